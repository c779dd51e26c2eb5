/**
 * Differentiable building blocks with hand-written gradients, for the MEDUSA-2 autograd step on tfjs-wasm.
 *
 * Why (measured, docs/PERFORMANCE.md "MEDUSA-2"): tf.matMul's own gradient is two matmuls with the
 * transposeA / transposeB flags, and tfjs-wasm runs those in a scalar loop (only the untransposed 2-D
 * product takes XNNPACK's fast kernel; /work/shared/DESIGN.md §4). Here every gradient product is an
 * explicit tf.transpose followed by a plain 2-D matmul. The loss on the vocabulary logits is one fused op
 * whose gradient is written in closed form (softmax - targets), so autograd does not keep or differentiate
 * the [n, V] chain of log-softmax, masks and products.
 *
 * The values are the same float32 computations as the plain ops; gradients agree with tfjs autodiff up to
 * float32 rounding (test/fast-grad.test.ts).
 */
import * as tf from '@tensorflow/tfjs';

/** a [m, k] @ b [k, n] -> [m, n], both operands differentiable: dA = dy @ b^T, dB = a^T @ dy (explicit transposes). */
export function matMulFast(a: tf.Tensor2D, b: tf.Tensor2D): tf.Tensor2D {
  const f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const x = args[0] as tf.Tensor2D; // [m, k]
    const w = args[1] as tf.Tensor2D; // [k, n]
    (args[2] as tf.GradSaveFunc)([x, w]);
    const value = tf.matMul(x, w); // [m, n]
    const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => {
      const [xs, ws] = saved as tf.Tensor2D[];
      // tidy: tfjs runs a custom gradient outside the backward's per-node tidy, so temporaries would live to its end
      return tf.tidy(() => [
        tf.matMul(dy as tf.Tensor2D, tf.transpose(ws)), // [m, n] @ [n, k] -> [m, k]
        tf.matMul(tf.transpose(xs), dy as tf.Tensor2D), // [k, m] @ [m, n] -> [k, n]
      ]);
    };
    return { value, gradFunc };
  });
  return f(a, b) as tf.Tensor2D;
}

/**
 * a [m, k] @ b [k, n] -> [m, n] where b is a constant (a frozen weight): only a is differentiable,
 * dA = dy @ b^T. No gradient is ever computed for b.
 */
export function matMulConstB(a: tf.Tensor2D, b: tf.Tensor2D): tf.Tensor2D {
  const f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const x = args[0] as tf.Tensor2D; // [m, k]
    const value = tf.matMul(x, b); // [m, n]
    const gradFunc = (dy: tf.Tensor): tf.Tensor => tf.tidy(() => tf.matMul(dy as tf.Tensor2D, tf.transpose(b))); // [m, n] @ [n, k] -> [m, k]
    return { value, gradFunc };
  });
  return f(a) as tf.Tensor2D;
}

/** The optional "rest bucket" of a top-k KD term: mass outside a set of ids per row. */
export interface ComplementTerm {
  /** [n, V] additive mask: a large negative number on the ids inside the set, 0 elsewhere (constant). */
  mask: tf.Tensor2D;
  /** [n] weight of the complement's log-probability per row (constant). */
  rest: tf.Tensor1D;
}

/**
 * Weighted negative log-likelihood summed over rows, differentiable in `logits` only:
 *
 *   value = - sum_r sum_j w[r, j] * log p[r, j]  -  sum_r rest[r] * log P_C[r]
 *
 * with p = softmax(logits[r]) and P_C[r] = the probability of the ids outside the set (the complement
 * term's mask; its log is logsumexp over the complement minus logsumexp over all ids). Gradient
 * (closed form): d/dz[r, j] = dy * ((W[r] + rest[r]) * p[r, j] - w[r, j] - rest[r] * q_C[r, j]),
 * W[r] = sum_j w[r, j], q_C = softmax over the complement (0 inside the set).
 * Cross-entropy is w = one-hot labels; KL(teacher || student) is w = the teacher's probabilities (plus
 * the teacher's negative entropy, a constant the caller adds).
 * logits [n, V]; weights [n, V] (constant) -> [] scalar.
 */
export function weightedNllSum(logits: tf.Tensor2D, weights: tf.Tensor2D, complement?: ComplementTerm): tf.Scalar {
  const f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const z = args[0] as tf.Tensor2D; // [n, V]
    const save = args[1] as tf.GradSaveFunc;
    const lse = tf.logSumExp(z, 1, true); // [n, 1]
    const logp = tf.sub(z, lse); // [n, V]
    let value = tf.neg(tf.sum(tf.mul(weights, logp))); // []
    let logRest: tf.Tensor | null = null; // [n, 1] log P_C
    if (complement) {
      logRest = tf.sub(tf.logSumExp(tf.add(z, complement.mask), 1, true), lse); // [n, 1]
      value = tf.sub(value, tf.sum(tf.mul(tf.reshape(complement.rest, [-1, 1]), logRest))); // []
    }
    save(logRest ? [logp, logRest] : [logp]);
    const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]): tf.Tensor => tf.tidy(() => {
      const [lp, lr] = saved; // [n, V], [n, 1]
      const p = tf.exp(lp); // [n, V]
      let coef: tf.Tensor = tf.sum(weights, 1, true); // [n, 1] W
      let g: tf.Tensor = tf.neg(weights); // [n, V]
      if (complement && lr) {
        const r = tf.reshape(complement.rest, [-1, 1]); // [n, 1]
        coef = tf.add(coef, r); // [n, 1]
        const qC = tf.exp(tf.sub(tf.add(lp, complement.mask), lr)); // [n, V] softmax over the complement, 0 inside the set
        g = tf.sub(g, tf.mul(r, qC)); // [n, V]
      }
      return tf.mul(tf.add(g, tf.mul(coef, p)), dy); // [n, V]
    });
    return { value: value as tf.Scalar, gradFunc };
  });
  return f(logits) as tf.Scalar;
}

