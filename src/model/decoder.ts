/**
 * The decoder family (Llama, Mistral, Qwen2, Qwen3), config-driven, on TensorFlow.js.
 *
 * One function, `decoderForward`, serves the full-sequence forward (batch with padding) and
 * incremental decoding with a KV cache: the cache holds the keys/values of everything seen so far,
 * and the new tokens attend to cache + themselves. Positions are derived from the attention mask as
 * Hugging Face generate() does (position = number of real tokens before it), so a left-padded row
 * computes exactly what the same row computes alone, and cached decoding equals the full forward.
 *
 * Engine notes (tfjs-wasm, see docs/ARCHITECTURE.md): weights are [in, out] so every projection is
 * an untransposed 2-D matmul (the XNNPACK fast path); attention for long query blocks runs as 2-D
 * matmuls per (row, kv-head) group, because batched matmuls fall to a scalar loop.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { assertEngineHealthy } from '../backend.js';
import { ropeInvFreq, type DecoderConfig } from './config.js';
import type { DecoderWeights } from './weights.js';

export interface Decoder {
  config: DecoderConfig;
  weights: DecoderWeights;
  /** Rotary inverse frequencies [hd/2] (float32, scaling applied). */
  invFreq: Float32Array;
}

export function makeDecoder(config: DecoderConfig, weights: DecoderWeights): Decoder {
  return { config, weights, invFreq: ropeInvFreq(config) };
}

/** Keys/values of everything processed so far, per layer, plus per-row bookkeeping. */
export interface KVCache {
  batch: number;
  /** Number of cached entries per row (including padding entries). */
  length: number;
  /** Per layer: [B, nKV, length, hd]. */
  k: tf.Tensor4D[];
  v: tf.Tensor4D[];
  /** Per row: the position id of each cached entry, -1 for padding. */
  keyPos: number[][];
  /** Per row: the position id the next real token gets. */
  nextPos: number[];
}

export function emptyCache(batch: number): KVCache {
  return { batch, length: 0, k: [], v: [], keyPos: Array.from({ length: batch }, () => []), nextPos: new Array<number>(batch).fill(0) };
}

export function disposeCache(cache: KVCache): void {
  for (const t of cache.k) t.dispose();
  for (const t of cache.v) t.dispose();
  cache.k = [];
  cache.v = [];
}

export interface ForwardArgs {
  /** Token ids, row-major [batch, seqLen]. */
  ids: ArrayLike<number>;
  batch: number;
  seqLen: number;
  /** 1 = real token, 0 = padding, row-major [batch, seqLen]; default all real. Padding must be on the left of each row's real tokens in a block. */
  mask?: ArrayLike<number>;
  /** When given, the new tokens attend to the cache, and the cache is extended in place. */
  cache?: KVCache;
  /** Which logits to compute: every position, the last position of each row, or none. */
  logits: 'all' | 'last' | 'none';
  /**
   * Tree attention (Medusa verification; batch 1, no padding mask): the new tokens attend to every
   * real cached entry (the sliding window still applies) plus the new tokens `mask` allows, and get
   * the given position ids. The cache (if any) is extended with all new tokens, keyed by these
   * positions; prune it afterwards with `keepCacheEntries`.
   */
  treeMask?: TreeMask;
  /**
   * Training hook (MEDUSA-2, src/train/trainable-backbone.ts): replaces the weights, the embedding
   * lookup and/or rewrites each linear projection's output (e.g. adds a LoRA path). Absent: the plain
   * forward, unchanged.
   */
  hook?: ForwardHook;
}

/** The linear projections a ForwardHook sees, by their Hugging Face module names. */
export type LinearSite = 'q_proj' | 'k_proj' | 'v_proj' | 'o_proj' | 'gate_proj' | 'up_proj' | 'down_proj' | 'lm_head';

/** The 2-D products of the forward a ForwardHook may replace: the fused weight products, and attention's (two activations). */
export type MatMulSite = 'qkv' | 'o_proj' | 'gate_up' | 'down_proj' | 'lm_head' | 'attention';

export interface ForwardHook {
  /** Weights used instead of model.weights (same internal layout), e.g. with some tensors trainable. */
  weights?: DecoderWeights;
  /** The embedding of `ids` [B*T] as [B*T, d], instead of the gather from the embedding table. */
  embed?: (ids: Int32Array) => tf.Tensor2D;
  /** Receives a projection's input [n, in] and output [n, out] (bias included); returns the output to use. Layer -1: lm_head. */
  linear?: (site: LinearSite, layer: number, input: tf.Tensor2D, output: tf.Tensor2D) => tf.Tensor2D;
  /**
   * Computes a [m, k] @ b [k, n] instead of tf.matMul for the 2-D products of the forward (e.g. the same
   * product with a faster gradient, src/train/fast-grad.ts). For a weight site b is that weight (layer -1:
   * lm_head); for 'attention' both operands are activations. The batched attention of short query blocks
   * (fewer than 8 new tokens) does not go through it.
   */
  matMul?: (a: tf.Tensor2D, b: tf.Tensor2D, site: MatMulSite, layer: number) => tf.Tensor2D;
}

export interface TreeMask {
  /** [T, T] among the new tokens: mask[i*T + j] = 1 when query i may attend new token j. */
  mask: Uint8Array;
  /** [T] position ids of the new tokens. */
  positions: Int32Array;
}

export interface ForwardResult {
  /** Final hidden states after the final norm: [batch, seqLen, d]. What Medusa heads read. */
  hidden: tf.Tensor3D;
  /** [batch, seqLen, V] ('all'), [batch, 1, V] ('last') or null. */
  logits: tf.Tensor3D | null;
}

/** Query blocks at least this long use per-group 2-D matmuls for attention (fast path); shorter ones a batched matmul. */
const LOOP_ATTENTION_MIN_QUERY = 8;
const MASKED = -1e9;

// ---------------------------------------------------------------------------------------------
// Host-side inputs of a forward: positions, key positions, the attention bias and RoPE tables.
// One implementation for every engine (tfjs here, onnxruntime in engines/onnx-decoder.ts).

export interface CacheBook {
  /** Per row: the position id of each cached entry, -1 for padding. */
  keyPos: number[][];
  /** Per row: the position id the next real token gets. */
  nextPos: number[];
  length: number;
}

export interface HostInputs {
  /** [B, T]: position of each token (padding: 1). */
  positions: Int32Array;
  /** Per row: the new entries' key positions (-1 for padding). */
  newKeyPos: number[][];
  /** [B, nRep*T, L] additive bias (0 or MASKED), row r*T+i = query i. */
  bias: Float32Array;
  /** [B, T, hd] */
  cos: Float32Array;
  sin: Float32Array;
}

/**
 * Positions from the mask (or the tree's), the grouped additive attention bias [B, nRep*T, L] (row r*T+i =
 * query i, the same for every head of a kv group) and the RoPE cos/sin tables [B*T, hd].
 */
export function hostInputs(c: DecoderConfig, invFreq: Float32Array, book: CacheBook, B: number, T: number, mask: ArrayLike<number> | undefined, tree?: TreeMask): HostInputs {
  const nRep = c.numHeads / c.numKvHeads;
  const hd = c.headDim;
  const S = book.length;
  const L = S + T;
  const positions = new Int32Array(B * T);
  const newKeyPos: number[][] = [];
  for (let b = 0; b < B; b++) {
    let p = book.nextPos[b];
    const rowPos: number[] = [];
    for (let t = 0; t < T; t++) {
      const real = mask ? mask[b * T + t] !== 0 : true;
      positions[b * T + t] = real ? p : 1; // padding gets position 1, as transformers does; it is masked anyway
      rowPos.push(real ? p : -1);
      if (real) p++;
    }
    newKeyPos.push(rowPos);
  }
  if (tree) {
    // Tree attention (batch 1, no padding): the given positions, as decoderForward's treeMask.
    for (let t = 0; t < T; t++) {
      positions[t] = tree.positions[t];
      newKeyPos[0][t] = tree.positions[t];
    }
  }
  const bias = new Float32Array(B * nRep * T * L);
  const window = c.slidingWindow;
  for (let b = 0; b < B; b++) {
    const keyPos = book.keyPos[b].concat(newKeyPos[b]); // [L]
    for (let i = 0; i < T; i++) {
      const qIndex = S + i;
      const qPos = newKeyPos[b][i];
      const row = (b * nRep * T + i) * L;
      for (let j = 0; j < L; j++) {
        const kp = keyPos[j];
        const ok = tree
          ? kp >= 0 && (j < S || tree.mask[i * T + (j - S)] !== 0) && kp <= qPos && (window === null || qPos - kp < window)
          : kp >= 0 && j <= qIndex && (qPos < 0 || (kp <= qPos && (window === null || qPos - kp < window)));
        bias[row + j] = ok ? 0 : MASKED;
      }
      for (let r = 1; r < nRep; r++) bias.copyWithin(row + r * T * L, row, row + L);
    }
  }
  const half = hd / 2;
  const cos = new Float32Array(B * T * hd);
  const sin = new Float32Array(B * T * hd);
  for (let n = 0; n < B * T; n++) {
    const pos = positions[n];
    for (let i = 0; i < half; i++) {
      const f = Math.fround(pos * invFreq[i]);
      const cv = Math.fround(Math.cos(f));
      const sv = Math.fround(Math.sin(f));
      cos[n * hd + i] = cv;
      cos[n * hd + half + i] = cv;
      sin[n * hd + i] = sv;
      sin[n * hd + half + i] = sv;
    }
  }
  return { positions, newKeyPos, bias, cos, sin };
}

export function decoderForward(model: Decoder, args: ForwardArgs): ForwardResult {
  const c = model.config;
  const { batch: B, seqLen: T } = args;
  const d = c.hiddenSize;
  const nH = c.numHeads;
  const nKV = c.numKvHeads;
  const hd = c.headDim;
  const nRep = nH / nKV;
  if (args.ids.length !== B * T) fail('E_INTERNAL', `ids has ${args.ids.length} entries, expected batch*seqLen = ${B * T}`);
  if (args.mask && args.mask.length !== B * T) fail('E_INTERNAL', `mask has ${args.mask.length} entries, expected ${B * T}`);
  for (let i = 0; i < args.ids.length; i++) {
    const id = args.ids[i];
    if (!Number.isInteger(id) || id < 0 || id >= c.vocabSize) fail('E_USAGE', `token id ${id} at index ${i} is outside the vocabulary [0, ${c.vocabSize})`);
  }
  const tree = args.treeMask;
  if (tree) {
    if (B !== 1) fail('E_INTERNAL', `treeMask needs batch 1, got ${B}`);
    if (args.mask) fail('E_INTERNAL', 'treeMask cannot be combined with a padding mask');
    if (tree.mask.length !== T * T) fail('E_INTERNAL', `treeMask.mask has ${tree.mask.length} entries, expected ${T * T}`);
    if (tree.positions.length !== T) fail('E_INTERNAL', `treeMask.positions has ${tree.positions.length} entries, expected ${T}`);
  }
  const cache = args.cache ?? emptyCache(B);
  if (cache.batch !== B) fail('E_INTERNAL', `cache batch ${cache.batch} != batch ${B}`);
  const S = cache.length;
  const L = S + T;

  // --- host-side bookkeeping: positions, key positions, attention bias, RoPE tables -------------------
  const { newKeyPos, bias, cos: cosData, sin: sinData } = hostInputs(c, model.invFreq, cache, B, T, args.mask, tree);
  const half = hd / 2;

  let logitsOut: tf.Tensor3D | null = null;
  const newK: tf.Tensor4D[] = [];
  const newV: tf.Tensor4D[] = [];
  const hiddenOut = tf.tidy((): tf.Tensor3D => {
    const hook = args.hook;
    const w = hook?.weights ?? model.weights;
    const lin = (site: LinearSite, layer: number, input: tf.Tensor, output: tf.Tensor): tf.Tensor2D =>
      (hook?.linear ? hook.linear(site, layer, input as tf.Tensor2D, output as tf.Tensor2D) : output) as tf.Tensor2D; // [n, out]
    const mm = (a: tf.Tensor2D, b: tf.Tensor2D, site: MatMulSite, layer: number): tf.Tensor2D =>
      hook?.matMul ? hook.matMul(a, b, site, layer) : tf.matMul(a, b); // [m, n]
    const cos = tf.tensor4d(cosData, [B, T, 1, hd]); // [B, T, 1, hd]
    const sin = tf.tensor4d(sinData, [B, T, 1, hd]); // [B, T, 1, hd]
    const biasT = tf.tensor3d(bias, [B, nRep * T, L]); // [B, nRep*T, L]
    const scale = 1 / Math.sqrt(hd);
    let x: tf.Tensor2D = hook?.embed ? hook.embed(Int32Array.from(args.ids)) : tf.gather(w.embed, tf.tensor1d(Int32Array.from(args.ids), 'int32')); // [B*T, d]
    for (let li = 0; li < c.numLayers; li++) {
      const lw = w.layers[li];
      // --- attention block ---
      const xn = rmsNorm(x, lw.attnNorm, c.rmsNormEps); // [B*T, d]
      let qkv: tf.Tensor2D = mm(xn, lw.wqkv, 'qkv', li); // [B*T, q+2kv]
      if (lw.bqkv) qkv = tf.add(qkv, lw.bqkv);
      let q: tf.Tensor4D = tf.reshape(lin('q_proj', li, xn, tf.slice(qkv, [0, 0], [B * T, nH * hd])), [B, T, nH, hd]); // [B, T, nH, hd]
      let k: tf.Tensor4D = tf.reshape(lin('k_proj', li, xn, tf.slice(qkv, [0, nH * hd], [B * T, nKV * hd])), [B, T, nKV, hd]); // [B, T, nKV, hd]
      const v: tf.Tensor4D = tf.reshape(lin('v_proj', li, xn, tf.slice(qkv, [0, (nH + nKV) * hd], [B * T, nKV * hd])), [B, T, nKV, hd]); // [B, T, nKV, hd]
      if (lw.qNorm && lw.kNorm) {
        q = rmsNorm(q, lw.qNorm, c.rmsNormEps); // [B, T, nH, hd]
        k = rmsNorm(k, lw.kNorm, c.rmsNormEps); // [B, T, nKV, hd]
      }
      q = applyRope(q, cos, sin, half); // [B, T, nH, hd]
      k = applyRope(k, cos, sin, half); // [B, T, nKV, hd]
      const kT = tf.transpose(k, [0, 2, 1, 3]); // [B, nKV, T, hd]
      const vT = tf.transpose(v, [0, 2, 1, 3]); // [B, nKV, T, hd]
      const kAll: tf.Tensor4D = S > 0 ? tf.concat([cache.k[li], kT], 2) : kT; // [B, nKV, L, hd]
      const vAll: tf.Tensor4D = S > 0 ? tf.concat([cache.v[li], vT], 2) : vT; // [B, nKV, L, hd]
      if (args.cache) {
        newK.push(tf.keep(kAll));
        newV.push(tf.keep(vAll));
      }
      const qG = tf.reshape(tf.transpose(q, [0, 2, 1, 3]), [B * nKV, nRep * T, hd]) as tf.Tensor3D; // [B*nKV, nRep*T, hd] (heads of a kv group are contiguous)
      const attn = attention(qG, tf.reshape(kAll, [B * nKV, L, hd]) as tf.Tensor3D, tf.reshape(vAll, [B * nKV, L, hd]) as tf.Tensor3D, biasT, { B, nKV, nRep, T, L, hd, scale }, (a, b) => mm(a, b, 'attention', li)); // [B*nKV, nRep*T, hd]
      const merged = tf.reshape(tf.transpose(tf.reshape(attn, [B, nH, T, hd]), [0, 2, 1, 3]), [B * T, nH * hd]); // [B*T, nH*hd]
      let o: tf.Tensor2D = mm(merged as tf.Tensor2D, lw.wo, 'o_proj', li); // [B*T, d]
      if (lw.bo) o = tf.add(o, lw.bo);
      if (hook?.linear) o = lin('o_proj', li, merged, o); // [B*T, d]
      const h = tf.add(x, o); // [B*T, d]
      // --- MLP block (SwiGLU) ---
      const hn = rmsNorm(h, lw.mlpNorm, c.rmsNormEps); // [B*T, d]
      const gu = mm(hn as tf.Tensor2D, lw.wgu, 'gate_up', li); // [B*T, 2ff]
      const ff = c.intermediateSize;
      const gate = hook?.linear ? lin('gate_proj', li, hn, tf.slice(gu, [0, 0], [B * T, ff])) : null; // [B*T, ff]
      const up = hook?.linear ? lin('up_proj', li, hn, tf.slice(gu, [0, ff], [B * T, ff])) : null; // [B*T, ff]
      const act = gate && up
        ? tf.mul(tf.mul(gate, tf.sigmoid(gate)), up) // [B*T, ff]
        : tf.mul(tf.mul(tf.slice(gu, [0, 0], [B * T, ff]), tf.sigmoid(tf.slice(gu, [0, 0], [B * T, ff]))), tf.slice(gu, [0, ff], [B * T, ff])); // [B*T, ff]
      x = tf.add(h, lin('down_proj', li, act, mm(act as tf.Tensor2D, lw.wdown, 'down_proj', li))); // [B*T, d]
    }
    const hidden2 = rmsNorm(x, w.finalNorm, c.rmsNormEps); // [B*T, d]
    const hidden = tf.reshape(hidden2, [B, T, d]) as tf.Tensor3D; // [B, T, d]
    if (args.logits === 'all') {
      logitsOut = tf.keep(tf.reshape(lin('lm_head', -1, hidden2, mm(hidden2, w.lmHead, 'lm_head', -1)), [B, T, c.vocabSize]) as tf.Tensor3D); // [B, T, V]
    } else if (args.logits === 'last') {
      const last = tf.reshape(tf.slice(hidden, [0, T - 1, 0], [B, 1, d]), [B, d]); // [B, d]
      logitsOut = tf.keep(tf.reshape(lin('lm_head', -1, last as tf.Tensor2D, mm(last as tf.Tensor2D, w.lmHead, 'lm_head', -1)), [B, 1, c.vocabSize]) as tf.Tensor3D); // [B, 1, V]
    }
    return hidden;
  });
  if (args.cache) {
    disposeCache(cache);
    cache.k = newK;
    cache.v = newV;
    cache.length = L;
    for (let b = 0; b < B; b++) {
      cache.keyPos[b] = cache.keyPos[b].concat(newKeyPos[b]);
      const last = newKeyPos[b].filter((p) => p >= 0);
      if (last.length > 0) cache.nextPos[b] = last[last.length - 1] + 1;
    }
  }
  assertEngineHealthy('the decoder forward');
  return { hidden: hiddenOut, logits: logitsOut };
}

/**
 * Keep only the cached entries at `keep` (indexes into [0, cache.length), strictly ascending), e.g.
 * the prefix plus the accepted nodes of a Medusa tree. nextPos becomes the last kept real position + 1.
 */
export function keepCacheEntries(cache: KVCache, keep: number[]): void {
  for (let i = 0; i < keep.length; i++) {
    const j = keep[i];
    if (!Number.isInteger(j) || j < 0 || j >= cache.length || (i > 0 && j <= keep[i - 1])) {
      fail('E_INTERNAL', `keepCacheEntries: index ${j} at ${i} is not ascending within [0, ${cache.length})`);
    }
  }
  if (keep.length === cache.length) return; // ascending and in range: the identity
  const idx = tf.tensor1d(Int32Array.from(keep), 'int32'); // [K]
  const gather = (t: tf.Tensor4D): tf.Tensor4D => {
    const g = tf.gather(t, idx, 2); // [B, nKV, K, hd]
    t.dispose();
    return g;
  };
  cache.k = cache.k.map(gather);
  cache.v = cache.v.map(gather);
  idx.dispose();
  cache.length = keep.length;
  for (let b = 0; b < cache.batch; b++) {
    cache.keyPos[b] = keep.map((j) => cache.keyPos[b][j]);
    const real = cache.keyPos[b].filter((p) => p >= 0);
    cache.nextPos[b] = real.length > 0 ? real[real.length - 1] + 1 : 0;
  }
}

/** RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * w. */
function rmsNorm<T extends tf.Tensor>(x: T, w: tf.Tensor1D, eps: number): T {
  const ms = tf.mean(tf.square(x), -1, true); // [..., 1]
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(ms, eps))), w) as T; // [..., n]
}

/** Non-interleaved rotary embedding: x*cos + rotate_half(x)*sin, rotate_half = [-x2, x1]. */
function applyRope(x: tf.Tensor4D, cos: tf.Tensor4D, sin: tf.Tensor4D, half: number): tf.Tensor4D {
  const [B, T, H] = x.shape;
  const x1 = tf.slice(x, [0, 0, 0, 0], [B, T, H, half]); // [B, T, H, hd/2]
  const x2 = tf.slice(x, [0, 0, 0, half], [B, T, H, half]); // [B, T, H, hd/2]
  const rot = tf.concat([tf.neg(x2), x1], 3); // [B, T, H, hd]
  return tf.add(tf.mul(x, cos), tf.mul(rot, sin)); // [B, T, H, hd]
}

interface AttnDims { B: number; nKV: number; nRep: number; T: number; L: number; hd: number; scale: number }

/**
 * Scaled dot-product attention with an additive bias.
 * q [B*nKV, nRep*T, hd], k/v [B*nKV, L, hd], bias [B, nRep*T, L] -> [B*nKV, nRep*T, hd].
 */
function attention(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, bias: tf.Tensor3D, dims: AttnDims, mm2: (a: tf.Tensor2D, b: tf.Tensor2D) => tf.Tensor2D): tf.Tensor3D {
  const { B, nKV, nRep, T, L, hd, scale } = dims;
  if (T >= LOOP_ATTENTION_MIN_QUERY) {
    // Fast path: untransposed 2-D matmuls per (row, kv-head) group.
    const qs = tf.unstack(q) as tf.Tensor2D[]; // B*nKV x [nRep*T, hd]
    const ks = tf.unstack(k) as tf.Tensor2D[]; // B*nKV x [L, hd]
    const vs = tf.unstack(v) as tf.Tensor2D[]; // B*nKV x [L, hd]
    const bs = tf.unstack(bias) as tf.Tensor2D[]; // B x [nRep*T, L]
    const outs: tf.Tensor2D[] = [];
    for (let g = 0; g < B * nKV; g++) {
      const kT = tf.transpose(ks[g]); // [hd, L]
      const scores = tf.add(tf.mul(mm2(qs[g], kT), scale), bs[Math.floor(g / nKV)]); // [nRep*T, L]
      outs.push(mm2(tf.softmax(scores) as tf.Tensor2D, vs[g])); // [nRep*T, hd]
    }
    return tf.stack(outs) as tf.Tensor3D; // [B*nKV, nRep*T, hd]
  }
  const scores = tf.mul(tf.matMul(q, k, false, true), scale); // [B*nKV, nRep*T, L]
  const biased = tf.add(tf.reshape(scores, [B, nKV, nRep * T, L]), tf.reshape(bias, [B, 1, nRep * T, L])); // [B, nKV, nRep*T, L]
  const probs = tf.reshape(tf.softmax(biased), [B * nKV, nRep * T, L]); // [B*nKV, nRep*T, L]
  void hd;
  return tf.matMul(probs, v); // [B*nKV, nRep*T, hd]
}
