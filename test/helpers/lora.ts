/** LoRA test helpers: random adapters, and the adapter model as a separate path (tfjs ops), independent of src/train. */
import * as tf from '@tensorflow/tfjs';
import type { ForwardHook, LinearSite } from '../../src/model/decoder.js';
import { Rng } from '../../src/model/sampling.js';
import type { HostTensor, LoraMergeRow, LoraMergeSpec } from '../../src/train/lora-merge.js';

/** Random A [r, in] and B [out, r] (B != 0, as after training) for every row of a LoRA table. */
export function randomAdapters(rows: LoraMergeRow[], r: number, seed: number): Record<string, HostTensor> {
  const rng = new Rng(seed);
  const rand = (n: number, s: number) => Float32Array.from({ length: n }, () => (2 * rng.next() - 1) * s);
  const out: Record<string, HostTensor> = {};
  for (const row of rows) {
    out[row.nameA] = { shape: [r, row.inDim], data: rand(r * row.inDim, 1 / Math.sqrt(row.inDim)) };
    out[row.nameB] = { shape: [row.outDim, r], data: rand(row.outDim * r, 0.05) };
  }
  return out;
}

/** The adapter model: every adapted projection's output + (x A^T) B^T * alpha/r. Tensors live until `dispose`. */
export function adapterHook(rows: LoraMergeRow[], adapters: Record<string, HostTensor>, spec: LoraMergeSpec): { hook: ForwardHook; dispose: () => void } {
  const byModule = new Map<string, { aT: tf.Tensor2D; bT: tf.Tensor2D }>();
  for (const row of rows) {
    const A = tf.tensor2d(adapters[row.nameA].data, [spec.rank, row.inDim]); // [r, in]
    const B = tf.tensor2d(adapters[row.nameB].data, [row.outDim, spec.rank]); // [out, r]
    byModule.set(row.base, { aT: tf.transpose(A), bT: tf.transpose(B) }); // [in, r], [r, out]
    A.dispose();
    B.dispose();
  }
  const scale = spec.alpha / spec.rank;
  const nameOf = (site: LinearSite, layer: number): string =>
    site === 'lm_head' ? 'lm_head.weight' : `model.layers.${layer}.${['gate_proj', 'up_proj', 'down_proj'].includes(site) ? 'mlp' : 'self_attn'}.${site}.weight`;
  return {
    hook: {
      linear: (site, layer, input, output) => {
        const m = byModule.get(nameOf(site, layer));
        if (!m) return output;
        return tf.add(output, tf.mul(tf.matMul(tf.matMul(input, m.aT), m.bT), scale)) as tf.Tensor2D; // [n, out]
      },
    },
    dispose: () => {
      for (const m of byModule.values()) {
        m.aT.dispose();
        m.bT.dispose();
      }
    },
  };
}
