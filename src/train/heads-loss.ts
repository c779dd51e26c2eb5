/**
 * The MEDUSA-1 loss and its exact gradients for one micro-batch, with the backward written out.
 *
 * Head k at position t is trained on the token at t+k+2 where the loss mask of that token is 1:
 *   loss = heads_coefficient * sum_k decay^k * CE_k,   CE_k = mean over head k's valid positions.
 * The mean is over the whole optimizer step (all its micro-batches): each micro-batch divides by the
 * step's count `norm[k]`, so accumulating micro-batches is exactly one larger batch.
 *
 * Memory: the vocabulary projection is computed `chunkRows` rows at a time (logits [chunkRows, V]),
 * one head at a time, with W2's gradient accumulated across chunks; no tensor ever holds
 * batch x seq x heads x vocab. Every matmul is an untransposed 2-D product (transposes are explicit),
 * the shape tfjs-wasm runs on XNNPACK; cross-entropy is fused (one softmax, gradient p - onehot).
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import type { MedusaHeads } from '../model/heads.js';

/** Top-1 .. top-10 accuracy is counted (training logs and `eval`; trees may use ranks 0..9). */
export const TOPK_REPORTED = 10;

export interface HeadsLossArgs {
  heads: MedusaHeads;
  /** Final hidden states of the micro-batch, [B*T, d] (row b*T + t). */
  hidden: tf.Tensor2D;
  /** Token ids [B*T] and the loss mask [B*T] (1 = a generated token the heads learn). */
  ids: ArrayLike<number>;
  lossMask: ArrayLike<number>;
  /** Real length of each row (positions >= length are padding). */
  lengths: number[];
  T: number;
  decay: number;
  headsCoefficient: number;
  /** Per head: the number of valid positions in the whole optimizer step (the mean's denominator). */
  norm: number[];
  chunkRows: number;
  /** false: forward only (evaluation). */
  computeGrads: boolean;
}

export interface HeadsLossResult {
  /** Per head: sum of cross-entropy over this micro-batch's valid positions. */
  ceSum: number[];
  /** Per head: valid positions in this micro-batch. */
  valid: number[];
  /** Per head: [top-1 .. top-10] correct counts (label's logit beaten by fewer than j logits). */
  correct: number[][];
  /** Gradients by external parameter name, internal layout; null when computeGrads is false. */
  grads: Map<string, tf.Tensor> | null;
}

/** Positions (flat row indexes) and labels of head k. */
export function headTargets(ids: ArrayLike<number>, lossMask: ArrayLike<number>, lengths: number[], T: number, k: number): { rows: Int32Array; labels: Int32Array } {
  const rows: number[] = [];
  const labels: number[] = [];
  for (let b = 0; b < lengths.length; b++) {
    for (let t = 0; t + k + 2 < lengths[b]; t++) {
      const j = b * T + t + k + 2;
      if (lossMask[j] === 1) {
        rows.push(b * T + t);
        labels.push(ids[j]);
      }
    }
  }
  return { rows: Int32Array.from(rows), labels: Int32Array.from(labels) };
}

export function headsLoss(a: HeadsLossArgs): HeadsLossResult {
  const { heads } = a;
  const s = heads.shape;
  const K = s.numHeads;
  const L = s.numLayers;
  const V = s.vocabSize;
  if (a.chunkRows < 1) fail('E_CONFIG', 'loss.chunk_rows must be at least 1');
  const ceSum = new Array<number>(K).fill(0);
  const valid = new Array<number>(K).fill(0);
  const correct = Array.from({ length: K }, () => new Array<number>(TOPK_REPORTED).fill(0));
  const grads = a.computeGrads ? new Map<string, tf.Tensor>() : null;

  for (let k = 0; k < K; k++) {
    const { rows, labels } = headTargets(a.ids, a.lossMask, a.lengths, a.T, k);
    const n = rows.length;
    valid[k] = n;
    if (n === 0) continue;
    const weight = a.norm[k] > 0 ? (a.headsCoefficient * Math.pow(a.decay, k)) / a.norm[k] : 0;
    const blocks = heads.blocks[k];
    const w2: tf.Tensor2D = heads.proj[k] ?? heads.baseLmHead; // [d, V]
    // --- forward through the residual blocks, keeping what the backward needs ---
    const hs: tf.Tensor2D[] = []; // h_l, [n, d]
    const zs: tf.Tensor2D[] = []; // z_l = h_l W1 + b1, [n, d]
    hs.push(tf.tidy(() => tf.gather(a.hidden, tf.tensor1d(rows, 'int32')))); // [n, d]
    for (let l = 0; l < L; l++) {
      const h = hs[l];
      const z = tf.tidy(() => tf.add(tf.matMul(h, blocks[l].w), blocks[l].b) as tf.Tensor2D); // [n, d]
      zs.push(z);
      hs.push(tf.tidy(() => tf.add(h, tf.mul(z, tf.sigmoid(z))) as tf.Tensor2D)); // [n, d]
    }
    const hL = hs[L]; // [n, d]
    // --- vocabulary projection and fused cross-entropy, chunkRows rows at a time ---
    let dW2: tf.Tensor2D | null = null; // [d, V]
    const dhChunks: tf.Tensor2D[] = [];
    const w2T = a.computeGrads ? tf.transpose(w2) : null; // [V, d]
    for (let r0 = 0; r0 < n; r0 += a.chunkRows) {
      const R = Math.min(a.chunkRows, n - r0);
      const out = tf.tidy(() => {
        const hc = tf.slice(hL, [r0, 0], [R, hL.shape[1]]); // [R, d]
        const logits = tf.matMul(hc, w2); // [R, V]
        // int32 one-hot then cast: tfjs-wasm 4.22's OneHot ignores dtype 'float32' and writes int32 bits (1 -> 1.4e-45).
        const onehot = tf.cast(tf.oneHot(tf.tensor1d(labels.subarray(r0, r0 + R), 'int32'), V), 'float32') as tf.Tensor2D; // [R, V]
        const labelLogit = tf.sum(tf.mul(logits, onehot), 1, true); // [R, 1]
        const lse = tf.logSumExp(logits, 1, true); // [R, 1]
        const ce = tf.sum(tf.sub(lse, labelLogit)); // []
        const rank = tf.sum(tf.cast(tf.greater(logits, labelLogit), 'int32'), 1); // [R]
        if (!a.computeGrads) return { ce, rank };
        const dlogits = tf.mul(tf.sub(tf.exp(tf.sub(logits, lse)), onehot), weight); // [R, V]
        const dhc = tf.matMul(dlogits, w2T!); // [R, d]
        if (!heads.proj[k]) return { ce, rank, dhc }; // the shared lm_head is frozen: no W2 gradient
        const dW2c = tf.matMul(tf.transpose(hc), dlogits); // [d, V]
        return { ce, rank, dW2c, dhc };
      });
      ceSum[k] += out.ce.dataSync()[0];
      const ranks = out.rank.dataSync();
      for (let i = 0; i < R; i++) for (let j = 0; j < TOPK_REPORTED; j++) if (ranks[i] < j + 1) correct[k][j]++;
      out.ce.dispose();
      out.rank.dispose();
      if (out.dW2c) {
        if (dW2 === null) dW2 = out.dW2c as tf.Tensor2D;
        else {
          const next: tf.Tensor2D = tf.add(dW2, out.dW2c);
          dW2.dispose();
          out.dW2c.dispose();
          dW2 = next;
        }
      }
      if (out.dhc) dhChunks.push(out.dhc as tf.Tensor2D);
    }
    w2T?.dispose();
    if (grads) {
      if (heads.proj[k] && dW2) grads.set(`${k}.${L}.weight`, dW2);
      else dW2?.dispose();
      // --- backward through the blocks ---
      let dh: tf.Tensor2D = dhChunks.length === 1 ? dhChunks[0] : tf.concat(dhChunks, 0); // [n, d]
      if (dhChunks.length > 1) for (const c of dhChunks) c.dispose();
      for (let l = L - 1; l >= 0; l--) {
        const z = zs[l];
        const h = hs[l];
        const res = tf.tidy(() => {
          const sg = tf.sigmoid(z); // [n, d]
          const dsilu = tf.mul(sg, tf.add(1, tf.mul(z, tf.sub(1, sg)))); // [n, d]
          const dz = tf.mul(dh, dsilu); // [n, d]
          const dW1 = tf.matMul(tf.transpose(h), dz); // [d, d] (in, out)
          const db1 = tf.sum(dz, 0); // [d]
          const dhPrev = tf.add(dh, tf.matMul(dz, tf.transpose(blocks[l].w))); // [n, d]
          return { dW1, db1, dhPrev };
        });
        grads.set(`${k}.${l}.linear.weight`, res.dW1);
        grads.set(`${k}.${l}.linear.bias`, res.db1);
        dh.dispose();
        dh = res.dhPrev as tf.Tensor2D;
      }
      dh.dispose();
    }
    for (const t of hs) t.dispose();
    for (const t of zs) t.dispose();
  }
  return { ceSum, valid, correct, grads };
}
