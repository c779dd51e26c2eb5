/**
 * Token selection: greedy, or sampling with temperature, top-k and top-p (applied in that order, as
 * transformers' logits warpers do), from a seeded generator so every run is reproducible.
 *
 * Cost per token is O(V) for plain sampling and top-k (a selection, not a sort of the vocabulary);
 * top-p sorts only the tokens that can be in the nucleus.
 */

/** mulberry32: small, fast, seedable 32-bit PRNG. `next()` returns a float in [0, 1). */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** The generator's state, for checkpoints. */
  getState(): number {
    return this.state;
  }
}

/** Derive a per-stream seed from a base seed and a stream index (e.g. prompt index), so rows do not depend on batching. */
export function streamSeed(seed: number, stream: number): number {
  let h = (seed ^ Math.imul(stream + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

export interface SamplingParams {
  /** 0 means greedy. */
  temperature: number;
  /** 1 disables. */
  topP: number;
  /** 0 disables. */
  topK: number;
}

export const SAMPLING_LIMITS = { maxTemperature: 100 } as const;

/** Index of the largest value; the first one on ties (as torch.argmax). */
export function argmax(x: ArrayLike<number>, offset = 0, n = x.length - offset): number {
  let best = 0;
  let bestV = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = x[offset + i];
    if (v > bestV) {
      bestV = v;
      best = i;
    }
  }
  return best;
}

/** The k-th largest of `values` (1-based k), by quickselect on a copy. */
function kthLargest(values: Float64Array, k: number): number {
  const a = Float64Array.from(values);
  let lo = 0;
  let hi = a.length - 1;
  const target = k - 1;
  while (lo < hi) {
    const pivot = a[(lo + hi) >>> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return a[target];
  }
  return a[target];
}

/**
 * The tokens sampling may pick and their unnormalised weights, for temperature > 0 (in a fixed
 * order: ascending id, or descending probability under top-p).
 */
export function samplingCandidates(logits: ArrayLike<number>, offset: number, V: number, p: SamplingParams): { ids: number[]; weights: number[] } {
  // Scaled logits and unnormalised probabilities.
  const scaled = new Float64Array(V);
  let max = -Infinity;
  for (let i = 0; i < V; i++) {
    scaled[i] = logits[offset + i] / p.temperature;
    if (scaled[i] > max) max = scaled[i];
  }
  // Candidates: all ids, or the top-k (ties at the k-th value: lower ids first).
  let cand: number[];
  if (p.topK > 0 && p.topK < V) {
    const kth = kthLargest(scaled, p.topK);
    cand = [];
    for (let i = 0; i < V; i++) if (scaled[i] > kth) cand.push(i);
    for (let i = 0; i < V && cand.length < p.topK; i++) if (scaled[i] === kth) cand.push(i);
    cand.sort((a, b) => a - b);
  } else {
    cand = Array.from({ length: V }, (_, i) => i);
  }
  const prob = (i: number): number => Math.exp(scaled[i] - max);
  let total = 0;
  for (const i of cand) total += prob(i);
  if (p.topP < 1) {
    // The nucleus lies within any set of top tokens whose mass already reaches top_p: shrink the
    // candidates to the tokens above a threshold when that holds, then sort only those.
    for (const rel of [1e-3, 1e-6, 1e-9]) {
      const t = rel; // probability relative to the most likely token
      const kept = cand.filter((i) => prob(i) >= t);
      let mass = 0;
      for (const i of kept) mass += prob(i);
      if (mass / total >= p.topP) {
        cand = kept;
        break;
      }
    }
    cand.sort((a, b) => scaled[b] - scaled[a] || a - b);
    let cum = 0;
    let k = 0;
    while (k < cand.length) {
      cum += prob(cand[k]) / total;
      k++;
      if (cum >= p.topP) break;
    }
    cand = cand.slice(0, k);
    total = 0;
    for (const i of cand) total += prob(i);
  }
  void total;
  return { ids: cand, weights: cand.map(prob) };
}

let weightScratch = new Float64Array(0);
function weightBuffer(V: number): Float64Array {
  if (weightScratch.length < V) weightScratch = new Float64Array(V);
  return weightScratch;
}

/** Pick the next token from one row of logits (logits[offset .. offset+V)). */
export function selectToken(logits: ArrayLike<number>, offset: number, V: number, p: SamplingParams, rng: Rng): number {
  if (p.temperature === 0) return argmax(logits, offset, V);
  if (p.topK === 0 && p.topP >= 1) {
    // Plain sampling: one pass for the max, one for the weights, one walk; no candidate arrays.
    let max = -Infinity;
    for (let i = 0; i < V; i++) max = Math.max(max, logits[offset + i]);
    const w = weightBuffer(V);
    let total = 0;
    for (let i = 0; i < V; i++) {
      w[i] = Math.exp((logits[offset + i] - max) / p.temperature);
      total += w[i];
    }
    let u = rng.next() * total;
    for (let i = 0; i < V; i++) {
      u -= w[i];
      if (u < 0) return i;
    }
    return V - 1;
  }
  const { ids, weights } = samplingCandidates(logits, offset, V, p);
  let total = 0;
  for (const w of weights) total += w;
  let u = rng.next() * total;
  for (let j = 0; j < ids.length; j++) {
    u -= weights[j];
    if (u < 0) return ids[j];
  }
  return ids[ids.length - 1];
}
