/**
 * `medusa-train export`: trained heads (a run's latest checkpoint, a checkpoint folder, or an existing
 * heads folder in the medusa / medusa-v2 / vllm layout) -> a folder a runtime loads (formats in
 * docs/EXPORT.md, tables in io/medusa-layouts.ts).
 *
 * Nothing is reported as done before it is proven: the files are written into a temporary folder
 * beside `out`, reloaded and checked (file set, config.json keys and values, every tensor's name,
 * shape and dtype against the literal table, every value against the trained value rounded to the
 * export dtype), and the heads' logits of the trained and the reloaded heads are compared on fixed
 * hidden states; only then is the folder renamed into place (an existing one, with `force`, is
 * replaced at that moment). A failure at any point leaves no folder under `out`'s name.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MedusaError, describe, fail } from '../errors.js';
import { fsyncDir, writeFileAtomic } from '../io/atomic.js';
import { readJsonFile } from '../io/json.js';
import { sha256File } from '../io/hash.js';
import {
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  openSafetensorsFolder,
  readHeader,
  readTensorF32,
  writeSafetensors,
  type DType,
  type WriteTensor,
} from '../io/safetensors.js';
import {
  CONFIG_FILE,
  LAYOUT_LM_HEAD,
  LAYOUT_WEIGHTS_FILE,
  META,
  checkLayoutConfig,
  checkLayoutTensors,
  checkV2Layers,
  layoutConfig,
  layoutTable,
  readHeadsFolder as readLayoutFolder,
  referenceTable,
  type HeadsLayout,
  type HostF32,
  type LmHeadMode,
  type RefShape,
} from '../io/medusa-layouts.js';
import { Rng } from '../model/sampling.js';
import { BACKBONE_FILE, STATE_FILE, loadCheckpoint, type CheckpointTensor } from '../train/checkpoint.js';
import * as tf from '@tensorflow/tfjs';
import { decoderForward, type Decoder, type ForwardHook } from '../model/decoder.js';
import { loadDecoder, openModelFolder } from '../model/load.js';
import { disposeWeights, expectedTensors } from '../model/weights.js';
import type { DecoderConfig } from '../model/config.js';
import { PEFT_PREFIX, checkAdapters, mergeLora, type HostTensor } from '../train/lora-merge.js';
import { createTrainableBackbone, type BackboneSpec } from '../train/trainable-backbone.js';
import { VERSION } from '../version.js';
import { isFile } from '../io/paths.js';
import { CHOICES_FILE, HF_HEADS_SUBDIR, checkChoicesFile, findChoices, openSource, shapeText, type Source, type SourceKind } from '../eval/heads-source.js';

export type ExportFormat = 'medusa' | 'medusa-v2' | 'vllm' | 'onnx' | 'hf';
export const EXPORT_FORMATS: readonly ExportFormat[] = ['medusa', 'medusa-v2', 'vllm', 'onnx', 'hf'];
export type ExportDtype = 'f32' | 'f16' | 'bf16';
export const EXPORT_DTYPES: readonly ExportDtype[] = ['f32', 'f16', 'bf16'];
export interface ExportArgs {
  /** A run folder (its latest checkpoint), a checkpoint folder `step-N`, or a heads folder in the medusa / medusa-v2 / vllm layout (import). */
  run: string;
  format: ExportFormat;
  /** The folder to create. */
  out: string;
  /** Default: the base model's torch_dtype for checkpoints (f32 if unknown), the source's dtype for heads folders, f32 for onnx. */
  dtype?: ExportDtype;
  /** Replace a non-empty `out` (only once the new export is verified). */
  force: boolean;
  /** The base model folder, overriding the one recorded in the checkpoint or heads folder. */
  baseModel?: string;
  log: (line: string) => void;
}

export interface ExportReport {
  out: string;
  format: ExportFormat;
  dtype: ExportDtype;
  /** File names inside `out`, sorted. */
  files: string[];
  /** Tensors written (for onnx: reference tensors put into the model). */
  tensors: number;
  /** Largest |trained logit - exported logit| over the verification positions. */
  maxAbsDiff: number;
  /** The largest per-logit bound the difference had to stay within (0 for f32 safetensors exports). */
  bound: number;
  verifiedPositions: number;
  sourceKind: SourceKind;
  warnings: string[];
}

/** Heads as trained, in the reference layout (float32), with the base lm_head when they use it. */
export interface TrainedHeads {
  heads: Record<string, HostF32>;
  shape: RefShape;
  /** The base model's lm_head [V, d] widened to f32 (required when shape.lmHead is shared). */
  baseLmHead: Float32Array | null;
}

export interface VerifyOptions {
  dtype: ExportDtype;
  /** base_model_name_or_path the config.json must carry. */
  baseModelName: string;
  /** Hidden-state positions for the logits comparison (default 8). */
  positions?: number;
}

export interface VerifyResult {
  files: string[];
  tensors: number;
  maxAbsDiff: number;
  bound: number;
  verifiedPositions: number;
}

export { type HeadsFolder } from '../io/medusa-layouts.js';

/** Read a heads folder in the medusa / medusa-v2 / vllm layout into the reference layout (see io/medusa-layouts.ts). */
export const readHeadsFolder = readLayoutFolder;

const DTYPE_OF: Record<ExportDtype, DType> = { f32: 'F32', f16: 'F16', bf16: 'BF16' };
const ONNX_FILE = 'heads.onnx';
const VERIFY_POSITIONS = 8;
const VERIFY_SEED = 0x6d656475; // "medu"
const ONNX_BATCH = 2;

function usage(message: string): never {
  fail('E_USAGE', message);
}

// ---------------------------------------------------------------------------------------------
// Base model
// ---------------------------------------------------------------------------------------------

interface BaseModel {
  dir: string;
  config: Record<string, unknown>;
  sha: string;
  /** torch_dtype (or dtype) of config.json as an export dtype, or null when not float32/float16/bfloat16. */
  torchDtype: ExportDtype | null;
}

function openBase(dir: string): BaseModel {
  const cfg = path.join(dir, CONFIG_FILE);
  const json = readJsonFile(cfg);
  if (typeof json !== 'object' || json === null || Array.isArray(json)) fail('E_CONFIG', `${cfg} must hold a JSON object`);
  const config = json as Record<string, unknown>;
  const td = config['torch_dtype'] ?? config['dtype'];
  const torchDtype = td === 'float32' ? 'f32' : td === 'float16' ? 'f16' : td === 'bfloat16' ? 'bf16' : null;
  return { dir, config, sha: sha256File(cfg), torchDtype };
}

/** The base lm_head [V, d] in f32: lm_head.weight, or model.embed_tokens.weight when tie_word_embeddings (as model/weights.ts). */
function readBaseLmHead(base: BaseModel, s: RefShape): Float32Array {
  const tied = base.config['tie_word_embeddings'] === true;
  const name = tied ? 'model.embed_tokens.weight' : 'lm_head.weight';
  const shards = openSafetensorsFolder(base.dir);
  const info = shards.tensors.get(name);
  if (!info) fail('E_MODEL', `base model ${base.dir} has no ${name} (tie_word_embeddings is ${String(tied)}), so its lm_head cannot be read`);
  if (info.shape.join(',') !== `${s.vocabSize},${s.hiddenSize}`) {
    fail('E_MODEL', `base model ${base.dir}: ${name} is [${info.shape.join(', ')}] but the heads need a [${s.vocabSize}, ${s.hiddenSize}] lm_head; is it the right base model?`);
  }
  if (!['F32', 'F16', 'BF16'].includes(info.dtype)) fail('E_UNSUPPORTED', `base model ${base.dir}: ${name} is ${info.dtype}; an lm_head must be F32, F16 or BF16`);
  return readTensorF32(info);
}

function baseMismatch(cfg: string, found: string | null, expected: string, src: Source): never {
  fail(
    'E_CONFIG',
    `base model changed or missing: ${found === null ? `${cfg} does not exist` : `${cfg} has sha256 ${found}`}, but ${src.describe} was trained on a base model whose config.json has sha256 ${expected}. ` +
      'Pass the original base model folder with --base-model.',
  );
}

/** Find and check the base model: the checkpoint's (or --base-model) must match the recorded config hash. */
function resolveBase(src: Source, override: string | undefined): BaseModel | null {
  const dir = override !== undefined ? path.resolve(override) : src.basePath !== null ? path.resolve(src.basePath) : null;
  if (dir === null) {
    if (src.kind === 'checkpoint') {
      fail('E_CONFIG', `${path.join(src.dir, STATE_FILE)} records no base_model_path (checkpoints of older versions); pass the base model folder with --base-model`);
    }
    return null;
  }
  const cfg = path.join(dir, CONFIG_FILE);
  if (!isFile(cfg)) {
    if (src.baseSha !== null) baseMismatch(cfg, null, src.baseSha, src);
    fail('E_IO', `base model folder ${dir} has no config.json; pass a Hugging Face model folder with --base-model`);
  }
  const base = openBase(dir);
  if (src.baseSha !== null && base.sha !== src.baseSha) baseMismatch(cfg, base.sha, src.baseSha, src);
  if (src.baseSha === null) {
    const bad: string[] = [];
    if (base.config['hidden_size'] !== src.shape.hiddenSize) bad.push(`hidden_size ${JSON.stringify(base.config['hidden_size'])} (heads: ${src.shape.hiddenSize})`);
    if (base.config['vocab_size'] !== src.shape.vocabSize) bad.push(`vocab_size ${JSON.stringify(base.config['vocab_size'])} (heads: ${src.shape.vocabSize})`);
    if (bad.length > 0) fail('E_CONFIG', `base model ${dir} does not fit the heads of ${src.describe}: ${cfg} has ${bad.join(', ')}; pass the right folder with --base-model`);
  }
  return base;
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

let f16Widen: Float32Array | undefined;

/** Values as the dtype stores them (round to nearest even, as io/safetensors.ts encodes), widened back to f32. */
function rounded(data: Float32Array, dtype: DType): Float32Array {
  if (dtype === 'F32') return data;
  const out = new Float32Array(data.length);
  if (dtype === 'BF16') {
    const dst = new Uint32Array(out.buffer);
    for (let i = 0; i < data.length; i++) dst[i] = f32ToBf16Bits(data[i]) << 16; // bf16 is the top half of an f32
  } else {
    if (!f16Widen) {
      f16Widen = new Float32Array(65536);
      for (let b = 0; b < 65536; b++) f16Widen[b] = f16BitsToF32(b);
    }
    for (let i = 0; i < data.length; i++) out[i] = f16Widen[f32ToF16Bits(data[i])];
  }
  return out;
}

function sameBits(a: Float32Array, b: Float32Array): number {
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

/** Refuse values an export cannot carry: NaN/Inf, and (f16) magnitudes beyond its range. */
function checkValues(name: string, data: Float32Array, dtype: DType, where: string): void {
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (!Number.isFinite(v)) fail('E_MODEL', `${where}: tensor "${name}" element ${i} is ${v}; the heads diverged, export an earlier checkpoint`);
    if (dtype === 'F16' && (f32ToF16Bits(v) & 0x7c00) === 0x7c00) {
      fail('E_UNSUPPORTED', `${where}: tensor "${name}" element ${i} is ${v}, beyond float16's largest value 65504; export with --dtype bf16 or f32`);
    }
  }
}

/** The value of a reference tensor of `t`: its own, or the base lm_head for a shared head's projection. */
function refValue(t: TrainedHeads, ref: string): Float32Array {
  const own = t.heads[ref];
  if (own) return own.data;
  if (t.shape.lmHead === 'shared' && new RegExp(`^\\d+\\.${t.shape.numLayers}\\.weight$`).test(ref)) {
    if (!t.baseLmHead) fail('E_INTERNAL', `heads share the base lm_head but none was given for ${ref}`);
    return t.baseLmHead;
  }
  fail('E_INTERNAL', `no value for reference tensor ${ref}`);
}

// ---------------------------------------------------------------------------------------------
// Logits (float64) and the rounding bound
// ---------------------------------------------------------------------------------------------

/** Unit roundoff and absolute floor of storing a value in a dtype (RNE). */
const STORE_ERR: Record<ExportDtype, { u: number; eta: number }> = {
  f32: { u: 0, eta: 0 },
  bf16: { u: 2 ** -8, eta: 2 ** -134 },
  f16: { u: 2 ** -11, eta: 2 ** -25 },
};
const SILU_SLOPE = 1.1; // max |d/dz z*sigmoid(z)| = 1.0998...

/** Hidden states [P, d]: seeded standard normals rounded to f32 (so every runtime gets the same input). */
export function verificationHidden(positions: number, d: number, seed = VERIFY_SEED): Float32Array {
  const rng = new Rng(seed);
  const out = new Float32Array(positions * d);
  for (let i = 0; i < out.length; i++) {
    const u1 = 1 - rng.next();
    const u2 = rng.next();
    out[i] = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
  }
  return out;
}

interface ErrModel {
  /** Relative and absolute error of every stored weight. */
  u: number;
  eta: number;
  /** Unit roundoff of the arithmetic that computes the other side (0: the same float64 code). */
  arith: number;
}

/**
 * Logits of head k on P positions, computed in float64: h <- h + silu(W h + b) per layer, then the
 * projection (its own `{k}.{L}.weight`, or `lmHead`). With `err`, also a first-order bound on how far
 * another computation can be whose weights are these rounded as `err` says and whose arithmetic has
 * unit roundoff `err.arith` (propagated through |W|, |silu'| <= 1.1), doubled for second-order terms.
 */
function headLogits(heads: Record<string, HostF32>, s: RefShape, lmHead: Float32Array | null, k: number, hidden: Float32Array, P: number, err?: ErrModel): { y: Float64Array; bound: Float64Array | null } {
  const d = s.hiddenSize;
  const V = s.vocabSize;
  let x = Float64Array.from(hidden);
  let e = err ? new Float64Array(P * d) : null;
  const gamma = (n: number, a: number): number => (a === 0 ? 0 : (n * a) / (1 - n * a));
  for (let l = 0; l < s.numLayers; l++) {
    const W = heads[`${k}.${l}.linear.weight`].data;
    const b = heads[`${k}.${l}.linear.bias`].data;
    const nx = new Float64Array(P * d);
    const ne = e ? new Float64Array(P * d) : null;
    for (let p = 0; p < P; p++) {
      const xo = p * d;
      let sumAbsX = 0;
      if (err) for (let i = 0; i < d; i++) sumAbsX += Math.abs(x[xo + i]);
      for (let o = 0; o < d; o++) {
        const wo = o * d;
        let z = b[o];
        let A = Math.abs(b[o]);
        let E = 0;
        for (let i = 0; i < d; i++) {
          const w = W[wo + i];
          z += w * x[xo + i];
          if (e) {
            const aw = Math.abs(w);
            A += aw * Math.abs(x[xo + i]);
            E += aw * e[xo + i];
          }
        }
        const sv = z / (1 + Math.exp(-z));
        nx[xo + o] = x[xo + o] + sv;
        if (ne && err) {
          const dz = E + (err.u + gamma(d + 1, err.arith)) * A + err.eta * (1 + sumAbsX);
          const ds = SILU_SLOPE * dz + 64 * err.arith * Math.abs(sv);
          ne[xo + o] = e![xo + o] + ds + err.arith * (Math.abs(x[xo + o]) + Math.abs(sv));
        }
      }
    }
    x = nx;
    e = ne;
  }
  const W2 = s.lmHead === 'shared' ? lmHead : heads[`${k}.${s.numLayers}.weight`].data;
  if (!W2) fail('E_INTERNAL', 'shared heads need the base lm_head for their logits');
  const y = new Float64Array(P * V);
  const bound = err ? new Float64Array(P * V) : null;
  const sumAbsX = new Float64Array(P);
  if (err) for (let p = 0; p < P; p++) for (let i = 0; i < d; i++) sumAbsX[p] += Math.abs(x[p * d + i]);
  const g = err ? err.u + gamma(d, err.arith) : 0;
  for (let v = 0; v < V; v++) {
    const wo = v * d;
    for (let p = 0; p < P; p++) {
      const xo = p * d;
      let acc = 0;
      let A = 0;
      let E = 0;
      for (let i = 0; i < d; i++) {
        const w = W2[wo + i];
        acc += w * x[xo + i];
        if (e) {
          const aw = Math.abs(w);
          A += aw * Math.abs(x[xo + i]);
          E += aw * e[xo + i];
        }
      }
      y[p * V + v] = acc;
      if (bound && err) bound[p * V + v] = 2 * (E + g * A + err.eta * sumAbsX[p]);
    }
  }
  return { y, bound };
}

/** Compare every logit of `other` [K, P, V] (or per head via `otherHead`) with the trained heads' within the bound. */
function compareLogits(
  trained: TrainedHeads,
  hidden: Float32Array,
  P: number,
  err: ErrModel,
  otherHead: (k: number) => ArrayLike<number>,
  where: string,
): { maxAbsDiff: number; bound: number } {
  const s = trained.shape;
  const V = s.vocabSize;
  const exact = err.u === 0 && err.eta === 0 && err.arith === 0;
  let maxAbsDiff = 0;
  let maxBound = 0;
  for (let k = 0; k < s.numHeads; k++) {
    const t = headLogits(trained.heads, s, trained.baseLmHead, k, hidden, P, exact ? undefined : err);
    const o = otherHead(k);
    for (let i = 0; i < P * V; i++) {
      const diff = Math.abs(t.y[i] - o[i]);
      const b = t.bound ? t.bound[i] : 0;
      if (b > maxBound) maxBound = b;
      if (!(diff <= b)) {
        fail(
          'E_MODEL',
          `export verification failed for ${where}: head ${k}, position ${Math.floor(i / V)}, token ${i % V}: the exported heads give logit ${o[i]}, the trained heads ${t.y[i]} ` +
            `(|diff| ${diff} > allowed ${b}${exact ? ', f32 must match exactly' : ''}); the export is wrong, nothing was written to its final place`,
        );
      }
      if (diff > maxAbsDiff) maxAbsDiff = diff;
    }
  }
  return { maxAbsDiff, bound: maxBound };
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

type OnnxHeadsModule = typeof import('../io/onnx-heads.js');

async function loadOnnxHeads(): Promise<OnnxHeadsModule> {
  try {
    return await import('../io/onnx-heads.js');
  } catch (e) {
    fail('E_UNSUPPORTED', `the onnx export is not available in this build (${describe(e).split('\n')[0]})`, e);
  }
}

/** The config.json beside heads.onnx: what the model takes and gives. */
export function onnxConfig(m: Pick<OnnxHeadsModule, 'ONNX_HEADS_LAYOUT' | 'ONNX_HEADS_LAYOUT_VERSION'>, s: RefShape, baseModelName: string, externalData: boolean): Record<string, unknown> {
  const L = m.ONNX_HEADS_LAYOUT;
  return {
    format: m.ONNX_HEADS_LAYOUT_VERSION,
    model_file: ONNX_FILE,
    external_data: externalData ? `${ONNX_FILE}.data` : null,
    opset: L.opset,
    inputs: [{ name: L.input, dtype: 'float32', shape: ['batch', 'seq', s.hiddenSize] }],
    outputs: [{ name: L.output, dtype: 'float32', shape: [s.numHeads, 'batch', 'seq', s.vocabSize] }],
    medusa_num_heads: s.numHeads,
    medusa_num_layers: s.numLayers,
    hidden_size: s.hiddenSize,
    vocab_size: s.vocabSize,
    lm_head: s.lmHead,
    base_model_name_or_path: baseModelName,
  };
}

function listFiles(dir: string): string[] {
  try {
    return fs.readdirSync(dir).sort();
  } catch (e) {
    fail('E_IO', `cannot list ${dir}: ${describe(e)}`, e);
  }
}

function verifyFail(dir: string, problems: string[]): never {
  const shown = problems.slice(0, 30);
  if (problems.length > shown.length) shown.push(`... and ${problems.length - shown.length} more`);
  fail('E_MODEL', `export verification failed for ${dir}:\n  - ${shown.join('\n  - ')}`);
}

/**
 * Reload an export and prove it holds `trained`: the file set, config.json (exact keys and values,
 * plus the TGI and vLLM rules), every tensor's name, shape and dtype against the literal table, every
 * value bit for bit against the trained value rounded to `dtype`, then the logits of both on fixed
 * hidden states: equal in f32, within the rounding bound otherwise (onnx: within float32 arithmetic).
 * Throws E_MODEL naming the first problems.
 */
export async function verifyExport(dir: string, format: Exclude<ExportFormat, 'hf'>, trained: TrainedHeads, o: VerifyOptions): Promise<VerifyResult> {
  const s = trained.shape;
  const P = o.positions ?? VERIFY_POSITIONS;
  const hidden = verificationHidden(P, s.hiddenSize);
  const files = listFiles(dir);
  const problems: string[] = [];
  if (format === 'onnx') {
    const m = await loadOnnxHeads();
    if (o.dtype !== 'f32') fail('E_UNSUPPORTED', `the onnx export is float32 only, not ${o.dtype}`);
    const modelFile = path.join(dir, ONNX_FILE);
    const external = files.includes(`${ONNX_FILE}.data`);
    for (const f of [CONFIG_FILE, ONNX_FILE]) if (!files.includes(f)) problems.push(`${path.join(dir, f)} is missing`);
    for (const f of files) if (![CONFIG_FILE, ONNX_FILE, `${ONNX_FILE}.data`, CHOICES_FILE].includes(f)) problems.push(`unexpected file ${path.join(dir, f)}`);
    checkChoicesFile(dir, files, s.numHeads);
    if (problems.length > 0) verifyFail(dir, problems);
    const cfgFile = path.join(dir, CONFIG_FILE);
    problems.push(...checkLayoutConfigGeneric(readJsonFile(cfgFile), onnxConfig(m, s, o.baseModelName, external), cfgFile));
    if (problems.length > 0) verifyFail(dir, problems);
    m.checkOnnxHeads(modelFile, { numHeads: s.numHeads, numLayers: s.numLayers, hiddenSize: s.hiddenSize, vocabSize: s.vocabSize, lmHead: s.lmHead });
    const seq = P / ONNX_BATCH;
    const out = await m.runOnnxHeads(modelFile, hidden, ONNX_BATCH, seq, s.hiddenSize);
    const V = s.vocabSize;
    if (out.length !== s.numHeads * P * V) verifyFail(dir, [`${modelFile} gave ${out.length} logits, expected ${s.numHeads} x ${P} x ${V}`]);
    // onnxruntime computes in float32: the bound is float32 arithmetic on exact f32 weights.
    const cmp = compareLogits(trained, hidden, P, { u: 0, eta: 0, arith: 2 ** -24 }, (k) => out.subarray(k * P * V, (k + 1) * P * V), dir);
    return { files, tensors: referenceTable(s).length + (s.lmHead === 'shared' ? 1 : 0), maxAbsDiff: cmp.maxAbsDiff, bound: cmp.bound, verifiedPositions: P };
  }

  const layout: HeadsLayout = format;
  const dtype = DTYPE_OF[o.dtype];
  const weightsName = LAYOUT_WEIGHTS_FILE[layout];
  for (const f of [CONFIG_FILE, weightsName]) if (!files.includes(f)) problems.push(`${path.join(dir, f)} is missing`);
  for (const f of files) if (f !== CONFIG_FILE && f !== weightsName && f !== CHOICES_FILE) problems.push(`unexpected file ${path.join(dir, f)}`);
  checkChoicesFile(dir, files, s.numHeads);
  if (problems.length > 0) verifyFail(dir, problems);

  const cfgFile = path.join(dir, CONFIG_FILE);
  problems.push(...checkLayoutConfig(layout, readJsonFile(cfgFile), layoutConfig(layout, s, o.baseModelName), cfgFile));
  const weightsFile = path.join(dir, weightsName);
  const header = readHeader(weightsFile);
  const rows = layoutTable(layout, s);
  problems.push(...checkLayoutTensors(rows, header.tensors, dtype, weightsFile));
  if (problems.length > 0) verifyFail(dir, problems);

  // Head by head (so only one head's reloaded tensors are in memory): every value bit for bit the
  // trained value rounded to the dtype, then the runtime's view of the head (v2: the base lm_head)
  // against the trained head.
  const exportShape: RefShape = { ...s, lmHead: LAYOUT_LM_HEAD[layout] };
  if (exportShape.lmHead === 'shared' && !trained.baseLmHead) fail('E_INTERNAL', 'verifying a medusa-v2 export needs the base lm_head');
  const cmp = compareLogits(trained, hidden, P, { ...STORE_ERR[o.dtype], arith: 0 }, (k) => {
    const reloaded: Record<string, HostF32> = {};
    for (const row of rows) {
      if (!row.reference.startsWith(`${k}.`)) continue;
      const got = readTensorF32(header.tensors.get(row.name)!);
      const trainedValue = refValue(trained, row.reference);
      const want = rounded(trainedValue, dtype);
      const i = sameBits(got, want);
      if (i >= 0) problems.push(`${weightsFile}: tensor "${row.name}" element ${i} is ${got[i]}, but the trained value ${trainedValue[i]} stored as ${dtype} is ${want[i]}`);
      reloaded[row.reference] = { shape: row.shape, data: got };
    }
    if (problems.length > 0) verifyFail(dir, problems);
    return headLogits(reloaded, exportShape, trained.baseLmHead, k, hidden, P).y;
  }, dir);
  return { files, tensors: rows.length, maxAbsDiff: cmp.maxAbsDiff, bound: cmp.bound, verifiedPositions: P };
}

function checkLayoutConfigGeneric(actual: unknown, expected: Record<string, unknown>, file: string): string[] {
  if (typeof actual !== 'object' || actual === null || Array.isArray(actual)) return [`${file} must hold a JSON object`];
  const a = actual as Record<string, unknown>;
  const problems: string[] = [];
  for (const [k, v] of Object.entries(expected)) {
    if (!Object.prototype.hasOwnProperty.call(a, k)) problems.push(`${file}: key "${k}" is missing (expected ${JSON.stringify(v)})`);
    else if (JSON.stringify(a[k]) !== JSON.stringify(v)) problems.push(`${file}: key "${k}" is ${JSON.stringify(a[k])}, expected ${JSON.stringify(v)}`);
  }
  for (const k of Object.keys(a)) if (!Object.prototype.hasOwnProperty.call(expected, k)) problems.push(`${file}: unexpected key "${k}"`);
  return problems;
}

// ---------------------------------------------------------------------------------------------
// Output folder
// ---------------------------------------------------------------------------------------------

function pidAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === 'EPERM';
  }
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Leftovers of dead exports to `out`: temp folders are removed; an old folder moved aside is put back if `out` is gone. */
function cleanLeftovers(parent: string, base: string, out: string): void {
  let names: string[];
  try {
    names = fs.readdirSync(parent);
  } catch {
    return;
  }
  const re = new RegExp(`^\\.${escapeRe(base)}\\.(tmp|old)-export-(\\d+)$`);
  for (const name of names) {
    const m = re.exec(name);
    if (!m || pidAlive(Number(m[2]))) continue;
    const p = path.join(parent, name);
    try {
      if (m[1] === 'old' && !fs.existsSync(out)) fs.renameSync(p, out);
      else fs.rmSync(p, { recursive: true, force: true });
    } catch {
      /* best effort */
    }
  }
}

function checkOut(out: string, force: boolean): 'absent' | 'empty' | 'replace' {
  let st: fs.Stats;
  try {
    st = fs.statSync(out);
  } catch {
    return 'absent';
  }
  if (!st.isDirectory()) fail('E_IO', `${out} exists and is not a folder; choose another --out`);
  const empty = fs.readdirSync(out).length === 0;
  if (empty) return 'empty';
  if (!force) fail('E_IO', `${out} exists and is not empty; choose another --out, or pass --force to replace it (only once the new export is verified)`);
  return 'replace';
}

function inside(child: string, parent: string): boolean {
  const rel = path.relative(parent, child);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

/** Export trained heads; see the module comment and docs/EXPORT.md. */
export async function runExport(a: ExportArgs): Promise<ExportReport> {
  if (!EXPORT_FORMATS.includes(a.format)) usage(`--format ${String(a.format)} is not one of ${EXPORT_FORMATS.join(', ')}`);
  if (a.dtype !== undefined && !EXPORT_DTYPES.includes(a.dtype)) usage(`--dtype ${String(a.dtype)} is not one of ${EXPORT_DTYPES.join(', ')}`);
  if (typeof a.out !== 'string' || a.out === '') usage('--out must name the folder to create');
  if (a.format === 'onnx' && a.dtype !== undefined && a.dtype !== 'f32') {
    fail('E_UNSUPPORTED', `the onnx export is float32 only (onnxruntime's CPU kernels compute in float32); --dtype ${a.dtype} cannot be used, drop it or pass --dtype f32`);
  }
  const out = path.resolve(a.out);
  checkOut(out, a.force);

  const src = openSource(a.run);
  for (const w of src.warnings) a.log(`warning: ${w}`);
  a.log(`export: ${src.describe}: ${shapeText(src.shape)}`);
  if (inside(src.protect, out)) fail('E_USAGE', `--out ${out} contains the source ${src.protect}; replacing it would delete what is being exported. Choose another --out`);

  if (a.format === 'hf') {
    if (src.recipe !== 'medusa2' || src.kind !== 'checkpoint') {
      fail('E_UNSUPPORTED', `--format hf exports a tuned backbone (MEDUSA-2 runs), but ${src.describe} ${src.kind !== 'checkpoint' ? 'holds heads only' : src.recipe === 'medusa1' ? 'comes from a MEDUSA-1 run' : `comes from a ${src.recipe} run`}: the backbone was frozen: export \`medusa\`/\`vllm\` and use the base model as it is`);
    }
    return exportHf(a, src, out);
  }
  const format = a.format;
  if (a.format === 'medusa-v2') {
    checkV2Layers(src.shape.numLayers, src.describe);
    if (src.kind === 'checkpoint' && src.shape.lmHead === 'per_head') {
      fail(
        'E_UNSUPPORTED',
        `${src.describe} trained a projection per head (lm_head per_head), but medusa-v2 folders hold no projections (runtimes use the base lm_head), so the trained {h}.${src.shape.numLayers}.weight would be lost; export \`medusa\` (or \`vllm\`) instead, or train with heads.lm_head: shared`,
      );
    }
  }

  // The base model: needed for the config hash check (checkpoints), the shared lm_head and its dtype.
  const base = resolveBase(src, a.baseModel);
  const needLmHead = src.shape.lmHead === 'shared' || a.format === 'medusa-v2';
  if (needLmHead && base === null) {
    fail(
      'E_CONFIG',
      `the base model of ${src.describe} cannot be found (${src.baseName === null ? 'no base_model_name_or_path is recorded' : `base_model_name_or_path ${JSON.stringify(src.baseName)} is not a local folder`}), ` +
        `and ${src.shape.lmHead === 'shared' ? 'these heads use its lm_head' : 'medusa-v2 reuses its lm_head'}; pass the base model folder with --base-model`,
    );
  }
  if (base) {
    if (inside(base.dir, out)) fail('E_USAGE', `--out ${out} contains the base model ${base.dir}; choose another --out`);
    a.log(`export: base model ${base.dir} (config.json sha256 ${base.sha.slice(0, 12)}…)`);
  }

  const dtype: ExportDtype =
    a.dtype ?? (a.format === 'onnx' ? 'f32' : src.kind === 'checkpoint' ? (base?.torchDtype ?? 'f32') : src.dtype === 'F16' ? 'f16' : src.dtype === 'BF16' ? 'bf16' : 'f32');
  const baseModelName = a.baseModel !== undefined ? path.resolve(a.baseModel) : (src.baseName ?? base?.dir ?? null);
  if (baseModelName === null && (a.format === 'medusa' || a.format === 'medusa-v2')) {
    fail('E_CONFIG', `a ${a.format} config.json names its base model (base_model_name_or_path), but ${src.describe} records none; pass the base model folder with --base-model`);
  }

  // The trained heads as the verification sees them.
  let trained: TrainedHeads = { heads: src.heads, shape: src.shape, baseLmHead: needLmHead ? readBaseLmHead(base!, src.shape) : null };
  if (a.format === 'medusa-v2' && src.shape.lmHead === 'per_head') {
    // An imported folder holds projections: v2 may drop them only if they are the base lm_head (a shared run's copies).
    const lm = trained.baseLmHead!;
    const asStored = rounded(lm, src.dtype ?? 'F32');
    const heads: Record<string, HostF32> = {};
    for (const [name, t] of Object.entries(src.heads)) {
      if (new RegExp(`^\\d+\\.${src.shape.numLayers}\\.weight$`).test(name)) {
        if (sameBits(t.data, asStored) >= 0 && sameBits(t.data, lm) >= 0) {
          fail(
            'E_UNSUPPORTED',
            `${src.describe}: projection ${name} differs from the base model's lm_head, so these heads were trained with a projection per head (lm_head per_head); ` +
              'medusa-v2 folders hold no projections (runtimes use the base lm_head) and would lose it: export `medusa` or `vllm` instead',
          );
        }
      } else heads[name] = t;
    }
    trained = { heads, shape: { ...src.shape, lmHead: 'shared' }, baseLmHead: lm };
  }
  const s = trained.shape;
  const trainedLmHead: LmHeadMode = s.lmHead === 'shared' ? 'shared' : (src.trainedLmHead ?? 'per_head');

  // Values an export cannot carry are refused before anything is written.
  const sd = DTYPE_OF[dtype];
  for (const row of referenceTable(s)) checkValues(row.name, trained.heads[row.name].data, sd, src.describe);
  if (trained.baseLmHead && a.format !== 'medusa-v2' && a.format !== 'onnx') checkValues('base lm_head', trained.baseLmHead, sd, base!.dir);
  if (trained.baseLmHead && a.format === 'onnx') checkValues('base lm_head', trained.baseLmHead, 'F32', base!.dir);

  let tensors = 0;
  const result = await writeThenRename(out, a.force, async (tmp) => {
    a.log(`export: writing ${a.format} (${dtype}) into ${tmp}`);
    const metadata: Record<string, string> = { [META.format]: 'pt', [META.version]: VERSION, [META.lmHead]: trainedLmHead };
    if (baseModelName !== null) metadata[META.baseModel] = baseModelName;
    const sha = src.baseSha ?? base?.sha;
    if (sha) metadata[META.baseModelSha] = sha;

    if (format === 'onnx') {
      const m = await loadOnnxHeads();
      const refHeads: Record<string, HostF32> = {};
      for (const row of referenceTable(s)) refHeads[row.name] = trained.heads[row.name];
      const extra: Record<string, string> = { medusa_train_version: VERSION };
      if (baseModelName !== null) extra['base_model_name_or_path'] = baseModelName;
      if (sha) extra['base_model_config_sha256'] = sha;
      const w = await m.writeOnnxHeads({
        out: path.join(tmp, ONNX_FILE),
        heads: refHeads,
        shape: { numHeads: s.numHeads, numLayers: s.numLayers, hiddenSize: s.hiddenSize, vocabSize: s.vocabSize },
        ...(s.lmHead === 'shared' ? { sharedLmHead: trained.baseLmHead! } : {}),
        metadata: extra,
      });
      writeJson(path.join(tmp, CONFIG_FILE), onnxConfig(m, s, baseModelName ?? '', w.externalData));
      tensors = referenceTable(s).length + (s.lmHead === 'shared' ? 1 : 0);
    } else {
      tensors = writeHeadsLayout(tmp, format, trained, sd, metadata, baseModelName ?? '');
    }
    const tree = findChoices(src);
    if (tree) {
      writeJson(path.join(tmp, CHOICES_FILE), tree.choices);
      a.log(`export: candidate tree ${tree.file} (${tree.choices.length} nodes) -> ${CHOICES_FILE}`);
    }
    fsyncDir(tmp);

    a.log(`export: verifying ${tmp} (file set, config.json, every tensor, logits on ${VERIFY_POSITIONS} positions)`);
    const r = await verifyExport(tmp, format, trained, { dtype, baseModelName: baseModelName ?? '' });
    if (r.tensors !== tensors) fail('E_INTERNAL', `verified ${r.tensors} tensors but wrote ${tensors}`);
    return r;
  });
  a.log(
    `export: verified ${result.tensors} tensors and config.json; logits on ${result.verifiedPositions} positions: max |diff| ${result.maxAbsDiff}` +
      `${result.bound > 0 ? ` (allowed ${result.bound.toPrecision(3)})` : ''}`,
  );
  a.log(`export: wrote ${out}`);
  return {
    out,
    format: a.format,
    dtype,
    files: listFiles(out),
    tensors: result.tensors,
    maxAbsDiff: result.maxAbsDiff,
    bound: result.bound,
    verifiedPositions: result.verifiedPositions,
    sourceKind: src.kind,
    warnings: src.warnings,
  };
}

/** Write heads in a layout (weights file + config.json) into `dir`; returns the number of tensors. */
function writeHeadsLayout(dir: string, layout: HeadsLayout, trained: TrainedHeads, sd: DType, metadata: Record<string, string>, baseModelName: string): number {
  const rows = layoutTable(layout, trained.shape);
  const write: Record<string, WriteTensor> = {};
  for (const row of rows) {
    const data = refValue(trained, row.reference);
    if (data.length !== row.shape.reduce((x, y) => x * y, 1)) fail('E_INTERNAL', `${row.reference} has ${data.length} values for [${row.shape}]`);
    write[row.name] = { dtype: sd, shape: row.shape.slice(), data };
  }
  writeSafetensors(path.join(dir, LAYOUT_WEIGHTS_FILE[layout]), write, metadata);
  writeJson(path.join(dir, CONFIG_FILE), layoutConfig(layout, trained.shape, baseModelName));
  return rows.length;
}

/**
 * Fill a temporary folder beside `out` (`fill` writes and verifies it), then move it into place: an
 * existing `out` (with force) is moved aside, the new folder renamed in, the old one removed. A failure
 * at any point leaves nothing under `out`'s name (and an old `out` where it was).
 */
async function writeThenRename<T>(out: string, force: boolean, fill: (tmp: string) => Promise<T>): Promise<T> {
  const parent = path.dirname(out);
  const baseName = path.basename(out);
  try {
    fs.mkdirSync(parent, { recursive: true });
  } catch (e) {
    fail('E_IO', `cannot create ${parent}: ${describe(e)}`, e);
  }
  cleanLeftovers(parent, baseName, out);
  const tmp = path.join(parent, `.${baseName}.tmp-export-${process.pid}`);
  const old = path.join(parent, `.${baseName}.old-export-${process.pid}`);
  try {
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp);
    const r = await fill(tmp);
    const state = checkOut(out, force);
    if (state !== 'absent') fs.renameSync(out, old);
    try {
      fs.renameSync(tmp, out);
    } catch (e) {
      if (state !== 'absent') fs.renameSync(old, out);
      throw e;
    }
    fsyncDir(parent);
    if (state !== 'absent') fs.rmSync(old, { recursive: true, force: true });
    return r;
  } catch (e) {
    try {
      fs.rmSync(tmp, { recursive: true, force: true });
    } catch {
      /* removed by the next export to this folder */
    }
    if (e instanceof MedusaError) throw e;
    fail('E_IO', `cannot write the export ${out}: ${describe(e)}; check that the folder is writable and has free space`, e);
  }
}

function writeJson(file: string, value: unknown): void {
  writeFileAtomic(file, [Buffer.from(`${JSON.stringify(value, null, 2)}\n`, 'utf8')]);
}

// ---------------------------------------------------------------------------------------------
// hf: a MEDUSA-2 run's tuned model as a Hugging Face folder, with its heads
// ---------------------------------------------------------------------------------------------

/** Files of the base model copied into an hf export byte for byte, when the base has them. */
export const HF_COPIED_FILES = [
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'tokenizer.model',
  'vocab.json',
  'merges.txt',
  'added_tokens.json',
  'chat_template.jinja',
] as const;
export const HF_WEIGHTS_FILE = 'model.safetensors';
/** The heads' folder inside an hf export (the `medusa` layout). */
export const HF_HEADS_DIR = HF_HEADS_SUBDIR;
/** Logits of an f32 hf export vs the adapter model: |diff| <= this x max(1, max |logit|). */
export const HF_LOGITS_TOL = 1e-5;
/** f16 / bf16 exports: a coarse check that every tensor is in its place (the rounding itself is checked bit for bit). */
const HF_LOGITS_TOL_ROUNDED: Record<ExportDtype, number> = { f32: HF_LOGITS_TOL, f16: 1e-2, bf16: 5e-2 };
const HF_VERIFY_ROWS = 2;
const HF_VERIFY_LEN = 8;

/** What a MEDUSA-2 checkpoint's state.json says about its backbone (written by src/recipes/medusa2.ts). */
function medusa2Spec(state: Record<string, unknown>, stateFile: string): BackboneSpec {
  const bad = (key: string, want: string): never => fail('E_CONFIG', `${stateFile}: state.${key} must be ${want}, got ${JSON.stringify(state[key]) ?? 'nothing'}; the checkpoint was not written by a medusa-train that can export it`);
  const mode = state['backbone_mode'];
  const emb = state['train_embeddings'];
  if (typeof emb !== 'boolean') bad('train_embeddings', 'true or false');
  if (mode === 'full') {
    const n = state['full_last_layers'];
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 1) bad('full_last_layers', 'an integer >= 1');
    return { mode: 'full', lastLayers: n as number, trainEmbeddings: emb as boolean };
  }
  if (mode !== 'lora') bad('backbone_mode', '"lora" or "full"');
  const l = state['lora'];
  if (typeof l !== 'object' || l === null || Array.isArray(l)) bad('lora', 'an object {rank, alpha, dropout, targets}');
  const lo = l as Record<string, unknown>;
  const rank = lo['rank'];
  const alpha = lo['alpha'];
  const dropout = lo['dropout'] ?? 0;
  const targets = lo['targets'];
  if (typeof rank !== 'number' || typeof alpha !== 'number' || typeof dropout !== 'number' || !Array.isArray(targets) || !targets.every((t) => typeof t === 'string')) {
    bad('lora', 'an object {rank: number, alpha: number, dropout: number, targets: string[]}');
  }
  return { mode: 'lora', rank: rank as number, alpha: alpha as number, dropout: dropout as number, targets: targets as string[], trainEmbeddings: emb as boolean };
}

/** Logits [B*T*V] of a decoder (with a hook made inside the tidy) on the verification ids. */
function hfLogits(decoder: Decoder, ids: number[], makeHook?: () => ForwardHook): Float32Array {
  const t = tf.tidy(() => {
    const { hidden, logits } = decoderForward(decoder, { ids, batch: HF_VERIFY_ROWS, seqLen: ids.length / HF_VERIFY_ROWS, logits: 'all', hook: makeHook?.() });
    hidden.dispose();
    return logits!; // [B, T, V]
  });
  try {
    return Float32Array.from(t.dataSync() as Float32Array);
  } finally {
    t.dispose();
  }
}

/**
 * `export --format hf`: the base model with the run's tuned backbone (LoRA merged: W + alpha/r B A; or the
 * tuned tensors of full mode) as a Hugging Face folder, plus the heads in `medusa/` (medusa layout whose
 * base_model_name_or_path is this folder). Verified before it is moved into place: file set, config.json,
 * copied files byte for byte, every tensor against the merged value rounded to the dtype, the heads as the
 * medusa export is verified, and the logits of the reloaded folder against the adapter model's (the base
 * decoder with the checkpoint's trainable backbone, as training computed it).
 */
async function exportHf(a: ExportArgs, src: Source, out: string): Promise<ExportReport> {
  const ck = loadCheckpoint(src.dir);
  const stateFile = path.join(src.dir, STATE_FILE);
  const bbFile = path.join(src.dir, BACKBONE_FILE);
  if (!ck.backbone) fail('E_IO', `${bbFile} is missing: ${src.describe} is a MEDUSA-2 checkpoint without its tuned backbone; export another checkpoint of the run`);
  const spec = medusa2Spec(ck.state, stateFile);
  const base = resolveBase(src, a.baseModel);
  if (base === null) fail('E_CONFIG', `the base model of ${src.describe} cannot be found; pass it with --base-model`);
  if (inside(base.dir, out)) fail('E_USAGE', `--out ${out} contains the base model ${base.dir}; choose another --out`);
  a.log(`export: base model ${base.dir} (config.json sha256 ${base.sha.slice(0, 12)}…), backbone ${spec.mode === 'lora' ? `LoRA rank ${spec.rank}, alpha ${spec.alpha} on ${spec.targets.join(', ')}` : `last ${spec.lastLayers} layer(s) tuned`}${spec.trainEmbeddings ? ' + embeddings' : ''}`);
  const folder = openModelFolder(base.dir);
  const c: DecoderConfig = folder.config;

  // The checkpoint's tensors: PEFT adapters, and tuned tensors under their Hugging Face names.
  const adapters: Record<string, HostTensor> = {};
  const tuned = new Map<string, CheckpointTensor>();
  for (const [name, t] of Object.entries(ck.backbone)) {
    if (name.startsWith(PEFT_PREFIX)) adapters[name] = t;
    else tuned.set(name, t);
  }
  if (spec.mode === 'lora') checkAdapters(adapters, c, spec, bbFile);
  else if (Object.keys(adapters).length > 0) fail('E_MODEL', `${bbFile} holds LoRA adapters (${Object.keys(adapters)[0]}, ...) but state.backbone_mode is "full"; the checkpoint is inconsistent, export another one`);
  const expected = expectedTensors(c);
  const shapeOf = new Map(expected.map((e) => [e.name, e.shape]));
  for (const [name, t] of tuned) {
    const want = shapeOf.get(name);
    if (want === undefined) fail('E_MODEL', `${bbFile}: tensor ${name} is neither a LoRA adapter nor a tensor of the base model (${c.architecture}); the checkpoint does not belong to ${base.dir}`);
    if (t.shape.join(',') !== want.join(',')) fail('E_MODEL', `${bbFile}: tensor ${name} is [${t.shape.join(', ')}] but the base model's is [${want.join(', ')}]; the checkpoint does not belong to ${base.dir}`);
  }

  // The merged model: base tensors, the tuned ones replaced, the adapters merged into what they adapt.
  const baseTensor = (name: string): HostTensor => {
    const t = tuned.get(name);
    if (t) return t;
    const info = folder.shards.tensors.get(name);
    if (!info) fail('E_MODEL', `base model ${base.dir} has no tensor ${name}`);
    return { shape: info.shape.slice(), data: readTensorF32(info) };
  };
  const current = (name: string): HostTensor => (name === 'lm_head.weight' && c.tieWordEmbeddings ? baseTensor('model.embed_tokens.weight') : baseTensor(name));
  const { merged, untiedLmHead } = spec.mode === 'lora' ? mergeLora(current, adapters, c, spec, bbFile) : { merged: new Map<string, HostTensor>(), untiedLmHead: false };
  const names = [...expected.map((e) => e.name), ...(untiedLmHead ? ['lm_head.weight'] : [])];
  const finalTensors = new Map<string, HostTensor>();
  for (const n of names) finalTensors.set(n, merged.get(n) ?? current(n));

  const dtype: ExportDtype = a.dtype ?? base.torchDtype ?? 'f32';
  const sd = DTYPE_OF[dtype];
  for (const [n, t] of finalTensors) checkValues(n, t.data, sd, src.describe);
  const trained: TrainedHeads = { heads: src.heads, shape: src.shape, baseLmHead: src.shape.lmHead === 'shared' ? readBaseLmHead(base, src.shape) : null };
  for (const row of referenceTable(trained.shape)) checkValues(row.name, trained.heads[row.name].data, sd, src.describe);
  const configText = untiedLmHead ? `${JSON.stringify({ ...folder.rawConfig, tie_word_embeddings: false }, null, 2)}\n` : fs.readFileSync(path.join(base.dir, CONFIG_FILE), 'utf8');
  if (untiedLmHead) a.log('export: lm_head was adapted on a model with tied embeddings: the export has its own lm_head.weight and tie_word_embeddings false');
  const copied = HF_COPIED_FILES.filter((f) => isFile(path.join(base.dir, f)));

  // The adapter model, as training computed it.
  const ref = loadDecoder(base.dir).decoder;
  const backbone = createTrainableBackbone(ref, spec, 0);
  let exported: Decoder | null = null;
  try {
    backbone.importTensors(ck.backbone, bbFile);
    const rng = new Rng(VERIFY_SEED);
    const T = Math.min(HF_VERIFY_LEN, c.maxPositionEmbeddings);
    const ids = Array.from({ length: HF_VERIFY_ROWS * T }, () => Math.floor(rng.next() * c.vocabSize));
    const want = hfLogits(ref, ids, () => backbone.hook(null));

    let heads = 0;
    const result = await writeThenRename(out, a.force, async (tmp) => {
      a.log(`export: writing hf (${dtype}) into ${tmp}`);
      fs.writeFileSync(path.join(tmp, CONFIG_FILE), configText);
      const write: Record<string, WriteTensor> = {};
      for (const [n, t] of finalTensors) write[n] = { dtype: sd, shape: t.shape.slice(), data: t.data };
      writeSafetensors(path.join(tmp, HF_WEIGHTS_FILE), write, { format: 'pt' });
      for (const f of copied) fs.copyFileSync(path.join(base.dir, f), path.join(tmp, f));
      const headsDir = path.join(tmp, HF_HEADS_DIR);
      fs.mkdirSync(headsDir);
      const meta: Record<string, string> = { [META.format]: 'pt', [META.version]: VERSION, [META.lmHead]: trained.shape.lmHead, [META.baseModel]: out, [META.baseModelSha]: sha256File(path.join(tmp, CONFIG_FILE)) };
      heads = writeHeadsLayout(headsDir, 'medusa', trained, sd, meta, out);
      const tree = findChoices(src);
      if (tree) writeJson(path.join(headsDir, CHOICES_FILE), tree.choices);
      fsyncDir(headsDir);
      fsyncDir(tmp);

      a.log(`export: verifying ${tmp} (file set, config.json, copied files, ${finalTensors.size} tensors, heads, logits on ${ids.length} positions)`);
      const problems: string[] = [];
      const files = listFiles(tmp);
      const wantFiles = [CONFIG_FILE, HF_WEIGHTS_FILE, HF_HEADS_DIR, ...copied].sort();
      if (files.join('\n') !== wantFiles.join('\n')) problems.push(`${tmp} holds ${files.join(', ')}, expected ${wantFiles.join(', ')}`);
      const cfgGot = JSON.stringify(readJsonFile(path.join(tmp, CONFIG_FILE)));
      const cfgWant = JSON.stringify(untiedLmHead ? { ...folder.rawConfig, tie_word_embeddings: false } : folder.rawConfig);
      if (cfgGot !== cfgWant) problems.push(`${path.join(tmp, CONFIG_FILE)} differs from the base model's config.json`);
      for (const f of copied) if (!fs.readFileSync(path.join(tmp, f)).equals(fs.readFileSync(path.join(base.dir, f)))) problems.push(`${path.join(tmp, f)} differs from ${path.join(base.dir, f)}`);
      const header = readHeader(path.join(tmp, HF_WEIGHTS_FILE));
      if (header.tensors.size !== finalTensors.size) problems.push(`${HF_WEIGHTS_FILE} holds ${header.tensors.size} tensors, expected ${finalTensors.size}`);
      for (const [n, t] of finalTensors) {
        const info = header.tensors.get(n);
        if (!info) problems.push(`${HF_WEIGHTS_FILE}: tensor ${n} is missing`);
        else if (info.dtype !== sd || info.shape.join(',') !== t.shape.join(',')) problems.push(`${HF_WEIGHTS_FILE}: tensor ${n} is ${info.dtype} [${info.shape.join(', ')}], expected ${sd} [${t.shape.join(', ')}]`);
        else {
          const i = sameBits(readTensorF32(info), rounded(t.data, sd));
          if (i >= 0) problems.push(`${HF_WEIGHTS_FILE}: tensor ${n} element ${i} is not the merged value stored as ${sd}`);
        }
        if (problems.length >= 30) break;
      }
      if (problems.length > 0) verifyFail(tmp, problems);
      const hr = await verifyExport(headsDir, 'medusa', trained, { dtype, baseModelName: out });
      if (hr.tensors !== heads) fail('E_INTERNAL', `verified ${hr.tensors} head tensors but wrote ${heads}`);

      // The reloaded folder's logits against the adapter model's.
      exported = loadDecoder(tmp).decoder;
      const got = hfLogits(exported, ids);
      let scale = 1;
      for (const v of want) scale = Math.max(scale, Math.abs(v));
      const bound = HF_LOGITS_TOL_ROUNDED[dtype] * scale;
      let maxAbsDiff = 0;
      for (let i = 0; i < want.length; i++) {
        const diff = Math.abs(want[i] - got[i]);
        if (!(diff <= bound)) {
          fail('E_MODEL', `export verification failed for ${tmp}: position ${Math.floor(i / c.vocabSize)}, token ${i % c.vocabSize}: the exported model gives logit ${got[i]}, the adapter model ${want[i]} (|diff| ${diff} > allowed ${bound}); the merge is wrong, nothing was written to its final place`);
        }
        maxAbsDiff = Math.max(maxAbsDiff, diff);
      }
      return { files, tensors: finalTensors.size + heads, maxAbsDiff, bound, verifiedPositions: ids.length };
    });
    a.log(`export: verified ${result.tensors} tensors (model ${finalTensors.size}, heads ${heads}), config.json and ${copied.length} copied file(s); logits on ${result.verifiedPositions} positions vs the adapter model: max |diff| ${result.maxAbsDiff} (allowed ${result.bound.toPrecision(3)})`);
    a.log(`export: wrote ${out} (heads in ${path.join(out, HF_HEADS_DIR)})`);
    return { out, format: 'hf', dtype, files: listFiles(out), tensors: result.tensors, maxAbsDiff: result.maxAbsDiff, bound: result.bound, verifiedPositions: result.verifiedPositions, sourceKind: src.kind, warnings: src.warnings };
  } finally {
    backbone.dispose();
    disposeWeights(ref.weights);
    if (exported !== null) disposeWeights((exported as Decoder).weights);
  }
}
