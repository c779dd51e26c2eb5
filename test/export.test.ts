/**
 * `export`: each target's exact layout (literal key/shape/config tables for d=64, V=512, K=3, L=1 and
 * L=2), the self-verification (f32 exact, bf16/f16 within the rounding bound, onnx within float32
 * arithmetic), import of existing folders and conversions between layouts, and every refusal.
 * The "trained" runs are checkpoints saved directly with random heads (no training needed).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MedusaError } from '../src/errors.js';
import { bf16BitsToF32, f32ToBf16Bits, f32ToF16Bits, readHeader, readTensorF32, readTensorRaw, writeSafetensors, type WriteTensor } from '../src/io/safetensors.js';
import { layoutTable, referenceTable } from '../src/io/medusa-layouts.js';
import { headTensorTable } from '../src/model/heads.js';
import { openModelFolder } from '../src/model/load.js';
import { Rng } from '../src/model/sampling.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { saveCheckpoint } from '../src/train/checkpoint.js';
import { readHeadsFolder, runExport, verifyExport, type ExportArgs, type TrainedHeads } from '../src/recipes/export.js';

type Heads = Record<string, { shape: number[]; data: Float32Array }>;

const D = 64;
const V = 512;
const K = 3;

// ---------------------------------------------------------------------------------------------
// Golden tables (written out literally on purpose)
// ---------------------------------------------------------------------------------------------

const MEDUSA_L1: Record<string, number[]> = {
  '0.0.linear.weight': [64, 64],
  '0.0.linear.bias': [64],
  '0.1.weight': [512, 64],
  '1.0.linear.weight': [64, 64],
  '1.0.linear.bias': [64],
  '1.1.weight': [512, 64],
  '2.0.linear.weight': [64, 64],
  '2.0.linear.bias': [64],
  '2.1.weight': [512, 64],
};
const MEDUSA_L2: Record<string, number[]> = {
  '0.0.linear.weight': [64, 64],
  '0.0.linear.bias': [64],
  '0.1.linear.weight': [64, 64],
  '0.1.linear.bias': [64],
  '0.2.weight': [512, 64],
  '1.0.linear.weight': [64, 64],
  '1.0.linear.bias': [64],
  '1.1.linear.weight': [64, 64],
  '1.1.linear.bias': [64],
  '1.2.weight': [512, 64],
  '2.0.linear.weight': [64, 64],
  '2.0.linear.bias': [64],
  '2.1.linear.weight': [64, 64],
  '2.1.linear.bias': [64],
  '2.2.weight': [512, 64],
};
const MEDUSA_V2_L1: Record<string, number[]> = {
  '0.0.linear.weight': [64, 64],
  '0.0.linear.bias': [64],
  '1.0.linear.weight': [64, 64],
  '1.0.linear.bias': [64],
  '2.0.linear.weight': [64, 64],
  '2.0.linear.bias': [64],
};
const VLLM_L1: Record<string, number[]> = {
  'blocks.0.layers.0.weight': [64, 64],
  'blocks.0.layers.0.bias': [64],
  'blocks.1.layers.0.weight': [64, 64],
  'blocks.1.layers.0.bias': [64],
  'blocks.2.layers.0.weight': [64, 64],
  'blocks.2.layers.0.bias': [64],
  'lm_heads.0.weight': [512, 64],
  'lm_heads.1.weight': [512, 64],
  'lm_heads.2.weight': [512, 64],
};
const VLLM_L2: Record<string, number[]> = {
  'blocks.0.layers.0.weight': [64, 64],
  'blocks.0.layers.0.bias': [64],
  'blocks.0.layers.1.weight': [64, 64],
  'blocks.0.layers.1.bias': [64],
  'blocks.1.layers.0.weight': [64, 64],
  'blocks.1.layers.0.bias': [64],
  'blocks.1.layers.1.weight': [64, 64],
  'blocks.1.layers.1.bias': [64],
  'blocks.2.layers.0.weight': [64, 64],
  'blocks.2.layers.0.bias': [64],
  'blocks.2.layers.1.weight': [64, 64],
  'blocks.2.layers.1.bias': [64],
  'lm_heads.0.weight': [512, 64],
  'lm_heads.1.weight': [512, 64],
  'lm_heads.2.weight': [512, 64],
};
/** vLLM name -> reference name. */
const VLLM_TO_REF_L2: Record<string, string> = {
  'blocks.0.layers.0.weight': '0.0.linear.weight',
  'blocks.0.layers.0.bias': '0.0.linear.bias',
  'blocks.0.layers.1.weight': '0.1.linear.weight',
  'blocks.0.layers.1.bias': '0.1.linear.bias',
  'blocks.1.layers.0.weight': '1.0.linear.weight',
  'blocks.1.layers.0.bias': '1.0.linear.bias',
  'blocks.1.layers.1.weight': '1.1.linear.weight',
  'blocks.1.layers.1.bias': '1.1.linear.bias',
  'blocks.2.layers.0.weight': '2.0.linear.weight',
  'blocks.2.layers.0.bias': '2.0.linear.bias',
  'blocks.2.layers.1.weight': '2.1.linear.weight',
  'blocks.2.layers.1.bias': '2.1.linear.bias',
  'lm_heads.0.weight': '0.2.weight',
  'lm_heads.1.weight': '1.2.weight',
  'lm_heads.2.weight': '2.2.weight',
};
const medusaConfig = (L: number, base: string): Record<string, unknown> => ({
  medusa_num_heads: 3,
  medusa_num_layers: L,
  base_model_name_or_path: base,
  hidden_size: 64,
  vocab_size: 512,
});
const MEDUSA_CONFIG_KEYS = ['medusa_num_heads', 'medusa_num_layers', 'base_model_name_or_path', 'hidden_size', 'vocab_size'];
const vllmConfig = (L: number): Record<string, unknown> => ({
  architectures: ['MedusaModel'],
  model_type: 'medusa',
  hidden_size: 64,
  vocab_size: 512,
  num_heads: 3,
  num_hidden_layers: L,
  truncated_vocab_size: null,
  medusa_fc_bias: true,
});

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

let root: string;
let modelF32: string; // tied embeddings, F32
let modelBf16: string; // untied lm_head, BF16
let counter = 0;
const fresh = (name: string): string => path.join(root, `${name}-${counter++}`);

interface Run {
  dir: string;
  heads: Heads;
  L: number;
  lmHead: 'per_head' | 'shared';
  model: string;
}

function randomHeads(L: number, lmHead: 'per_head' | 'shared', seed: number): Heads {
  const r = new Rng(seed);
  const t = (shape: number[], scale: number) => ({ shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => (r.next() - 0.5) * scale) });
  const heads: Heads = {};
  for (let k = 0; k < K; k++) {
    for (let l = 0; l < L; l++) {
      heads[`${k}.${l}.linear.weight`] = t([D, D], 0.25);
      heads[`${k}.${l}.linear.bias`] = t([D], 0.2);
    }
    if (lmHead === 'per_head') heads[`${k}.${L}.weight`] = t([V, D], 0.3);
  }
  return heads;
}

function makeRun(o: { L: number; lmHead: 'per_head' | 'shared'; model?: string; seed?: number; step?: number; dir?: string; heads?: Heads; recordBase?: boolean }): Run {
  const model = o.model ?? modelF32;
  const dir = o.dir ?? fresh(`run-${o.lmHead}-L${o.L}`);
  const heads = o.heads ?? randomHeads(o.L, o.lmHead, o.seed ?? 1);
  const step = o.step ?? 7;
  const state: Record<string, unknown> = {
    step,
    heads_shape: { num_heads: K, num_layers: o.L, lm_head: o.lmHead, hidden_size: D, vocab_size: V },
    base_model_config_sha256: openModelFolder(model).configHash,
  };
  if (o.recordBase !== false) state['base_model_path'] = path.resolve(model);
  saveCheckpoint(dir, { step, heads, optimizer: {}, state }, { keep: 5 });
  return { dir, heads, L: o.L, lmHead: o.lmHead, model };
}

const logs: string[] = [];
function args(run: string, format: ExportArgs['format'], extra: Partial<ExportArgs> = {}): ExportArgs {
  return { run, format, out: fresh(`out-${format}`), force: false, log: (l) => logs.push(l), ...extra };
}

function headerTable(file: string): Record<string, number[]> {
  const h = readHeader(file);
  return Object.fromEntries([...h.tensors].map(([n, t]) => [n, t.shape]));
}

function dtypes(file: string): string[] {
  return [...new Set([...readHeader(file).tensors.values()].map((t) => t.dtype))];
}

function tensor(file: string, name: string): Float32Array {
  const info = readHeader(file).tensors.get(name);
  if (!info) throw new Error(`${name} not in ${file}`);
  return readTensorF32(info);
}

function bits(a: Float32Array): number[] {
  return Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));
}

function readConfig(dir: string): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** The base model's lm_head [V, d] as stored (f32 widened). */
function baseLmHead(model: string): Float32Array {
  const f = openModelFolder(model);
  return readTensorF32(f.shards.tensors.get(f.config.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight')!);
}

async function expectError(p: Promise<unknown>, code: string, ...parts: (string | RegExp)[]): Promise<MedusaError> {
  let caught: unknown;
  try {
    await p;
  } catch (e) {
    caught = e;
  }
  if (!(caught instanceof MedusaError)) throw new Error(`expected a MedusaError ${code}, got ${String(caught)}`);
  expect(caught.code).toBe(code);
  for (const part of parts) {
    if (typeof part === 'string') expect(caught.message).toContain(part);
    else expect(caught.message).toMatch(part);
  }
  return caught;
}

function rewrite(file: string, edit: (t: Map<string, WriteTensor>) => void): void {
  const h = readHeader(file);
  const m = new Map<string, WriteTensor>();
  for (const [n, info] of h.tensors) m.set(n, { dtype: 'F32', shape: info.shape, data: readTensorF32(info) });
  edit(m);
  writeSafetensors(file, m, h.metadata);
}

let perL1: Run;
let perL2: Run;
let sharedL1: Run;
let sharedL2: Run;

beforeAll(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-export-'));
  modelF32 = path.join(root, 'model-f32');
  writeTinyModel(modelF32, { hiddenSize: D, vocabSize: V, numLayers: 1, tieWordEmbeddings: true, dtype: 'F32', seed: 3 });
  modelBf16 = path.join(root, 'model-bf16');
  writeTinyModel(modelBf16, { hiddenSize: D, vocabSize: V, numLayers: 1, tieWordEmbeddings: false, dtype: 'BF16', seed: 4 });
  perL1 = makeRun({ L: 1, lmHead: 'per_head', seed: 11 });
  perL2 = makeRun({ L: 2, lmHead: 'per_head', seed: 12 });
  sharedL1 = makeRun({ L: 1, lmHead: 'shared', seed: 13 });
  sharedL2 = makeRun({ L: 2, lmHead: 'shared', seed: 14 });
});
afterAll(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------

describe('layout tables', () => {
  test('the reference table is the trainer\'s headTensorTable', () => {
    for (const L of [1, 2]) {
      for (const lmHead of ['per_head', 'shared'] as const) {
        const s = { numHeads: K, numLayers: L, hiddenSize: D, vocabSize: V, lmHead };
        expect(referenceTable(s)).toEqual(headTensorTable(s).map((r) => ({ name: r.name, shape: r.shape })));
      }
    }
  });

  test('literal tables for d=64, V=512, K=3', () => {
    const s1 = { numHeads: K, numLayers: 1, hiddenSize: D, vocabSize: V };
    const s2 = { ...s1, numLayers: 2 };
    const asTable = (rows: { name: string; shape: number[] }[]) => Object.fromEntries(rows.map((r) => [r.name, r.shape]));
    expect(asTable(layoutTable('medusa', s1))).toEqual(MEDUSA_L1);
    expect(asTable(layoutTable('medusa', s2))).toEqual(MEDUSA_L2);
    expect(asTable(layoutTable('medusa-v2', s1))).toEqual(MEDUSA_V2_L1);
    expect(asTable(layoutTable('vllm', s1))).toEqual(VLLM_L1);
    expect(asTable(layoutTable('vllm', s2))).toEqual(VLLM_L2);
    expect(Object.fromEntries(layoutTable('vllm', s2).map((r) => [r.name, r.reference]))).toEqual(VLLM_TO_REF_L2);
    expect(() => layoutTable('medusa-v2', s2)).toThrow(/2 layers/);
  });
});

describe('targets (f32: exact)', () => {
  test('medusa, L=1: literal keys, shapes, config without architectures; values bit for bit', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    expect(r).toMatchObject({ format: 'medusa', dtype: 'f32', files: ['config.json', 'medusa_lm_head.safetensors'], tensors: 9, maxAbsDiff: 0, bound: 0, verifiedPositions: 8, sourceKind: 'checkpoint' });
    const file = path.join(r.out, 'medusa_lm_head.safetensors');
    expect(headerTable(file)).toEqual(MEDUSA_L1);
    expect(dtypes(file)).toEqual(['F32']);
    const cfg = readConfig(r.out);
    expect(cfg).toEqual(medusaConfig(1, path.resolve(modelF32)));
    expect(Object.keys(cfg)).toEqual(MEDUSA_CONFIG_KEYS);
    expect('architectures' in cfg).toBe(false); // TGI ignores the heads otherwise
    for (const [name, t] of Object.entries(perL1.heads)) expect(bits(tensor(file, name))).toEqual(bits(t.data));
    expect(logs.some((l) => l.includes('max |diff| 0'))).toBe(true);
  });

  test('medusa, L=2: every layer its own tensor', async () => {
    const r = await runExport(args(perL2.dir, 'medusa', { dtype: 'f32' }));
    const file = path.join(r.out, 'medusa_lm_head.safetensors');
    expect(headerTable(file)).toEqual(MEDUSA_L2);
    expect(readConfig(r.out)).toEqual(medusaConfig(2, path.resolve(modelF32)));
    const h = readHeader(file);
    const offsets = [...h.tensors.values()].map((t) => t.offset);
    expect(new Set(offsets).size).toBe(offsets.length);
    for (const [name, t] of Object.entries(perL2.heads)) expect(bits(tensor(file, name))).toEqual(bits(t.data));
    expect(bits(tensor(file, '1.0.linear.weight'))).not.toEqual(bits(tensor(file, '1.1.linear.weight')));
    expect(r.maxAbsDiff).toBe(0);
  });

  test('vllm, L=1 and L=2: literal keys, config with medusa_fc_bias true', async () => {
    for (const [run, table] of [[perL1, VLLM_L1], [perL2, VLLM_L2]] as const) {
      const r = await runExport(args(run.dir, 'vllm', { dtype: 'f32' }));
      expect(r.files).toEqual(['config.json', 'model.safetensors']);
      const file = path.join(r.out, 'model.safetensors');
      expect(headerTable(file)).toEqual(table);
      const cfg = readConfig(r.out);
      expect(cfg).toEqual(vllmConfig(run.L));
      expect(cfg['medusa_fc_bias']).toBe(true); // vLLM drops biases silently otherwise
      expect(r.maxAbsDiff).toBe(0);
      const names = layoutTable('vllm', { numHeads: K, numLayers: run.L, hiddenSize: D, vocabSize: V });
      for (const row of names) expect(bits(tensor(file, row.name))).toEqual(bits(run.heads[row.reference].data));
    }
  });

  test('medusa-v2 from a shared run: ResBlocks only, version "2"', async () => {
    const r = await runExport(args(sharedL1.dir, 'medusa-v2', { dtype: 'f32' }));
    const file = path.join(r.out, 'medusa_lm_head.safetensors');
    expect(headerTable(file)).toEqual(MEDUSA_V2_L1);
    const cfg = readConfig(r.out);
    expect(cfg).toEqual({ ...medusaConfig(1, path.resolve(modelF32)), version: '2' });
    expect('architectures' in cfg).toBe(false);
    for (const [name, t] of Object.entries(sharedL1.heads)) expect(bits(tensor(file, name))).toEqual(bits(t.data));
    expect(r).toMatchObject({ tensors: 6, maxAbsDiff: 0 });
  });

  test('medusa and vllm from a shared run: the base lm_head copied into every head', async () => {
    const lm = bits(baseLmHead(modelF32)); // tied model: model.embed_tokens.weight
    const m = await runExport(args(sharedL1.dir, 'medusa', { dtype: 'f32' }));
    const mf = path.join(m.out, 'medusa_lm_head.safetensors');
    expect(headerTable(mf)).toEqual(MEDUSA_L1);
    for (let k = 0; k < K; k++) expect(bits(tensor(mf, `${k}.1.weight`))).toEqual(lm);
    const v = await runExport(args(sharedL1.dir, 'vllm', { dtype: 'f32' }));
    const vf = path.join(v.out, 'model.safetensors');
    expect(headerTable(vf)).toEqual(VLLM_L1);
    for (let k = 0; k < K; k++) expect(bits(tensor(vf, `lm_heads.${k}.weight`))).toEqual(lm);
    expect([m.maxAbsDiff, v.maxAbsDiff]).toEqual([0, 0]);
  });

  test('a checkpoint folder works as well as the run folder; the run folder means its latest checkpoint', async () => {
    const run = makeRun({ L: 1, lmHead: 'per_head', seed: 21, step: 3 });
    const later = makeRun({ L: 1, lmHead: 'per_head', seed: 22, step: 9, dir: run.dir });
    const r = await runExport(args(run.dir, 'medusa', { dtype: 'f32' }));
    expect(bits(tensor(path.join(r.out, 'medusa_lm_head.safetensors'), '0.1.weight'))).toEqual(bits(later.heads['0.1.weight'].data));
    const c = await runExport(args(path.join(run.dir, 'checkpoints', 'step-00000003'), 'medusa', { dtype: 'f32' }));
    expect(bits(tensor(path.join(c.out, 'medusa_lm_head.safetensors'), '0.1.weight'))).toEqual(bits(run.heads['0.1.weight'].data));
  });
});

describe('dtypes', () => {
  test('bf16 rounds to nearest even, verifies within the bound, and reloads to the same values', async () => {
    const r = await runExport(args(perL2.dir, 'medusa', { dtype: 'bf16' }));
    expect(r.dtype).toBe('bf16');
    const file = path.join(r.out, 'medusa_lm_head.safetensors');
    expect(dtypes(file)).toEqual(['BF16']);
    const h = readHeader(file);
    for (const [name, t] of Object.entries(perL2.heads)) {
      const raw = readTensorRaw(h.tensors.get(name)!);
      const got = Array.from(new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2));
      expect(got).toEqual(Array.from(t.data, (x) => f32ToBf16Bits(x)));
    }
    expect(r.maxAbsDiff).toBeGreaterThan(0);
    expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
    const back = readHeadsFolder(r.out);
    expect(back).toMatchObject({ kind: 'medusa', dtype: 'BF16', shape: { numHeads: K, numLayers: 2, hiddenSize: D, vocabSize: V, lmHead: 'per_head' } });
    for (const [name, t] of Object.entries(perL2.heads)) expect(Array.from(back.heads[name].data)).toEqual(Array.from(t.data, (x) => bf16BitsToF32(f32ToBf16Bits(x))));
    // converting the bf16 folder again is exact (its values are bf16 already; the default dtype is the source's)
    const again = await runExport(args(r.out, 'vllm'));
    expect(again).toMatchObject({ dtype: 'bf16', maxAbsDiff: 0, sourceKind: 'medusa' });
  });

  test('f16 export verifies within its bound', async () => {
    const r = await runExport(args(perL1.dir, 'vllm', { dtype: 'f16' }));
    const file = path.join(r.out, 'model.safetensors');
    expect(dtypes(file)).toEqual(['F16']);
    const raw = readTensorRaw(readHeader(file).tensors.get('blocks.0.layers.0.bias')!);
    expect(Array.from(new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2))).toEqual(Array.from(perL1.heads['0.0.linear.bias'].data, (x) => f32ToF16Bits(x)));
    expect(r.maxAbsDiff).toBeGreaterThan(0);
    expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
  });

  test('the default dtype is the base model\'s torch_dtype; shared heads get its lm_head.weight bit for bit', async () => {
    const per = makeRun({ L: 1, lmHead: 'per_head', model: modelBf16, seed: 31 });
    const r = await runExport(args(per.dir, 'medusa'));
    expect(r.dtype).toBe('bf16');
    expect(dtypes(path.join(r.out, 'medusa_lm_head.safetensors'))).toEqual(['BF16']);

    const shared = makeRun({ L: 1, lmHead: 'shared', model: modelBf16, seed: 32 });
    const s = await runExport(args(shared.dir, 'vllm'));
    expect(s.dtype).toBe('bf16');
    const baseInfo = openModelFolder(modelBf16).shards.tensors.get('lm_head.weight')!;
    expect(baseInfo.dtype).toBe('BF16');
    const baseRaw = Buffer.from(readTensorRaw(baseInfo));
    const h = readHeader(path.join(s.out, 'model.safetensors'));
    for (let k = 0; k < K; k++) expect(Buffer.from(readTensorRaw(h.tensors.get(`lm_heads.${k}.weight`)!)).equals(baseRaw)).toBe(true);
    expect(s.maxAbsDiff).toBeGreaterThan(0); // the trained f32 ResBlocks round to bf16
    expect(s.maxAbsDiff).toBeLessThanOrEqual(s.bound);
  });

  test('f16 refuses values beyond its range', async () => {
    const heads = randomHeads(1, 'per_head', 41);
    heads['1.0.linear.bias'].data[5] = 70000;
    const run = makeRun({ L: 1, lmHead: 'per_head', heads });
    await expectError(runExport(args(run.dir, 'medusa', { dtype: 'f16' })), 'E_UNSUPPORTED', '"1.0.linear.bias"', '65504', 'bf16');
  });
});

describe('onnx', () => {
  test('per_head, L=2: heads.onnx + config.json, logits within float32 arithmetic', async () => {
    const r = await runExport(args(perL2.dir, 'onnx'));
    expect(r).toMatchObject({ format: 'onnx', dtype: 'f32', files: ['config.json', 'heads.onnx'], verifiedPositions: 8, sourceKind: 'checkpoint', tensors: 15 });
    expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
    expect(r.maxAbsDiff).toBeLessThan(1e-4);
    expect(readConfig(r.out)).toEqual({
      format: 'medusa-heads-onnx/1',
      model_file: 'heads.onnx',
      external_data: null,
      opset: 17,
      inputs: [{ name: 'hidden_states', dtype: 'float32', shape: ['batch', 'seq', 64] }],
      outputs: [{ name: 'logits', dtype: 'float32', shape: [3, 'batch', 'seq', 512] }],
      medusa_num_heads: 3,
      medusa_num_layers: 2,
      hidden_size: 64,
      vocab_size: 512,
      lm_head: 'per_head',
      base_model_name_or_path: path.resolve(modelF32),
    });
  });

  test('shared, L=1: the base lm_head inside the model', async () => {
    const r = await runExport(args(sharedL1.dir, 'onnx', { dtype: 'f32' }));
    expect(readConfig(r.out)['lm_head']).toBe('shared');
    expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
    expect(r.tensors).toBe(7);
  });
});

describe('verification catches a damaged export', () => {
  const trained = (run: Run): TrainedHeads => ({
    heads: run.heads,
    shape: { numHeads: K, numLayers: run.L, hiddenSize: D, vocabSize: V, lmHead: run.lmHead },
    baseLmHead: run.lmHead === 'shared' ? baseLmHead(run.model) : null,
  });
  const opts = () => ({ dtype: 'f32' as const, baseModelName: path.resolve(modelF32) });

  test('an intact export verifies', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    await expect(verifyExport(r.out, 'medusa', trained(perL1), opts())).resolves.toMatchObject({ maxAbsDiff: 0, tensors: 9, verifiedPositions: 8 });
  });

  test('a removed tensor', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    rewrite(path.join(r.out, 'medusa_lm_head.safetensors'), (m) => m.delete('1.0.linear.bias'));
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), opts()), 'E_MODEL', 'tensor "1.0.linear.bias" [64] is missing');
  });

  test('a renamed key', async () => {
    const r = await runExport(args(perL2.dir, 'vllm', { dtype: 'f32' }));
    rewrite(path.join(r.out, 'model.safetensors'), (m) => {
      m.set('lm_heads.2.weights', m.get('lm_heads.2.weight')!);
      m.delete('lm_heads.2.weight');
    });
    await expectError(verifyExport(r.out, 'vllm', trained(perL2), opts()), 'E_MODEL', 'tensor "lm_heads.2.weight" [512, 64] is missing', 'unexpected tensor "lm_heads.2.weights"');
  });

  test('a misshaped tensor, a changed value, a wrong dtype', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    const file = path.join(r.out, 'medusa_lm_head.safetensors');
    rewrite(file, (m) => m.set('0.0.linear.bias', { dtype: 'F32', shape: [63], data: new Float32Array(63) }));
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), opts()), 'E_MODEL', 'tensor "0.0.linear.bias" is [63], expected [64]');
    rewrite(file, (m) => {
      const data = Float32Array.from(perL1.heads['0.0.linear.bias'].data);
      data[7] = Math.fround(data[7] + 1e-3);
      m.set('0.0.linear.bias', { dtype: 'F32', shape: [64], data });
    });
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), opts()), 'E_MODEL', 'tensor "0.0.linear.bias" element 7');
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), { ...opts(), dtype: 'bf16' }), 'E_MODEL', 'is F32, expected BF16');
  });

  test('TGI rule: an architectures key in a medusa config.json', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    const cfg = readConfig(r.out);
    fs.writeFileSync(path.join(r.out, 'config.json'), JSON.stringify({ architectures: ['MedusaModel'], ...cfg }));
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), opts()), 'E_MODEL', '"architectures"', 'TGI');
  });

  test('vLLM rule: medusa_fc_bias missing or false', async () => {
    const r = await runExport(args(perL1.dir, 'vllm', { dtype: 'f32' }));
    const cfg = readConfig(r.out);
    fs.writeFileSync(path.join(r.out, 'config.json'), JSON.stringify({ ...cfg, medusa_fc_bias: false }));
    await expectError(verifyExport(r.out, 'vllm', trained(perL1), opts()), 'E_MODEL', '"medusa_fc_bias" is false', 'vLLM would drop them');
    delete cfg['medusa_fc_bias'];
    fs.writeFileSync(path.join(r.out, 'config.json'), JSON.stringify(cfg));
    await expectError(verifyExport(r.out, 'vllm', trained(perL1), opts()), 'E_MODEL', 'medusa_fc_bias');
  });

  test('a wrong config value and a stray file', async () => {
    const r = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    fs.writeFileSync(path.join(r.out, 'config.json'), JSON.stringify({ ...readConfig(r.out), medusa_num_heads: 4 }));
    await expectError(verifyExport(r.out, 'medusa', trained(perL1), opts()), 'E_MODEL', 'key "medusa_num_heads" is 4, expected 3');
    const r2 = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    fs.writeFileSync(path.join(r2.out, 'medusa_lm_head.pt'), 'x');
    await expectError(verifyExport(r2.out, 'medusa', trained(perL1), opts()), 'E_MODEL', 'unexpected file');
  });
});

describe('import and conversion', () => {
  test('readHeadsFolder reads our export back', async () => {
    const r = await runExport(args(perL2.dir, 'vllm', { dtype: 'f32' }));
    const f = readHeadsFolder(r.out);
    expect(f).toMatchObject({ kind: 'vllm', dtype: 'F32', trainedLmHead: 'per_head', baseModel: path.resolve(modelF32), baseModelConfigSha256: openModelFolder(modelF32).configHash, warnings: [] });
    expect(f.shape).toEqual({ numHeads: K, numLayers: 2, hiddenSize: D, vocabSize: V, lmHead: 'per_head' });
    expect(f.config).toEqual(vllmConfig(2));
    expect(Object.keys(f.heads).sort()).toEqual(Object.keys(MEDUSA_L2).sort());
    for (const [name, t] of Object.entries(perL2.heads)) expect(bits(f.heads[name].data)).toEqual(bits(t.data));
  });

  test('medusa -> vllm -> medusa round-trips bit for bit', async () => {
    const m1 = await runExport(args(perL2.dir, 'medusa', { dtype: 'f32' }));
    const v = await runExport(args(m1.out, 'vllm'));
    expect(v).toMatchObject({ sourceKind: 'medusa', dtype: 'f32', maxAbsDiff: 0 });
    expect(headerTable(path.join(v.out, 'model.safetensors'))).toEqual(VLLM_L2);
    const m2 = await runExport(args(v.out, 'medusa'));
    expect(m2).toMatchObject({ sourceKind: 'vllm', dtype: 'f32', maxAbsDiff: 0 });
    expect(readConfig(m2.out)).toEqual(readConfig(m1.out));
    const a = fs.readFileSync(path.join(m1.out, 'medusa_lm_head.safetensors'));
    const b = fs.readFileSync(path.join(m2.out, 'medusa_lm_head.safetensors'));
    expect(b.equals(a)).toBe(true);
  });

  test('medusa (shared run) -> medusa-v2 -> medusa round-trips bit for bit', async () => {
    const m1 = await runExport(args(sharedL1.dir, 'medusa', { dtype: 'f32' }));
    const v2 = await runExport(args(m1.out, 'medusa-v2'));
    expect(v2).toMatchObject({ sourceKind: 'medusa', maxAbsDiff: 0 });
    expect(headerTable(path.join(v2.out, 'medusa_lm_head.safetensors'))).toEqual(MEDUSA_V2_L1);
    for (const [name, t] of Object.entries(sharedL1.heads)) expect(bits(tensor(path.join(v2.out, 'medusa_lm_head.safetensors'), name))).toEqual(bits(t.data));
    const back = readHeadsFolder(v2.out);
    expect(back.shape.lmHead).toBe('shared');
    const m2 = await runExport(args(v2.out, 'medusa'));
    expect(m2).toMatchObject({ sourceKind: 'medusa-v2', maxAbsDiff: 0 });
    expect(Buffer.from(fs.readFileSync(path.join(m2.out, 'medusa_lm_head.safetensors'))).equals(fs.readFileSync(path.join(m1.out, 'medusa_lm_head.safetensors')))).toBe(true);
  });

  test('medusa (per_head run) -> medusa-v2 is refused: the projections would be lost', async () => {
    const m = await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }));
    await expectError(runExport(args(m.out, 'medusa-v2')), 'E_UNSUPPORTED', 'differs from the base model\'s lm_head', '`medusa`');
  });

  test('a folder published by others: no hidden_size/vocab_size, a hub base model name', async () => {
    const dir = fresh('foreign-medusa');
    fs.mkdirSync(dir);
    const heads = randomHeads(1, 'per_head', 51);
    writeSafetensors(path.join(dir, 'medusa_lm_head.safetensors'), Object.fromEntries(Object.entries(heads).map(([n, t]) => [n, { dtype: 'BF16' as const, shape: t.shape, data: t.data }])));
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ base_model_name_or_path: 'lmsys/vicuna-7b-v1.3', medusa_num_heads: 3, medusa_num_layers: 1 }));
    const f = readHeadsFolder(dir);
    expect(f).toMatchObject({ kind: 'medusa', dtype: 'BF16', baseModel: 'lmsys/vicuna-7b-v1.3', baseModelConfigSha256: null, trainedLmHead: null });
    expect(f.shape).toEqual({ numHeads: K, numLayers: 1, hiddenSize: D, vocabSize: V, lmHead: 'per_head' });
    const v = await runExport(args(dir, 'vllm'));
    expect(v).toMatchObject({ dtype: 'bf16', maxAbsDiff: 0 });
    const m = await runExport(args(v.out, 'medusa'));
    expect(readConfig(m.out)['base_model_name_or_path']).toBe('lmsys/vicuna-7b-v1.3');
    await expectError(runExport(args(dir, 'medusa-v2')), 'E_CONFIG', 'cannot be found', '"lmsys/vicuna-7b-v1.3"', '--base-model');
    await expectError(runExport(args(dir, 'medusa-v2', { baseModel: modelF32 })), 'E_UNSUPPORTED', 'differs from the base model\'s lm_head');
  });

  test('a vLLM folder without biases imports as zero biases; biases without the flag warn', async () => {
    const dir = fresh('foreign-vllm');
    fs.mkdirSync(dir);
    const heads = randomHeads(1, 'per_head', 61);
    const t: Record<string, WriteTensor> = {};
    for (let k = 0; k < K; k++) {
      t[`blocks.${k}.layers.0.weight`] = { dtype: 'F32', shape: [D, D], data: heads[`${k}.0.linear.weight`].data };
      t[`lm_heads.${k}.weight`] = { dtype: 'F32', shape: [V, D], data: heads[`${k}.1.weight`].data };
    }
    writeSafetensors(path.join(dir, 'model.safetensors'), t);
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ architectures: ['MedusaModel'], model_type: 'medusa', hidden_size: D, vocab_size: V, num_heads: K, num_hidden_layers: 1, truncated_vocab_size: null }));
    const f = readHeadsFolder(dir);
    expect(Array.from(f.heads['2.0.linear.bias'].data)).toEqual(new Array(D).fill(0));
    expect(f.warnings.join('\n')).toContain('zero biases');
    // nothing names the base model in a vLLM folder: a medusa config.json needs it given
    await expectError(runExport(args(dir, 'medusa')), 'E_CONFIG', 'base_model_name_or_path', '--base-model');
    const m = await runExport(args(dir, 'medusa', { baseModel: modelF32 }));
    expect(logs.some((l) => l.startsWith('warning:') && l.includes('zero biases'))).toBe(true);
    expect(headerTable(path.join(m.out, 'medusa_lm_head.safetensors'))).toEqual(MEDUSA_L1);
    expect(m.maxAbsDiff).toBe(0);

    // biases present but medusa_fc_bias not set: vLLM would drop them; the import keeps them and says so
    for (let k = 0; k < K; k++) t[`blocks.${k}.layers.0.bias`] = { dtype: 'F32', shape: [D], data: heads[`${k}.0.linear.bias`].data };
    writeSafetensors(path.join(dir, 'model.safetensors'), t);
    const g = readHeadsFolder(dir);
    expect(bits(g.heads['1.0.linear.bias'].data)).toEqual(bits(heads['1.0.linear.bias'].data));
    expect(g.warnings.join('\n')).toContain('vLLM drops the biases');
    const v = await runExport(args(dir, 'vllm'));
    expect(readConfig(v.out)['medusa_fc_bias']).toBe(true);
  });

  test('malformed folders: errors name the file and the key or tensor', async () => {
    const good = (await runExport(args(perL1.dir, 'medusa', { dtype: 'f32' }))).out;
    const copy = (): string => {
      const d = fresh('bad');
      fs.cpSync(good, d, { recursive: true });
      return d;
    };
    const noKey = copy();
    const cfg = readConfig(noKey);
    delete cfg['medusa_num_heads'];
    fs.writeFileSync(path.join(noKey, 'config.json'), JSON.stringify(cfg));
    expect(() => readHeadsFolder(noKey)).toThrow(`${path.join(noKey, 'config.json')}: key "medusa_num_heads" is missing`);

    const noConfig = copy();
    fs.rmSync(path.join(noConfig, 'config.json'));
    expect(() => readHeadsFolder(noConfig)).toThrow(expect.objectContaining({ code: 'E_IO', message: expect.stringContaining(`${path.join(noConfig, 'config.json')} is missing`) }));

    const missing = copy();
    rewrite(path.join(missing, 'medusa_lm_head.safetensors'), (m) => m.delete('2.0.linear.weight'));
    expect(() => readHeadsFolder(missing)).toThrow(expect.objectContaining({ code: 'E_MODEL', message: expect.stringContaining('tensor "2.0.linear.weight" [64, 64] is missing') }));

    const empty = fresh('empty');
    fs.mkdirSync(empty);
    expect(() => readHeadsFolder(empty)).toThrow(expect.objectContaining({ code: 'E_IO', message: expect.stringContaining('medusa_lm_head.safetensors') }));

    expect(() => readHeadsFolder(modelF32)).toThrow(expect.objectContaining({ code: 'E_CONFIG', message: expect.stringContaining('not a vLLM Medusa folder') }));

    const pt = fresh('pt');
    fs.mkdirSync(pt);
    fs.writeFileSync(path.join(pt, 'medusa_lm_head.pt'), 'pickle');
    fs.writeFileSync(path.join(pt, 'config.json'), '{}');
    await expectError(runExport(args(pt, 'vllm')), 'E_UNSUPPORTED', 'medusa_lm_head.pt', 'save_file');
  });
});

describe('refusals and safety', () => {
  test('base model changed: its config.json hash differs (or it is gone)', async () => {
    const model = fresh('model-copy');
    fs.cpSync(modelF32, model, { recursive: true });
    const run = makeRun({ L: 1, lmHead: 'per_head', model, seed: 71 });
    const expected = openModelFolder(model).configHash;
    const cfgFile = path.join(model, 'config.json');
    fs.writeFileSync(cfgFile, fs.readFileSync(cfgFile, 'utf8').replace('"rope_theta": 10000', '"rope_theta": 20000'));
    const now = openModelFolder(model).configHash;
    expect(now).not.toBe(expected);
    await expectError(runExport(args(run.dir, 'medusa')), 'E_CONFIG', 'base model changed or missing', expected, now, cfgFile);
    // the right base model passed explicitly is accepted
    const r = await runExport(args(run.dir, 'medusa', { baseModel: modelF32, dtype: 'f32' }));
    expect(readConfig(r.out)['base_model_name_or_path']).toBe(path.resolve(modelF32));
    fs.rmSync(model, { recursive: true });
    await expectError(runExport(args(run.dir, 'medusa')), 'E_CONFIG', 'base model changed or missing', 'does not exist', expected);
  });

  test('a checkpoint without base_model_path needs --baseModel', async () => {
    const run = makeRun({ L: 1, lmHead: 'per_head', seed: 72, recordBase: false });
    await expectError(runExport(args(run.dir, 'medusa')), 'E_CONFIG', 'base_model_path', '--base-model');
    await expect(runExport(args(run.dir, 'medusa', { baseModel: modelF32 }))).resolves.toMatchObject({ maxAbsDiff: 0 });
  });

  test('an existing non-empty out needs force; with force it is replaced only at the end', async () => {
    const out = fresh('existing');
    fs.mkdirSync(out);
    fs.writeFileSync(path.join(out, 'old.txt'), 'old');
    await expectError(runExport(args(perL1.dir, 'medusa', { out })), 'E_IO', out, 'not empty', '--force');
    expect(fs.readFileSync(path.join(out, 'old.txt'), 'utf8')).toBe('old');
    const r = await runExport(args(perL1.dir, 'medusa', { out, force: true }));
    expect(r.files).toEqual(['config.json', 'medusa_lm_head.safetensors']);
    expect(fs.existsSync(path.join(out, 'old.txt'))).toBe(false);
    // an empty folder is fine without force
    const emptyOut = fresh('empty-out');
    fs.mkdirSync(emptyOut);
    await expect(runExport(args(perL1.dir, 'vllm', { out: emptyOut }))).resolves.toMatchObject({ out: emptyOut });
  });

  test('a failure before the rename leaves no export and keeps the old one', async () => {
    const failing = (l: string) => {
      if (l.startsWith('export: verifying')) throw new Error('disk full (simulated)');
    };
    const out = fresh('never');
    await expect(runExport({ ...args(perL1.dir, 'medusa'), out, log: failing })).rejects.toThrow('disk full (simulated)');
    expect(fs.existsSync(out)).toBe(false);
    const kept = fresh('kept');
    fs.mkdirSync(kept);
    fs.writeFileSync(path.join(kept, 'old.txt'), 'old');
    await expect(runExport({ ...args(perL1.dir, 'medusa'), out: kept, force: true, log: failing })).rejects.toThrow('disk full');
    expect(fs.readdirSync(kept)).toEqual(['old.txt']);
    expect(fs.readdirSync(path.dirname(out)).filter((n) => n.includes('-export-'))).toEqual([]);
  });

  test('onnx is float32 only', async () => {
    await expectError(runExport(args(perL1.dir, 'onnx', { dtype: 'bf16' })), 'E_UNSUPPORTED', 'float32 only', '--dtype bf16');
    await expectError(runExport(args(perL1.dir, 'onnx', { dtype: 'f16' })), 'E_UNSUPPORTED', 'float32 only');
  });

  test('hf is for MEDUSA-2 runs only', async () => {
    await expectError(runExport(args(perL1.dir, 'hf')), 'E_UNSUPPORTED', 'the backbone was frozen: export `medusa`/`vllm` and use the base model as it is');
  });

  test('medusa-v2 needs one layer per head and a shared lm_head', async () => {
    await expectError(runExport(args(sharedL2.dir, 'medusa-v2')), 'E_UNSUPPORTED', 'these heads have 2 layers', '`medusa`');
    await expectError(runExport(args(perL1.dir, 'medusa-v2')), 'E_UNSUPPORTED', 'lm_head per_head', 'export `medusa`', 'lm_head: shared');
  });

  test('out must not contain the run; NaN heads are refused; bad arguments', async () => {
    await expectError(runExport(args(perL1.dir, 'medusa', { out: path.dirname(perL1.dir), force: true })), 'E_USAGE', 'contains the source');
    expect(fs.existsSync(path.join(perL1.dir, 'checkpoints'))).toBe(true);
    const heads = randomHeads(1, 'per_head', 81);
    heads['0.1.weight'].data[3] = NaN;
    const run = makeRun({ L: 1, lmHead: 'per_head', heads });
    await expectError(runExport(args(run.dir, 'vllm')), 'E_MODEL', '"0.1.weight" element 3 is NaN');
    await expectError(runExport(args(perL1.dir, 'tflite' as ExportArgs['format'])), 'E_USAGE', 'medusa, medusa-v2, vllm, onnx, hf');
    await expectError(runExport(args(perL1.dir, 'medusa', { dtype: 'f64' as ExportArgs['dtype'] })), 'E_USAGE', 'f32, f16, bf16');
    await expectError(runExport(args(path.join(root, 'nope'), 'medusa')), 'E_IO', 'does not exist');
  });
});

