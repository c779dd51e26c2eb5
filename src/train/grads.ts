/** Gradient maps (parameter name -> tensor) summed over micro-batches or autograd passes. */
import * as tf from '@tensorflow/tfjs';

/**
 * Add `g` into `acc` (the first map is taken as is when `acc` is null), disposing the replaced
 * tensors and `g`'s consumed ones; returns the accumulator.
 */
export function accumulateGrads(acc: Map<string, tf.Tensor> | null, g: Map<string, tf.Tensor>): Map<string, tf.Tensor> {
  if (!acc) return g;
  for (const [name, t] of g) {
    const prev = acc.get(name);
    if (!prev) acc.set(name, t);
    else {
      acc.set(name, tf.add(prev, t)); // same shape as t
      prev.dispose();
      t.dispose();
    }
  }
  return acc;
}
