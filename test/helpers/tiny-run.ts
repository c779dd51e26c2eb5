import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { run } from './cli.js';

/**
 * A temp folder (its own MEDUSA_TRAIN_CACHE) with `distill`: data/prompts/demo.jsonl distilled greedily
 * by the embedded tiny model (32 short conversations, ~1 s), the small real dataset CLI tests train on
 * with configs/tiny.yaml.
 */
export async function tinyDistill(prefix: string): Promise<{ tmp: string; data: string }> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  process.env['MEDUSA_TRAIN_CACHE'] = path.join(tmp, 'cache');
  const data = path.join(tmp, 'distill');
  const d = await run('distill', '--input', 'data/prompts/demo.jsonl', '--out', data, '--temperature', '0', '--max-new-tokens', '48', '--max-total-tokens', '256', '--no-progress');
  if (d.code !== 0) throw new Error(`tiny distill failed (${d.code}): ${d.err}`);
  return { tmp, data };
}
