/**
 * Heads proposers (src/engines/heads-proposer.ts): the onnx proposer (heads forward + TopK in one
 * onnxruntime session) proposes the same token ids as the tfjs proposer, for per_head and shared
 * lm_heads with 1 and 2 blocks, and the choice between them.
 */
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { isMedusaError } from '../src/errors.js';
import { disposeHeads, initHeads, type LmHeadMode, type MedusaHeads } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import { chooseProposer, onnxProposer, tfjsProposer } from '../src/engines/heads-proposer.js';

// onnxruntime outputs under Jest: see test/setup/realm.ts (jest setupFiles).

beforeAll(async () => {
  await initBackend('wasm');
});

const D = 32;
const V = 300;
const K = 3;

function gaussian(rng: Rng): number {
  return Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
}

/** Heads with random weights (not the identity init), so every block and projection matters. */
function randomHeads(lmHead: LmHeadMode, numLayers: number, seed: number): MedusaHeads {
  const rng = new Rng(seed);
  const rand = (n: number, std: number): Float32Array => Float32Array.from({ length: n }, () => std * gaussian(rng));
  const base = tf.tensor2d(rand(D * V, 0.5), [D, V]); // [d, V]
  const h = initHeads({ numHeads: K, numLayers, hiddenSize: D, vocabSize: V, lmHead }, base, seed);
  for (const blocks of h.blocks) {
    for (const b of blocks) {
      b.w.assign(tf.tensor2d(rand(D * D, 0.3), [D, D])); // [d, d]
      b.b.assign(tf.tensor1d(rand(D, 0.3))); // [d]
    }
  }
  for (const p of h.proj) p?.assign(tf.tensor2d(rand(D * V, 0.5), [D, V])); // [d, V]
  return h;
}

/** Each head's full logits [K][V] on one hidden state, on tfjs (the reference for scores). */
function headLogits(h: MedusaHeads, hidden: Float32Array): Float32Array[] {
  return tf.tidy(() => {
    const out: Float32Array[] = [];
    for (let k = 0; k < K; k++) {
      let x: tf.Tensor2D = tf.tensor2d(hidden, [1, D]); // [1, d]
      for (const blk of h.blocks[k]) {
        const z = tf.add(tf.matMul(x, blk.w), blk.b); // [1, d]
        x = tf.add(x, tf.mul(z, tf.sigmoid(z))); // [1, d]
      }
      out.push(tf.matMul(x, h.proj[k] ?? h.baseLmHead).dataSync() as Float32Array); // [1, V]
    }
    return out;
  });
}

describe.each([
  ['per_head', 1],
  ['per_head', 2],
  ['shared', 1],
  ['shared', 2],
] as const)('onnx proposer == tfjs proposer (%s lm_head, %i layer(s))', (lmHead, layers) => {
  test('same top-k ids (best first) on random hidden states; their scores are the top-k logits', async () => {
    const heads = randomHeads(lmHead, layers, 3 + layers);
    const ref = tfjsProposer(heads);
    const onnx = await onnxProposer(heads, { threads: 1 });
    expect(onnx.kind).toBe('onnx');
    expect([onnx.numHeads, onnx.hiddenSize, onnx.vocabSize]).toEqual([K, D, V]);
    const rng = new Rng(99);
    let minGap = Infinity;
    for (let i = 0; i < 8; i++) {
      const hidden = Float32Array.from({ length: D }, () => gaussian(rng));
      for (const topk of [1, 10]) {
        const want = await ref.propose(hidden, topk);
        const got = await onnx.propose(hidden, topk);
        expect(got.length).toBe(K);
        expect(got).toEqual(want);
        // The comparison means something only if the ranks are separated: the logits of consecutive
        // candidates differ clearly (float32 reordering between engines is ~1e-6).
        const logits = headLogits(heads, hidden);
        for (let k = 0; k < K; k++) {
          const sorted = Array.from(logits[k]).sort((a, b) => b - a);
          got[k].forEach((id, r) => expect(Math.abs(logits[k][id] - sorted[r])).toBeLessThan(1e-5));
          for (let r = 0; r < topk; r++) minGap = Math.min(minGap, sorted[r] - sorted[r + 1]);
        }
      }
    }
    expect(minGap).toBeGreaterThan(1e-4);
    onnx.dispose();
    disposeHeads(heads);
  });
});

describe('proposer checks and choice', () => {
  test('bad arguments and a disposed proposer fail with a code', async () => {
    const heads = randomHeads('per_head', 1, 1);
    const onnx = await onnxProposer(heads, { threads: 1 });
    const code = async (p: Promise<unknown>): Promise<string> => p.then(() => 'none', (e) => (isMedusaError(e) ? (e as { code: string }).code : String(e)));
    for (const p of [onnx, tfjsProposer(heads)]) {
      expect(await code(p.propose(new Float32Array(D), V + 1))).toBe('E_USAGE');
      expect(await code(p.propose(new Float32Array(D), 0))).toBe('E_USAGE');
      expect(await code(p.propose(new Float32Array(D + 1), 3))).toBe('E_INTERNAL');
    }
    onnx.dispose();
    expect(await code(onnx.propose(new Float32Array(D), 3))).toBe('E_INTERNAL');
    disposeHeads(heads);
  });

  test('chooseProposer: as asked; auto = onnx here, tfjs with onnxruntime disabled (saying why)', async () => {
    const heads = randomHeads('shared', 1, 2);
    expect((await chooseProposer('tfjs', heads)).kind).toBe('tfjs');
    const o = await chooseProposer('onnx', heads, { threads: 1 });
    expect(o.kind).toBe('onnx');
    o.dispose();
    const a = await chooseProposer('auto', heads, { threads: 1 });
    expect(a.kind).toBe('onnx');
    a.dispose();
    const logs: string[] = [];
    process.env['MEDUSA_TRAIN_DISABLE_ORT'] = '1';
    try {
      expect((await chooseProposer('auto', heads, { log: (l) => logs.push(l) })).kind).toBe('tfjs');
    } finally {
      delete process.env['MEDUSA_TRAIN_DISABLE_ORT'];
    }
    expect(logs.join('\n')).toContain('MEDUSA_TRAIN_DISABLE_ORT');
    disposeHeads(heads);
  });
});
