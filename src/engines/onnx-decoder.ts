/**
 * The decoder as ONE ONNX graph, run by onnxruntime-node: the native engine behind `onnxBackbone`.
 *
 * Graph (opset 17, float32, weights as initializers in the internal [in, out] layout, so no MatMul
 * needs a transposed weight):
 *
 *   inputs   input_ids [B,T] int64, cos/sin [B,T,hd], attn_bias [B,1,nRep*T,L] (L = S+T),
 *            logit_index [K] int64, past_key_i / past_value_i [S,B,nKV,hd] (sequence-major; S may be 0)
 *   outputs  hidden [B,T,d], logits [B,K,V], logits_argmax [B,K] int64 (fetched instead of logits for
 *            'argmax'), new_key_i / new_value_i [T,B,nKV,hd] (this call's entries)
 *
 * - Host-side bookkeeping (positions from the mask, the additive bias with causal / padding / sliding
 *   window terms, the RoPE cos/sin tables) is computed in JS exactly as decoderForward computes it, so
 *   masks and RoPE numerics match the reference.
 * - Attention is grouped as in decoder.ts: the nRep query heads of a KV group are stacked as rows
 *   (q [B,nKV,nRep*T,hd]), so GQA needs no repeated K/V and a decode step is one [nRep, hd] x [hd, L]
 *   product per group; the bias row r*T+i is query i for every head of the group.
 * - The cache stays on the host, sequence-major, in buffers with spare capacity: a call feeds the past
 *   as it is, the graph concatenates the new entries and
 *   transposes to [B,nKV,L,hd] for attention internally, and returns only the new entries, which the
 *   host appends. Returning the whole present cache instead cost a cache-sized copy out of onnxruntime
 *   plus a fresh allocation per step: 3.1 -> 1.7 ms per decode step of the 20M benchmark model.
 *   An empty cache is a zero-size [0,B,nKV,hd] input, which onnxruntime accepts, so one graph serves the
 *   full forward and cached decoding.
 * - Which logits: `logit_index` lists the positions whose logits are computed (Gather on hidden before
 *   the vocabulary projection): 0..T-1 for 'all', [T-1] for 'last', empty for 'none' (zero-size).
 * - RMSNorm is Pow/ReduceMean/Add/Sqrt/Div/Mul (the pattern onnxruntime fuses into
 *   SimplifiedLayerNormalization); SwiGLU is Mul(Mul(g, Sigmoid(g)), u).
 * - Tied embeddings: the lm_head is MatMul(hidden, Transpose(embed)), so the serialized model holds
 *   the embedding once (onnxruntime may constant-fold the transpose at load: a transposed copy in its
 *   memory, as the tfjs engine keeps too).
 * - Weights live inside the protobuf, which cannot exceed 2 GiB. Larger models would need ONNX
 *   external data (weights in a side file); not implemented: refused with E_UNSUPPORTED.
 */
import * as os from 'node:os';
import * as ort from 'onnxruntime-node';
import type * as tf from '@tensorflow/tfjs';
import { describe, fail } from '../errors.js';
import { GraphBuilder } from '../io/onnx.js';
import { parameterCount, type DecoderConfig } from '../model/config.js';
import { hostInputs, type CacheBook, type Decoder, type HostInputs, type TreeMask } from '../model/decoder.js';
import { createSession } from './ort.js';
import type { Backbone, BackboneCache, BackboneForwardArgs, BackboneForwardResult, OnnxBackboneOptions } from './decoder-engine.js';

/** A ModelProto is one protobuf message: at most 2 GiB. */
export const PROTOBUF_LIMIT_BYTES = 2 ** 31 - 1;
/** Room kept for the graph's nodes, names and small constants. */
const GRAPH_OVERHEAD_BYTES = 16 * 1024 * 1024;

/** Bytes of the float32 initializers of a model's graph (tied embeddings stored once). */
export function onnxWeightBytes(c: DecoderConfig): number {
  return 4 * parameterCount(c);
}

/** Refuse (E_UNSUPPORTED) a model whose weights do not fit one protobuf. */
export function checkOnnxModelSize(c: DecoderConfig): void {
  const bytes = onnxWeightBytes(c);
  if (bytes + GRAPH_OVERHEAD_BYTES > PROTOBUF_LIMIT_BYTES) {
    const gib = (x: number): string => (x / 1024 ** 3).toFixed(2);
    fail('E_UNSUPPORTED', `The onnx engine keeps the model's weights inside one ONNX protobuf, which is limited to 2 GiB; ` +
      `this model (${c.architecture}, ${parameterCount(c).toLocaleString('en-US')} parameters) needs ${gib(bytes)} GiB in float32. ` +
      'Weights in ONNX external data (a side file) are not implemented yet; use the tfjs engine for this model.');
  }
}

// ---------------------------------------------------------------------------------------------
// The graph

/** Float32 weights in the internal layout, as host arrays (read from the decoder's tensors). */
async function hostData(t: tf.Tensor): Promise<Float32Array> {
  const d = await t.data();
  if (!(d instanceof Float32Array)) fail('E_INTERNAL', `weight tensor of dtype ${t.dtype}; expected float32`);
  return d;
}

/** Build the serialized ModelProto of the decoder. Weights are read one tensor at a time. */
export async function buildDecoderGraph(model: Decoder): Promise<Uint8Array> {
  const c = model.config;
  checkOnnxModelSize(c);
  const w = model.weights;
  const d = c.hiddenSize;
  const nH = c.numHeads;
  const nKV = c.numKvHeads;
  const hd = c.headDim;
  const q = nH * hd;
  const kv = nKV * hd;
  const ff = c.intermediateSize;
  const V = c.vocabSize;
  const g = new GraphBuilder(`medusa-train-${c.architecture}`);
  const weight = async (name: string, t: tf.Tensor): Promise<string> => g.initializer(name, 'float32', t.shape, await hostData(t));
  // Small constants, named for readability of the graph.
  let constants = 0;
  const i64 = (vals: number[], prefix = 'shape'): string => g.initializer(`k${constants++}:${prefix}`, 'int64', [vals.length], vals);
  const f32 = (v: number, prefix = 'scalar'): string => g.initializer(`k${constants++}:${prefix}`, 'float32', [], [v]);

  const eps = f32(c.rmsNormEps, 'eps');
  const two = f32(2, 'two');
  const rmsNorm = (x: string, wName: string): string => {
    const ms = g.op('ReduceMean', [g.op('Pow', [x, two])], { axes: [-1], keepdims: 1 });
    return g.op('Mul', [g.op('Div', [x, g.op('Sqrt', [g.op('Add', [ms, eps])])]), wName]);
  };
  const slice = (x: string, start: number, end: number, axis: number): string =>
    g.op('Slice', [x, i64([start], 'start'), i64([end], 'end'), i64([axis], 'axis')]);

  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const cosIn = g.input('cos', 'float32', ['batch', 'seq', hd]);
  const sinIn = g.input('sin', 'float32', ['batch', 'seq', hd]);
  const bias = g.input('attn_bias', 'float32', ['batch', 1, 'rep_seq', 'total']);
  const logitIndex = g.input('logit_index', 'int64', ['n_logits']);
  const cos = g.op('Unsqueeze', [cosIn, i64([2], 'axes')]); // [B, T, 1, hd]
  const sin = g.op('Unsqueeze', [sinIn, i64([2], 'axes')]); // [B, T, 1, hd]
  const half = hd / 2;
  const rope = (x: string): string => {
    const x1 = slice(x, 0, half, 3);
    const x2 = slice(x, half, hd, 3);
    const rot = g.op('Concat', [g.op('Neg', [x2]), x1], { axis: 3 }); // [B, T, H, hd]
    return g.op('Add', [g.op('Mul', [x, cos]), g.op('Mul', [rot, sin])]);
  };
  const scale = f32(1 / Math.sqrt(hd), 'scale');

  const embed = await weight('embed', w.embed); // [V, d]
  let x = g.op('Gather', [embed, ids], { axis: 0 }); // [B, T, d]
  for (let li = 0; li < c.numLayers; li++) {
    const lw = w.layers[li];
    const p = `l${li}_`;
    const pastK = g.input(`past_key_${li}`, 'float32', ['past', 'batch', nKV, hd]); // sequence-major
    const pastV = g.input(`past_value_${li}`, 'float32', ['past', 'batch', nKV, hd]);
    // --- attention block ---
    const xn = rmsNorm(x, await weight(`${p}attn_norm`, lw.attnNorm)); // [B, T, d]
    let qkv = g.op('MatMul', [xn, await weight(`${p}wqkv`, lw.wqkv)]); // [B, T, q+2kv]
    if (lw.bqkv) qkv = g.op('Add', [qkv, await weight(`${p}bqkv`, lw.bqkv)]);
    let qh = g.op('Reshape', [slice(qkv, 0, q, 2), i64([0, 0, nH, hd])]); // [B, T, nH, hd]
    let kh = g.op('Reshape', [slice(qkv, q, q + kv, 2), i64([0, 0, nKV, hd])]); // [B, T, nKV, hd]
    const vh = g.op('Reshape', [slice(qkv, q + kv, q + 2 * kv, 2), i64([0, 0, nKV, hd])]); // [B, T, nKV, hd]
    if (lw.qNorm && lw.kNorm) {
      qh = rmsNorm(qh, await weight(`${p}q_norm`, lw.qNorm));
      kh = rmsNorm(kh, await weight(`${p}k_norm`, lw.kNorm));
    }
    qh = rope(qh);
    kh = rope(kh);
    const qG = g.op('Reshape', [g.op('Transpose', [qh], { perm: [0, 2, 1, 3] }), i64([0, nKV, -1, hd])]); // [B, nKV, nRep*T, hd]
    // The new entries go back to the host sequence-major ([T, B, nKV, hd]), where they are appended to the cache.
    const newK = g.node('Transpose', [kh], { outputs: [`new_key_${li}`], attrs: { perm: [1, 0, 2, 3] } })[0]; // [T, B, nKV, hd]
    const newV = g.node('Transpose', [vh], { outputs: [`new_value_${li}`], attrs: { perm: [1, 0, 2, 3] } })[0]; // [T, B, nKV, hd]
    g.output(newK, 'float32', ['seq', 'batch', nKV, hd]);
    g.output(newV, 'float32', ['seq', 'batch', nKV, hd]);
    const presentK = g.op('Transpose', [g.op('Concat', [pastK, newK], { axis: 0 })], { perm: [1, 2, 0, 3] }); // [B, nKV, L, hd]
    const presentV = g.op('Transpose', [g.op('Concat', [pastV, newV], { axis: 0 })], { perm: [1, 2, 0, 3] }); // [B, nKV, L, hd]
    const scores = g.op('Add', [g.op('Mul', [g.op('MatMul', [qG, g.op('Transpose', [presentK], { perm: [0, 1, 3, 2] })]), scale]), bias]); // [B, nKV, nRep*T, L]
    const probs = g.op('Softmax', [scores], { axis: -1 });
    const attn = g.op('MatMul', [probs, presentV]); // [B, nKV, nRep*T, hd]
    const merged = g.op('Reshape', [g.op('Transpose', [g.op('Reshape', [attn, i64([0, nH, -1, hd])])], { perm: [0, 2, 1, 3] }), i64([0, 0, q])]); // [B, T, q]
    let o = g.op('MatMul', [merged, await weight(`${p}wo`, lw.wo)]); // [B, T, d]
    if (lw.bo) o = g.op('Add', [o, await weight(`${p}bo`, lw.bo)]);
    const h = g.op('Add', [x, o]);
    // --- MLP block (SwiGLU) ---
    const hn = rmsNorm(h, await weight(`${p}mlp_norm`, lw.mlpNorm));
    const gu = g.op('MatMul', [hn, await weight(`${p}wgu`, lw.wgu)]); // [B, T, 2ff]
    const gate = slice(gu, 0, ff, 2);
    const act = g.op('Mul', [g.op('Mul', [gate, g.op('Sigmoid', [gate])]), slice(gu, ff, 2 * ff, 2)]); // [B, T, ff]
    x = g.op('Add', [h, g.op('MatMul', [act, await weight(`${p}wdown`, lw.wdown)])]);
  }
  const hidden = g.node('Identity', [rmsNorm(x, await weight('final_norm', w.finalNorm))], { outputs: ['hidden'] })[0]; // [B, T, d]
  g.output(hidden, 'float32', ['batch', 'seq', d]);
  const sel = g.op('Gather', [hidden, logitIndex], { axis: 1 }); // [B, K, d]
  const head = c.tieWordEmbeddings ? g.op('Transpose', [embed], { perm: [1, 0] }) : await weight('lm_head', w.lmHead); // [d, V]
  g.node('MatMul', [sel, head], { outputs: ['logits'] }); // [B, K, V]
  g.output('logits', 'float32', ['batch', 'n_logits', V]);
  // Greedy verification reads only the argmax: first maximum (select_last_index 0), as torch.argmax.
  g.node('ArgMax', ['logits'], { outputs: ['logits_argmax'], attrs: { axis: -1, keepdims: 0, select_last_index: 0 } }); // [B, K] int64
  g.output('logits_argmax', 'int64', ['batch', 'n_logits']);
  return g.serialize();
}

// ---------------------------------------------------------------------------------------------
// The backbone

/**
 * Host-side cache: per layer, keys and values sequence-major [length, B, nKV, hd] in a buffer with spare
 * capacity, so a step appends only its new entries (no per-step copy of the whole cache between the
 * host and onnxruntime; the graph transposes the past into attention layout internally).
 */
class OnnxCache implements BackboneCache, CacheBook {
  length = 0;
  k: Float32Array[] = [];
  v: Float32Array[] = [];
  keyPos: number[][];
  nextPos: number[];
  disposed = false;
  /** A forward on this cache is in flight (forwards on one cache must be awaited one by one). */
  busy = false;
  constructor(readonly owner: OnnxBackbone, readonly batch: number) {
    this.keyPos = Array.from({ length: batch }, () => []);
    this.nextPos = new Array<number>(batch).fill(0);
  }
  dispose(): void {
    this.disposed = true;
    this.k = [];
    this.v = [];
  }

  /** Keep only the entries at `keep` (ascending indexes into [0, length)), compacting the host buffers in place. */
  keepEntries(keep: number[]): void {
    if (this.disposed) fail('E_INTERNAL', 'keepEntries on a disposed onnx cache');
    if (this.busy) fail('E_INTERNAL', 'keepEntries while a forward on this cache is running');
    for (let i = 0; i < keep.length; i++) {
      const j = keep[i];
      if (!Number.isInteger(j) || j < 0 || j >= this.length || (i > 0 && j <= keep[i - 1])) {
        fail('E_INTERNAL', `keepEntries: index ${j} at ${i} is not ascending within [0, ${this.length})`);
      }
    }
    if (keep.length === this.length) return; // ascending and in range: the identity
    const c = this.owner.config;
    const entry = this.batch * c.numKvHeads * c.headDim; // values per cached position (sequence-major)
    for (const bufs of [this.k, this.v]) {
      for (const buf of bufs) {
        // keep[i] >= i, so copying forward in order never overwrites an entry still to be read.
        for (let i = 0; i < keep.length; i++) {
          if (keep[i] !== i) buf.copyWithin(i * entry, keep[i] * entry, (keep[i] + 1) * entry);
        }
      }
    }
    this.length = keep.length;
    for (let b = 0; b < this.batch; b++) {
      this.keyPos[b] = keep.map((j) => this.keyPos[b][j]);
      const real = this.keyPos[b].filter((p) => p >= 0);
      this.nextPos[b] = real.length > 0 ? real[real.length - 1] + 1 : 0;
    }
  }
}

/** Append `add` after the first `used` values of `buf`, growing it (x1.5, at least 64 more entries of `entry` values) when full. */
function append(buf: Float32Array | undefined, used: number, add: ArrayLike<number>, entry: number): Float32Array {
  const need = used + add.length;
  let out = buf ?? new Float32Array(0);
  if (out.length < need) {
    const grown = new Float32Array(Math.max(need + 64 * entry, Math.floor(1.5 * out.length)));
    grown.set(out.subarray(0, used));
    out = grown;
  }
  out.set(add, used);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Host inputs of tree-masked forwards (Medusa verification), cached per tree

/** The additive bias value of a masked pair (decoder.ts's; the tests compare with `hostInputs`). */
const MASKED = -1e9;

/**
 * Host inputs of tree forwards, equal to `hostInputs` (tested) but without rebuilding per step what
 * only depends on the tree: the bias block among the new tokens ([nRep*T, T], from `hostInputs` on an
 * empty cache) is kept per tree (its mask object and its positions relative to the root), RoPE rows
 * are kept per position. Per step only the prefix columns are computed (nothing to write when every
 * cached key is visible to every node, the usual case).
 */
export class TreeInputCache {
  private blocks = new WeakMap<Uint8Array, { rel: Int32Array; block: Float32Array }>();
  /** RoPE rows by position: [capacity, hd] each. */
  private cosTable = new Float32Array(0);
  private sinTable = new Float32Array(0);
  private ropeRows = 0;
  constructor(readonly c: DecoderConfig, readonly invFreq: Float32Array) {}

  /** Make sure RoPE rows exist for positions [0, upTo). */
  private rope(upTo: number): void {
    if (upTo <= this.ropeRows) return;
    const hd = this.c.headDim;
    const n = Math.max(upTo, 2 * this.ropeRows, 64);
    const cos = new Float32Array(n * hd);
    const sin = new Float32Array(n * hd);
    cos.set(this.cosTable.subarray(0, this.ropeRows * hd));
    sin.set(this.sinTable.subarray(0, this.ropeRows * hd));
    // Rows from the reference builder: a chain "tree" over the new positions on an empty cache.
    const T = n - this.ropeRows;
    const chain = hostInputs(this.c, this.invFreq, { length: 0, keyPos: [[]], nextPos: [0] }, 1, T, undefined, {
      mask: new Uint8Array(T * T), positions: Int32Array.from({ length: T }, (_, i) => this.ropeRows + i),
    });
    cos.set(chain.cos, this.ropeRows * hd);
    sin.set(chain.sin, this.ropeRows * hd);
    this.cosTable = cos;
    this.sinTable = sin;
    this.ropeRows = n;
  }

  /** `hostInputs(c, invFreq, book, 1, T, undefined, tree)` for a batch-1 tree forward. */
  inputs(book: CacheBook, tree: TreeMask): HostInputs {
    const c = this.c;
    const T = tree.positions.length;
    const S = book.length;
    const L = S + T;
    const nRep = c.numHeads / c.numKvHeads;
    const hd = c.headDim;
    const pos = tree.positions;
    let minPos = Infinity;
    let maxPos = -Infinity;
    for (let t = 0; t < T; t++) {
      if (!Number.isInteger(pos[t]) || pos[t] < 0) fail('E_INTERNAL', `treeMask.positions[${t}] = ${pos[t]} is not a position`);
      minPos = Math.min(minPos, pos[t]);
      maxPos = Math.max(maxPos, pos[t]);
    }
    // Positions past the model's range: no table that large (the reference builder handles them as it does).
    if (maxPos >= c.maxPositionEmbeddings) return hostInputs(c, this.invFreq, book, 1, T, undefined, tree);
    // The block among the new tokens depends only on the mask and the positions relative to the root.
    let hit = this.blocks.get(tree.mask);
    if (!hit || hit.rel.length !== T || hit.rel.some((r, t) => r !== pos[t] - pos[0])) {
      const rel = Int32Array.from(pos, (p) => p - pos[0]);
      const ref = hostInputs(c, this.invFreq, { length: 0, keyPos: [[]], nextPos: [0] }, 1, T, undefined, { mask: tree.mask, positions: rel });
      hit = { rel, block: ref.bias }; // [nRep*T, T]
      this.blocks.set(tree.mask, hit);
    }
    // Prefix columns: key j visible to node i when real, not after it, within the sliding window.
    // A fresh (zeroed) buffer per call: onnxruntime reads it while the run is in flight, and forwards on
    // different caches may overlap.
    const bias = new Float32Array(nRep * T * L); // [nRep*T, L]
    const keyPos = book.keyPos[0];
    const window = c.slidingWindow;
    let allVisible = true;
    for (let j = 0; j < S && allVisible; j++) {
      const kp = keyPos[j];
      allVisible = kp >= 0 && kp <= minPos && (window === null || maxPos - kp < window);
    }
    for (let i = 0; i < T; i++) {
      const row = i * L;
      if (!allVisible) {
        const q = pos[i];
        for (let j = 0; j < S; j++) {
          const kp = keyPos[j];
          bias[row + j] = kp >= 0 && kp <= q && (window === null || q - kp < window) ? 0 : MASKED;
        }
      }
      bias.set(hit.block.subarray(i * T, (i + 1) * T), row + S);
      for (let r = 1; r < nRep; r++) bias.copyWithin(row + r * T * L, row, row + L);
    }
    this.rope(maxPos + 1);
    const cos = new Float32Array(T * hd); // [T, hd]
    const sin = new Float32Array(T * hd);
    for (let t = 0; t < T; t++) {
      cos.set(this.cosTable.subarray(pos[t] * hd, (pos[t] + 1) * hd), t * hd);
      sin.set(this.sinTable.subarray(pos[t] * hd, (pos[t] + 1) * hd), t * hd);
    }
    return { positions: Int32Array.from(pos), newKeyPos: [Array.from(pos)], bias, cos, sin };
  }
}

class OnnxBackbone implements Backbone {
  readonly kind = 'onnx' as const;
  readonly config: DecoderConfig;
  private session: ort.InferenceSession | null;
  private readonly treeInputs: TreeInputCache;
  constructor(readonly decoder: Decoder, session: ort.InferenceSession) {
    this.config = decoder.config;
    this.session = session;
    this.treeInputs = new TreeInputCache(decoder.config, decoder.invFreq);
  }

  newCache(batch: number): BackboneCache {
    if (!Number.isInteger(batch) || batch < 1) fail('E_INTERNAL', `cache batch must be a positive integer, got ${batch}`);
    return new OnnxCache(this, batch);
  }

  async forward(a: BackboneForwardArgs): Promise<BackboneForwardResult> {
    const session = this.session;
    if (!session) fail('E_INTERNAL', 'forward() on a disposed onnx backbone');
    const c = this.config;
    const { batch: B, seqLen: T } = a;
    const nKV = c.numKvHeads;
    const hd = c.headDim;
    const nRep = c.numHeads / nKV;
    if (!Number.isInteger(B) || B < 1 || !Number.isInteger(T) || T < 1) fail('E_INTERNAL', `batch ${B} and seqLen ${T} must be positive integers`);
    if (a.ids.length !== B * T) fail('E_INTERNAL', `ids has ${a.ids.length} entries, expected batch*seqLen = ${B * T}`);
    if (a.mask && a.mask.length !== B * T) fail('E_INTERNAL', `mask has ${a.mask.length} entries, expected ${B * T}`);
    const ids = new BigInt64Array(B * T);
    for (let i = 0; i < ids.length; i++) {
      const id = a.ids[i];
      if (!Number.isInteger(id) || id < 0 || id >= c.vocabSize) fail('E_USAGE', `token id ${id} at index ${i} is outside the vocabulary [0, ${c.vocabSize})`);
      ids[i] = BigInt(id);
    }
    let cache: OnnxCache | undefined;
    if (a.cache !== undefined) {
      if (!(a.cache instanceof OnnxCache) || a.cache.owner !== this) fail('E_INTERNAL', 'the cache passed to the onnx backbone was not made by it (use backbone.newCache)');
      if (a.cache.disposed) fail('E_INTERNAL', 'the cache passed to the onnx backbone was disposed');
      cache = a.cache;
      if (cache.batch !== B) fail('E_INTERNAL', `cache batch ${cache.batch} != batch ${B}`);
      if (cache.busy) fail('E_INTERNAL', 'a forward on this cache is still running; await it before the next one');
    }
    const book: CacheBook = cache ?? { length: 0, keyPos: Array.from({ length: B }, () => []), nextPos: new Array<number>(B).fill(0) };
    const S = book.length;
    const L = S + T;
    const tree = a.treeMask;
    if (tree) {
      if (B !== 1) fail('E_INTERNAL', `treeMask needs batch 1, got ${B}`);
      if (a.mask) fail('E_INTERNAL', 'treeMask cannot be combined with a padding mask');
      if (tree.mask.length !== T * T) fail('E_INTERNAL', `treeMask.mask has ${tree.mask.length} entries, expected ${T * T}`);
      if (tree.positions.length !== T) fail('E_INTERNAL', `treeMask.positions has ${tree.positions.length} entries, expected ${T}`);
    }
    const host = tree ? this.treeInputs.inputs(book, tree) : hostInputs(c, this.decoder.invFreq, book, B, T, a.mask, tree);
    const logitIndex = a.logits === 'all' || a.logits === 'argmax' ? BigInt64Array.from({ length: T }, (_, i) => BigInt(i)) : a.logits === 'last' ? BigInt64Array.of(BigInt(T - 1)) : new BigInt64Array(0);
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', ids, [B, T]),
      cos: new ort.Tensor('float32', host.cos, [B, T, hd]),
      sin: new ort.Tensor('float32', host.sin, [B, T, hd]),
      attn_bias: new ort.Tensor('float32', host.bias, [B, 1, nRep * T, L]),
      logit_index: new ort.Tensor('int64', logitIndex, [logitIndex.length]),
    };
    const entry = B * nKV * hd; // values per cached position
    const empty = new Float32Array(0);
    for (let li = 0; li < c.numLayers; li++) {
      feeds[`past_key_${li}`] = new ort.Tensor('float32', S === 0 ? empty : cache!.k[li].subarray(0, S * entry), [S, B, nKV, hd]);
      feeds[`past_value_${li}`] = new ort.Tensor('float32', S === 0 ? empty : cache!.v[li].subarray(0, S * entry), [S, B, nKV, hd]);
    }
    const fetches = ['hidden', a.logits === 'argmax' ? 'logits_argmax' : 'logits'];
    if (cache) for (let li = 0; li < c.numLayers; li++) fetches.push(`new_key_${li}`, `new_value_${li}`);
    let out: ort.InferenceSession.ReturnType;
    if (cache) cache.busy = true;
    try {
      out = await session.run(feeds, fetches);
    } catch (e) {
      fail('E_ENGINE', `onnxruntime failed in the decoder forward (batch ${B}, ${T} new tokens, ${S} cached): ${describe(e)}`, e);
    } finally {
      if (cache) cache.busy = false;
    }
    if (cache && !cache.disposed) {
      for (let li = 0; li < c.numLayers; li++) {
        cache.k[li] = append(cache.k[li], S * entry, out[`new_key_${li}`].data as Float32Array, entry);
        cache.v[li] = append(cache.v[li], S * entry, out[`new_value_${li}`].data as Float32Array, entry);
      }
      cache.length = L;
      for (let b = 0; b < B; b++) {
        cache.keyPos[b] = cache.keyPos[b].concat(host.newKeyPos[b]);
        const real = host.newKeyPos[b].filter((p) => p >= 0);
        if (real.length > 0) cache.nextPos[b] = real[real.length - 1] + 1;
      }
    }
    const hidden = out['hidden'].data as Float32Array;
    if (a.logits === 'argmax') {
      const am = out['logits_argmax'].data as BigInt64Array; // [B, T]
      return { hidden, logits: null, argmax: Int32Array.from(am, (x) => Number(x)) };
    }
    const logits = a.logits === 'none' ? null : (out['logits'].data as Float32Array);
    return { hidden, logits };
  }

  dispose(): void {
    const s = this.session;
    this.session = null;
    if (s) void s.release().catch(() => undefined);
  }
}

/** Build the graph and its session; see `onnxBackbone` in decoder-engine.ts for memory. */
export async function createOnnxBackbone(decoder: Decoder, o: OnnxBackboneOptions = {}): Promise<Backbone> {
  const threads = o.threads ?? os.cpus().length;
  if (!Number.isInteger(threads) || threads < 1) fail('E_USAGE', `onnx threads must be a positive integer, got ${threads}`);
  let bytes: Uint8Array | null = await buildDecoderGraph(decoder);
  let session: ort.InferenceSession;
  try {
    session = await createSession(ort, bytes, threads, `decoder graph (${decoder.config.architecture}, ${bytes.length} bytes)`);
  } finally {
    bytes = null;
  }
  return new OnnxBackbone(decoder, session);
}
