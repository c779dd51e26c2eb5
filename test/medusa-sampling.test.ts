/**
 * Medusa decoding beyond greedy: typical acceptance in the decoding loop (temperature > 0).
 * - at a vanishing temperature only the argmax passes, so the output is plain greedy's;
 * - every step's accept length and emitted tokens equal a direct application of the formula
 *   (typicalAccept, per path) to the logits the verification forward produced;
 * - the base-token draws follow the seed (same seed, same text; other seeds, other texts);
 * - the cache stays consistent: the final sequence re-scored by one plain forward gives the logits
 *   every emitted token was chosen or verified from (tfjs and onnx engines);
 * - the tree walk (acceptOnTree) equals typicalAccept / greedyAccept on random trees and logits, and
 *   computes distributions only for nodes on accepted paths; sampleTypical draws from the typical set.
 */
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import type { Decoder } from '../src/model/decoder.js';
import { generate } from '../src/model/generate.js';
import { disposeHeads, initHeads, type MedusaHeads } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import { disposeWeights } from '../src/model/weights.js';
import { medusaGenerateOn, type MedusaDecodeOptions } from '../src/eval/medusa-decode.js';
import { acceptOnTree, greedyAccept, NodeDistributions, sampleTypical, typicalAccept, typicalThreshold } from '../src/eval/acceptance.js';
import { tfjsProposer } from '../src/engines/heads-proposer.js';
import { onnxBackbone, tfjsBackbone, type Backbone, type BackboneForwardArgs } from '../src/engines/decoder-engine.js';
import { treeBuffers } from '../src/eval/tree.js';
import { DECODER_FIXTURES, maxAbsDiff } from './helpers/golden.js';

const MODELS = ['llama-gqa', 'qwen3-qknorm', 'mistral-window'] as const;
const CHAIN = [[0], [0, 0], [0, 0, 0]];
const WIDE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]];
const TOPK = 3;
const NEW = 24;

function greedy(model: Decoder, prompt: number[], n: number): number[] {
  return generate(model, [prompt], { maxNewTokens: n, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 }).tokens[0];
}

function randomPrompts(V: number, count: number, seed: number): number[][] {
  const rng = new Rng(seed);
  return Array.from({ length: count }, () => Array.from({ length: 1 + Math.floor(rng.next() * 10) }, () => Math.floor(rng.next() * V)));
}

/** Fresh heads (W1 = 0, W2 = lm_head): they propose the base model's own top tokens, often accepted on these repetitive models. */
function freshHeads(model: Decoder, numHeads: number): MedusaHeads {
  const c = model.config;
  return initHeads({ numHeads, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize, lmHead: 'per_head' }, model.weights.lmHead, 7);
}

/** A backbone that keeps a copy of every tree-verification forward's tokens and logits. */
function spy(inner: Backbone): { bb: Backbone; trees: { ids: number[]; logits: Float32Array }[] } {
  const trees: { ids: number[]; logits: Float32Array }[] = [];
  const bb: Backbone = {
    kind: inner.kind,
    config: inner.config,
    newCache: (b) => inner.newCache(b),
    dispose: () => inner.dispose(),
    forward: async (a: BackboneForwardArgs) => {
      const r = await inner.forward(a);
      if (a.treeMask) trees.push({ ids: Array.from(a.ids), logits: r.logits!.slice() });
      return r;
    },
  };
  return { bb, trees };
}

beforeAll(async () => {
  await initBackend('wasm');
});

describe.each(MODELS)('%s', (variant) => {
  let model: Decoder;
  let heads: MedusaHeads;
  beforeAll(() => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    heads = freshHeads(model, 3);
  });
  afterAll(() => {
    disposeHeads(heads);
    disposeWeights(model.weights);
  });

  test.each([['chain', CHAIN], ['wide', WIDE]] as const)('%s tree: typical acceptance at temperature 1e-5 gives exactly plain greedy (typical and argmax base token)', async (_n, choices) => {
    const bb = tfjsBackbone(model);
    let accepted = 0;
    for (const prompt of randomPrompts(model.config.vocabSize, 6, 5)) {
      const want = greedy(model, prompt, NEW);
      for (const baseToken of ['typical', 'argmax'] as const) {
        const r = await medusaGenerateOn(bb, tfjsProposer(heads), prompt, {
          choices: choices as unknown as number[][], topk: TOPK, maxNewTokens: NEW, eosIds: [], sampling: { temperature: 1e-5, seed: 3, baseToken },
        });
        expect(r.acceptance).toBe('typical');
        expect(r.tokens).toEqual(want);
        accepted += r.acceptLengths.reduce((a, b) => a + b, 0);
      }
    }
    expect(accepted).toBeGreaterThan(0);
  });

  // These tiny random models are nearly uniform over 96 tokens, so delta * exp(-H) is about delta / 96: deltas near 1 put it among the candidates' probabilities.
  test.each([[1, 1], [0.5, 0.3]])('temperature %s, delta %s: every step accepts exactly what typicalAccept decides on the verification logits (fresh heads and constructed proposals)', async (temperature, posteriorAlpha) => {
    const V = model.config.vocabSize;
    const tree = treeBuffers(WIDE, TOPK);
    const W = tree.maxDepth + 1;
    const rng = new Rng(11);
    // Constructed proposals: rank 0 = a token repeated from the prompt's end, ranks 1-2 random.
    const constructed = (prompt: number[]): MedusaDecodeOptions['candidateOverride'] => ({ step }) =>
      [0, 1, 2].map((k) => [prompt[(step + k) % prompt.length], Math.floor(rng.next() * V), Math.floor(rng.next() * V)]);
    let acceptedSteps = 0;
    let rejectedSteps = 0;
    for (const [i, prompt] of randomPrompts(V, 6, 21).entries()) {
      const { bb, trees } = spy(tfjsBackbone(model));
      const sampling = { temperature, seed: i, posteriorThreshold: 0.09, posteriorAlpha };
      const r = await medusaGenerateOn(bb, tfjsProposer(heads), prompt, {
        choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [], sampling, candidateOverride: i % 2 === 0 ? undefined : constructed(prompt),
      });
      // Steps that verified a tree (the last one may have emitted only its base token).
      expect(trees.length).toBeGreaterThanOrEqual(r.steps - 1);
      let at = 0;
      for (let s = 0; s < r.steps; s++) {
        at++; // the base token
        if (s >= trees.length) break;
        const { ids, logits } = trees[s];
        expect(ids[0]).toBe(r.tokens[at - 1]);
        const cands = new Int32Array(tree.numPaths * W);
        const pathLogits = new Float32Array(tree.numPaths * W * V);
        tree.retrieveIndices.forEach((node, j) => {
          cands[j] = node < 0 ? -1 : ids[node];
          if (node >= 0) pathLogits.set(logits.subarray(node * V, (node + 1) * V), j * V);
        });
        const ref = typicalAccept(cands, pathLogits, tree.numPaths, W, V, { temperature, posteriorThreshold: 0.09, posteriorAlpha });
        const emitted = r.acceptLengths[s];
        const last = s === r.steps - 1;
        // The final step may stop early at max_new_tokens; every other step emits the whole accepted prefix.
        if (last) expect(emitted).toBeLessThanOrEqual(ref.acceptLength);
        else expect(emitted).toBe(ref.acceptLength);
        const refTokens = Array.from(cands.subarray(ref.bestPath * W + 1, ref.bestPath * W + 1 + emitted));
        expect(r.tokens.slice(at, at + emitted)).toEqual(refTokens);
        at += emitted;
        if (ref.acceptLength > 0) acceptedSteps++;
        if (ref.acceptLength < tree.maxDepth) rejectedSteps++;
      }
      expect(at).toBe(r.tokens.length);
    }
    // Both decisions happen: steps that accept candidates, and steps where the best path stops short.
    expect(acceptedSteps).toBeGreaterThan(0);
    expect(rejectedSteps).toBeGreaterThan(0);
  });

  test('seeded: the same seed gives the same tokens, other seeds other texts; the argmax base token ignores the seed', async () => {
    const bb = tfjsBackbone(model);
    const prompts = randomPrompts(model.config.vocabSize, 4, 8);
    const run = (prompt: number[], seed: number, baseToken: 'typical' | 'argmax' = 'typical') => medusaGenerateOn(bb, tfjsProposer(heads), prompt, {
      choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [], sampling: { temperature: 1, seed, baseToken },
    });
    let differ = 0;
    for (const p of prompts) {
      const a = await run(p, 1);
      expect((await run(p, 1)).tokens).toEqual(a.tokens);
      if ((await run(p, 2)).tokens.join() !== a.tokens.join()) differ++;
      expect((await run(p, 1, 'argmax')).tokens).toEqual((await run(p, 99, 'argmax')).tokens);
    }
    expect(differ).toBeGreaterThan(0);
  });
});

describe.each(MODELS)('%s: the cache stays consistent with the emitted tokens', (variant) => {
  let model: Decoder;
  let heads: MedusaHeads;
  let onnx: Backbone;
  beforeAll(async () => {
    model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    heads = freshHeads(model, 3);
    onnx = await onnxBackbone(model, { threads: 1 });
  });
  afterAll(() => {
    onnx.dispose();
    disposeHeads(heads);
    disposeWeights(model.weights);
  });

  test.each(['tfjs', 'onnx'] as const)('%s: re-scoring prompt + output with one plain forward gives the logits seen while decoding (typical and greedy)', async (engine) => {
    const V = model.config.vocabSize;
    const bb = engine === 'onnx' ? onnx : tfjsBackbone(model);
    const before = tf.memory().numTensors;
    let multi = 0;
    for (const [i, prompt] of randomPrompts(V, 4, 31).entries()) {
      for (const temperature of [0, 1]) {
        const r = await medusaGenerateOn(bb, tfjsProposer(heads), prompt, {
          choices: WIDE, topk: TOPK, maxNewTokens: NEW, eosIds: [], sampling: { temperature, seed: i }, recordLogits: true,
        });
        if (r.acceptLengths.some((a) => a > 0)) multi++;
        const seq = [...prompt, ...r.tokens];
        const plain = await bb.forward({ ids: seq, batch: 1, seqLen: seq.length, logits: 'all' });
        const rows = plain.logits!.slice((prompt.length - 1) * V, (prompt.length - 1 + r.tokens.length) * V);
        expect(r.logitsSeen!.length).toBe(r.tokens.length * V);
        expect(maxAbsDiff(rows, r.logitsSeen!)).toBeLessThan(1e-4);
      }
    }
    expect(multi).toBeGreaterThan(0);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('tree acceptance', () => {
  /** A random valid tree (choices) with depth <= 3 and ranks < 3. */
  function randomChoices(rng: Rng): number[][] {
    const set = new Map<string, number[]>();
    const n = 1 + Math.floor(rng.next() * 14);
    for (let i = 0; i < n; i++) {
      const depth = 1 + Math.floor(rng.next() * 3);
      const p = Array.from({ length: depth }, () => Math.floor(rng.next() * 3));
      for (let d = 1; d <= depth; d++) set.set(p.slice(0, d).join(), p.slice(0, d)); // every prefix is a node
    }
    return [...set.values()];
  }

  test('acceptOnTree equals typicalAccept (temperature > 0) and greedyAccept (0) per path, and evaluates only nodes on accepted paths', () => {
    const rng = new Rng(77);
    const V = 12;
    let nonTrivial = 0;
    for (let c = 0; c < 300; c++) {
      const tree = treeBuffers(randomChoices(rng), 3);
      const N = tree.nodes;
      const W = tree.maxDepth + 1;
      // Peaked logits so candidates (from a small set of tokens) pass at various rates.
      const logits = Float32Array.from({ length: N * V }, () => (rng.next() < 0.2 ? 3 : 0) + rng.next() * 2);
      const tokens = Array.from({ length: N }, () => Math.floor(rng.next() * 4));
      const cands = new Int32Array(tree.numPaths * W);
      const pathLogits = new Float32Array(tree.numPaths * W * V);
      tree.retrieveIndices.forEach((node, j) => {
        cands[j] = node < 0 ? -1 : tokens[node];
        if (node >= 0) pathLogits.set(logits.subarray(node * V, (node + 1) * V), j * V);
      });
      for (const temperature of [0, 0.5, 1, 2]) {
        const o = { temperature, posteriorThreshold: c % 3 === 0 ? 0.3 : 0.09, posteriorAlpha: 0.3 };
        const dist = new NodeDistributions(V, o);
        dist.reset(logits);
        const got = acceptOnTree(dist, tokens, tree.retrieveIndices, tree.numPaths, W);
        let want: { bestPath: number; acceptLength: number };
        if (temperature === 0) {
          const am = new Int32Array(tree.numPaths * W);
          tree.retrieveIndices.forEach((node, j) => {
            am[j] = node < 0 ? -1 : (dist.argmax(node));
          });
          want = greedyAccept(cands, am, tree.numPaths, W);
        } else {
          want = typicalAccept(cands, pathLogits, tree.numPaths, W, V, o);
        }
        expect({ bestPath: got.bestPath, acceptLength: got.acceptLength }).toEqual(want);
        expect(got.nodes).toEqual(Array.from(tree.retrieveIndices.subarray(want.bestPath * W, want.bestPath * W + want.acceptLength + 1)));
        if (temperature > 0) {
          // Distributions computed: the root plus accepted nodes (at most), not the whole tree.
          const acceptedNodes = new Set<number>();
          for (let i = 0; i < tree.numPaths; i++) {
            for (let j = 1; j < W; j++) {
              const node = tree.retrieveIndices[i * W + j];
              if (node < 0) break;
              const parentNode = tree.retrieveIndices[i * W + j - 1];
              const p = new Float64Array(V);
              let m = -Infinity;
              for (let v = 0; v < V; v++) m = Math.max(m, logits[parentNode * V + v] / temperature);
              let s = 0;
              for (let v = 0; v < V; v++) s += (p[v] = Math.exp(logits[parentNode * V + v] / temperature - m));
              for (let v = 0; v < V; v++) p[v] /= s;
              if (!(p[tokens[node]] > typicalThreshold(p, o.posteriorThreshold, o.posteriorAlpha))) break;
              acceptedNodes.add(node);
            }
          }
          expect(dist.evaluated).toBeLessThanOrEqual(1 + acceptedNodes.size);
          if (want.acceptLength > 0 && want.acceptLength < tree.maxDepth) nonTrivial++;
        }
      }
    }
    expect(nonTrivial).toBeGreaterThan(50);
  });

  test('sampleTypical draws only from the typical set (plus the argmax), in proportion to p', () => {
    const p = Float64Array.from([0.05, 0.4, 0.02, 0.3, 0.2, 0.03]);
    const thr = 0.1;
    const counts = new Array<number>(p.length).fill(0);
    const M = 10_000;
    for (let i = 0; i < M; i++) counts[sampleTypical(p, thr, (i + 0.5) / M)]++;
    const mass = 0.4 + 0.3 + 0.2;
    expect(counts[0] + counts[2] + counts[5]).toBe(0);
    for (const v of [1, 3, 4]) expect(Math.abs(counts[v] / M - p[v] / mass)).toBeLessThan(1e-3);
    // A threshold above every probability keeps the argmax only.
    for (const u of [0, 0.5, 0.999]) expect(sampleTypical(p, 0.9, u)).toBe(1);
  });
});
