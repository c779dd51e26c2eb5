/**
 * The engine boundary for Medusa heads at decoding time: given the backbone's final hidden state of
 * the last accepted position, each head's top-k token ids (best first). Medusa decoding
 * (src/eval/medusa-decode.ts) only sees this interface, so the heads can run where it is cheapest.
 *
 * - `tfjs`: the heads' forward (ResBlocks + head lm_head) and top-k on the current TensorFlow.js backend.
 */
import * as tf from '@tensorflow/tfjs';
import type { MedusaHeads } from '../model/heads.js';

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
