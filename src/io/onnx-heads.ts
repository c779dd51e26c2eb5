/**
 * The Medusa heads as one ONNX model: our own layout (no runtime defines one), written for and proven
 * with onnxruntime. Leaf module (errors, Node builtins, onnx-proto, onnxruntime-node loaded lazily).
 *
 * Layout "medusa-heads-onnx/1", opset 17 (default domain only), IR version 8:
 *
 *   input   hidden_states  float32 [batch, seq, hidden]        batch, seq: dim_param "batch", "seq"
 *   output  logits         float32 [heads, batch, seq, vocab]  heads, hidden, vocab: fixed numbers
 *
 *   head k:  h = hidden_states
 *            per block l:  z = h @ head{k}.block{l}.weight_t + head{k}.block{l}.bias
 *                          h = h + z * Sigmoid(z)                             (SiLU, residual)
 *            logits_k = h @ head{k}.proj.weight_t          (per_head)
 *                     = h @ lm_head.weight_t               (shared: ONE initializer for every head)
 *   logits = Concat(Unsqueeze(logits_k, [0]) for k in 0..heads-1, axis 0)
 *
 * Initializers (float32 unless said; "W" is the Medusa reference tensor, PyTorch [out, in]):
 *
 *   head{k}.block{l}.weight_t  [hidden, hidden]  = transpose(W `{k}.{l}.linear.weight`)  ([in, out])
 *   head{k}.block{l}.bias      [hidden]          = W `{k}.{l}.linear.bias`
 *   head{k}.proj.weight_t      [hidden, vocab]   = transpose(W `{k}.{L}.weight`)          (per_head)
 *   lm_head.weight_t           [hidden, vocab]   = transpose(base lm_head [vocab, hidden]) (shared)
 *   unsqueeze_axes             int64 [1] = [0]
 *
 * Intermediate values are named head{k}.block{l}.{linear,pre,sigmoid,silu,out}, head{k}.logits and
 * head{k}.logits_4d. metadata_props: producer, layout, input, output, medusa_num_heads,
 * medusa_num_layers, hidden_size, vocab_size, lm_head (+ the caller's own keys).
 *
 * Weights are stored inline while they fit the 2 GiB protobuf limit (minus a margin); above that (or
 * above `externalDataThreshold`) they go to ONNX external data: `<model file>.data` beside the model,
 * each tensor at an offset aligned to 64 KiB (page size and Windows mapping granularity, so
 * onnxruntime can map it), TensorProto.data_location = EXTERNAL with external_data {location (the
 * data file's base name), offset, length}. onnxruntime resolves the location relative to the model
 * file, so such models are opened by path (runOnnxHeads always does).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type * as OrtTypes from 'onnxruntime-node';
import onnxProto from 'onnx-proto';
import { describe, fail } from '../errors.js';
import { writeFileAtomic } from './atomic.js';
import { GraphBuilder, ONNX_IR_VERSION, ONNX_OPSET } from './onnx.js';

const onnx = onnxProto.onnx;

export const ONNX_HEADS_LAYOUT = {
  input: 'hidden_states',
  output: 'logits',
  opset: 17,
  inputShape: ['batch', 'seq', 'hidden'],
  outputShape: ['heads', 'batch', 'seq', 'vocab'],
} as const;

/** The layout's version, stored in metadata_props `layout`. */
export const ONNX_HEADS_LAYOUT_VERSION = 'medusa-heads-onnx/1';

/** The symbolic (dim_param) names of the dynamic dimensions. */
export const ONNX_HEADS_BATCH_DIM = 'batch';
export const ONNX_HEADS_SEQ_DIM = 'seq';

/** The protobuf limit of one serialized model (2 GiB - 1). */
export const ONNX_PROTOBUF_LIMIT_BYTES = 2 ** 31 - 1;
/** Weight bytes above which the weights go to external data by default (the limit minus 64 MiB for the graph). */
export const ONNX_HEADS_INLINE_LIMIT_BYTES = ONNX_PROTOBUF_LIMIT_BYTES - 64 * 2 ** 20;
/** Alignment of each tensor's offset in the external data file. */
export const ONNX_EXTERNAL_DATA_ALIGNMENT = 65536;

const UNSQUEEZE_AXES = 'unsqueeze_axes';
const ALLOWED_OPS = new Set(['MatMul', 'Add', 'Sigmoid', 'Mul', 'Unsqueeze', 'Concat']);
const RESERVED_METADATA = ['producer', 'layout', 'input', 'output', 'medusa_num_heads', 'medusa_num_layers', 'hidden_size', 'vocab_size', 'lm_head'];

export interface OnnxHeadsShape {
  numHeads: number;
  numLayers: number;
  hiddenSize: number;
  vocabSize: number;
}

export type OnnxLmHeadMode = 'per_head' | 'shared';

export type ReferenceHeadTensors = Record<string, { shape: number[]; data: Float32Array }>;

/** One initializer of the layout and where its values come from. */
export interface OnnxHeadsRow {
  /** The ONNX initializer name. */
  name: string;
  /** Its dims in the ONNX model. */
  dims: number[];
  /** The Medusa reference tensor it is made from, or 'lm_head' (the shared base lm_head [V, d]). */
  source: string;
  /** Stored transposed: the source is [out, in] (PyTorch), the initializer [in, out]. */
  transpose: boolean;
}

/**
 * The literal table of the layout's weight initializers for a shape, in file order. The reference
 * names are those of model/heads.ts `headTensorTable` (the tests check the two agree).
 */
export function onnxHeadsTable(s: OnnxHeadsShape, lmHead: OnnxLmHeadMode): OnnxHeadsRow[] {
  const d = s.hiddenSize;
  const V = s.vocabSize;
  const rows: OnnxHeadsRow[] = [];
  for (let k = 0; k < s.numHeads; k++) {
    for (let l = 0; l < s.numLayers; l++) {
      rows.push({ name: `head${k}.block${l}.weight_t`, dims: [d, d], source: `${k}.${l}.linear.weight`, transpose: true });
      rows.push({ name: `head${k}.block${l}.bias`, dims: [d], source: `${k}.${l}.linear.bias`, transpose: false });
    }
    if (lmHead === 'per_head') rows.push({ name: `head${k}.proj.weight_t`, dims: [d, V], source: `${k}.${s.numLayers}.weight`, transpose: true });
  }
  if (lmHead === 'shared') rows.push({ name: 'lm_head.weight_t', dims: [d, V], source: 'lm_head', transpose: true });
  return rows;
}

export interface WriteOnnxHeadsOptions {
  /** The .onnx file to write (its folder is created). */
  out: string;
  /** The heads in the Medusa reference layout (model/heads.ts exportHeads). */
  heads: ReferenceHeadTensors;
  shape: OnnxHeadsShape;
  /** The base lm_head [V, d] when the heads share it: stored once, used by every head. */
  sharedLmHead?: Float32Array;
  /** Extra metadata_props (keys other than the layout's own). */
  metadata?: Record<string, string>;
  /** Weight bytes above which external data is used (default ONNX_HEADS_INLINE_LIMIT_BYTES; never above it). */
  externalDataThreshold?: number;
  /** Offset alignment in the external data file (default ONNX_EXTERNAL_DATA_ALIGNMENT). */
  externalDataAlignment?: number;
}

export interface WriteOnnxHeadsResult {
  /** Absolute paths written: the model, then the external data file if any. */
  files: string[];
  /** Total bytes of those files. */
  bytes: number;
  externalData: boolean;
}

/** Write the heads as an ONNX model in the layout above, atomically (temporary names + rename). */
export async function writeOnnxHeads(o: WriteOnnxHeadsOptions): Promise<WriteOnnxHeadsResult> {
  if (ONNX_OPSET !== ONNX_HEADS_LAYOUT.opset) fail('E_INTERNAL', `the ONNX builder targets opset ${ONNX_OPSET} but the heads layout is opset ${ONNX_HEADS_LAYOUT.opset}`);
  const s = o.shape;
  checkShape(s);
  const lmHead: OnnxLmHeadMode = o.sharedLmHead ? 'shared' : 'per_head';
  const table = onnxHeadsTable(s, lmHead);
  const sources = collectSources(o, table, lmHead);
  const metadata = buildMetadata(s, lmHead, o.metadata);

  const out = path.resolve(o.out);
  const dataFile = `${out}.data`;
  const location = path.basename(dataFile);
  const align = o.externalDataAlignment ?? ONNX_EXTERNAL_DATA_ALIGNMENT;
  if (!Number.isInteger(align) || align < 1) fail('E_CONFIG', `externalDataAlignment must be a positive integer, got ${align}`);
  const threshold = Math.min(o.externalDataThreshold ?? ONNX_HEADS_INLINE_LIMIT_BYTES, ONNX_HEADS_INLINE_LIMIT_BYTES);
  const weightBytes = table.reduce((a, r) => a + numel(r.dims) * 4, 0);
  const external = weightBytes > threshold;

  const { model, plan } = onnxHeadsModel(s, lmHead, table, sources, metadata, external ? { location, align } : null, false);
  let bytes: Uint8Array;
  try {
    bytes = onnx.ModelProto.encode(model).finish();
  } catch (e) {
    fail('E_INTERNAL', `could not serialize the ONNX heads model for ${out}: ${describe(e)}`, e);
  }
  if (bytes.length > ONNX_PROTOBUF_LIMIT_BYTES) fail('E_INTERNAL', `the ONNX heads model is ${bytes.length} bytes, over the protobuf limit, with weights ${external ? 'external' : 'inline'}`);

  try {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    if (external) {
      // data first, then the model that points into it: the model under its final name never refers to a partial data file
      writeFileAtomic(dataFile, externalParts(plan, sources));
      writeFileAtomic(out, [bytes]);
    } else {
      writeFileAtomic(out, [bytes]);
      fs.rmSync(dataFile, { force: true }); // a stale data file of an earlier external export
    }
  } catch (e) {
    fail('E_IO', `could not write the ONNX heads model ${external ? `${out} (+ ${dataFile})` : out}: ${describe(e)}`, e);
  }
  const files = external ? [out, dataFile] : [out];
  return { files, bytes: files.reduce((a, f) => a + fs.statSync(f).size, 0), externalData: external };
}

type ExternalPlan = { row: OnnxHeadsRow; offset: number; length: number }[];

/** Names of the optional top-k proposal input and outputs (`buildOnnxHeadsProposer`). */
export const ONNX_HEADS_TOPK = { k: 'topk', values: 'topk_values', indices: 'topk_indices' } as const;

/**
 * The layout's ModelProto over validated sources: weights inline, or external at planned offsets in
 * `ext.location` (`plan`, written by the caller). `topk` adds the proposal input/outputs (ONNX_HEADS_TOPK).
 */
function onnxHeadsModel(
  s: OnnxHeadsShape, lmHead: OnnxLmHeadMode, table: OnnxHeadsRow[], sources: Map<string, Source>, metadata: Record<string, string>,
  ext: { location: string; align: number } | null, topk: boolean,
): { model: InstanceType<typeof onnx.ModelProto>; plan: ExternalPlan } {
  const g = new GraphBuilder('medusa_heads');
  const d = s.hiddenSize;
  g.input(ONNX_HEADS_LAYOUT.input, 'float32', [ONNX_HEADS_BATCH_DIM, ONNX_HEADS_SEQ_DIM, d]);
  // weights: inline (transposed copies) or external (planned offsets; bytes streamed below)
  const plan: ExternalPlan = [];
  let end = 0;
  for (const row of table) {
    const src = sources.get(row.name)!;
    if (ext) {
      const offset = alignUp(end, ext.align);
      const length = numel(row.dims) * 4;
      g.externalInitializer(row.name, 'float32', row.dims, { location: ext.location, offset, length });
      plan.push({ row, offset, length });
      end = offset + length;
    } else {
      g.initializer(row.name, 'float32', row.dims, row.transpose ? transposeFull(src.data, src.rows, src.cols) : src.data);
    }
  }
  g.initializer(UNSQUEEZE_AXES, 'int64', [1], [0]);

  const perHead: string[] = [];
  for (let k = 0; k < s.numHeads; k++) {
    let h: string = ONNX_HEADS_LAYOUT.input;
    for (let l = 0; l < s.numLayers; l++) {
      const p = `head${k}.block${l}`;
      const lin = g.node('MatMul', [h, `${p}.weight_t`], { outputs: [`${p}.linear`], name: `${p}.matmul` })[0];
      const pre = g.node('Add', [lin, `${p}.bias`], { outputs: [`${p}.pre`], name: `${p}.add_bias` })[0];
      const sig = g.node('Sigmoid', [pre], { outputs: [`${p}.sigmoid`], name: `${p}.sigmoid_op` })[0];
      const silu = g.node('Mul', [pre, sig], { outputs: [`${p}.silu`], name: `${p}.silu_op` })[0];
      h = g.node('Add', [h, silu], { outputs: [`${p}.out`], name: `${p}.residual` })[0];
    }
    const proj = lmHead === 'shared' ? 'lm_head.weight_t' : `head${k}.proj.weight_t`;
    const logits = g.node('MatMul', [h, proj], { outputs: [`head${k}.logits`], name: `head${k}.project` })[0];
    perHead.push(g.node('Unsqueeze', [logits, UNSQUEEZE_AXES], { outputs: [`head${k}.logits_4d`], name: `head${k}.unsqueeze` })[0]);
  }
  g.node('Concat', perHead, { outputs: [ONNX_HEADS_LAYOUT.output], attrs: { axis: 0 }, name: 'concat_heads' });
  g.output(ONNX_HEADS_LAYOUT.output, 'float32', [s.numHeads, ONNX_HEADS_BATCH_DIM, ONNX_HEADS_SEQ_DIM, s.vocabSize]);
  if (topk) {
    // Decoding-time proposals (not part of the exported layout): each head's top-k, best first.
    const k = g.input(ONNX_HEADS_TOPK.k, 'int64', [1]);
    g.node('TopK', [ONNX_HEADS_LAYOUT.output, k], { outputs: [ONNX_HEADS_TOPK.values, ONNX_HEADS_TOPK.indices], attrs: { axis: -1, largest: 1, sorted: 1 }, name: 'topk_heads' }); // [K, B, T, k] each
    g.output(ONNX_HEADS_TOPK.values, 'float32', [s.numHeads, ONNX_HEADS_BATCH_DIM, ONNX_HEADS_SEQ_DIM, 'k']);
    g.output(ONNX_HEADS_TOPK.indices, 'int64', [s.numHeads, ONNX_HEADS_BATCH_DIM, ONNX_HEADS_SEQ_DIM, 'k']);
  }

  const model = g.build();
  model.metadataProps = Object.entries(metadata).map(([key, value]) => onnx.StringStringEntryProto.create({ key, value }));
  model.docString = `Medusa heads (${ONNX_HEADS_LAYOUT_VERSION}): ${ONNX_HEADS_LAYOUT.input} float32 [batch, seq, ${d}] -> ${ONNX_HEADS_LAYOUT.output} float32 [${s.numHeads}, batch, seq, ${s.vocabSize}]; ${s.numLayers} SiLU residual block(s) per head, lm_head ${lmHead}.`;
  return { model, plan };
}

export interface OnnxHeadsProposerOptions {
  /** The heads in the Medusa reference layout (model/heads.ts exportHeads). */
  heads: ReferenceHeadTensors;
  shape: OnnxHeadsShape;
  /** The base lm_head [V, d] when the heads share it. */
  sharedLmHead?: Float32Array;
}

/**
 * The exported layout's graph (weights inline) plus each head's top-k (input `topk` int64 [1],
 * outputs `topk_values` float32 / `topk_indices` int64 [heads, batch, seq, k], best first), serialized
 * for an in-memory onnxruntime session: the decoding-time heads proposer. Not written to disk.
 */
export function buildOnnxHeadsProposer(o: OnnxHeadsProposerOptions): Uint8Array {
  const s = o.shape;
  checkShape(s);
  const lmHead: OnnxLmHeadMode = o.sharedLmHead ? 'shared' : 'per_head';
  const table = onnxHeadsTable(s, lmHead);
  const where = 'the in-memory heads proposer';
  const sources = collectSources({ ...o, out: where }, table, lmHead);
  const weightBytes = table.reduce((a, r) => a + numel(r.dims) * 4, 0);
  if (weightBytes > ONNX_HEADS_INLINE_LIMIT_BYTES) fail('E_UNSUPPORTED', `the heads' weights (${weightBytes} bytes) do not fit one ONNX protobuf for ${where}; use the tfjs proposer`);
  const { model } = onnxHeadsModel(s, lmHead, table, sources, buildMetadata(s, lmHead, undefined), null, true);
  return onnx.ModelProto.encode(model).finish();
}

interface Source {
  data: Float32Array;
  /** The source matrix is [rows, cols] (1-D sources: rows = 1). */
  rows: number;
  cols: number;
}

function checkShape(s: OnnxHeadsShape): void {
  const bad: string[] = [];
  const need = (name: keyof OnnxHeadsShape, min: number) => {
    const v = s[name];
    if (!Number.isSafeInteger(v) || v < min) bad.push(`${name} = ${v} (an integer >= ${min})`);
  };
  need('numHeads', 1);
  need('numLayers', 0);
  need('hiddenSize', 1);
  need('vocabSize', 1);
  if (bad.length > 0) fail('E_CONFIG', `bad heads shape for the ONNX export: ${bad.join(', ')}`);
}

function collectSources(o: WriteOnnxHeadsOptions, table: OnnxHeadsRow[], lmHead: OnnxLmHeadMode): Map<string, Source> {
  const s = o.shape;
  const problems: string[] = [];
  const sources = new Map<string, Source>();
  for (const row of table) {
    let data: Float32Array | undefined;
    let shape: number[];
    if (row.source === 'lm_head') {
      shape = [s.vocabSize, s.hiddenSize];
      data = o.sharedLmHead;
      if (data && data.length !== s.vocabSize * s.hiddenSize) {
        problems.push(`the shared lm_head has ${data.length} values, expected [${shape}] = ${s.vocabSize * s.hiddenSize}`);
        continue;
      }
    } else {
      const t = o.heads[row.source];
      shape = row.transpose ? [row.dims[1], row.dims[0]] : row.dims;
      if (!t) {
        problems.push(`missing ${row.source} [${shape}]`);
        continue;
      }
      if (t.shape.join(',') !== shape.join(',')) {
        problems.push(`${row.source} is [${t.shape}], expected [${shape}]`);
        continue;
      }
      if (t.data.length !== numel(shape)) {
        problems.push(`${row.source} has ${t.data.length} values for shape [${shape}]`);
        continue;
      }
      data = t.data;
    }
    const bad = countNonFinite(data!);
    if (bad > 0) problems.push(`${row.source} has ${bad} NaN/Inf value(s)`);
    sources.set(row.name, { data: data!, rows: shape.length === 2 ? shape[0] : 1, cols: shape[shape.length - 1] });
  }
  const known = new Set(table.map((r) => r.source));
  for (const name of Object.keys(o.heads)) if (!known.has(name)) problems.push(`unexpected tensor ${name}${lmHead === 'shared' && /^\d+\.\d+\.weight$/.test(name) ? ' (a per-head projection, but a shared lm_head was given)' : ''}`);
  if (problems.length > 0) {
    fail('E_MODEL', `the heads do not match the shape ${s.numHeads} heads x ${s.numLayers} layers, hidden ${s.hiddenSize}, vocab ${s.vocabSize}, lm_head ${lmHead} (nothing written to ${o.out}):\n  - ${problems.join('\n  - ')}`);
  }
  return sources;
}

function buildMetadata(s: OnnxHeadsShape, lmHead: OnnxLmHeadMode, extra: Record<string, string> | undefined): Record<string, string> {
  const meta: Record<string, string> = {
    producer: 'medusa-train',
    layout: ONNX_HEADS_LAYOUT_VERSION,
    input: `${ONNX_HEADS_LAYOUT.input} float32 [batch, seq, hidden]`,
    output: `${ONNX_HEADS_LAYOUT.output} float32 [heads, batch, seq, vocab]`,
    medusa_num_heads: String(s.numHeads),
    medusa_num_layers: String(s.numLayers),
    hidden_size: String(s.hiddenSize),
    vocab_size: String(s.vocabSize),
    lm_head: lmHead,
  };
  for (const [k, v] of Object.entries(extra ?? {})) {
    if (RESERVED_METADATA.includes(k)) fail('E_CONFIG', `ONNX metadata key "${k}" is set by the heads layout itself; use another key`);
    if (typeof v !== 'string') fail('E_CONFIG', `ONNX metadata "${k}" must be a string, got ${typeof v}`);
    meta[k] = v;
  }
  return meta;
}

function numel(dims: number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

function countNonFinite(a: Float32Array): number {
  let n = 0;
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i])) n++;
  return n;
}

/** Rows [c0, c1) of the transpose of src [rows, cols] (i.e. its columns c0..c1-1) into dst at dstOffset. */
function transposeInto(src: Float32Array, rows: number, cols: number, c0: number, c1: number, dst: Float32Array, dstOffset: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = c0; c < c1; c++) dst[dstOffset + (c - c0) * rows + r] = src[base + c];
  }
}

function transposeFull(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  const step = Math.max(1, Math.floor(2 ** 22 / rows)); // blocks of ~16 MB of output
  for (let c0 = 0; c0 < cols; c0 += step) {
    const c1 = Math.min(cols, c0 + step);
    transposeInto(src, rows, cols, c0, c1, out, c0 * rows);
  }
  return out;
}

function bytesOf(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** The external data file's bytes, lazily: padding to each planned offset, then the tensor (transposed ~16 MB at a time). */
function* externalParts(plan: { row: OnnxHeadsRow; offset: number; length: number }[], sources: Map<string, Source>): Generator<Uint8Array> {
  let pos = 0;
  for (const { row, offset, length } of plan) {
    if (offset > pos) yield new Uint8Array(offset - pos);
    const src = sources.get(row.name)!;
    if (!row.transpose) yield bytesOf(src.data);
    else {
      const step = Math.max(1, Math.floor(2 ** 22 / src.rows));
      for (let c0 = 0; c0 < src.cols; c0 += step) {
        const c1 = Math.min(src.cols, c0 + step);
        const chunk = new Float32Array((c1 - c0) * src.rows);
        transposeInto(src.data, src.rows, src.cols, c0, c1, chunk, 0);
        yield bytesOf(chunk);
      }
    }
    pos = offset + length;
  }
}

// ---------------------------------------------------------------------------------------------------
// onnxruntime

type Ort = typeof OrtTypes;

async function loadOrt(): Promise<Ort> {
  try {
    const mod = (await import('onnxruntime-node')) as Ort & { default?: Ort };
    // CommonJS: the named exports may only be on `default` depending on the loader
    return typeof mod.InferenceSession === 'function' ? mod : (mod.default as Ort);
  } catch (e) {
    fail('E_BACKEND', `onnxruntime-node failed to load: ${describe(e).split('\n')[0]} (reinstall the package's dependencies: npm ci)`, e);
  }
}

/**
 * Run an exported heads model with onnxruntime-node: hidden [batch, seq, d] float32 -> logits
 * [K, batch, seq, V] float32 (row-major). The session is created from the file path (external data is
 * resolved beside it) and released before returning.
 */
export async function runOnnxHeads(file: string, hidden: Float32Array, batch: number, seq: number, d: number, opts: { threads?: number } = {}): Promise<Float32Array> {
  for (const [name, v] of [['batch', batch], ['seq', seq], ['d', d]] as const) {
    if (!Number.isSafeInteger(v) || v < 1) fail('E_INTERNAL', `runOnnxHeads: ${name} must be a positive integer, got ${v}`);
  }
  if (hidden.length !== batch * seq * d) fail('E_INTERNAL', `runOnnxHeads: hidden has ${hidden.length} values, expected batch ${batch} x seq ${seq} x d ${d} = ${batch * seq * d}`);
  const abs = path.resolve(file);
  if (!fs.existsSync(abs)) fail('E_IO', `ONNX heads model not found: ${abs}`);
  const ort = await loadOrt();
  let session: OrtTypes.InferenceSession;
  try {
    session = await ort.InferenceSession.create(abs, {
      intraOpNumThreads: opts.threads ?? Math.max(1, os.cpus().length),
      interOpNumThreads: 1,
      executionMode: 'sequential',
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3,
    });
  } catch (e) {
    fail('E_ENGINE', `onnxruntime could not load the ONNX heads model ${abs}: ${describe(e).split('\n')[0]}`, e);
  }
  try {
    if (!session.inputNames.includes(ONNX_HEADS_LAYOUT.input) || !session.outputNames.includes(ONNX_HEADS_LAYOUT.output)) {
      fail('E_MODEL', `${abs} is not a Medusa heads ONNX model: inputs [${session.inputNames}], outputs [${session.outputNames}]; expected input ${ONNX_HEADS_LAYOUT.input}, output ${ONNX_HEADS_LAYOUT.output}`);
    }
    let result: OrtTypes.InferenceSession.OnnxValueMapType;
    try {
      result = await session.run({ [ONNX_HEADS_LAYOUT.input]: new ort.Tensor('float32', hidden, [batch, seq, d]) });
    } catch (e) {
      fail('E_ENGINE', `onnxruntime failed to run the ONNX heads model ${abs} on hidden states [${batch}, ${seq}, ${d}]: ${describe(e).split('\n')[0]}`, e);
    }
    const t = result[ONNX_HEADS_LAYOUT.output] as OrtTypes.Tensor;
    const dims = t.dims.map(Number);
    if (t.type !== 'float32' || dims.length !== 4 || dims[1] !== batch || dims[2] !== seq || numel(dims) !== (t.data as Float32Array).length) {
      fail('E_MODEL', `${abs}: ${ONNX_HEADS_LAYOUT.output} came out ${t.type} [${dims}], expected float32 [heads, ${batch}, ${seq}, vocab]`);
    }
    return Float32Array.from(t.data as Float32Array);
  } finally {
    await session.release();
  }
}

// ---------------------------------------------------------------------------------------------------
// checking a written model

type Long = { toNumber(): number };
function num(x: number | Long | null | undefined): number {
  if (x === null || x === undefined) return 0;
  return typeof x === 'number' ? x : x.toNumber();
}

/**
 * Parse an exported heads model and check it against the layout for `expected`: IR version and opset,
 * the input/output names, types and dims (batch and seq symbolic), the exact set of initializers with
 * their types, dims and data (inline sizes; external locations, offsets and lengths inside the data
 * file), the ops and their wiring, and the metadata. Every problem is reported at once (E_MODEL).
 * `expected.lmHead` defaults to the model's own `lm_head` metadata.
 */
export function checkOnnxHeads(file: string, expected: OnnxHeadsShape & { lmHead?: OnnxLmHeadMode }): void {
  const abs = path.resolve(file);
  let buf: Buffer;
  try {
    buf = fs.readFileSync(abs);
  } catch (e) {
    fail('E_IO', `cannot read the ONNX heads model ${abs}: ${describe(e)}`, e);
  }
  let model: InstanceType<typeof onnx.ModelProto>;
  try {
    model = onnx.ModelProto.decode(buf);
  } catch (e) {
    fail('E_MODEL', `${abs} is not an ONNX model (protobuf decoding failed: ${describe(e)})`, e);
  }
  checkShape(expected);
  const p: string[] = [];
  const s = expected;
  const meta = new Map((model.metadataProps ?? []).map((e) => [e.key ?? '', e.value ?? '']));
  const metaLm = meta.get('lm_head');
  let lmHead: OnnxLmHeadMode;
  if (expected.lmHead) lmHead = expected.lmHead;
  else if (metaLm === 'per_head' || metaLm === 'shared') lmHead = metaLm;
  else {
    lmHead = (model.graph?.initializer ?? []).some((t) => t.name === 'lm_head.weight_t') ? 'shared' : 'per_head';
    p.push(`metadata lm_head is ${JSON.stringify(metaLm ?? null)}, expected "per_head" or "shared"`);
  }

  // versions
  const ir = num(model.irVersion as number | Long);
  if (ir < ONNX_IR_VERSION) p.push(`IR version ${ir}, expected ${ONNX_IR_VERSION} or later (opset ${ONNX_HEADS_LAYOUT.opset} needs IR 8)`);
  const opsets = (model.opsetImport ?? []).map((o) => ({ domain: o.domain ?? '', version: num(o.version as number | Long) }));
  const main = opsets.filter((o) => o.domain === '' || o.domain === 'ai.onnx');
  if (main.length !== 1 || main[0].version !== ONNX_HEADS_LAYOUT.opset) p.push(`opset ${main.map((o) => o.version).join(', ') || 'missing'} for the default domain, expected ${ONNX_HEADS_LAYOUT.opset}`);
  for (const o of opsets) if (o.domain !== '' && o.domain !== 'ai.onnx') p.push(`unexpected opset domain "${o.domain}"`);

  // metadata
  const want: Record<string, string> = {
    layout: ONNX_HEADS_LAYOUT_VERSION,
    medusa_num_heads: String(s.numHeads),
    medusa_num_layers: String(s.numLayers),
    hidden_size: String(s.hiddenSize),
    vocab_size: String(s.vocabSize),
    lm_head: lmHead,
  };
  for (const [k, v] of Object.entries(want)) if (meta.get(k) !== v) p.push(`metadata ${k} is ${JSON.stringify(meta.get(k) ?? null)}, expected "${v}"`);

  const graph = model.graph;
  if (!graph) {
    p.push('no graph');
    report(abs, s, lmHead, p);
    return;
  }
  const inits = new Map<string, InstanceType<typeof onnx.TensorProto>>();
  for (const t of graph.initializer ?? []) {
    const name = t.name ?? '';
    if (inits.has(name)) p.push(`initializer ${name} appears twice`);
    inits.set(name, t as InstanceType<typeof onnx.TensorProto>);
  }

  // input and output
  const B = { param: ONNX_HEADS_BATCH_DIM };
  const T = { param: ONNX_HEADS_SEQ_DIM };
  const inputs = (graph.input ?? []).filter((v) => !inits.has(v.name ?? ''));
  if (inputs.length !== 1 || inputs[0].name !== ONNX_HEADS_LAYOUT.input) p.push(`graph inputs [${inputs.map((v) => v.name)}], expected [${ONNX_HEADS_LAYOUT.input}]`);
  const input = (graph.input ?? []).find((v) => v.name === ONNX_HEADS_LAYOUT.input);
  if (input) checkValue(p, 'input', input, [B, T, s.hiddenSize]);
  const outputs = graph.output ?? [];
  if (outputs.length !== 1 || outputs[0].name !== ONNX_HEADS_LAYOUT.output) p.push(`graph outputs [${outputs.map((v) => v.name)}], expected [${ONNX_HEADS_LAYOUT.output}]`);
  const output = outputs.find((v) => v.name === ONNX_HEADS_LAYOUT.output);
  if (output) checkValue(p, 'output', output, [s.numHeads, B, T, s.vocabSize]);

  // initializers
  const table = onnxHeadsTable(s, lmHead);
  const expectedInits = new Map<string, { dims: number[]; type: number; from: string }>(table.map((r) => [r.name, { dims: r.dims, type: onnx.TensorProto.DataType.FLOAT, from: r.source }]));
  expectedInits.set(UNSQUEEZE_AXES, { dims: [1], type: onnx.TensorProto.DataType.INT64, from: 'axes' });
  let dataSize: number | null | undefined; // size of the external data file, read once
  for (const [name, e] of expectedInits) {
    const t = inits.get(name);
    if (!t) {
      p.push(`missing initializer ${name} [${e.dims}]${e.from === 'axes' ? '' : ` (from ${e.from})`}`);
      continue;
    }
    const dims = (t.dims ?? []).map((x) => num(x as number | Long));
    if (dims.join(',') !== e.dims.join(',')) p.push(`initializer ${name} is [${dims}], expected [${e.dims}]`);
    if (t.dataType !== e.type) p.push(`initializer ${name} has data type ${t.dataType}, expected ${e.type === onnx.TensorProto.DataType.FLOAT ? 'FLOAT (1)' : 'INT64 (7)'}`);
    const bytes = numel(e.dims) * (e.type === onnx.TensorProto.DataType.INT64 ? 8 : 4);
    if (t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL) {
      const ext = new Map((t.externalData ?? []).map((x) => [x.key ?? '', x.value ?? '']));
      const loc = ext.get('location') ?? '';
      const offset = Number(ext.get('offset') ?? '0');
      const length = Number(ext.get('length') ?? String(bytes));
      if (!loc || path.isAbsolute(loc) || loc.split(/[\\/]/).includes('..')) {
        p.push(`initializer ${name}: external data location ${JSON.stringify(loc)} must be a relative path beside the model`);
        continue;
      }
      if (!Number.isSafeInteger(offset) || offset < 0 || length !== bytes) p.push(`initializer ${name}: external data offset ${ext.get('offset')} / length ${ext.get('length')}, expected length ${bytes}`);
      const dataPath = path.join(path.dirname(abs), loc);
      if (dataSize === undefined) dataSize = fs.existsSync(dataPath) ? fs.statSync(dataPath).size : null;
      if (dataSize === null) p.push(`initializer ${name}: external data file ${dataPath} is missing`);
      else if (offset + length > dataSize) p.push(`initializer ${name}: bytes ${offset}..${offset + length} lie past the end of ${dataPath} (${dataSize} bytes)`);
    } else {
      const have = t.rawData && t.rawData.length > 0 ? t.rawData.length : e.type === onnx.TensorProto.DataType.INT64 ? (t.int64Data ?? []).length * 8 : (t.floatData ?? []).length * 4;
      if (have !== bytes) p.push(`initializer ${name} holds ${have} bytes of data, expected ${bytes}`);
    }
  }
  for (const name of inits.keys()) if (!expectedInits.has(name)) p.push(`unexpected initializer ${name}`);

  // ops and wiring
  const defined = new Set<string>([...inits.keys(), ...(graph.input ?? []).map((v) => v.name ?? '')]);
  for (const n of graph.node ?? []) {
    if ((n.domain ?? '') !== '' || !ALLOWED_OPS.has(n.opType ?? '')) p.push(`node ${n.name}: op ${n.domain ? `${n.domain}.` : ''}${n.opType} is not part of the layout`);
    for (const i of n.input ?? []) if (i !== '' && !defined.has(i)) p.push(`node ${n.name} reads ${i}, which nothing defines before it`);
    for (const o of n.output ?? []) defined.add(o);
  }
  if (!defined.has(ONNX_HEADS_LAYOUT.output)) p.push(`no node produces ${ONNX_HEADS_LAYOUT.output}`);
  report(abs, s, lmHead, p);
}

function report(file: string, s: OnnxHeadsShape, lmHead: OnnxLmHeadMode, problems: string[]): void {
  if (problems.length === 0) return;
  const shown = problems.slice(0, 30);
  if (problems.length > shown.length) shown.push(`... and ${problems.length - shown.length} more`);
  fail(
    'E_MODEL',
    `${file} is not a Medusa heads ONNX model (${ONNX_HEADS_LAYOUT_VERSION}) of ${s.numHeads} heads x ${s.numLayers} layers, hidden ${s.hiddenSize}, vocab ${s.vocabSize}, lm_head ${lmHead}:\n  - ${shown.join('\n  - ')}\nRe-export the heads with medusa-train.`,
  );
}

type ValueInfo = InstanceType<typeof onnx.ValueInfoProto> | onnxProto.onnx.IValueInfoProto;

function checkValue(p: string[], what: string, v: ValueInfo, dims: (number | { param: string })[]): void {
  const t = v.type?.tensorType;
  if (!t) {
    p.push(`${what} ${v.name} is not a tensor`);
    return;
  }
  if (t.elemType !== onnx.TensorProto.DataType.FLOAT) p.push(`${what} ${v.name} has element type ${t.elemType}, expected FLOAT (1)`);
  const got = t.shape?.dim ?? [];
  const show = (x: onnxProto.onnx.TensorShapeProto.IDimension) => (x.dimParam ? x.dimParam : x.dimValue !== null && x.dimValue !== undefined ? String(num(x.dimValue as number | Long)) : '?');
  const wantStr = dims.map((x) => (typeof x === 'number' ? String(x) : x.param)).join(', ');
  if (got.length !== dims.length) {
    p.push(`${what} ${v.name} is [${got.map(show).join(', ')}], expected [${wantStr}]`);
    return;
  }
  dims.forEach((w, i) => {
    const g = got[i];
    if (typeof w === 'number') {
      if (g.dimParam || num(g.dimValue as number | Long) !== w) p.push(`${what} ${v.name} dim ${i} is ${show(g)}, expected ${w}`);
    } else if (g.dimParam !== w.param) {
      p.push(`${what} ${v.name} dim ${i} is ${show(g)}, expected the symbolic dim "${w.param}" (dynamic)`);
    }
  });
}
