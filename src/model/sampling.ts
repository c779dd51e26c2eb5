/**
 * Token selection: greedy, or sampling with temperature, top-k and top-p (applied in that order, as
 * transformers' logits warpers do), from a seeded generator so every run is reproducible.
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

/** Pick the next token from one row of logits (logits[offset .. offset+V)). */
export function selectToken(logits: ArrayLike<number>, offset: number, V: number, p: SamplingParams, rng: Rng): number {
  if (p.temperature === 0) return argmax(logits, offset, V);
  // Candidates sorted by logit, descending (ties by index, ascending).
  const idx = Array.from({ length: V }, (_, i) => i);
  idx.sort((a, b) => logits[offset + b] - logits[offset + a] || a - b);
  let keep = p.topK > 0 ? Math.min(p.topK, V) : V;
  const maxLogit = logits[offset + idx[0]] / p.temperature;
  const probs = new Float64Array(keep);
  let sum = 0;
  for (let i = 0; i < keep; i++) {
    probs[i] = Math.exp(logits[offset + idx[i]] / p.temperature - maxLogit);
    sum += probs[i];
  }
  if (p.topP < 1) {
    // Keep the smallest prefix whose probability mass reaches topP (at least one token).
    let cum = 0;
    let k = 0;
    while (k < keep) {
      cum += probs[k] / sum;
      k++;
      if (cum >= p.topP) break;
    }
    keep = k;
    sum = 0;
    for (let i = 0; i < keep; i++) sum += probs[i];
  }
  let u = rng.next() * sum;
  for (let i = 0; i < keep; i++) {
    u -= probs[i];
    if (u < 0) return idx[i];
  }
  return idx[keep - 1];
}
