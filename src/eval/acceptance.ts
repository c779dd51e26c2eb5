/**
 * Verification of Medusa candidates against the backbone, as the reference's `evaluate_posterior`
 * (FasterDecoding/Medusa medusa/model/utils.py): greedy (temperature 0) and typical acceptance
 * (the `fast = True` branch, which is the default of `medusa_generate`).
 *
 * Layout: `candidates` is [numPaths, width] row-major (width = maxDepth + 1, root first, -1 padding
 * as in TreeBuffers.retrieveIndices). Position j of a path holds the backbone's output after the
 * path's prefix 0..j, so candidate token j+1 is checked against position j.
 *
 * Padding: the reference pads candidates with token 0 (it indexes tree_candidates_ext[-1], an
 * appended zero), so a padded slot could be "accepted" when the backbone predicts token 0 there.
 * Here a negative candidate ends the path: padding is never accepted.
 */

import { fail } from '../errors.js';

/** Reference defaults of `medusa_generate`: eps (posterior_threshold) 0.09, delta (posterior_alpha) 0.3. */
export const TYPICAL_DEFAULTS = { posteriorThreshold: 0.09, posteriorAlpha: 0.3 };

function checkShape(name: string, got: number, numPaths: number, width: number, per = 1): void {
  if (!Number.isInteger(numPaths) || numPaths < 1 || !Number.isInteger(width) || width < 1) {
    fail('E_INTERNAL', `acceptance: numPaths (${numPaths}) and width (${width}) must be positive integers`);
  }
  if (got !== numPaths * width * per) {
    fail('E_INTERNAL', `acceptance: ${name} has ${got} values, expected ${numPaths} x ${width}${per === 1 ? '' : ` x ${per}`}`);
  }
}

/**
 * Greedy: per path, the number of leading candidate tokens (after the root) that equal the
 * backbone's argmax at the previous position. Best path = the first with the longest run
 * (torch.argmax returns the first maximum); path 0 when nothing is accepted.
 */
export function greedyAccept(
  candidates: Int32Array,
  argmaxes: Int32Array,
  numPaths: number,
  width: number,
): { bestPath: number; acceptLength: number } {
  checkShape('candidates', candidates.length, numPaths, width);
  checkShape('argmaxes', argmaxes.length, numPaths, width);
  let bestPath = 0;
  let acceptLength = 0;
  for (let i = 0; i < numPaths; i++) {
    const row = i * width;
    let n = 0;
    for (let j = 1; j < width; j++) {
      const c = candidates[row + j];
      if (c < 0 || c !== argmaxes[row + j - 1]) break;
      n++;
    }
    if (n > acceptLength) {
      acceptLength = n;
      bestPath = i;
    }
  }
  return { bestPath, acceptLength };
}

/**
 * min(eps, delta * exp(-H(p))) with H(p) = -sum p log(p + 1e-5): the reference adds 1e-5 inside
 * the log, so H is slightly below the true entropy; kept for identical decisions.
 */
export function typicalThreshold(p: ArrayLike<number>, eps: number, delta: number): number {
  let h = 0;
  for (let i = 0; i < p.length; i++) h -= p[i] * Math.log(p[i] + 1e-5);
  return Math.min(eps, delta * Math.exp(-h));
}

/** softmax(logits[off .. off+V) / temperature) into out (float64). */
function softmaxInto(logits: Float32Array, off: number, V: number, temperature: number, out: Float64Array): void {
  let max = -Infinity;
  for (let v = 0; v < V; v++) {
    const x = logits[off + v] / temperature;
    out[v] = x;
    if (x > max) max = x;
  }
  let sum = 0;
  for (let v = 0; v < V; v++) {
    const e = Math.exp(out[v] - max);
    out[v] = e;
    sum += e;
  }
  for (let v = 0; v < V; v++) out[v] /= sum;
}

/**
 * Typical acceptance: candidate x at position j+1 is accepted when p(x) > min(eps, delta *
 * exp(-H(p))), p = softmax(logits[path, j] / temperature); a path's accept length is its run of
 * accepted tokens. Among paths with the longest run the reference picks the one with the largest
 * sum of log p over the accepted tokens, first path on exact ties (`tieBreak: 'likelihood'`, the
 * default); `tieBreak: 'first'` takes the first longest path. Path 0 when nothing is accepted.
 * temperature 0 falls back to greedy on the logits' argmax (first maximum), as the reference does.
 */
export function typicalAccept(
  candidates: Int32Array,
  logits: Float32Array,
  numPaths: number,
  width: number,
  V: number,
  o: { temperature: number; posteriorThreshold: number; posteriorAlpha: number; tieBreak?: 'likelihood' | 'first' },
): { bestPath: number; acceptLength: number } {
  checkShape('candidates', candidates.length, numPaths, width);
  if (!Number.isInteger(V) || V < 1) fail('E_INTERNAL', `acceptance: vocabulary size ${V} must be a positive integer`);
  checkShape('logits', logits.length, numPaths, width, V);
  if (!Number.isFinite(o.temperature) || o.temperature < 0) {
    fail('E_CONFIG', `typical acceptance: temperature must be >= 0, got ${o.temperature}`);
  }
  if (o.temperature === 0) {
    const argmaxes = new Int32Array(numPaths * width);
    for (let k = 0; k < numPaths * width; k++) {
      let best = 0;
      for (let v = 1; v < V; v++) if (logits[k * V + v] > logits[k * V + best]) best = v;
      argmaxes[k] = best;
    }
    return greedyAccept(candidates, argmaxes, numPaths, width);
  }
  const p = new Float64Array(V);
  const lengths = new Int32Array(numPaths);
  const logLik = new Float64Array(numPaths);
  let acceptLength = 0;
  for (let i = 0; i < numPaths; i++) {
    const row = i * width;
    let n = 0;
    let ll = 0;
    for (let j = 1; j < width; j++) {
      const x = candidates[row + j];
      if (x < 0) break;
      if (x >= V) fail('E_INTERNAL', `acceptance: candidate token ${x} (path ${i}, position ${j}) is outside the vocabulary of ${V}`);
      softmaxInto(logits, (row + j - 1) * V, V, o.temperature, p);
      if (!(p[x] > typicalThreshold(p, o.posteriorThreshold, o.posteriorAlpha))) break;
      n++;
      ll += Math.log(p[x]);
    }
    lengths[i] = n;
    logLik[i] = ll;
    if (n > acceptLength) acceptLength = n;
  }
  if (acceptLength === 0) return { bestPath: 0, acceptLength: 0 };
  let bestPath = -1;
  for (let i = 0; i < numPaths; i++) {
    if (lengths[i] !== acceptLength) continue;
    if (bestPath < 0) bestPath = i;
    else if (o.tieBreak !== 'first' && logLik[i] > logLik[bestPath]) bestPath = i;
  }
  return { bestPath, acceptLength };
}
