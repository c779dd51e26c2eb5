import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Rng } from '../src/model/sampling.js';
import { DatasetWriter, type DistilledRecord } from '../src/data/dataset.js';
import { countValid, loadExamples, padBatch, planEpoch, splitEval, type TrainExample } from '../src/data/batches.js';
import { fingerprintTag, hiddenCacheBytes, openHiddenCache, type CacheDtype, type CacheKind } from '../src/data/hidden-cache.js';
import { f16BitsToF32, f32ToF16Bits } from '../src/io/safetensors.js';
import { expectMedusa } from './helpers/errors.js';

let tmpRoot: string;
beforeAll(() => {
  tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-train-data-'));
});
afterAll(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true });
});
let counter = 0;
const freshDir = (): string => path.join(tmpRoot, `d${counter++}`);


const META = {
  base_model: '/models/tiny',
  base_model_config_sha256: 'ab'.repeat(32),
  tokenizer_sha256: 'cd'.repeat(32),
};

/** A user turn [0, a) then an assistant turn [a, n) whose first `masked` tokens have loss mask 1. */
function rec(index: number, n: number, a: number, masked: number, id = `conv-${index}`): DistilledRecord {
  const r = new Rng(index + 7);
  const ids = Array.from({ length: n }, () => Math.floor(r.next() * 1000));
  const mask = Array.from({ length: n }, (_, p) => (p >= a && p < a + masked ? 1 : 0));
  return { id, sourceIndex: index, inputIds: ids, lossMask: mask, turnRoles: ['user', 'assistant'], turnStarts: [0, a], turnEnds: [a, n], truncated: false };
}

function writeDataset(dir: string, records: DistilledRecord[], meta: Record<string, string> = META): void {
  const w = DatasetWriter.open(dir, { meta, topk: 0, mode: 'new' });
  w.appendShard(records, [], [], records[records.length - 1].sourceIndex + 1);
  w.finish({});
}

function example(key: string, ids: number[], mask: number[]): TrainExample {
  return { key, inputIds: Int32Array.from(ids), lossMask: Uint8Array.from(mask) };
}

describe('loadExamples', () => {
  test('truncates to maxSeqLen, drops conversations without labels at positions >= 2, counts both', () => {
    const a = freshDir();
    const b = freshDir();
    writeDataset(a, [
      rec(0, 10, 3, 5), // kept as is
      rec(1, 40, 5, 10), // truncated to 16, kept (labels at 5..14)
      rec(2, 40, 20, 10), // truncated to 16, no labels left -> dropped
      rec(3, 6, 0, 2), // labels only at positions 0, 1 -> dropped (no head can learn them)
      rec(4, 6, 2, 1), // a label at position 2 -> kept
    ]);
    writeDataset(b, [rec(0, 12, 4, 0), rec(1, 16, 4, 4, 'shared-id')]);
    const got = loadExamples([a, b], { maxSeqLen: 16 });
    expect(got.truncated).toBe(2);
    expect(got.droppedNoLabels).toBe(3);
    expect(got.examples.map((e) => e.key)).toEqual(['0:conv-0', '0:conv-1', '0:conv-4', '1:shared-id']);
    expect(got.examples.map((e) => e.inputIds.length)).toEqual([10, 16, 6, 16]);
    const full = rec(1, 40, 5, 10);
    expect(Array.from(got.examples[1].inputIds)).toEqual(Array.from(full.inputIds).slice(0, 16));
    expect(Array.from(got.examples[1].lossMask)).toEqual(Array.from(full.lossMask).slice(0, 16));
    expect(got.examples[1].inputIds).toBeInstanceOf(Int32Array);
    expect(got.examples[1].lossMask).toBeInstanceOf(Uint8Array);
    expect(got.examples[1].inputIds.buffer.byteLength).toBe(16 * 4); // not a view of the 40-token array
    expect(got.datasets.map((d) => [d.dir, d.rows])).toEqual([
      [path.resolve(a), 5],
      [path.resolve(b), 2],
    ]);
    expect(got.datasets[0].meta).toEqual(META);
    expect(got.datasets[0].shardSha256).toHaveLength(1);
    expect(got.datasets[0].shardSha256[0]).toMatch(/^[0-9a-f]{64}$/);
    expect(got.baseModelConfigSha256).toBe(META.base_model_config_sha256);
    expect(got.tokenizerSha256).toBe(META.tokenizer_sha256);
    // No truncation with a generous limit.
    const all = loadExamples([a], { maxSeqLen: 1000 });
    expect(all.truncated).toBe(0);
    expect(all.droppedNoLabels).toBe(1);
  });

  test('datasets of different models or tokenizers are refused, naming both folders and values', () => {
    const a = freshDir();
    const b = freshDir();
    writeDataset(a, [rec(0, 10, 3, 5)]);
    writeDataset(b, [rec(0, 10, 3, 5)], { ...META, tokenizer_sha256: 'ef'.repeat(32) });
    expectMedusa(() => loadExamples([a, b], { maxSeqLen: 16 }), 'E_CONFIG', a, b, 'tokenizer_sha256', 'cd'.repeat(32), 'ef'.repeat(32));
    const c = freshDir();
    writeDataset(c, [rec(0, 10, 3, 5)], { ...META, base_model_config_sha256: '12'.repeat(32) });
    expectMedusa(() => loadExamples([a, c], { maxSeqLen: 16 }), 'E_CONFIG', a, c, 'base_model_config_sha256', 'ab'.repeat(32), '12'.repeat(32));
    const d = freshDir();
    const { tokenizer_sha256: _drop, ...noTok } = META;
    void _drop;
    writeDataset(d, [rec(0, 10, 3, 5)], noTok);
    expectMedusa(() => loadExamples([a, d], { maxSeqLen: 16 }), 'E_CONFIG', d, '(missing)');
    expectMedusa(() => loadExamples([d], { maxSeqLen: 16 }), 'E_CONFIG', d, 'tokenizer_sha256');
    expectMedusa(() => loadExamples([a, a], { maxSeqLen: 16 }), 'E_CONFIG', 'twice');
    expectMedusa(() => loadExamples([], { maxSeqLen: 16 }), 'E_CONFIG');
    expectMedusa(() => loadExamples([freshDir()], { maxSeqLen: 16 }), 'E_IO');
  });
});

describe('splitEval', () => {
  const examples = Array.from({ length: 2000 }, (_, i) => example(`${i % 3}:conv-${i}`, [1, 2, 3], [0, 0, 1]));

  test('deterministic per seed, different across seeds, order kept, fraction respected', () => {
    const s1 = splitEval(examples, { fraction: 0.1, max: 10_000, seed: 1 });
    const s1b = splitEval(examples, { fraction: 0.1, max: 10_000, seed: 1 });
    const s2 = splitEval(examples, { fraction: 0.1, max: 10_000, seed: 2 });
    expect(s1.eval.map((e) => e.key)).toEqual(s1b.eval.map((e) => e.key));
    expect(s1.eval.map((e) => e.key)).not.toEqual(s2.eval.map((e) => e.key));
    expect(s1.train.length + s1.eval.length).toBe(examples.length);
    expect(s1.eval.length).toBeGreaterThan(150);
    expect(s1.eval.length).toBeLessThan(250);
    // input order within each split, and a partition
    const pos = new Map(examples.map((e, i) => [e.key, i]));
    for (const part of [s1.train, s1.eval]) {
      const idx = part.map((e) => pos.get(e.key)!);
      expect(idx).toEqual(idx.slice().sort((x, y) => x - y));
    }
    expect(new Set([...s1.train, ...s1.eval]).size).toBe(examples.length);
    // membership depends on the key only: a subset splits the same way
    const sub = examples.filter((_, i) => i % 2 === 0);
    const ssub = splitEval(sub, { fraction: 0.1, max: 10_000, seed: 1 });
    expect(ssub.eval.map((e) => e.key)).toEqual(s1.eval.filter((e) => pos.get(e.key)! % 2 === 0).map((e) => e.key));
  });

  test('max caps the eval split (keeping the first by hash), fraction 0 and 1', () => {
    const full = splitEval(examples, { fraction: 0.2, max: 100_000, seed: 5 });
    const capped = splitEval(examples, { fraction: 0.2, max: 25, seed: 5 });
    expect(capped.eval.length).toBe(25);
    expect(capped.train.length).toBe(examples.length - 25);
    const fullKeys = new Set(full.eval.map((e) => e.key));
    for (const e of capped.eval) expect(fullKeys.has(e.key)).toBe(true);
    // a smaller fraction selects a subset of a larger one (same hash threshold ordering)
    const smaller = splitEval(examples, { fraction: 0.05, max: 100_000, seed: 5 });
    for (const e of smaller.eval) expect(fullKeys.has(e.key)).toBe(true);
    expect(splitEval(examples, { fraction: 0, max: 100, seed: 5 }).eval).toEqual([]);
    expect(splitEval(examples, { fraction: 1, max: 100_000, seed: 5 }).train).toEqual([]);
    expect(splitEval(examples, { fraction: 1, max: 0, seed: 5 }).eval).toEqual([]);
    expectMedusa(() => splitEval(examples, { fraction: 1.5, max: 1, seed: 5 }), 'E_INTERNAL');
  });
});

describe('planEpoch', () => {
  const r = new Rng(42);
  const lengths = Array.from({ length: 1003 }, () => 1 + Math.floor(r.next() * 500));
  const padded = (plan: number[][]): number => plan.reduce((s, b) => s + b.length * Math.max(...b.map((i) => lengths[i])), 0);
  const base = { batchSize: 8, seed: 3, epoch: 0, shuffle: true, groupByLength: false };

  const expectPermutation = (plan: number[][], n: number, batchSize: number): void => {
    const flat = plan.flat();
    expect(flat.length).toBe(n);
    expect(new Set(flat).size).toBe(n);
    expect(Math.min(...flat)).toBe(0);
    expect(Math.max(...flat)).toBe(n - 1);
    expect(plan.length).toBe(Math.ceil(n / batchSize));
    expect(plan.filter((b) => b.length !== batchSize).length).toBeLessThanOrEqual(1);
  };

  test.each([
    [true, false],
    [true, true],
    [false, true],
    [false, false],
  ])('shuffle=%s groupByLength=%s: every index once, deterministic, varies by epoch when shuffled', (shuffle, groupByLength) => {
    const o = { ...base, shuffle, groupByLength };
    const p0 = planEpoch(lengths, o);
    expectPermutation(p0, lengths.length, 8);
    expect(planEpoch(lengths, o)).toEqual(p0);
    const p1 = planEpoch(lengths, { ...o, epoch: 1 });
    expectPermutation(p1, lengths.length, 8);
    if (shuffle) {
      expect(p1).not.toEqual(p0);
      expect(planEpoch(lengths, { ...o, seed: 4 })).not.toEqual(p0);
    } else {
      expect(p1).toEqual(p0);
    }
  });

  test('plain order without shuffle is the input order', () => {
    const p = planEpoch([5, 6, 7, 8, 9], { ...base, batchSize: 2, shuffle: false });
    expect(p).toEqual([[0, 1], [2, 3], [4]]);
    expect(planEpoch([], base)).toEqual([]);
  });

  test('groupByLength reduces padding and puts the longest batch first', () => {
    const plain = planEpoch(lengths, base);
    const grouped = planEpoch(lengths, { ...base, groupByLength: true });
    const real = lengths.reduce((a, b) => a + b, 0);
    expect(padded(grouped)).toBeLessThan(padded(plain));
    expect(padded(grouped) - real).toBeLessThan((padded(plain) - real) / 4);
    const maxLen = Math.max(...lengths);
    expect(Math.max(...grouped[0].map((i) => lengths[i]))).toBe(maxLen);
    expect(grouped[0].length).toBe(8);
    // batches within a megabatch come sorted by length, descending
    for (const b of grouped) for (let j = 1; j < b.length; j++) expect(lengths[b[j - 1]]).toBeGreaterThanOrEqual(lengths[b[j]]);
  });
});

describe('padBatch / countValid', () => {
  const examples = [
    example('0:a', [5, 6, 7, 8, 9], [0, 0, 1, 1, 1]),
    example('0:b', [1, 2], [0, 1]),
    example('0:c', [3, 3, 3, 3, 3, 3, 3], [0, 1, 0, 1, 1, 0, 1]),
  ];

  test('layout: right padding, attention, loss mask, lengths, indexes', () => {
    const b = padBatch(examples, [2, 0, 1], 99);
    expect(b.B).toBe(3);
    expect(b.T).toBe(7);
    expect(Array.from(b.ids)).toEqual([3, 3, 3, 3, 3, 3, 3, 5, 6, 7, 8, 9, 99, 99, 1, 2, 99, 99, 99, 99, 99]);
    expect(Array.from(b.attention)).toEqual([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
    expect(Array.from(b.lossMask)).toEqual([0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    expect(b.lengths).toEqual([7, 5, 2]);
    expect(b.exampleIndexes).toEqual([2, 0, 1]);
    expectMedusa(() => padBatch(examples, [], 0), 'E_INTERNAL');
    expectMedusa(() => padBatch(examples, [3], 0), 'E_INTERNAL');
  });

  test('countValid equals a brute-force count', () => {
    const brute = (b: ReturnType<typeof padBatch>, K: number): number[] => {
      const out = new Array<number>(K).fill(0);
      for (let k = 0; k < K; k++)
        for (let i = 0; i < b.B; i++)
          for (let t = 0; t < b.T; t++) if (t + k + 2 < b.lengths[i] && b.lossMask[i * b.T + t + k + 2] === 1) out[k]++;
      return out;
    };
    const small = padBatch(examples, [0, 1, 2], 0);
    expect(countValid(small, 4)).toEqual([6, 5, 3, 1]) // a: 3,2,1,0  b: 0  c: 3,3,2,1;
    expect(countValid(small, 4)).toEqual(brute(small, 4));
    const r = new Rng(9);
    for (let trial = 0; trial < 30; trial++) {
      const exs = Array.from({ length: 1 + Math.floor(r.next() * 6) }, (_, i) => {
        const n = 1 + Math.floor(r.next() * 20);
        return example(`x:${i}`, Array.from({ length: n }, () => 1), Array.from({ length: n }, () => (r.next() < 0.5 ? 1 : 0)));
      });
      const b = padBatch(exs, exs.map((_, i) => i).reverse(), 0);
      const K = 1 + Math.floor(r.next() * 25);
      expect(countValid(b, K)).toEqual(brute(b, K));
    }
    expect(countValid(small, 0)).toEqual([]);
  });
});

describe('hidden cache', () => {
  const d = 6;
  const lengths = [3, 0, 5, 1, 4];
  const r = new Rng(11);
  /** Random hidden states with a wide range of magnitudes, including f16 subnormals and ties. */
  const data = lengths.map((len) =>
    Float32Array.from({ length: len * d }, (_, j) => {
      const x = (r.next() - 0.5) * 2 ** Math.floor(r.next() * 40 - 30);
      return j === 0 ? 1 + 2 ** -11 : j === 1 ? -0 : j === 2 ? 65504 : x; // tie -> even, -0, f16 max
    }),
  );
  const bytes = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const f16Round = (a: Float32Array): Float32Array => Float32Array.from(a, (x) => f16BitsToF32(f32ToF16Bits(x)));

  const fill = (kind: CacheKind, dtype: CacheDtype, dir?: string, fingerprint = 'fp-1') => {
    const c = openHiddenCache({ kind, dtype, hiddenSize: d, lengths, dir, fingerprint });
    expect(c.complete).toBe(false);
    // out of order, as batches sorted by length fill it
    for (const i of [2, 0, 4, 1, 3]) {
      expect(c.has(i)).toBe(false);
      c.put(i, data[i]);
      expect(c.has(i)).toBe(true);
    }
    return c;
  };

  test('hiddenCacheBytes', () => {
    expect(hiddenCacheBytes(lengths, d, 'f32')).toBe(13 * d * 4);
    expect(hiddenCacheBytes(lengths, d, 'f16')).toBe(13 * d * 2);
  });

  test.each(['memory', 'disk'] as const)('%s: f32 round trip is exact, f16 equals f16 rounding', (kind) => {
    for (const dtype of ['f32', 'f16'] as const) {
      const dir = kind === 'disk' ? freshDir() : undefined;
      const c = fill(kind, dtype, dir);
      for (let i = 0; i < lengths.length; i++) {
        const got = c.get(i);
        expect(got).toBeInstanceOf(Float32Array);
        const want = dtype === 'f32' ? data[i] : f16Round(data[i]);
        expect(bytes(got).equals(bytes(want))).toBe(true);
      }
      if (dtype === 'f16') expect(c.get(0)[0]).toBe(1); // 1 + 2^-11 is a tie: rounds to even
      // the returned array is a copy: mutating it does not change the cache
      c.get(2).fill(7);
      expect(c.get(2)[3]).not.toBe(7);
      c.finalize();
      expect(c.complete).toBe(true);
      expectMedusa(() => c.put(0, data[0]), 'E_INTERNAL', 'complete');
      c.close();
      expectMedusa(() => c.get(0), 'E_INTERNAL', 'close');
      if (kind === 'disk') {
        const tag = fingerprintTag('fp-1');
        expect(fs.statSync(path.join(dir!, `hidden-${tag}.bin`)).size).toBe(hiddenCacheBytes(lengths, d, dtype));
        const side = JSON.parse(fs.readFileSync(path.join(dir!, `hidden-${tag}.json`), 'utf8')) as Record<string, unknown>;
        expect(side).toMatchObject({ fingerprint: 'fp-1', hiddenSize: d, dtype, count: lengths.length, complete: true });
      }
    }
  });

  test('misuse: wrong length, get before put, finalize with a missing example', () => {
    const c = openHiddenCache({ kind: 'memory', dtype: 'f32', hiddenSize: d, lengths, fingerprint: 'x' });
    expectMedusa(() => c.put(0, new Float32Array(5)), 'E_INTERNAL', '18');
    expectMedusa(() => c.get(0), 'E_INTERNAL');
    expectMedusa(() => c.put(9, data[0]), 'E_INTERNAL', 'out of range');
    c.put(0, data[0]);
    expectMedusa(() => c.finalize(), 'E_INTERNAL', 'example 1');
    expectMedusa(() => openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, fingerprint: 'x' }), 'E_INTERNAL', 'dir');
  });

  test('disk: a complete cache is reused; a different fingerprint, lengths or dtype, or an incomplete one, is rebuilt', () => {
    const dir = freshDir();
    fill('disk', 'f16', dir).finalize();
    const again = openHiddenCache({ kind: 'disk', dtype: 'f16', hiddenSize: d, lengths, dir, fingerprint: 'fp-1' });
    expect(again.complete).toBe(true);
    expect(again.discarded).toBeNull();
    for (let i = 0; i < lengths.length; i++) {
      expect(again.has(i)).toBe(true);
      expect(bytes(again.get(i)).equals(bytes(f16Round(data[i])))).toBe(true);
    }
    again.close();

    // A different fingerprint never reuses it (and leaves it alone).
    const other = openHiddenCache({ kind: 'disk', dtype: 'f16', hiddenSize: d, lengths, dir, fingerprint: 'fp-2' });
    expect(other.complete).toBe(false);
    expect(other.has(0)).toBe(false);
    other.close();
    // Same fingerprint but other settings: discarded with the reason.
    const dtypeChanged = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-1' });
    expect(dtypeChanged.complete).toBe(false);
    expect(dtypeChanged.discarded).toContain('dtype');
    dtypeChanged.close();
    // ... which removed the old one: reopening as f16 rebuilds as well (the sidecar is f32 and incomplete now)
    const f16Again = openHiddenCache({ kind: 'disk', dtype: 'f16', hiddenSize: d, lengths, dir, fingerprint: 'fp-1' });
    expect(f16Again.complete).toBe(false);
    f16Again.close();

    const lenChanged = fill('disk', 'f32', dir, 'fp-3');
    lenChanged.finalize();
    lenChanged.close();
    const l2 = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths: [3, 0, 5, 1, 5], dir, fingerprint: 'fp-3' });
    expect(l2.complete).toBe(false);
    expect(l2.discarded).toMatch(/lengthsHash|bytes/);
    l2.close();

    // Incomplete (crash before finalize): rebuilt.
    const part = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-4' });
    part.put(0, data[0]);
    part.close();
    const resumed = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-4' });
    expect(resumed.complete).toBe(false);
    expect(resumed.discarded).toContain('incomplete');
    expect(resumed.has(0)).toBe(false);
    resumed.close();

    // A sidecar that says complete over a truncated data file, and a corrupt sidecar: rebuilt.
    const tag = fingerprintTag('fp-5');
    fill('disk', 'f32', dir, 'fp-5').finalize();
    fs.truncateSync(path.join(dir, `hidden-${tag}.bin`), 10);
    const cut = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-5' });
    expect(cut.complete).toBe(false);
    expect(cut.discarded).toContain('bytes');
    cut.close();
    fs.writeFileSync(path.join(dir, `hidden-${tag}.json`), '{"complete": tru');
    const bad = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-5' });
    expect(bad.complete).toBe(false);
    expect(bad.discarded).toContain('JSON');
    // rebuilt from scratch: filling and finalizing gives a reusable cache again
    for (let i = 0; i < lengths.length; i++) bad.put(i, data[i]);
    bad.finalize();
    bad.close();
    const ok = openHiddenCache({ kind: 'disk', dtype: 'f32', hiddenSize: d, lengths, dir, fingerprint: 'fp-5' });
    expect(ok.complete).toBe(true);
    expect(bytes(ok.get(4)).equals(bytes(data[4]))).toBe(true);
    ok.close();
  });

  test.each(['memory', 'disk'] as const)('%s: values beyond the f16 range are an error naming the example; non-finite values are refused', (kind) => {
    const c = openHiddenCache({ kind, dtype: 'f16', hiddenSize: 2, lengths: [1, 2], dir: kind === 'disk' ? freshDir() : undefined, fingerprint: 'r' });
    c.put(0, Float32Array.from([65519, -65519])); // rounds to ±65504
    expect(Array.from(c.get(0))).toEqual([65504, -65504]);
    expectMedusa(() => c.put(1, Float32Array.from([1, 2, 3, -70000])), 'E_CONFIG', 'example 1', '-70000', 'f32');
    expect(c.has(1)).toBe(false);
    expectMedusa(() => c.put(1, Float32Array.from([65520, 0, 0, 0])), 'E_CONFIG', 'example 1');
    expectMedusa(() => c.put(1, Float32Array.from([0, NaN, 0, 0])), 'E_ENGINE', 'example 1');
    c.close();
    const f32 = openHiddenCache({ kind, dtype: 'f32', hiddenSize: 2, lengths: [1], dir: kind === 'disk' ? freshDir() : undefined, fingerprint: 'r' });
    f32.put(0, Float32Array.from([1e30, -1e30])); // fine in f32
    f32.put(0, Float32Array.from([1e30, -1e30])); // a second put overwrites until complete
    expectMedusa(() => f32.put(0, Float32Array.from([Infinity, 0])), 'E_ENGINE', 'example 0');
    expect(Array.from(f32.get(0))).toEqual([Math.fround(1e30), Math.fround(-1e30)]);
    f32.close();
  });
});
