/**
 * The engine boundary for Medusa heads at decoding time: given the backbone's final hidden state of
 * the last accepted position, each head's top-k token ids (best first). Medusa decoding
 * (src/eval/medusa-decode.ts) only sees this interface, so the heads can run where it is cheapest.
 *
 * - `tfjs`: the heads' forward (ResBlocks + head lm_head) and top-k on the current TensorFlow.js backend.
 * - `onnx`: the same forward plus TopK in ONE onnxruntime session (the graph of the ONNX export,
 *   src/io/onnx-heads.ts, with a TopK output; weights inline): one native call per step, only the
 *   [numHeads, topk] ids come back to JS. onnxruntime is loaded lazily (tfjs-only runs never load it).
 */
import * as tf from '@tensorflow/tfjs';
import { describe, fail } from '../errors.js';
import { exportHeads, type MedusaHeads } from '../model/heads.js';
import { buildOnnxHeadsProposer, ONNX_HEADS_LAYOUT, ONNX_HEADS_TOPK } from '../io/onnx-heads.js';
import { createSession, DISABLE_ORT_ENV, disabledByEnv, probeOrt } from './ort.js';

export type HeadsProposerKind = 'tfjs' | 'onnx';

export interface HeadsProposer {
  readonly kind: HeadsProposerKind;
  readonly numHeads: number;
  readonly hiddenSize: number;
  readonly vocabSize: number;
  /** Each head's top-`topk` token ids on one hidden state `hidden` [d]: [numHeads][topk], best first. */
  propose(hidden: Float32Array, topk: number): Promise<number[][]>;
  /** Free the proposer's own resources (not the heads it was made from). */
  dispose(): void;
}

/** Each head's top-k token ids on one hidden state [1, d]: [numHeads][topk]. */
export function headsTopK(heads: MedusaHeads, hidden: tf.Tensor2D, topk: number): number[][] {
  const K = heads.shape.numHeads;
  const ids = tf.tidy(() => {
    const rows: tf.Tensor2D[] = [];
    for (let k = 0; k < K; k++) {
      let h: tf.Tensor2D = hidden; // [1, d]
      for (const blk of heads.blocks[k]) {
        const z = tf.add(tf.matMul(h, blk.w), blk.b); // [1, d]
        h = tf.add(h, tf.mul(z, tf.sigmoid(z))); // [1, d]
      }
      rows.push(tf.matMul(h, heads.proj[k] ?? heads.baseLmHead)); // [1, V]
    }
    return tf.topk(tf.concat(rows, 0), topk).indices; // [K, topk]
  });
  const data = ids.dataSync();
  ids.dispose();
  return Array.from({ length: K }, (_, k) => Array.from(data.subarray(k * topk, (k + 1) * topk)));
}

/** The heads on the current tfjs backend. */
export function tfjsProposer(heads: MedusaHeads): HeadsProposer {
  const d = heads.shape.hiddenSize;
  return {
    kind: 'tfjs',
    numHeads: heads.shape.numHeads,
    hiddenSize: d,
    vocabSize: heads.shape.vocabSize,
    propose: async (hidden, topk) => {
      checkProposeArgs('tfjs', d, heads.shape.vocabSize, hidden, topk);
      const h = tf.tensor2d(hidden, [1, d]); // [1, d]
      try {
        return headsTopK(heads, h, topk);
      } finally {
        h.dispose();
      }
    },
    dispose: () => {},
  };
}

/** Checks shared by the proposers: one hidden state of the heads' width, topk in [1, V]. */
function checkProposeArgs(kind: HeadsProposerKind, d: number, V: number, hidden: Float32Array, topk: number): void {
  if (hidden.length !== d) fail('E_INTERNAL', `${kind} heads proposer: hidden has ${hidden.length} values, expected the hidden size ${d}`);
  if (!Number.isInteger(topk) || topk < 1 || topk > V) fail('E_USAGE', `topk must be an integer in [1, ${V}] (the vocabulary size), got ${topk}`);
}

/** [V, d] (PyTorch layout) from the internal [d, V]. */
function transposeLmHead(t: tf.Tensor2D): Float32Array {
  const [d, V] = t.shape;
  const src = t.dataSync() as Float32Array;
  const out = new Float32Array(d * V);
  for (let i = 0; i < d; i++) for (let v = 0; v < V; v++) out[v * d + i] = src[i * V + v];
  return out;
}

export interface OnnxProposerOptions {
  /**
   * onnxruntime intra-op threads; default 1: one hidden state is too little work to split, and a second
   * spinning thread pool beside the backbone's slowed the backbone's forwards (bench/medusa.ts).
   */
  threads?: number;
}

/**
 * The heads' forward and TopK in one onnxruntime session, built from the heads' current weights (a
 * snapshot: later training of `heads` is not seen). Ties between equal logits may be ordered
 * differently from tfjs's topk.
 */
export async function onnxProposer(heads: MedusaHeads, o: OnnxProposerOptions = {}): Promise<HeadsProposer> {
  const probe = await probeOrt();
  if (!probe.ok || !probe.ort) fail('E_BACKEND', `The onnx heads proposer is unavailable: ${probe.reason ?? 'onnxruntime-node did not load'}. Use the tfjs proposer.`);
  const ort = probe.ort;
  const s = heads.shape;
  const d = s.hiddenSize;
  const V = s.vocabSize;
  const K = s.numHeads;
  const threads = o.threads ?? 1;
  if (!Number.isInteger(threads) || threads < 1) fail('E_USAGE', `onnx heads proposer threads must be a positive integer, got ${threads}`);
  const bytes = buildOnnxHeadsProposer({
    heads: exportHeads(heads), shape: { numHeads: K, numLayers: s.numLayers, hiddenSize: d, vocabSize: V },
    sharedLmHead: s.lmHead === 'shared' ? transposeLmHead(heads.baseLmHead) : undefined,
  });
  let session: Awaited<ReturnType<typeof createSession>> | null = await createSession(ort, bytes, threads, `heads proposer graph (${K} heads, ${bytes.length} bytes)`);
  return {
    kind: 'onnx',
    numHeads: K,
    hiddenSize: d,
    vocabSize: V,
    propose: async (hidden, topk) => {
      if (!session) fail('E_INTERNAL', 'propose() on a disposed onnx heads proposer');
      checkProposeArgs('onnx', d, V, hidden, topk);
      let out: Awaited<ReturnType<typeof session.run>>;
      try {
        out = await session.run({
          [ONNX_HEADS_LAYOUT.input]: new ort.Tensor('float32', hidden, [1, 1, d]), // [B=1, T=1, d]
          [ONNX_HEADS_TOPK.k]: new ort.Tensor('int64', BigInt64Array.of(BigInt(topk)), [1]),
        }, [ONNX_HEADS_TOPK.indices]);
      } catch (e) {
        fail('E_ENGINE', `onnxruntime failed in the heads proposer (${K} heads, top-${topk}): ${describe(e).split('\n')[0]}`, e);
      }
      const ids = out[ONNX_HEADS_TOPK.indices].data as BigInt64Array; // [K, 1, 1, topk]
      if (ids.length !== K * topk) fail('E_ENGINE', `onnx heads proposer returned ${ids.length} ids, expected ${K} heads x ${topk}`);
      return Array.from({ length: K }, (_, k) => Array.from(ids.subarray(k * topk, (k + 1) * topk), Number));
    },
    dispose: () => {
      const sess = session;
      session = null;
      if (sess) void sess.release().catch(() => undefined);
    },
  };
}

/**
 * The heads proposer of a kind: `onnx` / `tfjs` as asked; `auto` = onnx when onnxruntime is usable
 * (and not disabled by MEDUSA_TRAIN_DISABLE_ORT), else tfjs, saying why through `log`.
 */
export async function chooseProposer(kind: HeadsProposerKind | 'auto', heads: MedusaHeads, o: OnnxProposerOptions & { log?: (line: string) => void } = {}): Promise<HeadsProposer> {
  if (kind === 'tfjs') return tfjsProposer(heads);
  if (kind === 'onnx') return onnxProposer(heads, o);
  if (kind !== 'auto') fail('E_USAGE', `Unknown heads proposer '${String(kind)}'. Use one of: auto, tfjs, onnx.`);
  const log = o.log ?? (() => {});
  if (disabledByEnv()) {
    log(`heads proposer: onnx disabled by ${DISABLE_ORT_ENV}; using tfjs`);
    return tfjsProposer(heads);
  }
  try {
    return await onnxProposer(heads, o);
  } catch (e) {
    log(`heads proposer: onnx unavailable (${(e as Error).message.split('\n')[0]}); using tfjs`);
    return tfjsProposer(heads);
  }
}
