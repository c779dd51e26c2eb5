/**
 * Gradient-norm clipping as torch.nn.utils.clip_grad_norm_ (norm_type 2) does it:
 *
 *   total_norm = || [ ||g_1||, ||g_2||, ... ] ||      (= the norm of all gradients concatenated)
 *   clip_coef  = max_norm / (total_norm + 1e-6)
 *   g_i       *= min(clip_coef, 1)
 *
 * Works on tfjs tensors, because the heads' trainer holds its gradients as float32 tfjs tensors
 * (from tf.variableGrads or accumulated over vocabulary chunks). tfjs tensors are immutable, so
 * instead of scaling in place this returns NEW tensors; the inputs are left untouched and stay
 * owned by the caller (dispose them when done). When no clipping is needed (coefficient >= 1) the
 * outputs are clones (tfjs clones share the data buffer, so that costs nothing).
 *
 * Numerics: each gradient's squared norm is summed on the device in float32 (one gradient at a
 * time, so the only extra memory is one temporary the size of the largest gradient); the
 * per-tensor norms are downloaded together (one small sync) and combined on the host in float64.
 * torch does the outer norm in float32; the difference is far below float32 resolution of the
 * scaled gradients. The coefficient is computed in float64 and applied as a float32 scalar, as
 * torch applies its float32 clip_coef tensor.
 *
 * Non-finite norms: like torch with error_if_nonfinite=False, an infinite norm gives coefficient
 * 0 (so finite entries become 0 and infinite ones NaN) and a NaN norm gives NaN gradients. The
 * trainer should check `Number.isFinite(norm)` and skip such a step.
 */

import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';

export interface ClipResult {
  /** Total L2 norm of all gradients before clipping (torch's return value). */
  norm: number;
  /** The factor applied to every gradient: min(maxNorm / (norm + 1e-6), 1). */
  scale: number;
  /** The clipped gradients, same keys and order as the input; new tensors owned by the caller. */
  grads: Map<string, tf.Tensor>;
}

/** torch's guard against division by zero in clip_coef. */
export const CLIP_EPS = 1e-6;

/** Global L2 norm of a set of gradients (see the module comment for how it is accumulated). */
export function globalGradNorm(grads: ReadonlyMap<string, tf.Tensor>): number {
  if (grads.size === 0) return 0; // torch returns tensor(0.) for no gradients
  const norms = tf.tidy(() => {
    const per: tf.Tensor[] = [];
    for (const g of grads.values()) {
      // sqrt(sum(g^2)) per tensor in float32, as torch.norm(g) is; the temporaries of one gradient
      // are released before the next (a nested tidy keeps only the scalar).
      per.push(tf.tidy(() => tf.sqrt(tf.sum(tf.square(g)))));
    }
    return tf.stack(per); // [n]
  });
  const host = norms.dataSync();
  norms.dispose();
  let sq = 0;
  for (let i = 0; i < host.length; i++) sq += host[i] * host[i];
  return Math.sqrt(sq);
}

/**
 * Clip gradients to a total L2 norm of at most `maxNorm` (torch.nn.utils.clip_grad_norm_).
 * Returns the pre-clipping norm, the factor applied, and the new gradient tensors.
 */
export function clipGradNorm(grads: ReadonlyMap<string, tf.Tensor>, maxNorm: number): ClipResult {
  if (!Number.isFinite(maxNorm) || maxNorm <= 0) fail('E_CONFIG', `max gradient norm must be a finite number > 0, got ${String(maxNorm)}`);
  for (const [name, g] of grads) {
    if (g.dtype !== 'float32') fail('E_INTERNAL', `gradient ${JSON.stringify(name)} has dtype ${g.dtype}, expected float32`);
  }
  const norm = globalGradNorm(grads);
  // Math.min propagates NaN, as torch.clamp(nan, max=1) does.
  const scale = Math.min(maxNorm / (norm + CLIP_EPS), 1);
  const out = new Map<string, tf.Tensor>();
  for (const [name, g] of grads) {
    out.set(name, scale === 1 ? tf.clone(g) : tf.tidy(() => tf.mul(g, tf.scalar(scale, 'float32'))));
  }
  return { norm, scale, grads: out };
}
