/**
 * The onnx backbone (one ONNX graph in onnxruntime-node) against the PyTorch goldens
 * (test/fixtures/decoder) and against the tfjs reference engine, plus its size refusal.
 */
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { isMedusaError } from '../src/errors.js';
import { loadDecoder } from '../src/model/load.js';
import { parseDecoderConfig } from '../src/model/config.js';
import type { Decoder } from '../src/model/decoder.js';
import { argmax, Rng } from '../src/model/sampling.js';
import { disposeWeights } from '../src/model/weights.js';
import { chooseBackbone, onnxBackbone, tfjsBackbone, type Backbone } from '../src/engines/decoder-engine.js';
import { checkOnnxModelSize, onnxWeightBytes, PROTOBUF_LIMIT_BYTES, TreeInputCache } from '../src/engines/onnx-decoder.js';
import { hostInputs, type CacheBook } from '../src/model/decoder.js';
import { treeBuffers } from '../src/eval/tree.js';
import { DECODER_FIXTURES, VARIANTS, readGolden, maxAbsDiff } from './helpers/golden.js';

const TOL = 1e-4;

// onnxruntime outputs under Jest: see test/setup/realm.ts (jest setupFiles).

beforeAll(async () => {
  await initBackend('wasm');
});

/** Greedy decoding with the backbone's cache: prompt prefill, then one token per step. */
async function greedyCached(bb: Backbone, prompt: number[], n: number, onStep?: (s: number, logits: Float32Array) => void): Promise<number[]> {
  const cache = bb.newCache(1);
  const got: number[] = [];
  let input = prompt;
  try {
    for (let s = 0; s < n; s++) {
      const { logits } = await bb.forward({ ids: input, batch: 1, seqLen: input.length, cache, logits: 'last' });
      onStep?.(s, logits!);
      const tok = argmax(logits!);
      got.push(tok);
      input = [tok];
    }
  } finally {
    cache.dispose();
  }
  return got;
}

async function expectCode(p: Promise<unknown> | (() => unknown), code: string, pattern?: RegExp): Promise<void> {
  try {
    if (typeof p === 'function') p();
    else await p;
  } catch (e) {
    expect(isMedusaError(e)).toBe(true);
    expect((e as { code: string }).code).toBe(code);
    if (pattern) expect((e as Error).message).toMatch(pattern);
    return;
  }
  throw new Error(`expected ${code}`);
}

describe.each(VARIANTS)('onnx backbone: %s', (variant) => {
  let model: Decoder;
  let bb: Backbone;
  const g = readGolden(variant);
  beforeAll(async () => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    bb = await onnxBackbone(model, { threads: 1 });
  });
  afterAll(() => {
    bb.dispose();
    disposeWeights(model.weights);
  });

  test('padded batch forward: hidden states and logits match PyTorch within 1e-4', async () => {
    const [B, T] = g['input_ids'].shape;
    const mask = g['attention_mask'].data as number[];
    const { hidden, logits } = await bb.forward({ ids: g['input_ids'].data, batch: B, seqLen: T, mask, logits: 'all' });
    const d = model.config.hiddenSize;
    const V = model.config.vocabSize;
    expect(hidden.length).toBe(B * T * d);
    expect(logits!.length).toBe(B * T * V);
    const realH: number[] = [];
    const realL: number[] = [];
    for (let p = 0; p < B * T; p++) {
      if (mask[p] === 0) continue;
      for (let i = 0; i < d; i++) realH.push(p * d + i);
      for (let i = 0; i < V; i++) realL.push(p * V + i);
    }
    expect(realH.length).toBeGreaterThan(0);
    expect(maxAbsDiff(hidden, g['hidden'].data, realH)).toBeLessThan(TOL);
    expect(maxAbsDiff(logits!, g['logits'].data, realL)).toBeLessThan(TOL);
    // 'last' gives each row's last position, 'none' no logits.
    const last = await bb.forward({ ids: g['input_ids'].data, batch: B, seqLen: T, mask, logits: 'last' });
    for (let b = 0; b < B; b++) {
      expect(maxAbsDiff(last.logits!.subarray(b * V, (b + 1) * V), (g['logits'].data as Float32Array).subarray((b * T + T - 1) * V, (b * T + T) * V))).toBeLessThan(TOL);
    }
    const none = await bb.forward({ ids: g['input_ids'].data, batch: B, seqLen: T, mask, logits: 'none' });
    expect(none.logits).toBeNull();
    expect(maxAbsDiff(none.hidden, g['hidden'].data, realH)).toBeLessThan(TOL);
  });

  test('unpadded single row matches PyTorch', async () => {
    const [, T] = g['input_ids'].shape;
    const ids = (g['input_ids'].data as number[]).slice(T, 2 * T);
    const mask = (g['attention_mask'].data as number[]).slice(T, 2 * T);
    const real = ids.filter((_, i) => mask[i] === 1);
    const { hidden, logits } = await bb.forward({ ids: real, batch: 1, seqLen: real.length, logits: 'all' });
    expect(maxAbsDiff(hidden, g['single_hidden'].data)).toBeLessThan(TOL);
    expect(maxAbsDiff(logits!, g['single_logits'].data)).toBeLessThan(TOL);
  });

  test('KV-cached decoding: step logits match PyTorch, greedy tokens equal greedy_ids', async () => {
    const prompt = g['greedy_prompt'].data as number[];
    const expected = g['greedy_ids'].data as number[];
    const stepLogits = g['decode_logits'].data as Float32Array;
    const V = model.config.vocabSize;
    const diffs: number[] = [];
    const got = await greedyCached(bb, prompt, expected.length, (s, l) => diffs.push(maxAbsDiff(l, stepLogits.subarray(s * V, (s + 1) * V))));
    expect(Math.max(...diffs)).toBeLessThan(TOL);
    expect(got).toEqual(expected);
  });
});

describe('onnx backbone vs tfjs backbone', () => {
  test.each(['llama-gqa', 'mistral-window', 'qwen3-qknorm'] as const)('%s: random padded batch, prefill + cached steps (with finished rows and multi-token blocks) agree within 1e-4', async (variant) => {
    const model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    const onnx = await onnxBackbone(model);
    const ref = tfjsBackbone(model);
    const c = model.config;
    const d = c.hiddenSize;
    const V = c.vocabSize;
    const rng = new Rng(7);
    const B = 3;
    const lens = [9, 4, 1];
    const T = Math.max(...lens);
    const ids: number[] = [];
    const mask: number[] = [];
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T; t++) {
        const real = t >= T - lens[b];
        ids.push(real ? 3 + Math.floor(rng.next() * (V - 3)) : 0);
        mask.push(real ? 1 : 0);
      }
    }
    const realIndex = (m: number[], width: number): number[] => m.flatMap((x, p) => (x ? Array.from({ length: width }, (_, i) => p * width + i) : []));
    // Without a cache.
    {
      const a = await onnx.forward({ ids, batch: B, seqLen: T, mask, logits: 'all' });
      const r = await ref.forward({ ids, batch: B, seqLen: T, mask, logits: 'all' });
      expect(maxAbsDiff(a.hidden, r.hidden, realIndex(mask, d))).toBeLessThan(TOL);
      expect(maxAbsDiff(a.logits!, r.logits!, realIndex(mask, V))).toBeLessThan(TOL);
    }
    // Prefill into a cache, then single-token steps (row 1 finishes after step 2 and gets masked
    // padding), then a 3-token block with padding in the middle row.
    const ca = onnx.newCache(B);
    const cr = ref.newCache(B);
    const pa = await onnx.forward({ ids, batch: B, seqLen: T, mask, cache: ca, logits: 'last' });
    const pr = await ref.forward({ ids, batch: B, seqLen: T, mask, cache: cr, logits: 'last' });
    expect(maxAbsDiff(pa.hidden, pr.hidden, realIndex(mask, d))).toBeLessThan(TOL);
    expect(maxAbsDiff(pa.logits!, pr.logits!)).toBeLessThan(TOL);
    let logits = pa.logits!;
    for (let s = 0; s < 6; s++) {
      const next: number[] = [];
      const nextMask: number[] = [];
      for (let b = 0; b < B; b++) {
        const done = b === 1 && s >= 2;
        next.push(done ? 0 : argmax(logits.subarray(b * V, (b + 1) * V)));
        nextMask.push(done ? 0 : 1);
      }
      const a = await onnx.forward({ ids: next, batch: B, seqLen: 1, mask: nextMask, cache: ca, logits: 'last' });
      const r = await ref.forward({ ids: next, batch: B, seqLen: 1, mask: nextMask, cache: cr, logits: 'last' });
      expect(maxAbsDiff(a.hidden, r.hidden, realIndex(nextMask, d))).toBeLessThan(TOL);
      expect(maxAbsDiff(a.logits!, r.logits!, realIndex(nextMask, V))).toBeLessThan(TOL);
      logits = a.logits!;
    }
    const block = [5, 6, 7, 0, 8, 9, 10, 11, 12];
    const blockMask = [1, 1, 1, 0, 1, 1, 1, 1, 1];
    const a = await onnx.forward({ ids: block, batch: B, seqLen: 3, mask: blockMask, cache: ca, logits: 'all' });
    const r = await ref.forward({ ids: block, batch: B, seqLen: 3, mask: blockMask, cache: cr, logits: 'all' });
    expect(maxAbsDiff(a.hidden, r.hidden, realIndex(blockMask, d))).toBeLessThan(TOL);
    expect(maxAbsDiff(a.logits!, r.logits!, realIndex(blockMask, V))).toBeLessThan(TOL);
    expect(ca.length).toBe(cr.length);
    expect(ca.length).toBe(T + 6 + 3);
    ca.dispose();
    cr.dispose();
    onnx.dispose();
    disposeWeights(model.weights);
  });

  test('a left-padded row equals the row alone across cached steps (sliding window beyond its width)', async () => {
    const model = loadDecoder(path.join(DECODER_FIXTURES, 'mistral-window')).decoder;
    const bb = await onnxBackbone(model);
    const prompts = [[5, 9, 17, 33, 40, 41, 7], [12, 13]];
    const n = 8;
    const single = await Promise.all(prompts.map((p) => greedyCached(bb, p, n)));
    const B = 2;
    const P = 7;
    const ids = [...prompts[0], 0, 0, 0, 0, 0, ...prompts[1]];
    const mask = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1];
    const cache = bb.newCache(B);
    const V = model.config.vocabSize;
    let { logits } = await bb.forward({ ids, batch: B, seqLen: P, mask, cache, logits: 'last' });
    const batched: number[][] = [[], []];
    for (let s = 0; s < n; s++) {
      const next = [0, 1].map((b) => argmax(logits!.subarray(b * V, (b + 1) * V)));
      next.forEach((t, b) => batched[b].push(t));
      ({ logits } = await bb.forward({ ids: next, batch: B, seqLen: 1, cache, logits: 'last' }));
    }
    expect(batched).toEqual(single);
    cache.dispose();
    bb.dispose();
    disposeWeights(model.weights);
  });
});

/** Every position's argmax (first maximum) of logits [n, V]. */
function argmaxRows(logits: Float32Array, V: number): number[] {
  return Array.from({ length: logits.length / V }, (_, n) => argmax(logits, n * V, V));
}

/** A Medusa-shaped tree of 3 levels (ranks up to 3): 1 + 4 + 16 + ... nodes. */
const TREE_CHOICES = [[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [3, 2]];

describe.each(['llama-gqa', 'mistral-window', 'qwen2-bias-tied'] as const)("logits: 'argmax' (%s)", (variant) => {
  let model: Decoder;
  let engines: Backbone[];
  beforeAll(async () => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    engines = [tfjsBackbone(model), await onnxBackbone(model, { threads: 1 })];
  });
  afterAll(() => {
    for (const e of engines) e.dispose();
    disposeWeights(model.weights);
  });

  test("equals the argmax of the 'all' logits: padded batch without a cache, then a tree-masked forward on a cache, on both engines", async () => {
    const V = model.config.vocabSize;
    const rng = new Rng(11);
    const tok = (): number => 3 + Math.floor(rng.next() * (V - 3));
    const B = 2;
    const T = 7;
    const ids = Array.from({ length: B * T }, tok);
    const mask = [1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1];
    const tree = treeBuffers(TREE_CHOICES, 4);
    const N = tree.nodes;
    const prompt = Array.from({ length: 9 }, tok);
    const treeIds = Array.from({ length: N }, tok);
    const picked: number[][] = [];
    for (const bb of engines) {
      const all = await bb.forward({ ids, batch: B, seqLen: T, mask, logits: 'all' });
      const am = await bb.forward({ ids, batch: B, seqLen: T, mask, logits: 'argmax' });
      expect(am.logits).toBeNull();
      expect(am.argmax).toBeInstanceOf(Int32Array);
      expect(Array.from(am.argmax!)).toEqual(argmaxRows(all.logits!, V));
      expect(maxAbsDiff(am.hidden, all.hidden)).toBeLessThan(1e-6);
      // Tree verification: the same cache state twice, 'all' on one, 'argmax' on the other.
      const results = [];
      for (const mode of ['all', 'argmax'] as const) {
        const cache = bb.newCache(1);
        await bb.forward({ ids: prompt, batch: 1, seqLen: prompt.length, cache, logits: 'none' });
        const positions = Int32Array.from(tree.positionOffsets, (p) => prompt.length + p);
        results.push(await bb.forward({ ids: treeIds, batch: 1, seqLen: N, cache, logits: mode, treeMask: { mask: tree.attentionMask, positions } }));
        expect(cache.length).toBe(prompt.length + N);
        cache.dispose();
      }
      const want = argmaxRows(results[0].logits!, V);
      expect(Array.from(results[1].argmax!)).toEqual(want);
      expect(maxAbsDiff(results[1].hidden, results[0].hidden)).toBeLessThan(1e-6);
      picked.push(want);
    }
    // Both engines pick the same tokens (the logits agree within 1e-4; ties aside).
    expect(picked[1]).toEqual(picked[0]);
  });
});

describe('tree host inputs cached per tree (onnx engine)', () => {
  test.each(['llama-gqa', 'mistral-window'] as const)('%s: equal to hostInputs for random cache states, steps and trees (cache hits included)', (variant) => {
    const model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    const c = model.config;
    const cache = new TreeInputCache(c, model.invFreq);
    const rng = new Rng(5);
    const trees = [treeBuffers(TREE_CHOICES, 4), treeBuffers([[0], [0, 0], [0, 0, 0]], 1), treeBuffers([[0], [1], [2]], 3)];
    let checked = 0;
    for (let step = 0; step < 24; step++) {
      const tree = trees[step % trees.length];
      const S = Math.floor(rng.next() * 40);
      // Cached key positions: real and ascending, or (every third step) with padding entries and a gap.
      const keyPos: number[] = [];
      let p = 0;
      for (let j = 0; j < S; j++) {
        if (step % 3 === 2 && rng.next() < 0.2) keyPos.push(-1);
        else keyPos.push(p++);
        if (step % 3 === 2 && rng.next() < 0.1) p += 2;
      }
      const book: CacheBook = { length: S, keyPos: [keyPos], nextPos: [p] };
      const positions = Int32Array.from(tree.positionOffsets, (o) => p + o);
      const want = hostInputs(c, model.invFreq, book, 1, tree.nodes, undefined, { mask: tree.attentionMask, positions });
      const got = cache.inputs(book, { mask: tree.attentionMask, positions });
      expect(Array.from(got.bias)).toEqual(Array.from(want.bias));
      expect(Array.from(got.cos)).toEqual(Array.from(want.cos));
      expect(Array.from(got.sin)).toEqual(Array.from(want.sin));
      expect(Array.from(got.positions)).toEqual(Array.from(want.positions));
      expect(got.newKeyPos).toEqual(want.newKeyPos);
      checked++;
    }
    expect(checked).toBe(24);
    // Positions past max_position_embeddings: no RoPE table that large, the same inputs all the same.
    const far = c.maxPositionEmbeddings + 5;
    const tree = trees[0];
    const book: CacheBook = { length: 3, keyPos: [[far - 3, far - 2, far - 1]], nextPos: [far] };
    const treeMask = { mask: tree.attentionMask, positions: Int32Array.from(tree.positionOffsets, (o) => far + o) };
    const want = hostInputs(c, model.invFreq, book, 1, tree.nodes, undefined, treeMask);
    const got = cache.inputs(book, treeMask);
    expect(Array.from(got.bias)).toEqual(Array.from(want.bias));
    expect(Array.from(got.cos)).toEqual(Array.from(want.cos));
    disposeWeights(model.weights);
  });
});

describe('onnx backbone errors', () => {
  const bigConfig = (): ReturnType<typeof parseDecoderConfig> => parseDecoderConfig({
    architectures: ['LlamaForCausalLM'], vocab_size: 128256, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16,
    num_attention_heads: 32, num_key_value_heads: 8, tie_word_embeddings: true,
  }, 'big/config.json');

  test('a model over the 2 GiB protobuf limit is refused with E_UNSUPPORTED before any weight is read', async () => {
    const c = bigConfig(); // Llama-3.2-1B shaped: 1.24e9 parameters, 4.6 GiB in float32
    expect(onnxWeightBytes(c)).toBeGreaterThan(PROTOBUF_LIMIT_BYTES);
    await expectCode(() => checkOnnxModelSize(c), 'E_UNSUPPORTED', /2 GiB.*external data/s);
    // The weights are never touched: a decoder with no weights at all gets the same error.
    const fake = { config: c, weights: null, invFreq: new Float32Array(32) } as unknown as Decoder;
    await expectCode(onnxBackbone(fake), 'E_UNSUPPORTED', /limited to 2 GiB/);
    // Just below the limit is accepted by the check.
    const small = { ...c, numLayers: 2 };
    expect(() => checkOnnxModelSize(small)).not.toThrow();
  });

  test('bad inputs: out-of-vocabulary ids, a foreign, busy or disposed cache, batch mismatch', async () => {
    const model = loadDecoder(path.join(DECODER_FIXTURES, 'llama-gqa')).decoder;
    const bb = await onnxBackbone(model);
    const ref = tfjsBackbone(model);
    await expectCode(bb.forward({ ids: [3, 96], batch: 1, seqLen: 2, logits: 'last' }), 'E_USAGE', /outside the vocabulary/);
    await expectCode(bb.forward({ ids: [3, 4], batch: 1, seqLen: 2, cache: ref.newCache(1), logits: 'last' }), 'E_INTERNAL', /not made by it/);
    await expectCode(bb.forward({ ids: [3, 4], batch: 1, seqLen: 2, cache: bb.newCache(2), logits: 'last' }), 'E_INTERNAL', /cache batch/);
    const busy = bb.newCache(1);
    const first = bb.forward({ ids: [3, 4], batch: 1, seqLen: 2, cache: busy, logits: 'last' });
    await expectCode(bb.forward({ ids: [5], batch: 1, seqLen: 1, cache: busy, logits: 'last' }), 'E_INTERNAL', /still running/);
    await first;
    expect(busy.length).toBe(2);
    const c = bb.newCache(1);
    c.dispose();
    await expectCode(bb.forward({ ids: [3, 4], batch: 1, seqLen: 2, cache: c, logits: 'last' }), 'E_INTERNAL', /disposed/);
    bb.dispose();
    await expectCode(bb.forward({ ids: [3, 4], batch: 1, seqLen: 2, logits: 'last' }), 'E_INTERNAL', /disposed/);
    disposeWeights(model.weights);
  });
});

describe('backbone choice', () => {
  test('auto picks onnx here; with onnxruntime disabled it falls back to tfjs and says why', async () => {
    await initBackend('wasm');
    const { decoder } = loadDecoder(path.join(DECODER_FIXTURES, 'llama-gqa'));
    const logs: string[] = [];
    const a = await chooseBackbone('auto', decoder, (l) => logs.push(l));
    expect(a.kind).toBe('onnx');
    a.dispose();
    process.env['MEDUSA_TRAIN_DISABLE_ORT'] = '1';
    try {
      const b = await chooseBackbone('auto', decoder, (l) => logs.push(l));
      expect(b.kind).toBe('tfjs');
      expect(logs.join('\n')).toContain('MEDUSA_TRAIN_DISABLE_ORT');
      const r = await b.forward({ ids: [5, 6, 7], batch: 1, seqLen: 3, logits: 'last' });
      expect(r.logits!.length).toBe(decoder.config.vocabSize);
      b.dispose();
    } finally {
      delete process.env['MEDUSA_TRAIN_DISABLE_ORT'];
    }
    disposeWeights(decoder.weights);
  });
});
