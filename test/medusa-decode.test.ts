/**
 * Medusa decoding (tree attention + greedy acceptance) on the tfjs engine: the output must equal
 * plain greedy decoding token for token, whatever the heads propose; perfect proposals are all
 * accepted; the tree-attention forward and cache pruning equal plain forwards. The same on any
 * Backbone (`medusaGenerateGreedyOn`), checked on the onnx engine.
 */
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward, disposeCache, emptyCache, keepCacheEntries, type Decoder } from '../src/model/decoder.js';
import { generate } from '../src/model/generate.js';
import { disposeHeads, initHeads, type MedusaHeads } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import { disposeWeights } from '../src/model/weights.js';
import { medusaGenerateGreedy, medusaGenerateGreedyOn, type MedusaDecodeResult } from '../src/eval/medusa-decode.js';
import { tfjsProposer } from '../src/engines/heads-proposer.js';
import { onnxBackbone, tfjsBackbone, type Backbone } from '../src/engines/decoder-engine.js';
import { treeBuffers } from '../src/eval/tree.js';
import { DECODER_FIXTURES, maxAbsDiff } from './helpers/golden.js';

const MODELS = ['llama-gqa', 'qwen3-qknorm', 'mistral-window'] as const;
const CHAIN = [[0], [0, 0], [0, 0, 0]];
const WIDE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]];
const SINGLE = [[0]];
const TREES: [string, number[][]][] = [['chain', CHAIN], ['wide', WIDE], ['single', SINGLE]];
const TOPK = 3;
const NEW = 20;

function greedy(model: Decoder, prompt: number[], n: number, eosIds: number[] = []): number[] {
  return generate(model, [prompt], { maxNewTokens: n, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId: 0 }).tokens[0];
}

/** A result without its wall-clock timing (the rest is deterministic). */
function untimed(r: MedusaDecodeResult): Omit<MedusaDecodeResult, 'timing'> {
  const { timing, ...rest } = r;
  expect(timing.steps.length).toBe(r.steps);
  return rest;
}

function randomPrompts(V: number, count: number, seed: number): number[][] {
  const rng = new Rng(seed);
  return Array.from({ length: count }, () => Array.from({ length: 1 + Math.floor(rng.next() * 12) }, () => Math.floor(rng.next() * V)));
}

/** Heads with random W1 and W2 (scale s), so their proposals are arbitrary. */
function randomHeads(model: Decoder, numHeads: number, seed: number, s = 0.5): MedusaHeads {
  const c = model.config;
  const h = initHeads({ numHeads, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize, lmHead: 'per_head' }, model.weights.lmHead, seed);
  tf.tidy(() => {
    for (let k = 0; k < numHeads; k++) {
      h.blocks[k][0].w.assign(tf.randomNormal([c.hiddenSize, c.hiddenSize], 0, s, 'float32', seed + k));
      h.proj[k]!.assign(tf.randomNormal([c.hiddenSize, c.vocabSize], 0, s, 'float32', seed + 100 + k));
    }
  });
  return h;
}

/** Fresh heads (W1 = 0, W2 = lm_head copy): they often repeat the base model's guess, so some get accepted. */
function freshHeads(model: Decoder, numHeads: number): MedusaHeads {
  const c = model.config;
  return initHeads({ numHeads, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize, lmHead: 'per_head' }, model.weights.lmHead, 7);
}

beforeAll(async () => {
  await initBackend('wasm');
});

describe.each(MODELS)('%s', (variant) => {
  let model: Decoder;
  beforeAll(() => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
  });
  afterAll(() => disposeWeights(model.weights));

  test('tree-attention forward: every node equals the plain forward of prefix + its path; keepCacheEntries + a later forward equals the plain cached forward', () => {
    const V = model.config.vocabSize;
    const prefix = [5, 9, 17, 33, 40, 41, 7];
    const tree = treeBuffers(WIDE, TOPK);
    const rng = new Rng(3);
    const treeTokens = Array.from({ length: tree.nodes }, () => Math.floor(rng.next() * V));
    const cache = emptyCache(1);
    const pre = decoderForward(model, { ids: prefix, batch: 1, seqLen: prefix.length, cache, logits: 'none' });
    pre.hidden.dispose();
    const positions = Int32Array.from(tree.positionOffsets, (p) => prefix.length + p);
    const fwd = decoderForward(model, { ids: treeTokens, batch: 1, seqLen: tree.nodes, cache, logits: 'all', treeMask: { mask: tree.attentionMask, positions } });
    const treeLogits = fwd.logits!.dataSync();
    fwd.hidden.dispose();
    fwd.logits!.dispose();
    // Each node's path from the root, from the attention mask (ancestors + itself, in node order = depth order).
    const pathOf = (n: number): number[] => Array.from({ length: tree.nodes }, (_, j) => j).filter((j) => tree.attentionMask[n * tree.nodes + j] === 1);
    for (let n = 0; n < tree.nodes; n++) {
      const seq = [...prefix, ...pathOf(n).map((j) => treeTokens[j])];
      const full = decoderForward(model, { ids: seq, batch: 1, seqLen: seq.length, logits: 'last' });
      expect(maxAbsDiff(treeLogits.subarray(n * V, (n + 1) * V), full.logits!.dataSync())).toBeLessThan(1e-4);
      full.hidden.dispose();
      full.logits!.dispose();
    }
    // Keep the prefix + the deepest path of the tree, then feed one more token.
    const deepest = pathOf(tree.nodes - 1);
    keepCacheEntries(cache, [...prefix.map((_, i) => i), ...deepest.map((n) => prefix.length + n)]);
    expect(cache.length).toBe(prefix.length + deepest.length);
    expect(cache.nextPos[0]).toBe(prefix.length + deepest.length);
    expect(cache.keyPos[0]).toEqual(Array.from({ length: cache.length }, (_, i) => i));
    const next = decoderForward(model, { ids: [11, 12], batch: 1, seqLen: 2, cache, logits: 'all' });
    const plainCache = emptyCache(1);
    const seq = [...prefix, ...deepest.map((j) => treeTokens[j])];
    decoderForward(model, { ids: seq, batch: 1, seqLen: seq.length, cache: plainCache, logits: 'none' }).hidden.dispose();
    const plain = decoderForward(model, { ids: [11, 12], batch: 1, seqLen: 2, cache: plainCache, logits: 'all' });
    expect(maxAbsDiff(next.logits!.dataSync(), plain.logits!.dataSync())).toBeLessThan(1e-4);
    expect(maxAbsDiff(next.hidden.dataSync(), plain.hidden.dataSync())).toBeLessThan(1e-4);
    for (const t of [next.hidden, next.logits!, plain.hidden, plain.logits!]) t.dispose();
    disposeCache(cache);
    disposeCache(plainCache);
  });

  test.each(TREES)('%s tree: Medusa greedy equals plain greedy for 8 random prompts (random and fresh heads)', async (_name, choices) => {
    const prompts = randomPrompts(model.config.vocabSize, 8, 42);
    const random = randomHeads(model, 3, 1);
    const fresh = freshHeads(model, 3);
    let acceptedSomething = false;
    for (const prompt of prompts) {
      const want = greedy(model, prompt, NEW);
      for (const heads of [random, fresh]) {
        const r = await medusaGenerateGreedy(model, heads, prompt, { choices, topk: TOPK, maxNewTokens: NEW, eosIds: [] });
        expect(r.tokens).toEqual(want);
        expect(r.steps).toBe(r.acceptLengths.length);
        expect(r.steps + r.acceptLengths.reduce((a, b) => a + b, 0)).toBe(NEW);
        expect(r.tokensPerStep).toBeCloseTo(NEW / r.steps, 10);
        if (r.acceptLengths.some((a) => a > 0)) acceptedSomething = true;
      }
    }
    // The fresh heads echo the base model's guess, and these tiny models repeat themselves a lot.
    expect(acceptedSomething).toBe(true);
    disposeHeads(random);
    disposeHeads(fresh);
  });

  test('oracle proposals (the true continuation) are all accepted: chain and wide trees', async () => {
    const heads = freshHeads(model, 3);
    const V = model.config.vocabSize;
    for (const prompt of randomPrompts(V, 4, 9)) {
      const want = greedy(model, prompt, NEW + 4);
      const truth = (i: number): number => want[i];
      // Chain: the true token at rank 0 of every head.
      const chain = await medusaGenerateGreedy(model, heads, prompt, {
        choices: CHAIN, topk: 1, maxNewTokens: NEW, eosIds: [],
        candidateOverride: ({ generated }) => [0, 1, 2].map((k) => [truth(generated + k)]),
      });
      expect(chain.tokens).toEqual(want.slice(0, NEW));
      expect(chain.acceptLengths.slice(0, -1).every((a) => a === 3)).toBe(true);
      expect(chain.steps).toBe(Math.ceil(NEW / 4));
      expect(chain.tokensPerStep).toBeCloseTo(NEW / Math.ceil(NEW / 4), 10); // 4 per step up to the trimmed end
      // Wide: the truth hides at rank 1 of head 0, rank 0 of head 1, rank 1 of head 2 (path [1, 0, 0] exists,
      // [1, 0, 1] does not, so 2 are accepted each step); other ranks are wrong tokens.
      const wrong = (t: number): number => (t + 1) % V;
      const wide = await medusaGenerateGreedy(model, heads, prompt, {
        choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [],
        candidateOverride: ({ generated }) => {
          const t0 = truth(generated), t1 = truth(generated + 1), t2 = truth(generated + 2);
          return [[wrong(t0), t0, wrong(t0)], [t1, wrong(t1), wrong(t1)], [wrong(t2), t2, wrong(t2)]];
        },
      });
      expect(wide.tokens).toEqual(want.slice(0, NEW));
      expect(wide.acceptLengths.slice(0, -1).every((a) => a === 2)).toBe(true);
      expect(wide.steps).toBe(Math.ceil(NEW / 3));
    }
    disposeHeads(heads);
  });

  test('useless proposals: nothing accepted, one token per step, same tokens', async () => {
    const heads = freshHeads(model, 3);
    const V = model.config.vocabSize;
    const prompt = [3, 1, 4, 1, 5];
    const want = greedy(model, prompt, NEW + 4);
    const r = await medusaGenerateGreedy(model, heads, prompt, {
      choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [],
      candidateOverride: ({ generated }) => [0, 1, 2].map(() => [1, 2, 3].map((o) => (want[generated] + o) % V)),
    });
    expect(r.tokens).toEqual(want.slice(0, NEW));
    expect(r.acceptLengths.every((a) => a === 0)).toBe(true);
    expect(r.steps).toBe(NEW);
    expect(r.tokensPerStep).toBe(1);
    disposeHeads(heads);
  });

  test('stops at an eos token like plain greedy, and leaks no tensors', async () => {
    const heads = freshHeads(model, 3);
    const prompt = [8, 9, 10];
    const free = greedy(model, prompt, NEW);
    const eos = free[7];
    const want = greedy(model, prompt, NEW, [eos]);
    const before = tf.memory().numTensors;
    const r = await medusaGenerateGreedy(model, heads, prompt, { choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [eos] });
    expect(tf.memory().numTensors).toBe(before);
    expect(r.tokens).toEqual(want);
    expect(r.tokens[r.tokens.length - 1]).toBe(eos);
    disposeHeads(heads);
  });
});

test('rejects a tree deeper than the heads, and ranks beyond topk', async () => {
  const model = loadDecoder(path.join(DECODER_FIXTURES, 'llama-gqa')).decoder;
  const heads = freshHeads(model, 2);
  await expect(medusaGenerateGreedy(model, heads, [1, 2], { choices: CHAIN, topk: 1, maxNewTokens: 4, eosIds: [] })).rejects.toThrow();
  await expect(medusaGenerateGreedy(model, heads, [1, 2], { choices: [[0], [3]], topk: 2, maxNewTokens: 4, eosIds: [] })).rejects.toThrow();
  disposeHeads(heads);
  disposeWeights(model.weights);
});

describe.each(MODELS)('%s on a Backbone', (variant) => {
  let model: Decoder;
  let bb: Backbone;
  beforeAll(async () => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    bb = await onnxBackbone(model, { threads: 1 });
  });
  afterAll(() => {
    bb.dispose();
    disposeWeights(model.weights);
  });

  test('onnx tree-attention forward: every node equals the plain onnx forward of prefix + its path; keepEntries + a later forward equals the plain cached forward', async () => {
    const V = model.config.vocabSize;
    const d = model.config.hiddenSize;
    const prefix = [5, 9, 17, 33, 40, 41, 7];
    const tree = treeBuffers(WIDE, TOPK);
    const rng = new Rng(3);
    const treeTokens = Array.from({ length: tree.nodes }, () => Math.floor(rng.next() * V));
    const cache = bb.newCache(1);
    await bb.forward({ ids: prefix, batch: 1, seqLen: prefix.length, cache, logits: 'none' });
    const positions = Int32Array.from(tree.positionOffsets, (p) => prefix.length + p);
    const fwd = await bb.forward({ ids: treeTokens, batch: 1, seqLen: tree.nodes, cache, logits: 'all', treeMask: { mask: tree.attentionMask, positions } });
    const treeLogits = fwd.logits!.slice();
    const treeHidden = fwd.hidden.slice();
    expect(cache.length).toBe(prefix.length + tree.nodes);
    const pathOf = (n: number): number[] => Array.from({ length: tree.nodes }, (_, j) => j).filter((j) => tree.attentionMask[n * tree.nodes + j] === 1);
    for (let n = 0; n < tree.nodes; n++) {
      const seq = [...prefix, ...pathOf(n).map((j) => treeTokens[j])];
      const full = await bb.forward({ ids: seq, batch: 1, seqLen: seq.length, logits: 'last' });
      expect(maxAbsDiff(treeLogits.subarray(n * V, (n + 1) * V), full.logits!)).toBeLessThan(1e-4);
      expect(maxAbsDiff(treeHidden.subarray(n * d, (n + 1) * d), full.hidden.subarray((seq.length - 1) * d, seq.length * d))).toBeLessThan(1e-4);
    }
    // Keep the prefix + the deepest path, then feed two more tokens.
    const deepest = pathOf(tree.nodes - 1);
    cache.keepEntries([...prefix.map((_, i) => i), ...deepest.map((n) => prefix.length + n)]);
    expect(cache.length).toBe(prefix.length + deepest.length);
    const next = await bb.forward({ ids: [11, 12], batch: 1, seqLen: 2, cache, logits: 'all' });
    const nextLogits = next.logits!.slice();
    const nextHidden = next.hidden.slice();
    const plainCache = bb.newCache(1);
    const seq = [...prefix, ...deepest.map((j) => treeTokens[j])];
    await bb.forward({ ids: seq, batch: 1, seqLen: seq.length, cache: plainCache, logits: 'none' });
    const plain = await bb.forward({ ids: [11, 12], batch: 1, seqLen: 2, cache: plainCache, logits: 'all' });
    expect(maxAbsDiff(nextLogits, plain.logits!)).toBeLessThan(1e-4);
    expect(maxAbsDiff(nextHidden, plain.hidden)).toBeLessThan(1e-4);
    // And against the tfjs reference's tree forward.
    const ref = tfjsBackbone(model);
    const refCache = ref.newCache(1);
    await ref.forward({ ids: prefix, batch: 1, seqLen: prefix.length, cache: refCache, logits: 'none' });
    const refTree = await ref.forward({ ids: treeTokens, batch: 1, seqLen: tree.nodes, cache: refCache, logits: 'all', treeMask: { mask: tree.attentionMask, positions } });
    expect(maxAbsDiff(treeLogits, refTree.logits!)).toBeLessThan(1e-4);
    refCache.keepEntries([...prefix.map((_, i) => i), ...deepest.map((n) => prefix.length + n)]);
    const refNext = await ref.forward({ ids: [11, 12], batch: 1, seqLen: 2, cache: refCache, logits: 'all' });
    expect(maxAbsDiff(nextLogits, refNext.logits!)).toBeLessThan(1e-4);
    for (const c of [cache, plainCache, refCache]) c.dispose();
    expect(() => cache.keepEntries([0])).toThrow();
  });

  test('keepEntries rejects indexes that are not ascending or out of range', async () => {
    const cache = bb.newCache(1);
    await bb.forward({ ids: [1, 2, 3], batch: 1, seqLen: 3, cache, logits: 'none' });
    expect(() => cache.keepEntries([1, 0])).toThrow();
    expect(() => cache.keepEntries([0, 3])).toThrow();
    cache.keepEntries([0, 1, 2]);
    expect(cache.length).toBe(3);
    cache.dispose();
  });

  test.each(TREES)('%s tree: Medusa greedy on the onnx backbone equals plain greedy for 6 random prompts (random and fresh heads)', async (_name, choices) => {
    const prompts = randomPrompts(model.config.vocabSize, 6, 42);
    const random = randomHeads(model, 3, 1);
    const fresh = freshHeads(model, 3);
    let acceptedSomething = false;
    const before = tf.memory().numTensors;
    for (const prompt of prompts) {
      const want = greedy(model, prompt, NEW);
      for (const heads of [random, fresh]) {
        const r = await medusaGenerateGreedyOn(bb, tfjsProposer(heads), prompt, { choices, topk: TOPK, maxNewTokens: NEW, eosIds: [] });
        expect(r.tokens).toEqual(want);
        expect(r.steps).toBe(r.acceptLengths.length);
        expect(r.steps + r.acceptLengths.reduce((a, b) => a + b, 0)).toBe(NEW);
        if (r.acceptLengths.some((a) => a > 0)) acceptedSomething = true;
      }
    }
    expect(tf.memory().numTensors).toBe(before);
    expect(acceptedSomething).toBe(true);
    disposeHeads(random);
    disposeHeads(fresh);
  });

  test('onnx and tfjs backbones give the same Medusa result as medusaGenerateGreedy (steps and accept lengths too); oracle proposals all accepted', async () => {
    const heads = freshHeads(model, 3);
    const ref = tfjsBackbone(model);
    for (const prompt of randomPrompts(model.config.vocabSize, 3, 9)) {
      const sync = untimed(await medusaGenerateGreedy(model, heads, prompt, { choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [] }));
      expect(untimed(await medusaGenerateGreedyOn(bb, tfjsProposer(heads), prompt, { choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [] }))).toEqual(sync);
      expect(untimed(await medusaGenerateGreedyOn(ref, tfjsProposer(heads), prompt, { choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [] }))).toEqual(sync);
      const want = greedy(model, prompt, NEW + 4);
      const chain = await medusaGenerateGreedyOn(bb, tfjsProposer(heads), prompt, {
        choices: CHAIN, topk: 1, maxNewTokens: NEW, eosIds: [],
        candidateOverride: ({ generated }) => [0, 1, 2].map((k) => [want[generated + k]]),
      });
      expect(chain.tokens).toEqual(want.slice(0, NEW));
      expect(chain.acceptLengths.slice(0, -1).every((a) => a === 3)).toBe(true);
      expect(chain.steps).toBe(Math.ceil(NEW / 4));
    }
    // eos stops like plain greedy.
    const prompt = [8, 9, 10];
    const eos = greedy(model, prompt, NEW)[7];
    const r = await medusaGenerateGreedyOn(bb, tfjsProposer(heads), prompt, { choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [eos] });
    expect(r.tokens).toEqual(greedy(model, prompt, NEW, [eos]));
    ref.dispose();
    disposeHeads(heads);
  });
});
