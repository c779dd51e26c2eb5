/**
 * Hugging Face tensor names -> the decoder's internal weights. The mapping is a literal table;
 * loading checks the count, that every expected tensor is present with its exact shape, and
 * reports tensors that the table does not know.
 *
 * Internal layout (float32, tfjs): linear weights are stored [in, out] (PyTorch stores [out, in];
 * we transpose once at load so every matmul is the untransposed 2-D product that XNNPACK runs fast),
 * q/k/v are fused into one [d, q+2kv] matrix and gate/up into one [d, 2*ff] matrix.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { readTensorF32, type ShardedModel, type TensorInfo } from '../io/safetensors.js';
import type { DecoderConfig } from './config.js';

/** Which config flag a tensor depends on. */
type When = 'always' | 'untied' | 'qkvBias' | 'oBias' | 'qkNorm';
/** Shape as a function of the config's dimensions. */
type Dim = 'V' | 'd' | 'ff' | 'q' | 'kv' | 'hd';

interface TensorRow {
  hf: string;
  shape: readonly Dim[];
  when: When;
}

/** Tensors outside the layers. */
export const GLOBAL_TENSORS: readonly TensorRow[] = [
  { hf: 'model.embed_tokens.weight', shape: ['V', 'd'], when: 'always' },
  { hf: 'model.norm.weight', shape: ['d'], when: 'always' },
  { hf: 'lm_head.weight', shape: ['V', 'd'], when: 'untied' },
];

/** Tensors of layer i, named `model.layers.{i}.<hf>`. */
export const LAYER_TENSORS: readonly TensorRow[] = [
  { hf: 'input_layernorm.weight', shape: ['d'], when: 'always' },
  { hf: 'self_attn.q_proj.weight', shape: ['q', 'd'], when: 'always' },
  { hf: 'self_attn.k_proj.weight', shape: ['kv', 'd'], when: 'always' },
  { hf: 'self_attn.v_proj.weight', shape: ['kv', 'd'], when: 'always' },
  { hf: 'self_attn.o_proj.weight', shape: ['d', 'q'], when: 'always' },
  { hf: 'self_attn.q_proj.bias', shape: ['q'], when: 'qkvBias' },
  { hf: 'self_attn.k_proj.bias', shape: ['kv'], when: 'qkvBias' },
  { hf: 'self_attn.v_proj.bias', shape: ['kv'], when: 'qkvBias' },
  { hf: 'self_attn.o_proj.bias', shape: ['d'], when: 'oBias' },
  { hf: 'self_attn.q_norm.weight', shape: ['hd'], when: 'qkNorm' },
  { hf: 'self_attn.k_norm.weight', shape: ['hd'], when: 'qkNorm' },
  { hf: 'post_attention_layernorm.weight', shape: ['d'], when: 'always' },
  { hf: 'mlp.gate_proj.weight', shape: ['ff', 'd'], when: 'always' },
  { hf: 'mlp.up_proj.weight', shape: ['ff', 'd'], when: 'always' },
  { hf: 'mlp.down_proj.weight', shape: ['d', 'ff'], when: 'always' },
];

/** Names that some checkpoints carry and that are safely ignored (recomputed buffers). */
const IGNORABLE = [/\.rotary_emb\.inv_freq$/];

export interface ExpectedTensor {
  name: string;
  shape: number[];
}

function applies(when: When, c: DecoderConfig): boolean {
  switch (when) {
    case 'always': return true;
    case 'untied': return !c.tieWordEmbeddings;
    case 'qkvBias': return c.qkvBias;
    case 'oBias': return c.oBias;
    case 'qkNorm': return c.qkNorm;
  }
}

function dims(c: DecoderConfig): Record<Dim, number> {
  return { V: c.vocabSize, d: c.hiddenSize, ff: c.intermediateSize, q: c.numHeads * c.headDim, kv: c.numKvHeads * c.headDim, hd: c.headDim };
}

/** The full list of tensors a checkpoint of this config must hold, with shapes. */
export function expectedTensors(c: DecoderConfig): ExpectedTensor[] {
  const D = dims(c);
  const out: ExpectedTensor[] = [];
  for (const row of GLOBAL_TENSORS) if (applies(row.when, c)) out.push({ name: row.hf, shape: row.shape.map((s) => D[s]) });
  for (let i = 0; i < c.numLayers; i++) {
    for (const row of LAYER_TENSORS) if (applies(row.when, c)) out.push({ name: `model.layers.${i}.${row.hf}`, shape: row.shape.map((s) => D[s]) });
  }
  const perLayer = 9 + (c.qkvBias ? 3 : 0) + (c.oBias ? 1 : 0) + (c.qkNorm ? 2 : 0);
  const expectedCount = (c.tieWordEmbeddings ? 2 : 3) + c.numLayers * perLayer;
  if (out.length !== expectedCount) fail('E_INTERNAL', `weight table produced ${out.length} tensors, expected ${expectedCount}`);
  return out;
}

export interface LayerWeights {
  attnNorm: tf.Tensor1D; // [d]
  wqkv: tf.Tensor2D; // [d, q + 2kv]
  bqkv: tf.Tensor1D | null; // [q + 2kv]
  wo: tf.Tensor2D; // [q, d]
  bo: tf.Tensor1D | null; // [d]
  qNorm: tf.Tensor1D | null; // [hd]
  kNorm: tf.Tensor1D | null; // [hd]
  mlpNorm: tf.Tensor1D; // [d]
  wgu: tf.Tensor2D; // [d, 2ff]  (gate columns first, then up)
  wdown: tf.Tensor2D; // [ff, d]
}

export interface DecoderWeights {
  embed: tf.Tensor2D; // [V, d]
  layers: LayerWeights[];
  finalNorm: tf.Tensor1D; // [d]
  /** [d, V]; for tied embeddings a transposed copy of embed. */
  lmHead: tf.Tensor2D;
}

export interface LoadReport {
  /** Tensors in the files that the table does not know (and that are not known-harmless). */
  unexpected: string[];
  /** Known-harmless tensors skipped (e.g. rotary inv_freq buffers). */
  ignored: string[];
  /** dtypes found in the checkpoint, with counts. */
  dtypes: Record<string, number>;
}

/** Check the checkpoint's tensor set against the table without reading any data. */
export function checkTensorSet(model: ShardedModel, c: DecoderConfig, where: string): LoadReport {
  const expected = expectedTensors(c);
  const problems: string[] = [];
  for (const e of expected) {
    const info = model.tensors.get(e.name);
    if (!info) {
      problems.push(`missing tensor ${e.name} (expected shape [${e.shape.join(', ')}])`);
    } else if (info.shape.length !== e.shape.length || info.shape.some((s, i) => s !== e.shape[i])) {
      problems.push(`tensor ${e.name} has shape [${info.shape.join(', ')}] in ${info.file}, expected [${e.shape.join(', ')}]`);
    } else if (!['F32', 'F16', 'BF16', 'F64'].includes(info.dtype)) {
      problems.push(`tensor ${e.name} has dtype ${info.dtype}; weights must be F32, F16 or BF16`);
    }
  }
  if (problems.length > 0) {
    const shown = problems.slice(0, 20);
    fail('E_MODEL', `${where} does not match its config.json (${c.architecture}, ${c.numLayers} layers, hidden ${c.hiddenSize}):\n  - ${shown.join('\n  - ')}` +
      (problems.length > shown.length ? `\n  - … and ${problems.length - shown.length} more` : '') +
      '\nThe checkpoint is incomplete or belongs to another config; re-download or re-export it.');
  }
  const names = new Set(expected.map((e) => e.name));
  const unexpected: string[] = [];
  const ignored: string[] = [];
  const dtypes: Record<string, number> = {};
  for (const [name, info] of model.tensors) {
    dtypes[info.dtype] = (dtypes[info.dtype] ?? 0) + 1;
    if (names.has(name)) continue;
    if (IGNORABLE.some((r) => r.test(name)) || (c.tieWordEmbeddings && name === 'lm_head.weight')) ignored.push(name);
    else unexpected.push(name);
  }
  return { unexpected, ignored, dtypes };
}

function get(model: ShardedModel, name: string): TensorInfo {
  const info = model.tensors.get(name);
  if (!info) fail('E_INTERNAL', `tensor ${name} vanished after the check`);
  return info;
}

/** Transpose a row-major [rows, cols] matrix into columns [colOffset, colOffset+rows) of a [cols, dstCols] matrix. */
function transposeInto(dst: Float32Array, dstCols: number, colOffset: number, src: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let k = 0; k < cols; k++) dst[k * dstCols + colOffset + r] = src[base + k];
  }
}

/** Read PyTorch-layout [out, in] weights and build one fused [in, sum(out)] matrix. */
function fusedLinear(model: ShardedModel, names: string[], inDim: number): tf.Tensor2D {
  const parts = names.map((n) => ({ info: get(model, n) }));
  const outTotal = parts.reduce((a, p) => a + p.info.shape[0], 0);
  const dst = new Float32Array(inDim * outTotal);
  let off = 0;
  for (const p of parts) {
    const rows = p.info.shape[0];
    transposeInto(dst, outTotal, off, readTensorF32(p.info), rows, inDim);
    off += rows;
  }
  return tf.tensor2d(dst, [inDim, outTotal]); // [in, out_total]
}

function vector(model: ShardedModel, names: string[]): tf.Tensor1D {
  const arrays = names.map((n) => readTensorF32(get(model, n)));
  const total = arrays.reduce((a, x) => a + x.length, 0);
  const dst = new Float32Array(total);
  let off = 0;
  for (const a of arrays) {
    dst.set(a, off);
    off += a.length;
  }
  return tf.tensor1d(dst);
}

/** Load every tensor into backend memory in the internal layout (float32). */
export function loadDecoderWeights(model: ShardedModel, c: DecoderConfig, where: string): { weights: DecoderWeights; report: LoadReport } {
  const report = checkTensorSet(model, c, where);
  const d = c.hiddenSize;
  const layers: LayerWeights[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`;
    layers.push({
      attnNorm: vector(model, [`${p}input_layernorm.weight`]),
      wqkv: fusedLinear(model, [`${p}self_attn.q_proj.weight`, `${p}self_attn.k_proj.weight`, `${p}self_attn.v_proj.weight`], d),
      bqkv: c.qkvBias ? vector(model, [`${p}self_attn.q_proj.bias`, `${p}self_attn.k_proj.bias`, `${p}self_attn.v_proj.bias`]) : null,
      wo: fusedLinear(model, [`${p}self_attn.o_proj.weight`], c.numHeads * c.headDim),
      bo: c.oBias ? vector(model, [`${p}self_attn.o_proj.bias`]) : null,
      qNorm: c.qkNorm ? vector(model, [`${p}self_attn.q_norm.weight`]) : null,
      kNorm: c.qkNorm ? vector(model, [`${p}self_attn.k_norm.weight`]) : null,
      mlpNorm: vector(model, [`${p}post_attention_layernorm.weight`]),
      wgu: fusedLinear(model, [`${p}mlp.gate_proj.weight`, `${p}mlp.up_proj.weight`], d),
      wdown: fusedLinear(model, [`${p}mlp.down_proj.weight`], c.intermediateSize),
    });
  }
  const embedData = readTensorF32(get(model, 'model.embed_tokens.weight'));
  const embed = tf.tensor2d(embedData, [c.vocabSize, d]); // [V, d]
  const lmHead = c.tieWordEmbeddings
    ? (() => {
        const dst = new Float32Array(d * c.vocabSize);
        transposeInto(dst, c.vocabSize, 0, embedData, c.vocabSize, d);
        return tf.tensor2d(dst, [d, c.vocabSize]);
      })()
    : fusedLinear(model, ['lm_head.weight'], d); // [d, V]
  const finalNorm = vector(model, ['model.norm.weight']);
  return { weights: { embed, layers, finalNorm, lmHead }, report };
}

export function disposeWeights(w: DecoderWeights): void {
  const all: (tf.Tensor | null)[] = [w.embed, w.finalNorm, w.lmHead];
  for (const l of w.layers) all.push(l.attnNorm, l.wqkv, l.bqkv, l.wo, l.bo, l.qNorm, l.kNorm, l.mlpNorm, l.wgu, l.wdown);
  for (const t of all) t?.dispose();
}

/** The base lm_head in PyTorch layout [V, d] (what `lm_head.weight` holds) on the host, from the internal [d, V]. */
export function lmHeadReference(w: DecoderWeights): Float32Array {
  const [d, V] = w.lmHead.shape;
  const t = w.lmHead.dataSync() as Float32Array; // [d, V]
  const out = new Float32Array(V * d); // [V, d]
  for (let i = 0; i < d; i++) for (let j = 0; j < V; j++) out[j * d + i] = t[i * V + j];
  return out;
}
