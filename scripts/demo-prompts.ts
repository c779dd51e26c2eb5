/**
 * Writes data/prompts/structured-train.jsonl, the demo's training prompts (committed):
 *
 *   npm run build && node dist/scripts/demo-prompts.js [--out data/prompts/structured-train.jsonl]
 *
 * The first DEMO_TRAIN_PROMPTS.count distinct prompts of the structured corpus drawn from seed
 * DEMO_TRAIN_PROMPTS.seed (`trainingSamples` in src/model/structured-corpus.ts, which never yields a
 * held-out prompt of data/prompts/structured.jsonl); one `{"id","prompt"}` row each (no system
 * message, like the held-out file). Deterministic: always the same bytes; the demo CLI test checks
 * that the committed file equals `demoTrainPromptLines()`.
 */
import * as fs from 'node:fs';
import { demoTrainPromptLines, DEMO_TRAIN_PROMPTS } from '../src/recipes/demo.js';
import { packagePath } from '../src/paths.js';

const i = process.argv.indexOf('--out');
const out = i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : packagePath(...DEMO_TRAIN_PROMPTS.file);
const lines = demoTrainPromptLines();
fs.writeFileSync(out, `${lines.join('\n')}\n`);
console.log(`wrote ${lines.length} prompts to ${out}`);
