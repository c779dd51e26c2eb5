/**
 * Training examples from distilled datasets, the train/eval split, the per-epoch batch plan and
 * padded batches.
 *
 * Everything here is a pure function of its arguments (and of the dataset files), so a resumed run
 * plans exactly the batches an uninterrupted run plans: the split depends on (seed, example key), an
 * epoch's order on (seed, epoch, lengths) through `Rng(streamSeed(seed, epoch))`.
 *
 * Medusa head k (0-based) at position t predicts token t+k+2, so only loss-mask positions >= 2 can
 * ever be a label; `countValid` counts, per head, the positions that head is trained on.
 */
import { MedusaError } from '../errors.js';
import { Rng, streamSeed } from '../model/sampling.js';
import { iterateRecords, openDataset } from './dataset.js';

export interface TrainExample {
  /** `${datasetIndex}:${record.id}`: stable across runs, used by the eval split. */
  key: string;
  inputIds: Int32Array;
  lossMask: Uint8Array;
}

export interface LoadedDatasetInfo {
  /** Absolute path. */
  dir: string;
  meta: Record<string, string>;
  /** Rows in the dataset (before truncation and dropping). */
  rows: number;
  /** SHA-256 of each listed shard (from the manifest; readShard verifies them): what the data is, for cache fingerprints. */
  shardSha256: string[];
}

export interface LoadedExamples {
  examples: TrainExample[];
  datasets: LoadedDatasetInfo[];
  /** Conversations cut to maxSeqLen (counted whether or not they were then dropped). */
  truncated: number;
  /** Conversations dropped because no loss-mask 1 remains at a position >= 2 (after truncation). */
  droppedNoLabels: number;
  /** The `base_model_config_sha256` meta shared by every dataset. */
  baseModelConfigSha256: string;
  /** The `tokenizer_sha256` meta shared by every dataset. */
  tokenizerSha256: string;
}

/** Meta keys that must be present and identical in every dataset trained on together. */
export const SHARED_META_KEYS = ['base_model_config_sha256', 'tokenizer_sha256'] as const;

function internal(message: string): MedusaError {
  return new MedusaError('E_INTERNAL', message);
}

function checkInt(name: string, v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
    throw internal(`${name} must be an integer >= ${min}, got ${String(v)}`);
  }
  return v;
}

function checkSeed(seed: unknown): void {
  if (typeof seed !== 'number' || !Number.isSafeInteger(seed)) throw internal(`seed must be an integer, got ${String(seed)}`);
}

/**
 * Read every record of the datasets in `dirs` (in order), cut each to `maxSeqLen` tokens and drop the
 * ones left without a label. All datasets must have been made from the same base model config and
 * tokenizer (their `base_model_config_sha256` and `tokenizer_sha256` meta); otherwise E_CONFIG.
 */
export function loadExamples(dirs: string[], o: { maxSeqLen: number }): LoadedExamples {
  checkInt('maxSeqLen', o.maxSeqLen, 1);
  if (dirs.length === 0) throw new MedusaError('E_CONFIG', 'No dataset given: pass at least one folder written by `medusa-train distill`.');
  // Open (and validate the manifests of) every dataset before reading any shard.
  const opened = dirs.map((d) => openDataset(d));
  const seen = new Map<string, number>();
  opened.forEach((ds, i) => {
    const prev = seen.get(ds.dir);
    if (prev !== undefined) {
      throw new MedusaError('E_CONFIG', `Dataset ${ds.dir} is given twice (datasets ${prev} and ${i}); every conversation would be trained on twice. List each dataset once.`);
    }
    seen.set(ds.dir, i);
  });
  const shared: string[] = [];
  for (const key of SHARED_META_KEYS) {
    const first = opened[0].meta[key];
    if (first === undefined) {
      throw new MedusaError(
        'E_CONFIG',
        `Dataset ${opened[0].dir} has no ${key} in its meta, so it cannot be checked against the model; regenerate it with medusa-train distill.`,
      );
    }
    for (let i = 1; i < opened.length; i++) {
      const v = opened[i].meta[key];
      if (v !== first) {
        throw new MedusaError(
          'E_CONFIG',
          `Datasets ${opened[0].dir} and ${opened[i].dir} were made with different models: ${key} is ${JSON.stringify(first)} in ${opened[0].dir} ` +
            `but ${v === undefined ? '(missing)' : JSON.stringify(v)} in ${opened[i].dir}. Train on datasets distilled from the same base model and tokenizer.`,
        );
      }
    }
    shared.push(first);
  }

  const examples: TrainExample[] = [];
  let truncated = 0;
  let droppedNoLabels = 0;
  opened.forEach((ds, di) => {
    for (const rec of iterateRecords(ds)) {
      let ids = rec.inputIds;
      let mask = rec.lossMask;
      if (ids.length > o.maxSeqLen) {
        // slice (not subarray): let the full-length arrays be collected.
        ids = ids.slice(0, o.maxSeqLen);
        mask = mask.slice(0, o.maxSeqLen);
        truncated++;
      }
      let labeled = false;
      for (let p = 2; p < mask.length; p++) {
        if (mask[p] === 1) {
          labeled = true;
          break;
        }
      }
      if (!labeled) {
        droppedNoLabels++;
        continue;
      }
      examples.push({ key: `${di}:${rec.id}`, inputIds: ids, lossMask: mask });
    }
  });
  return {
    examples,
    datasets: opened.map((ds) => ({ dir: ds.dir, meta: { ...ds.meta }, rows: ds.rows, shardSha256: ds.manifest.shards.map((sh) => sh.sha256) })),
    truncated,
    droppedNoLabels,
    baseModelConfigSha256: shared[0],
    tokenizerSha256: shared[1],
  };
}

const utf8 = new TextEncoder();

/**
 * Stable 32-bit hash of (seed, key): FNV-1a over the key's UTF-8 bytes, starting from the FNV offset
 * basis mixed with the seed, then murmur3's finalizer so nearby keys spread over the whole range.
 */
export function splitHash(seed: number, key: string): number {
  let h = (0x811c9dc5 ^ streamSeed(seed >>> 0, 0x5eed)) >>> 0;
  for (const b of utf8.encode(key)) {
    h ^= b;
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * Deterministic train/eval split. An example goes to eval when splitHash(seed, key) / 2^32 < fraction,
 * at most `max` of them (those with the smallest hashes; ties by input position). Both splits keep
 * the input order. The same key always lands on the same side for a given seed, whatever else is in
 * the list (up to the `max` cap).
 */
export function splitEval(examples: TrainExample[], o: { fraction: number; max: number; seed: number }): { train: TrainExample[]; eval: TrainExample[] } {
  if (typeof o.fraction !== 'number' || !(o.fraction >= 0 && o.fraction <= 1)) throw internal(`eval fraction must be in [0, 1], got ${String(o.fraction)}`);
  checkInt('eval max', o.max, 0);
  checkSeed(o.seed);
  const limit = o.fraction * 4294967296;
  const candidates: { i: number; h: number }[] = [];
  examples.forEach((ex, i) => {
    const h = splitHash(o.seed, ex.key);
    if (h < limit) candidates.push({ i, h });
  });
  if (candidates.length > o.max) {
    candidates.sort((a, b) => a.h - b.h || a.i - b.i);
    candidates.length = o.max;
  }
  const inEval = new Uint8Array(examples.length);
  for (const c of candidates) inEval[c.i] = 1;
  const train: TrainExample[] = [];
  const evalSet: TrainExample[] = [];
  examples.forEach((ex, i) => (inEval[i] ? evalSet : train).push(ex));
  return { train, eval: evalSet };
}

/** Megabatch size as a multiple of the batch size (HF's LengthGroupedSampler uses 50). */
export const MEGABATCH_MULT = 50;

function shuffleInPlace<T>(a: T[], rng: Rng): void {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rng.next() * (i + 1));
    const t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

/**
 * The batches of one epoch, as lists of example indexes (into `lengths`); every index appears exactly
 * once, the last batch may be partial. Pure function of its arguments.
 *
 * - shuffle: Fisher–Yates with `Rng(streamSeed(seed, epoch))`; without it, input order.
 * - groupByLength (as HF's LengthGroupedSampler): the (shuffled) order is cut into megabatches of
 *   batchSize*50, each sorted by length descending (stable) and cut into batches. With shuffle, the
 *   order of the batches is then shuffled with the same rng. Finally the longest batch (largest
 *   maximum length, then most rows, then first) is swapped to position 0, so a batch that does not
 *   fit in memory fails at step 0, not hours later.
 */
export function planEpoch(lengths: number[], o: { batchSize: number; seed: number; epoch: number; shuffle: boolean; groupByLength: boolean }): number[][] {
  checkInt('batchSize', o.batchSize, 1);
  checkInt('epoch', o.epoch, 0);
  checkSeed(o.seed);
  const n = lengths.length;
  for (let i = 0; i < n; i++) checkInt(`lengths[${i}]`, lengths[i], 0);
  const order = Array.from({ length: n }, (_, i) => i);
  const rng = new Rng(streamSeed(o.seed >>> 0, o.epoch));
  if (o.shuffle) shuffleInPlace(order, rng);
  const batches: number[][] = [];
  if (!o.groupByLength) {
    for (let s = 0; s < n; s += o.batchSize) batches.push(order.slice(s, s + o.batchSize));
    return batches;
  }
  const mega = o.batchSize * MEGABATCH_MULT;
  for (let m = 0; m < n; m += mega) {
    const group = order.slice(m, m + mega).sort((a, b) => lengths[b] - lengths[a]); // Array.prototype.sort is stable
    for (let s = 0; s < group.length; s += o.batchSize) batches.push(group.slice(s, s + o.batchSize));
  }
  if (o.shuffle) shuffleInPlace(batches, rng);
  let best = 0;
  for (let b = 1; b < batches.length; b++) {
    // Within a batch lengths are descending, so element 0 is its longest.
    const lb = lengths[batches[b][0]];
    const lbest = lengths[batches[best][0]];
    if (lb > lbest || (lb === lbest && batches[b].length > batches[best].length)) best = b;
  }
  if (best !== 0) {
    const t = batches[0];
    batches[0] = batches[best];
    batches[best] = t;
  }
  return batches;
}

export interface PaddedBatch {
  /** Rows. */
  B: number;
  /** Longest row's length. */
  T: number;
  /** [B*T] token ids, right-padded with padId. */
  ids: Int32Array;
  /** [B*T] 1 on real tokens, 0 on padding. */
  attention: Uint8Array;
  /** [B*T] the examples' loss masks, 0 on padding. */
  lossMask: Uint8Array;
  /** Real length of each row. */
  lengths: number[];
  /** Index (into the examples list) of each row. */
  exampleIndexes: number[];
}

/** Right-pad the examples `indexes` (in that order) into one [B, T] batch. */
export function padBatch(examples: TrainExample[], indexes: number[], padId: number): PaddedBatch {
  if (indexes.length === 0) throw internal('padBatch: empty batch');
  checkInt('padId', padId, 0);
  let T = 0;
  for (const i of indexes) {
    if (!Number.isSafeInteger(i) || i < 0 || i >= examples.length) throw internal(`padBatch: example index ${i} out of range [0, ${examples.length})`);
    T = Math.max(T, examples[i].inputIds.length);
  }
  const B = indexes.length;
  const ids = new Int32Array(B * T).fill(padId);
  const attention = new Uint8Array(B * T);
  const lossMask = new Uint8Array(B * T);
  const lengths: number[] = [];
  indexes.forEach((i, b) => {
    const ex = examples[i];
    const len = ex.inputIds.length;
    if (ex.lossMask.length !== len) throw internal(`padBatch: example ${ex.key} has ${len} ids but ${ex.lossMask.length} loss-mask values`);
    ids.set(ex.inputIds, b * T);
    attention.fill(1, b * T, b * T + len);
    lossMask.set(ex.lossMask, b * T);
    lengths.push(len);
  });
  return { B, T, ids, attention, lossMask, lengths, exampleIndexes: indexes.slice() };
}

/**
 * Per head k (0..numHeads-1): the number of (b, t) with t+k+2 < length_b and lossMask[b, t+k+2] == 1,
 * i.e. the positions head k is trained on (its loss denominator). Equals the number of mask ones at
 * positions >= k+2 of each row, summed over rows.
 */
export function countValid(batch: PaddedBatch, numHeads: number): number[] {
  checkInt('numHeads', numHeads, 0);
  const counts = new Array<number>(numHeads).fill(0);
  for (let b = 0; b < batch.B; b++) {
    const row = b * batch.T;
    const len = batch.lengths[b];
    let total = 0;
    for (let p = 0; p < len; p++) total += batch.lossMask[row + p] === 1 ? 1 : 0;
    // ones before position k+2, grown one position per head
    let before = 0;
    for (let p = 0; p < Math.min(2, len); p++) before += batch.lossMask[row + p] === 1 ? 1 : 0;
    for (let k = 0; k < numHeads; k++) {
      const start = k + 2;
      if (start >= len) break;
      counts[k] += total - before;
      before += batch.lossMask[row + start] === 1 ? 1 : 0;
    }
  }
  return counts;
}
