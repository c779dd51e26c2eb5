/**
 * The folder layouts in which runtimes load Medusa heads, as literal tables between each layout's
 * tensor names and the reference names the trainer uses (`{k}.{l}.linear.weight` [d, d] (out, in),
 * `{k}.{l}.linear.bias` [d], `{k}.{L}.weight` [V, d]); the config.json each runtime reads; and the
 * reader of such folders (ours and ones published by others). Format details: docs/EXPORT.md.
 *
 *   medusa     medusa_lm_head.safetensors + config.json {medusa_num_heads, medusa_num_layers,
 *              base_model_name_or_path, hidden_size, vocab_size} (no `architectures`: TGI would ignore
 *              the heads). Reference names as they are. TGI, TensorRT-LLM, the Medusa reference code.
 *   medusa-v2  the same file name with the ResBlocks only (`{k}.0.linear.*`; one layer per head), config
 *              as medusa plus "version": "2"; the runtime reuses the base lm_head. TGI.
 *   vllm       model.safetensors with `blocks.{k}.layers.{l}.weight|bias`, `lm_heads.{k}.weight` +
 *              config.json {architectures ["MedusaModel"], model_type "medusa", hidden_size, vocab_size,
 *              num_heads, num_hidden_layers, truncated_vocab_size null, medusa_fc_bias true}.
 *
 * Every table is checked by count (and the writer and reader check every shape against it).
 * Leaf module: imports Node builtins, ../errors.js and sibling io modules only.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MedusaError } from '../errors.js';
import { readJsonFile } from './json.js';
import { readHeader, readTensorF32, type DType, type TensorInfo } from './safetensors.js';
import { isFile } from './paths.js';

export type HeadsLayout = 'medusa' | 'medusa-v2' | 'vllm';
export const HEADS_LAYOUTS: readonly HeadsLayout[] = ['medusa', 'medusa-v2', 'vllm'];
export type LmHeadMode = 'per_head' | 'shared';

export interface LayoutShape {
  numHeads: number;
  numLayers: number;
  hiddenSize: number;
  vocabSize: number;
}

/** A heads shape with the lm_head mode: `per_head` heads carry `{k}.{L}.weight`, `shared` ones use the base lm_head. */
export interface RefShape extends LayoutShape {
  lmHead: LmHeadMode;
}

export interface HostF32 {
  shape: number[];
  data: Float32Array;
}

export const CONFIG_FILE = 'config.json';
export const LAYOUT_WEIGHTS_FILE: Readonly<Record<HeadsLayout, string>> = {
  medusa: 'medusa_lm_head.safetensors',
  'medusa-v2': 'medusa_lm_head.safetensors',
  vllm: 'model.safetensors',
};
/** The lm_head mode a layout stores: v2 folders hold no projections (runtimes use the base lm_head). */
export const LAYOUT_LM_HEAD: Readonly<Record<HeadsLayout, LmHeadMode>> = { medusa: 'per_head', 'medusa-v2': 'shared', vllm: 'per_head' };

/** Floating-point dtypes an export may hold. */
export const HEAD_DTYPES: readonly DType[] = ['F32', 'F16', 'BF16'];

/** Keys of the safetensors `__metadata__` our exports carry (runtimes ignore metadata). */
export const META = {
  format: 'format',
  version: 'medusa_train.version',
  lmHead: 'medusa_train.lm_head',
  baseModel: 'medusa_train.base_model_name_or_path',
  baseModelSha: 'medusa_train.base_model_config_sha256',
} as const;

/** One row of a layout table: the name in the layout's file, the reference name, the shape. */
export interface LayoutRow {
  name: string;
  reference: string;
  shape: number[];
}

function err(code: 'E_CONFIG' | 'E_MODEL' | 'E_UNSUPPORTED' | 'E_IO' | 'E_INTERNAL', message: string): MedusaError {
  return new MedusaError(code, message);
}

function isPosInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
}

function checkShape(s: LayoutShape): void {
  for (const k of ['numHeads', 'numLayers', 'hiddenSize', 'vocabSize'] as const) {
    if (!isPosInt(s[k])) throw err('E_INTERNAL', `heads shape ${k} must be a positive integer, got ${String(s[k])}`);
  }
}

/** The reference layout (the trainer's checkpoint names), as model/heads.ts's headTensorTable. */
export function referenceTable(s: RefShape): { name: string; shape: number[] }[] {
  checkShape(s);
  const d = s.hiddenSize;
  const rows: { name: string; shape: number[] }[] = [];
  for (let k = 0; k < s.numHeads; k++) {
    for (let l = 0; l < s.numLayers; l++) {
      rows.push({ name: `${k}.${l}.linear.weight`, shape: [d, d] });
      rows.push({ name: `${k}.${l}.linear.bias`, shape: [d] });
    }
    if (s.lmHead === 'per_head') rows.push({ name: `${k}.${s.numLayers}.weight`, shape: [s.vocabSize, d] });
  }
  const expected = s.numHeads * (2 * s.numLayers + (s.lmHead === 'per_head' ? 1 : 0));
  if (rows.length !== expected) throw err('E_INTERNAL', `reference table has ${rows.length} rows, expected ${expected}`);
  return rows;
}

/** Refuse a v2 layout for heads with more than one layer (runtimes hard-code one ResBlock). */
export function checkV2Layers(numLayers: number, where: string): void {
  if (numLayers !== 1) {
    throw err(
      'E_UNSUPPORTED',
      `${where}: the medusa-v2 layout holds exactly one layer per head (TGI asserts medusa_num_layers == 1), but these heads have ${numLayers} layers; export \`medusa\` or \`vllm\` instead`,
    );
  }
}

/** The literal table of a layout for a heads shape: layout name <-> reference name, with the shape. */
export function layoutTable(layout: HeadsLayout, s: LayoutShape): LayoutRow[] {
  checkShape(s);
  const d = s.hiddenSize;
  const V = s.vocabSize;
  const L = s.numLayers;
  const rows: LayoutRow[] = [];
  let expected: number;
  switch (layout) {
    case 'medusa':
      for (let k = 0; k < s.numHeads; k++) {
        for (let l = 0; l < L; l++) {
          rows.push({ name: `${k}.${l}.linear.weight`, reference: `${k}.${l}.linear.weight`, shape: [d, d] });
          rows.push({ name: `${k}.${l}.linear.bias`, reference: `${k}.${l}.linear.bias`, shape: [d] });
        }
        rows.push({ name: `${k}.${L}.weight`, reference: `${k}.${L}.weight`, shape: [V, d] });
      }
      expected = s.numHeads * (2 * L + 1);
      break;
    case 'medusa-v2':
      checkV2Layers(L, 'medusa-v2 layout');
      for (let k = 0; k < s.numHeads; k++) {
        rows.push({ name: `${k}.0.linear.weight`, reference: `${k}.0.linear.weight`, shape: [d, d] });
        rows.push({ name: `${k}.0.linear.bias`, reference: `${k}.0.linear.bias`, shape: [d] });
      }
      expected = s.numHeads * 2;
      break;
    case 'vllm':
      for (let k = 0; k < s.numHeads; k++) {
        for (let l = 0; l < L; l++) {
          rows.push({ name: `blocks.${k}.layers.${l}.weight`, reference: `${k}.${l}.linear.weight`, shape: [d, d] });
          rows.push({ name: `blocks.${k}.layers.${l}.bias`, reference: `${k}.${l}.linear.bias`, shape: [d] });
        }
      }
      for (let k = 0; k < s.numHeads; k++) rows.push({ name: `lm_heads.${k}.weight`, reference: `${k}.${L}.weight`, shape: [V, d] });
      expected = s.numHeads * (2 * L + 1);
      break;
    default:
      throw err('E_INTERNAL', `unknown heads layout ${String(layout)}`);
  }
  if (rows.length !== expected) throw err('E_INTERNAL', `${layout} table has ${rows.length} rows, expected ${expected}`);
  if (new Set(rows.map((r) => r.name)).size !== rows.length) throw err('E_INTERNAL', `${layout} table has duplicate names`);
  return rows;
}

/** The config.json a layout's folder carries (keys in this order). */
export function layoutConfig(layout: HeadsLayout, s: LayoutShape, baseModelNameOrPath: string): Record<string, unknown> {
  checkShape(s);
  switch (layout) {
    case 'medusa':
      return {
        medusa_num_heads: s.numHeads,
        medusa_num_layers: s.numLayers,
        base_model_name_or_path: baseModelNameOrPath,
        hidden_size: s.hiddenSize,
        vocab_size: s.vocabSize,
      };
    case 'medusa-v2':
      checkV2Layers(s.numLayers, 'medusa-v2 layout');
      return { ...layoutConfig('medusa', s, baseModelNameOrPath), version: '2' };
    case 'vllm':
      return {
        architectures: ['MedusaModel'],
        model_type: 'medusa',
        hidden_size: s.hiddenSize,
        vocab_size: s.vocabSize,
        num_heads: s.numHeads,
        num_hidden_layers: s.numLayers,
        truncated_vocab_size: null,
        // Our heads always have biases; vLLM treats them as absent (and drops them silently) without this flag.
        medusa_fc_bias: true,
      };
    default:
      throw err('E_INTERNAL', `unknown heads layout ${String(layout)}`);
  }
}

/**
 * Problems of a written config.json against the one the layout requires: missing, unexpected or
 * different keys, plus the two runtime rules spelled out (TGI: no `architectures`; vLLM:
 * `medusa_fc_bias` true when the heads have biases, which ours always do).
 */
export function checkLayoutConfig(layout: HeadsLayout, actual: unknown, expected: Record<string, unknown>, file: string): string[] {
  const problems: string[] = [];
  if (typeof actual !== 'object' || actual === null || Array.isArray(actual)) return [`${file} must hold a JSON object`];
  const a = actual as Record<string, unknown>;
  if (layout !== 'vllm' && Object.prototype.hasOwnProperty.call(a, 'architectures')) {
    problems.push(`${file} has an "architectures" key: TGI would treat the folder as another speculator and ignore the Medusa heads`);
  }
  if (layout === 'vllm' && a['medusa_fc_bias'] !== true) {
    problems.push(`${file}: "medusa_fc_bias" is ${JSON.stringify(a['medusa_fc_bias']) ?? 'missing'} but the heads have biases: vLLM would drop them silently`);
  }
  for (const [k, v] of Object.entries(expected)) {
    if (!Object.prototype.hasOwnProperty.call(a, k)) problems.push(`${file}: key "${k}" is missing (expected ${JSON.stringify(v)})`);
    else if (JSON.stringify(a[k]) !== JSON.stringify(v)) problems.push(`${file}: key "${k}" is ${JSON.stringify(a[k])}, expected ${JSON.stringify(v)}`);
  }
  for (const k of Object.keys(a)) {
    if (!Object.prototype.hasOwnProperty.call(expected, k) && !(k === 'architectures' && layout !== 'vllm')) problems.push(`${file}: unexpected key "${k}"`);
  }
  return problems;
}

/**
 * Problems of a safetensors header against a layout table: missing, misshaped, unexpected tensors,
 * dtypes other than `dtype` (any float dtype when null), tensors sharing storage (aliased layers).
 */
export function checkLayoutTensors(rows: LayoutRow[], tensors: Map<string, TensorInfo>, dtype: DType | null, file: string): string[] {
  const problems: string[] = [];
  for (const row of rows) {
    const t = tensors.get(row.name);
    if (!t) problems.push(`${file}: tensor "${row.name}" [${row.shape.join(', ')}] is missing`);
    else if (t.shape.join(',') !== row.shape.join(',')) problems.push(`${file}: tensor "${row.name}" is [${t.shape.join(', ')}], expected [${row.shape.join(', ')}]`);
    else if (dtype !== null && t.dtype !== dtype) problems.push(`${file}: tensor "${row.name}" is ${t.dtype}, expected ${dtype}`);
    else if (dtype === null && !HEAD_DTYPES.includes(t.dtype)) problems.push(`${file}: tensor "${row.name}" is ${t.dtype}; heads must be F32, F16 or BF16`);
  }
  const known = new Set(rows.map((r) => r.name));
  for (const name of tensors.keys()) if (!known.has(name)) problems.push(`${file}: unexpected tensor "${name}"`);
  const seen = new Map<number, string>();
  for (const t of tensors.values()) {
    if (t.byteLength === 0) continue;
    const other = seen.get(t.offset);
    if (other !== undefined) problems.push(`${file}: tensors "${other}" and "${t.name}" share storage; every layer must be its own tensor`);
    seen.set(t.offset, t.name);
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------
// Reading (import)
// ---------------------------------------------------------------------------------------------

export interface HeadsFolder {
  kind: HeadsLayout;
  dir: string;
  /** config.json as read. */
  config: Record<string, unknown>;
  /** Reference layout, float32 (F16/BF16 widened exactly). */
  heads: Record<string, HostF32>;
  /** `shared` for medusa-v2 (no projections in the folder), else `per_head`. */
  shape: RefShape;
  /** base_model_name_or_path of config.json (medusa, medusa-v2) or of our metadata, else null. */
  baseModel: string | null;
  /** sha256 of the base model's config.json when the folder was written by medusa-train. */
  baseModelConfigSha256: string | null;
  /** The lm_head mode the heads were trained with, when the folder was written by medusa-train. */
  trainedLmHead: LmHeadMode | null;
  /** The tensors' dtype when they all share one, else null. */
  dtype: 'F32' | 'F16' | 'BF16' | null;
  weightsFile: string;
  /** Things that load but deserve a word (e.g. biases vLLM would ignore). */
  warnings: string[];
}

function readConfigObject(file: string): Record<string, unknown> {
  if (!isFile(file)) throw err('E_IO', `${file} is missing; a Medusa heads folder has a config.json next to its safetensors file`);
  const json = readJsonFile(file);
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw err('E_CONFIG', `${file} must hold a JSON object`);
  return json as Record<string, unknown>;
}

/** Which layout a folder holds, from its files and config.json. */
export function detectLayout(dir: string): { kind: HeadsLayout; config: Record<string, unknown>; warnings: string[] } {
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch {
    throw err('E_IO', `heads folder ${dir} does not exist; check the path`);
  }
  if (!st.isDirectory()) throw err('E_IO', `${dir} is not a folder; pass a folder in the medusa, medusa-v2 or vllm layout`);
  const medusaFile = path.join(dir, LAYOUT_WEIGHTS_FILE.medusa);
  const vllmFile = path.join(dir, LAYOUT_WEIGHTS_FILE.vllm);
  const hasMedusa = isFile(medusaFile);
  const hasVllm = isFile(vllmFile);
  const warnings: string[] = [];
  if (!hasMedusa && !hasVllm) {
    for (const pt of ['medusa_lm_head.pt', 'pytorch_model.bin', 'medusa_lm_head.bin']) {
      if (isFile(path.join(dir, pt))) {
        throw err(
          'E_UNSUPPORTED',
          `${dir} holds ${pt} but no safetensors file; .pt/.bin pickles are not read (they can run code). Convert it once with Python: ` +
            `safetensors.torch.save_file(torch.load("${pt}"), "medusa_lm_head.safetensors")`,
        );
      }
    }
    if (isFile(path.join(dir, 'model.safetensors.index.json'))) throw err('E_UNSUPPORTED', `${dir} holds sharded weights (model.safetensors.index.json); Medusa heads folders hold one file`);
    throw err('E_IO', `${dir} is not a Medusa heads folder: neither ${LAYOUT_WEIGHTS_FILE.medusa} (medusa, medusa-v2) nor ${LAYOUT_WEIGHTS_FILE.vllm} (vllm) is there`);
  }
  const configFile = path.join(dir, CONFIG_FILE);
  const config = readConfigObject(configFile);
  if (hasMedusa && hasVllm) {
    throw err('E_CONFIG', `${dir} holds both ${LAYOUT_WEIGHTS_FILE.medusa} and ${LAYOUT_WEIGHTS_FILE.vllm}, so its layout is ambiguous; keep the one you mean`);
  }
  if (hasVllm) {
    const arch = config['architectures'];
    const isMedusa = config['model_type'] === 'medusa' || (Array.isArray(arch) && arch.includes('MedusaModel'));
    if (!isMedusa) {
      throw err(
        'E_CONFIG',
        `${configFile}: model_type is ${JSON.stringify(config['model_type']) ?? 'missing'} and architectures is ${JSON.stringify(arch) ?? 'missing'}, ` +
          `so ${dir} is not a vLLM Medusa folder (model_type "medusa", architectures ["MedusaModel"]); is it a base model folder?`,
      );
    }
    return { kind: 'vllm', config, warnings };
  }
  const version = config['version'];
  if (version === '2' || version === 2) return { kind: 'medusa-v2', config, warnings };
  if (version !== undefined && version !== '1' && version !== 1) {
    throw err('E_CONFIG', `${configFile}: key "version" is ${JSON.stringify(version)}; Medusa heads folders are version "2" (ResBlocks only) or have no version key`);
  }
  // TGI loads the v1 layout and falls back to v2 when it fails: a folder with no projection at all is v2.
  const header = readHeader(medusaFile);
  const hasProjection = [...header.tensors.keys()].some((n) => /^\d+\.\d+\.weight$/.test(n));
  if (!hasProjection && header.tensors.size > 0) {
    warnings.push(`${configFile} has no "version" key but ${medusaFile} holds no {h}.{L}.weight projections: read as medusa-v2, as TGI does`);
    return { kind: 'medusa-v2', config, warnings };
  }
  return { kind: 'medusa', config, warnings };
}

function configInt(config: Record<string, unknown>, keys: string[], file: string, required: boolean, hint: string): number | null {
  for (const k of keys) {
    if (!Object.prototype.hasOwnProperty.call(config, k)) continue;
    const v = config[k];
    if (!isPosInt(v)) throw err('E_CONFIG', `${file}: key "${k}" must be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  }
  if (required) throw err('E_CONFIG', `${file}: key "${keys[0]}" is missing; ${hint}`);
  return null;
}

/**
 * Read a heads folder in the medusa, medusa-v2 or vllm layout (ours or published by others) into
 * the reference layout. The layout is detected from the files and config.json; every tensor is
 * checked against the layout's literal table. Errors name the file and the key or tensor.
 */
export function readHeadsFolder(dir: string): HeadsFolder {
  const { kind, config, warnings } = detectLayout(dir);
  const configFile = path.join(dir, CONFIG_FILE);
  const weightsFile = path.join(dir, LAYOUT_WEIGHTS_FILE[kind]);
  const header = readHeader(weightsFile);
  const names = [...header.tensors.keys()];
  const first = (re: RegExp): TensorInfo | undefined => header.tensors.get(names.find((n) => re.test(n)) ?? '');

  let numHeads: number;
  let numLayers: number;
  let hidden: number | null;
  let vocab: number | null;
  if (kind === 'vllm') {
    const hint = 'a vLLM Medusa config.json gives num_heads, num_hidden_layers, hidden_size and vocab_size';
    numHeads = configInt(config, ['num_heads', 'medusa_num_heads'], configFile, true, hint)!;
    numLayers = configInt(config, ['num_hidden_layers', 'medusa_num_layers'], configFile, true, hint)!;
    hidden = configInt(config, ['hidden_size'], configFile, false, hint);
    vocab = configInt(config, ['vocab_size'], configFile, false, hint);
    if (hidden === null) warnings.push(`${configFile} has no "hidden_size": vLLM would assume 4096; taken from the tensors here`);
    if (vocab === null) warnings.push(`${configFile} has no "vocab_size": vLLM would assume 32001; taken from the tensors here`);
    const tvs = config['truncated_vocab_size'];
    if (tvs !== undefined && tvs !== null && tvs !== vocab) {
      throw err('E_UNSUPPORTED', `${configFile}: "truncated_vocab_size" is ${JSON.stringify(tvs)}; heads with a truncated vocabulary (token_map) cannot be imported`);
    }
    if (config['original_lm_head'] === true) {
      throw err('E_UNSUPPORTED', `${configFile}: "original_lm_head" is true (one lm_head shared by all heads); import supports one lm_heads.{h}.weight per head only`);
    }
    hidden ??= first(/^blocks\.\d+\.layers\.\d+\.weight$/)?.shape[1] ?? null;
    vocab ??= first(/^lm_heads\.\d+\.weight$/)?.shape[0] ?? null;
  } else {
    const hint = 'a Medusa heads config.json gives medusa_num_heads and medusa_num_layers';
    numHeads = configInt(config, ['medusa_num_heads'], configFile, true, hint)!;
    numLayers = configInt(config, ['medusa_num_layers'], configFile, true, hint)!;
    hidden = configInt(config, ['hidden_size'], configFile, false, hint);
    vocab = configInt(config, ['vocab_size'], configFile, kind === 'medusa-v2', 'a medusa-v2 folder holds no projection to read the vocabulary size from');
    if (Object.prototype.hasOwnProperty.call(config, 'architectures')) {
      warnings.push(`${configFile} has an "architectures" key: TGI ignores the heads of such a folder (the export will not have it)`);
    }
    hidden ??= first(/^\d+\.0\.linear\.weight$/)?.shape[1] ?? null;
    vocab ??= first(/^\d+\.\d+\.weight$/)?.shape[0] ?? null;
  }
  if (kind === 'medusa-v2') checkV2Layers(numLayers, configFile);
  if (hidden === null || vocab === null) {
    throw err('E_CONFIG', `${configFile}: "${hidden === null ? 'hidden_size' : 'vocab_size'}" is missing and ${weightsFile} has no tensor to read it from`);
  }
  const shape: RefShape = { numHeads, numLayers, hiddenSize: hidden, vocabSize: vocab, lmHead: LAYOUT_LM_HEAD[kind] };
  let rows = layoutTable(kind, shape);

  // A vLLM folder without biases (medusa_fc_bias false) is exactly heads with zero biases.
  let zeroBiases = false;
  if (kind === 'vllm') {
    const biasRows = rows.filter((r) => r.name.endsWith('.bias'));
    const present = biasRows.filter((r) => header.tensors.has(r.name)).length;
    if (present === 0 && config['medusa_fc_bias'] !== true) {
      zeroBiases = true;
      rows = rows.filter((r) => !r.name.endsWith('.bias'));
      warnings.push(`${weightsFile} has no biases ("medusa_fc_bias" is not true): imported with zero biases, which computes the same`);
    } else if (present > 0 && config['medusa_fc_bias'] !== true) {
      warnings.push(
        `${configFile}: "medusa_fc_bias" is ${JSON.stringify(config['medusa_fc_bias']) ?? 'missing'}, so vLLM drops the biases this folder holds; ` +
          'the import keeps them (the export will set the flag)',
      );
    }
  }

  const problems = checkLayoutTensors(rows, header.tensors, null, weightsFile);
  if (problems.length > 0) {
    let hint = `The folder does not hold ${kind} heads of ${numHeads} heads x ${numLayers} layer(s), hidden ${hidden}, vocabulary ${vocab} (from ${configFile}).`;
    if (kind === 'medusa' && numLayers > 1 && problems.some((p) => /\.[1-9]\d*\.linear\.(weight|bias)" .*missing/.test(p))) {
      hint += ' The Medusa reference code aliased the layers of a head when medusa_num_layers > 1, and saving it dropped the aliases; such a folder cannot be told apart from a damaged one.';
    }
    const shown = problems.slice(0, 20);
    throw err('E_MODEL', `${shown.join('\n')}${problems.length > shown.length ? `\n... and ${problems.length - shown.length} more` : ''}\n${hint}`);
  }

  const heads: Record<string, HostF32> = {};
  const dtypes = new Set<DType>();
  for (const row of rows) {
    const info = header.tensors.get(row.name)!;
    dtypes.add(info.dtype);
    heads[row.reference] = { shape: row.shape.slice(), data: readTensorF32(info) };
  }
  if (zeroBiases) {
    for (const r of layoutTable(kind, shape)) if (r.name.endsWith('.bias')) heads[r.reference] = { shape: r.shape.slice(), data: new Float32Array(r.shape[0]) };
  }
  const meta = header.metadata;
  const metaBase = typeof meta[META.baseModel] === 'string' && meta[META.baseModel] !== '' ? meta[META.baseModel] : null;
  const cfgBase = typeof config['base_model_name_or_path'] === 'string' && config['base_model_name_or_path'] !== '' ? (config['base_model_name_or_path'] as string) : null;
  const sha = meta[META.baseModelSha];
  const lm = meta[META.lmHead];
  const only = dtypes.size === 1 ? [...dtypes][0] : null;
  return {
    kind,
    dir,
    config,
    heads,
    shape,
    baseModel: kind === 'vllm' ? metaBase : (cfgBase ?? metaBase),
    baseModelConfigSha256: typeof sha === 'string' && /^[0-9a-f]{64}$/.test(sha) ? sha : null,
    trainedLmHead: lm === 'per_head' || lm === 'shared' ? lm : null,
    dtype: only === 'F32' || only === 'F16' || only === 'BF16' ? only : null,
    weightsFile,
    warnings,
  };
}
