/**
 * Step 1 of `npm run build:structured-model`: write the structured corpus (src/model/structured-corpus.ts)
 * as token ids for scripts/build_structured_model.py, the tokenizer files of the model, and the
 * held-out prompt file.
 *
 *   node dist/scripts/structured-corpus.js --out .scratch/structured-corpus [--count 30000] [--prompts data/prompts/structured.jsonl]
 *
 * Output folder:
 *   tokenizer/            tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json
 *   train_ids.bin         uint16 LE token ids of every training conversation, concatenated
 *   train_offsets.bin     uint32 LE, n+1 offsets into train_ids.bin (in tokens)
 *   train_mask.bin        uint8, 1 on tokens the assistant writes (its answer through <|im_end|>)
 *   heldout_*.bin         the same for the held-out conversations (user prompt + reference answer)
 *   meta.json             counts, seeds, vocabulary size, special ids, sha256 of every file above
 * Deterministic: the same arguments write the same bytes.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../src/errors.js';
import { Tokenizer } from '../src/data/tokenizer.js';
import { encodeChat } from '../src/data/chat.js';
import {
  HELDOUT_SEED, STRUCTURED_SEED, STRUCTURED_VOCAB_SIZE, buildStructuredTokenizer, heldOutSamples, sampleMessages, trainingSamples,
  type StructuredSample,
} from '../src/model/structured-corpus.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

const out = arg('out', '.scratch/structured-corpus');
const countText = arg('count', '30000');
const count = Number(countText);
if (!Number.isInteger(count) || count < 100) fail('E_USAGE', `--count ${countText}: expected an integer >= 100.`);
const promptsFile = arg('prompts', 'data/prompts/structured.jsonl');
/** Conversations whose text trains the BPE merges. */
const BPE_SAMPLES = 4000;

const heldOut = heldOutSamples(HELDOUT_SEED);
const train = trainingSamples(count, STRUCTURED_SEED, heldOut);
const tok = buildStructuredTokenizer(train.slice(0, BPE_SAMPLES));
if (tok.vocabSize !== STRUCTURED_VOCAB_SIZE) fail('E_INTERNAL', `structured tokenizer has ${tok.vocabSize} tokens, expected ${STRUCTURED_VOCAB_SIZE}`);

fs.mkdirSync(path.join(out, 'tokenizer'), { recursive: true });
const json = (file: string, v: unknown): void => fs.writeFileSync(file, `${JSON.stringify(v, null, 2)}\n`);
json(path.join(out, 'tokenizer', 'tokenizer.json'), tok.tokenizerJson);
json(path.join(out, 'tokenizer', 'tokenizer_config.json'), tok.tokenizerConfig);
json(path.join(out, 'tokenizer', 'special_tokens_map.json'), tok.specialTokensMap);
json(path.join(out, 'tokenizer', 'generation_config.json'), tok.generationConfig);

const tokenizer = await Tokenizer.load(path.join(out, 'tokenizer'));
const FIXED_NOW = new Date(0); // the template does not use the date; fixed anyway for determinism

/** Encode samples; returns the files' bytes. */
function encodeAll(samples: StructuredSample[]): { ids: Buffer; offsets: Buffer; mask: Buffer; tokens: number } {
  const ids: number[] = [];
  const mask: number[] = [];
  const offsets: number[] = [0];
  for (const s of samples) {
    const e = encodeChat(tokenizer, undefined, sampleMessages(s), { now: FIXED_NOW });
    for (const id of e.ids) if (id < 0 || id >= STRUCTURED_VOCAB_SIZE) fail('E_INTERNAL', `token id ${id} out of range`);
    ids.push(...e.ids);
    mask.push(...e.assistantMask);
    offsets.push(ids.length);
  }
  const idBuf = Buffer.alloc(ids.length * 2);
  ids.forEach((v, i) => idBuf.writeUInt16LE(v, 2 * i));
  const offBuf = Buffer.alloc(offsets.length * 4);
  offsets.forEach((v, i) => offBuf.writeUInt32LE(v, 4 * i));
  return { ids: idBuf, offsets: offBuf, mask: Buffer.from(mask), tokens: ids.length };
}

const t0 = Date.now();
const files: Record<string, string> = {};
const write = (name: string, b: Buffer): void => {
  fs.writeFileSync(path.join(out, name), b);
  files[name] = createHash('sha256').update(b).digest('hex');
};
const tr = encodeAll(train);
write('train_ids.bin', tr.ids);
write('train_offsets.bin', tr.offsets);
write('train_mask.bin', tr.mask);
const ho = encodeAll(heldOut);
write('heldout_ids.bin', ho.ids);
write('heldout_offsets.bin', ho.offsets);
write('heldout_mask.bin', ho.mask);
const taskCounts: Record<string, number> = {};
for (const s of train) taskCounts[s.task] = (taskCounts[s.task] ?? 0) + 1;
json(path.join(out, 'meta.json'), {
  format: 'medusa-train-structured-corpus',
  version: 1,
  seed: STRUCTURED_SEED,
  heldout_seed: HELDOUT_SEED,
  conversations: train.length,
  tokens: tr.tokens,
  task_counts: taskCounts,
  heldout_conversations: heldOut.length,
  heldout_tasks: heldOut.map((s) => s.task),
  heldout_tokens: ho.tokens,
  vocab_size: tok.vocabSize,
  pad_id: tok.specialTokens.pad.id,
  eos_ids: tok.eosTokenIds,
  tokenizer_sha256: tokenizer.hash,
  files,
});

fs.mkdirSync(path.dirname(promptsFile), { recursive: true });
fs.writeFileSync(promptsFile, heldOut.map((s, i) => JSON.stringify({ id: `structured-${String(i).padStart(3, '0')}`, prompt: s.prompt })).join('\n') + '\n');

console.log(
  `structured corpus: ${train.length} conversations, ${tr.tokens} tokens (${(tr.tokens / train.length).toFixed(1)} per conversation), ` +
    `${heldOut.length} held-out (${ho.tokens} tokens), vocab ${tok.vocabSize}; encoded in ${((Date.now() - t0) / 1000).toFixed(1)} s -> ${out}, ${promptsFile}`,
);
