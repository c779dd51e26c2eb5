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

// ---------------------------------------------------------------------------------------------
// Acceptance on a candidate tree (what the decoding loop runs)
// ---------------------------------------------------------------------------------------------

/** Greedy (temperature 0) or typical acceptance settings. */
export interface AcceptanceOptions {
  /** 0 = greedy acceptance (and an argmax base token). */
  temperature: number;
  /** eps of typical acceptance (the reference's posterior_threshold). */
  posteriorThreshold: number;
  /** delta of typical acceptance (the reference's posterior_alpha). */
  posteriorAlpha: number;
}

/**
 * One node's next-token distribution, computed on demand from the tree forward's logits: the argmax
 * (greedy), or p = softmax(logits / T) in float64 with the typical threshold computed only when a
 * decision needs it (p(x) > min(eps, A) holds iff p(x) > eps or p(x) > A, so A = delta * exp(-H),
 * which costs a log per token, is skipped while candidates clear eps).
 */
export class NodeDistributions {
  private readonly V: number;
  private readonly o: AcceptanceOptions;
  private logits: Float32Array = new Float32Array(0);
  private readonly argmaxOf = new Map<number, number>();
  private readonly probsOf = new Map<number, Float64Array>();
  private readonly thresholdOf = new Map<number, number>();
  /** Buffers of [V] float64, reused across steps. */
  private readonly pool: Float64Array[] = [];
  private used = 0;
  /** Distributions computed since the last reset (softmaxes for typical, argmaxes for greedy). */
  evaluated = 0;

  constructor(V: number, o: AcceptanceOptions) {
    if (!Number.isInteger(V) || V < 1) fail('E_INTERNAL', `acceptance: vocabulary size ${V} must be a positive integer`);
    if (!Number.isFinite(o.temperature) || o.temperature < 0) fail('E_CONFIG', `typical acceptance: temperature must be >= 0, got ${o.temperature}`);
    if (!(o.posteriorThreshold >= 0 && o.posteriorThreshold <= 1)) fail('E_CONFIG', `typical acceptance: posterior_threshold (eps) must be in [0, 1], got ${o.posteriorThreshold}`);
    if (!(o.posteriorAlpha >= 0 && Number.isFinite(o.posteriorAlpha))) fail('E_CONFIG', `typical acceptance: posterior_alpha (delta) must be a finite number >= 0, got ${o.posteriorAlpha}`);
    this.V = V;
    this.o = o;
  }

  get greedy(): boolean {
    return this.o.temperature === 0;
  }

  /**
   * New logits [nodes, V] (a host copy the caller keeps unchanged until the next reset); or, for
   * greedy acceptance, only each node's argmax [nodes] computed by the engine (logits null).
   */
  reset(logits: Float32Array | null, argmaxes?: Int32Array): void {
    if (logits === null && (!this.greedy || argmaxes === undefined)) fail('E_INTERNAL', 'acceptance: typical acceptance needs the logits; greedy needs logits or argmaxes');
    if (logits !== null && logits.length % this.V !== 0) fail('E_INTERNAL', `acceptance: ${logits.length} logits are not rows of ${this.V}`);
    this.logits = logits ?? new Float32Array(0);
    this.argmaxOf.clear();
    if (logits === null) argmaxes!.forEach((a, n) => this.argmaxOf.set(n, a));
    this.probsOf.clear();
    this.thresholdOf.clear();
    this.used = 0;
    this.evaluated = 0;
  }

  /** The logits of the last reset. */
  logitsView(): Float32Array {
    return this.logits;
  }

  private row(n: number): number {
    if (!Number.isInteger(n) || n < 0 || (n + 1) * this.V > this.logits.length) fail('E_INTERNAL', `acceptance: node ${n} is outside the logits`);
    return n * this.V;
  }

  argmax(n: number): number {
    let a = this.argmaxOf.get(n);
    if (a === undefined) {
      const off = this.row(n);
      const l = this.logits;
      a = 0;
      let best = -Infinity;
      for (let v = 0; v < this.V; v++) if (l[off + v] > best) { best = l[off + v]; a = v; }
      this.argmaxOf.set(n, a);
      if (this.greedy) this.evaluated++;
    }
    return a;
  }

  /** softmax(logits[n] / T), float64 [V] (typical only). */
  probs(n: number): Float64Array {
    let p = this.probsOf.get(n);
    if (p === undefined) {
      if (this.greedy) fail('E_INTERNAL', 'acceptance: probabilities asked for at temperature 0');
      if (this.used === this.pool.length) this.pool.push(new Float64Array(this.V));
      p = this.pool[this.used++];
      softmaxInto(this.logits, this.row(n), this.V, this.o.temperature, p);
      this.probsOf.set(n, p);
      this.evaluated++;
    }
    return p;
  }

  /** min(eps, delta * exp(-H(p))) of node n (typical only). */
  threshold(n: number): number {
    let t = this.thresholdOf.get(n);
    if (t === undefined) {
      t = typicalThreshold(this.probs(n), this.o.posteriorThreshold, this.o.posteriorAlpha);
      this.thresholdOf.set(n, t);
    }
    return t;
  }

  /**
   * Whether `token` passes at node n: equals the argmax (greedy), or p(token) > min(eps, delta *
   * exp(-H)) (typical). Returns log p(token) when it passes (0 for greedy), null when not.
   */
  accepts(n: number, token: number): number | null {
    if (!Number.isInteger(token) || token < 0 || token >= this.V) fail('E_INTERNAL', `acceptance: candidate token ${token} is outside the vocabulary of ${this.V}`);
    if (this.greedy) return token === this.argmax(n) ? 0 : null;
    const px = this.probs(n)[token];
    if (px > this.o.posteriorThreshold || px > this.threshold(n)) return Math.log(px);
    return null;
  }
}

/**
 * Acceptance on a candidate tree, visiting only what the decision needs: a node's distribution is
 * computed only when its parent chain is accepted (root first; nodes are in depth order, so parents
 * come before children). The result is exactly greedyAccept (temperature 0) or typicalAccept
 * (likelihood tie-break) on the per-path layout: a path's accept length is its run of accepted
 * nodes; the best path is the first longest (greedy) or, among the longest, the one with the largest
 * sum of log p, first on exact ties (typical). Returns the accepted node indices, root first.
 */
export function acceptOnTree(
  dist: NodeDistributions,
  nodeTokens: ArrayLike<number>,
  retrieveIndices: Int32Array,
  numPaths: number,
  width: number,
): { bestPath: number; acceptLength: number; nodes: number[] } {
  checkShape('retrieveIndices', retrieveIndices.length, numPaths, width);
  const N = nodeTokens.length;
  // parent of each node from the paths ([numPaths, width], root 0 first, -1 padded)
  const parent = new Int32Array(N).fill(-2);
  parent[0] = -1;
  for (let i = 0; i < numPaths; i++) {
    for (let j = 1; j < width; j++) {
      const n = retrieveIndices[i * width + j];
      if (n < 0) break;
      const p = retrieveIndices[i * width + j - 1];
      if (n >= N || p >= n || (parent[n] !== -2 && parent[n] !== p)) fail('E_INTERNAL', `acceptance: path ${i} is not a path of a ${N}-node tree in depth order`);
      parent[n] = p;
    }
  }
  const accepted = new Uint8Array(N);
  const logLik = new Float64Array(N);
  accepted[0] = 1;
  for (let n = 1; n < N; n++) {
    const p = parent[n];
    if (p < 0 || !accepted[p]) continue;
    const ll = dist.accepts(p, nodeTokens[n]);
    if (ll === null) continue;
    accepted[n] = 1;
    logLik[n] = logLik[p] + ll;
  }
  let bestPath = 0;
  let acceptLength = 0;
  let bestLL = -Infinity;
  for (let i = 0; i < numPaths; i++) {
    const row = i * width;
    let len = 0;
    while (len + 1 < width && retrieveIndices[row + len + 1] >= 0 && accepted[retrieveIndices[row + len + 1]]) len++;
    if (len === 0) continue;
    const ll = logLik[retrieveIndices[row + len]];
    if (len > acceptLength || (len === acceptLength && !dist.greedy && ll > bestLL)) {
      bestPath = i;
      acceptLength = len;
      bestLL = ll;
    }
  }
  return { bestPath, acceptLength, nodes: Array.from(retrieveIndices.subarray(bestPath * width, bestPath * width + acceptLength + 1)) };
}

/**
 * The base token of a step at temperature > 0 (the reference's `get_typical_one_token`, its
 * non-`fast` path): a draw from p = softmax(logits / T) restricted to the tokens with p >= min(eps,
 * delta * exp(-H(p))) — the same typical set acceptance admits candidates from — renormalised. The
 * argmax always stays in the set (the reference would draw from an empty set, NaN, when delta > 1
 * excluded every token). One uniform from `u01` per call, tokens walked in ascending id order.
 */
export function sampleTypical(p: Float64Array, threshold: number, u01: number): number {
  let best = 0;
  for (let v = 1; v < p.length; v++) if (p[v] > p[best]) best = v;
  let total = 0;
  for (let v = 0; v < p.length; v++) if (p[v] >= threshold || v === best) total += p[v];
  let u = u01 * total;
  let last = best;
  for (let v = 0; v < p.length; v++) {
    if (!(p[v] >= threshold || v === best)) continue;
    last = v;
    u -= p[v];
    if (u < 0) return v;
  }
  return last;
}
