/**
 * src/train/fast-grad.ts: each hand-written gradient equals tfjs autodiff's gradient of the plain ops on small
 * random shapes (and the values equal the plain ops'), on wasm and cpu; a constant operand gets no gradient.
 */
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { matMulConstB, matMulFast, weightedNllSum } from '../src/train/fast-grad.js';
import { Rng } from '../src/model/sampling.js';

function rand(rng: Rng, shape: number[], scale = 1): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(Float32Array.from({ length: n }, () => (2 * rng.next() - 1) * scale), shape);
}

/** max |a - b| / max(|b|, tiny) */
function relErr(a: tf.Tensor, b: tf.Tensor): number {
  const x = a.dataSync();
  const y = b.dataSync();
  expect(x.length).toBe(y.length);
  let num = 0;
  let den = 1e-30;
  for (let i = 0; i < x.length; i++) {
    num = Math.max(num, Math.abs(x[i] - y[i]));
    den = Math.max(den, Math.abs(y[i]));
  }
  return num / den;
}

const TOL = 1e-5;

describe.each(['wasm', 'cpu'] as const)('fast-grad on %s', (backendName) => {
  beforeAll(async () => {
    await initBackend(backendName);
  });

  test('matMulFast: value and both gradients equal tf.matMul autodiff (incl. a non-uniform upstream gradient)', () => {
    const rng = new Rng(11);
    for (const [m, k, n] of [[5, 7, 3], [1, 4, 9], [13, 2, 6]]) {
      const a = rand(rng, [m, k]) as tf.Tensor2D;
      const b = rand(rng, [k, n]) as tf.Tensor2D;
      const up = rand(rng, [m, n]); // weights the output, so dy is not all ones
      const plain = tf.grads((x: tf.Tensor, w: tf.Tensor) => tf.sum(tf.mul(tf.sin(tf.matMul(x as tf.Tensor2D, w as tf.Tensor2D)), up)));
      const fast = tf.grads((x: tf.Tensor, w: tf.Tensor) => tf.sum(tf.mul(tf.sin(matMulFast(x as tf.Tensor2D, w as tf.Tensor2D)), up)));
      const [ga, gb] = plain([a, b]);
      const [fa, fb] = fast([a, b]);
      expect(relErr(matMulFast(a, b), tf.matMul(a, b))).toBeLessThan(TOL);
      expect(relErr(fa, ga)).toBeLessThan(TOL);
      expect(relErr(fb, gb)).toBeLessThan(TOL);
      expect(fa.shape).toEqual([m, k]);
      expect(fb.shape).toEqual([k, n]);
    }
  });

  test('matMulConstB: the gradient of the variable operand equals autodiff; the constant gets none', () => {
    const rng = new Rng(12);
    const a = tf.variable(rand(rng, [6, 4]), true);
    const b = rand(rng, [4, 5]) as tf.Tensor2D;
    const up = rand(rng, [6, 5]);
    const plain = tf.variableGrads(() => tf.sum(tf.mul(tf.square(tf.matMul(a as tf.Tensor2D, b)), up)) as tf.Scalar, [a]);
    const fast = tf.variableGrads(() => tf.sum(tf.mul(tf.square(matMulConstB(a as tf.Tensor2D, b)), up)) as tf.Scalar, [a]);
    expect(Math.abs(fast.value.dataSync()[0] - plain.value.dataSync()[0])).toBeLessThan(TOL * Math.abs(plain.value.dataSync()[0]));
    expect(relErr(fast.grads[a.name], plain.grads[a.name])).toBeLessThan(TOL);
    expect(Object.keys(fast.grads)).toEqual([a.name]);
    a.dispose();
  });

  /** The reference: the same loss written with plain ops, differentiated by autodiff. */
  function plainNll(z: tf.Tensor2D, w: tf.Tensor2D, mask?: tf.Tensor2D, rest?: tf.Tensor1D): tf.Scalar {
    const lse = tf.logSumExp(z, 1, true); // [n, 1]
    let v = tf.neg(tf.sum(tf.mul(w, tf.sub(z, lse)))); // []
    if (mask && rest) v = tf.sub(v, tf.sum(tf.mul(rest, tf.sub(tf.logSumExp(tf.add(z, mask), 1), tf.reshape(lse, [-1])))));
    return v as tf.Scalar;
  }

  test('weightedNllSum: cross-entropy (one-hot), soft targets and the top-k rest bucket equal autodiff in value and gradient', () => {
    const rng = new Rng(13);
    const n = 6;
    const V = 11;
    const logits = rand(rng, [n, V], 4) as tf.Tensor2D;
    const labels = Int32Array.from({ length: n }, () => Math.floor(rng.next() * V));
    const onehot = tf.cast(tf.oneHot(tf.tensor1d(labels, 'int32'), V), 'float32') as tf.Tensor2D; // [n, V]
    const soft = tf.softmax(rand(rng, [n, V], 3)) as tf.Tensor2D; // [n, V], rows sum to 1
    // top-3 "teacher" per row: probabilities on 3 distinct ids, rest = 1 - their sum; mask -1e9 on those ids
    const k = 3;
    const w = new Float32Array(n * V);
    const m = new Float32Array(n * V);
    const rest = new Float32Array(n);
    for (let r = 0; r < n; r++) {
      let mass = 0;
      for (let i = 0; i < k; i++) {
        const id = (r * 5 + i * 4) % V;
        const p = 0.5 / 2 ** i;
        w[r * V + id] = p;
        m[r * V + id] = -1e9;
        mass += p;
      }
      rest[r] = 1 - mass;
    }
    const wT = tf.tensor2d(w, [n, V]);
    const mT = tf.tensor2d(m, [n, V]);
    const rT = tf.tensor1d(rest);
    const cases: [string, (z: tf.Tensor2D) => tf.Scalar, (z: tf.Tensor2D) => tf.Scalar][] = [
      ['ce', (z) => weightedNllSum(z, onehot), (z) => plainNll(z, onehot)],
      ['soft', (z) => weightedNllSum(z, soft), (z) => plainNll(z, soft)],
      ['topk+rest', (z) => weightedNllSum(z, wT, { mask: mT, rest: rT }), (z) => plainNll(z, wT, mT, rT)],
    ];
    const up = 0.37; // a scalar upstream gradient other than 1
    for (const [name, fast, plain] of cases) {
      const vf = fast(logits);
      const vp = plain(logits);
      expect({ name, ok: Math.abs(vf.dataSync()[0] - vp.dataSync()[0]) < TOL * Math.abs(vp.dataSync()[0]) }).toEqual({ name, ok: true });
      const gf = tf.grad((z: tf.Tensor) => tf.mul(fast(z as tf.Tensor2D), up))(logits);
      const gp = tf.grad((z: tf.Tensor) => tf.mul(plain(z as tf.Tensor2D), up))(logits);
      expect({ name, ok: relErr(gf, gp) < TOL }).toEqual({ name, ok: true });
    }
    // CE's closed form is softmax - onehot (per unit upstream gradient)
    const g = tf.grad((z: tf.Tensor) => weightedNllSum(z as tf.Tensor2D, onehot))(logits);
    expect(relErr(g, tf.sub(tf.softmax(logits), onehot))).toBeLessThan(TOL);
  });

  test('weightedNllSum composed with matMulFast (a head projection) gives autodiff gradients for both operands', () => {
    const rng = new Rng(14);
    const h = rand(rng, [7, 5]) as tf.Tensor2D;
    const W = rand(rng, [5, 9]) as tf.Tensor2D;
    const onehot = tf.cast(tf.oneHot(tf.tensor1d(Int32Array.from([0, 3, 8, 2, 2, 5, 1]), 'int32'), 9), 'float32') as tf.Tensor2D;
    const [fh, fw] = tf.grads((x: tf.Tensor, w: tf.Tensor) => weightedNllSum(matMulFast(x as tf.Tensor2D, w as tf.Tensor2D), onehot))([h, W]);
    const [ph, pw] = tf.grads((x: tf.Tensor, w: tf.Tensor) => plainNll(tf.matMul(x as tf.Tensor2D, w as tf.Tensor2D), onehot))([h, W]);
    expect(relErr(fh, ph)).toBeLessThan(TOL);
    expect(relErr(fw, pw)).toBeLessThan(TOL);
  });
});
