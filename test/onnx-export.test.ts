/**
 * The ONNX heads export (src/io/onnx-heads.ts): onnxruntime's output against a float64 JS forward of
 * the Medusa reference formula and against the tfjs heads (model/heads.ts), dynamic batch and
 * sequence, external data, the model checker, and the shared lm_head stored once.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import type * as OrtTypes from 'onnxruntime-node';
import { initBackend } from '../src/backend.js';
import { isMedusaError } from '../src/errors.js';
import { headTensorTable, importHeads, initHeads, disposeHeads, type HeadsShape } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import {
  checkOnnxHeads,
  ONNX_EXTERNAL_DATA_ALIGNMENT,
  ONNX_HEADS_LAYOUT,
  ONNX_HEADS_LAYOUT_VERSION,
  onnxHeadsTable,
  runOnnxHeads,
  writeOnnxHeads,
  type OnnxLmHeadMode,
  type ReferenceHeadTensors,
} from '../src/io/onnx-heads.js';

// onnxruntime outputs under Jest: see test/setup/realm.ts (jest setupFiles).

const onnx = onnxProto.onnx;
const TOL = 1e-5;
const K = 3;

type Ort = typeof OrtTypes;
let ort: Ort;
let tmp: string;

beforeAll(async () => {
  await initBackend('cpu');
  const mod = (await import('onnxruntime-node')) as Ort & { default?: Ort };
  ort = typeof mod.InferenceSession === 'function' ? mod : (mod.default as Ort);
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-onnx-export-'));
});

afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

interface Case {
  d: number;
  V: number;
  L: number;
  lmHead: OnnxLmHeadMode;
}

function shapeOf(c: Case): HeadsShape {
  return { numHeads: K, numLayers: c.L, hiddenSize: c.d, vocabSize: c.V, lmHead: c.lmHead };
}

function uniform(rng: Rng, n: number, a: number): Float32Array {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = (2 * rng.next() - 1) * a;
  return x;
}

/** Random heads in the Medusa reference layout (PyTorch [out, in]) and, for shared heads, a base lm_head [V, d]. */
function randomHeads(c: Case, seed: number): { heads: ReferenceHeadTensors; shared?: Float32Array } {
  const rng = new Rng(seed);
  const heads: ReferenceHeadTensors = {};
  const a = 1 / Math.sqrt(c.d);
  for (const row of headTensorTable(shapeOf(c))) {
    const n = row.shape.reduce((x, y) => x * y, 1);
    heads[row.name] = { shape: row.shape, data: uniform(rng, n, row.kind === 'b1' ? 0.5 : row.kind === 'w1' ? 1.5 * a : a) };
  }
  return c.lmHead === 'shared' ? { heads, shared: uniform(rng, c.V * c.d, a) } : { heads };
}

/** The reference formula in float64: h <- h + SiLU(h W^T + b) per block, logits = h W2^T; out [K, batch, seq, V]. */
function referenceForward(c: Case, heads: ReferenceHeadTensors, shared: Float32Array | undefined, hidden: Float32Array, rows: number): Float64Array {
  const { d, V, L } = c;
  const out = new Float64Array(K * rows * V);
  const h = new Float64Array(d);
  const z = new Float64Array(d);
  for (let k = 0; k < K; k++) {
    const W2 = shared ?? heads[`${k}.${L}.weight`].data;
    for (let r = 0; r < rows; r++) {
      for (let i = 0; i < d; i++) h[i] = hidden[r * d + i];
      for (let l = 0; l < L; l++) {
        const W = heads[`${k}.${l}.linear.weight`].data;
        const b = heads[`${k}.${l}.linear.bias`].data;
        for (let o = 0; o < d; o++) {
          let s = b[o];
          for (let i = 0; i < d; i++) s += h[i] * W[o * d + i];
          z[o] = s;
        }
        for (let o = 0; o < d; o++) h[o] += z[o] / (1 + Math.exp(-z[o]));
      }
      for (let v = 0; v < V; v++) {
        let s = 0;
        for (let i = 0; i < d; i++) s += h[i] * W2[v * d + i];
        out[(k * rows + r) * V + v] = s;
      }
    }
  }
  return out;
}

/** The same heads loaded into model/heads.ts and run with tfjs ops (internal layout: W [in, out]). */
function tfjsForward(c: Case, heads: ReferenceHeadTensors, shared: Float32Array | undefined, hidden: Float32Array, rows: number): Float32Array {
  const s = shapeOf(c);
  const base = shared ?? new Float32Array(c.V * c.d);
  const baseT = tf.tidy(() => tf.tensor2d(base, [c.V, c.d]).transpose() as tf.Tensor2D); // internal [d, V]
  const h = initHeads(s, baseT, 1);
  try {
    importHeads(h, heads, 'test heads');
    return tf.tidy(() => {
      const x0 = tf.tensor2d(hidden, [rows, c.d]);
      const per: tf.Tensor2D[] = [];
      for (let k = 0; k < K; k++) {
        let x: tf.Tensor2D = x0;
        for (const blk of h.blocks[k]) {
          const zz = tf.add(tf.matMul(x, blk.w), blk.b);
          x = tf.add(x, tf.mul(zz, tf.sigmoid(zz))) as tf.Tensor2D;
        }
        per.push(tf.matMul(x, h.proj[k] ?? h.baseLmHead));
      }
      return tf.stack(per).dataSync() as Float32Array;
    });
  } finally {
    disposeHeads(h);
    if (!baseT.isDisposed) baseT.dispose();
  }
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

async function expectCode(f: () => unknown, code: string, pattern?: RegExp): Promise<void> {
  try {
    await f();
  } catch (e) {
    if (!isMedusaError(e)) throw e;
    expect(e.code).toBe(code);
    if (pattern) expect(e.message).toMatch(pattern);
    return;
  }
  throw new Error(`expected ${code}`);
}

/** What the tests read of a decoded model (protobufjs fills every field of a decoded message). */
interface DecodedTensor {
  name: string;
  dims: unknown[];
  rawData: Uint8Array;
  dataLocation: number;
  externalData: { key: string; value: string }[];
}
interface DecodedValueInfo {
  name: string;
  type: { tensorType: { shape: { dim: InstanceType<typeof onnx.TensorShapeProto.Dimension>[] } } };
}
interface DecodedGraph {
  input: DecodedValueInfo[];
  output: DecodedValueInfo[];
  initializer: DecodedTensor[];
  node: { name: string; opType: string; input: string[] }[];
}
type DecodedModel = Omit<InstanceType<typeof onnx.ModelProto>, 'graph'> & { graph: DecodedGraph };

function readModel(file: string): DecodedModel {
  return onnx.ModelProto.decode(fs.readFileSync(file)) as unknown as DecodedModel;
}

function writeModel(file: string, m: DecodedModel): void {
  fs.writeFileSync(file, onnx.ModelProto.encode(m as unknown as onnxProto.onnx.IModelProto).finish());
}

const toNum = (x: unknown): number => (typeof x === 'number' ? x : (x as { toNumber(): number }).toNumber());

const CASES: Case[] = [
  { d: 16, V: 40, L: 1, lmHead: 'per_head' },
  { d: 32, V: 257, L: 2, lmHead: 'per_head' },
  { d: 64, V: 512, L: 1, lmHead: 'shared' },
  { d: 24, V: 100, L: 2, lmHead: 'shared' },
];

test('the layout table names the reference tensors of model/heads.ts, one to one', () => {
  for (const c of CASES) {
    const s = shapeOf(c);
    const ref = headTensorTable(s).map((r) => r.name);
    const rows = onnxHeadsTable(s, c.lmHead);
    expect(rows.filter((r) => r.source !== 'lm_head').map((r) => r.source)).toEqual(ref);
    expect(rows.filter((r) => r.source === 'lm_head').length).toBe(c.lmHead === 'shared' ? 1 : 0);
    for (const r of rows) {
      const refShape = headTensorTable(s).find((x) => x.name === r.source)?.shape ?? [c.V, c.d];
      expect(r.dims).toEqual(r.transpose ? [refShape[1], refShape[0]] : refShape);
    }
  }
});

describe.each(CASES)('heads d=$d V=$V L=$L $lmHead', (c) => {
  let file: string;
  let heads: ReferenceHeadTensors;
  let shared: Float32Array | undefined;

  beforeAll(async () => {
    ({ heads, shared } = randomHeads(c, 1000 + c.d + c.V + c.L));
    file = path.join(tmp, `heads-${c.d}-${c.V}-${c.L}-${c.lmHead}`, 'heads.onnx');
    const r = await writeOnnxHeads({ out: file, heads, shape: shapeOf(c), sharedLmHead: shared, metadata: { base_model_name_or_path: 'test/base' } });
    expect(r.externalData).toBe(false);
    expect(r.files).toEqual([path.resolve(file)]);
    expect(r.bytes).toBe(fs.statSync(file).size);
    expect(fs.readdirSync(path.dirname(file))).toEqual(['heads.onnx']); // no temporary files left
  });

  test('the written model passes the checker and carries the documented names and metadata', () => {
    checkOnnxHeads(file, shapeOf(c));
    checkOnnxHeads(file, { numHeads: K, numLayers: c.L, hiddenSize: c.d, vocabSize: c.V }); // lm_head from the metadata
    const m = readModel(file);
    expect(toNum(m.opsetImport[0].version)).toBe(ONNX_HEADS_LAYOUT.opset);
    expect(m.producerName).toBe('medusa-train');
    const meta = Object.fromEntries(m.metadataProps.map((e) => [e.key, e.value]));
    expect(meta).toMatchObject({
      producer: 'medusa-train',
      layout: ONNX_HEADS_LAYOUT_VERSION,
      medusa_num_heads: String(K),
      medusa_num_layers: String(c.L),
      hidden_size: String(c.d),
      vocab_size: String(c.V),
      lm_head: c.lmHead,
      base_model_name_or_path: 'test/base',
    });
    expect(m.graph.input.map((v) => v.name)).toEqual(['hidden_states']);
    expect(m.graph.output.map((v) => v.name)).toEqual(['logits']);
    const dims = (v: DecodedValueInfo) => v.type.tensorType.shape.dim.map((x) => x.dimParam || toNum(x.dimValue));
    expect(dims(m.graph.input[0])).toEqual(['batch', 'seq', c.d]);
    expect(dims(m.graph.output[0])).toEqual([K, 'batch', 'seq', c.V]);
    const names = m.graph.initializer.map((t) => t.name).sort();
    expect(names).toContain('head0.block0.weight_t');
    expect(names).toContain(`head${K - 1}.block${c.L - 1}.bias`);
    expect(names).toContain(c.lmHead === 'shared' ? 'lm_head.weight_t' : `head${K - 1}.proj.weight_t`);
    // the block weight is stored transposed ([in, out]): element (i, o) = reference W[o, i]
    const w = m.graph.initializer.find((t) => t.name === 'head1.block0.weight_t')!;
    const raw = w.rawData;
    const wt = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    const W = heads['1.0.linear.weight'].data;
    expect(wt[2 * c.d + 5]).toBe(W[5 * c.d + 2]);
  });

  test('onnxruntime equals the float64 reference and tfjs, with dynamic batch and sequence on one session', async () => {
    const session = await ort.InferenceSession.create(file, { logSeverityLevel: 3 });
    try {
      const rng = new Rng(7 + c.d);
      for (const [batch, seq] of [
        [1, 1],
        [2, 7],
        [3, 5],
      ]) {
        const hidden = uniform(rng, batch * seq * c.d, 2);
        const r = await session.run({ hidden_states: new ort.Tensor('float32', hidden, [batch, seq, c.d]) });
        const t = r['logits'];
        expect(t.dims.map(Number)).toEqual([K, batch, seq, c.V]);
        const got = Float32Array.from(t.data as Float32Array);
        const want = referenceForward(c, heads, shared, hidden, batch * seq);
        expect(maxAbs(want)).toBeGreaterThan(0.1); // not a trivially small output
        expect(maxAbsDiff(got, want)).toBeLessThan(TOL);
        expect(maxAbsDiff(got, tfjsForward(c, heads, shared, hidden, batch * seq))).toBeLessThan(TOL);
      }
    } finally {
      await session.release();
    }
    // and through the module's own runner
    const hidden = uniform(new Rng(99), 2 * 3 * c.d, 2);
    const got = await runOnnxHeads(file, hidden, 2, 3, c.d, { threads: 2 });
    expect(got.length).toBe(K * 2 * 3 * c.V);
    expect(maxAbsDiff(got, referenceForward(c, heads, shared, hidden, 6))).toBeLessThan(TOL);
  });
});

describe('external data', () => {
  const c: Case = { d: 32, V: 300, L: 2, lmHead: 'per_head' };

  test('a forced low threshold writes model + data, aligned, and onnxruntime loads it by path', async () => {
    const { heads } = randomHeads(c, 5);
    const dir = path.join(tmp, 'external');
    const file = path.join(dir, 'heads.onnx');
    const r = await writeOnnxHeads({ out: file, heads, shape: shapeOf(c), externalDataThreshold: 0 });
    expect(r.externalData).toBe(true);
    expect(r.files).toEqual([path.resolve(file), path.resolve(`${file}.data`)]);
    expect(fs.readdirSync(dir).sort()).toEqual(['heads.onnx', 'heads.onnx.data']);
    expect(r.bytes).toBe(fs.statSync(file).size + fs.statSync(`${file}.data`).size);

    const weightBytes = onnxHeadsTable(shapeOf(c), 'per_head').reduce((a, x) => a + x.dims.reduce((p, q) => p * q, 1) * 4, 0);
    expect(fs.statSync(file).size).toBeLessThan(20_000); // the graph only
    expect(fs.statSync(`${file}.data`).size).toBeGreaterThanOrEqual(weightBytes);

    const m = readModel(file);
    const weights = m.graph.initializer.filter((t) => t.name !== 'unsqueeze_axes');
    expect(weights.length).toBe(K * (2 * c.L + 1));
    const spans: [number, number][] = [];
    for (const t of weights) {
      expect(t.dataLocation).toBe(onnx.TensorProto.DataLocation.EXTERNAL);
      expect(t.rawData?.length ?? 0).toBe(0);
      const ext = Object.fromEntries(t.externalData.map((e) => [e.key, e.value]));
      expect(ext.location).toBe('heads.onnx.data');
      const offset = Number(ext.offset);
      const length = Number(ext.length);
      expect(offset % ONNX_EXTERNAL_DATA_ALIGNMENT).toBe(0);
      expect(length).toBe(t.dims.map(toNum).reduce((p, q) => p * q, 1) * 4);
      spans.push([offset, offset + length]);
    }
    spans.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < spans.length; i++) expect(spans[i][0]).toBeGreaterThanOrEqual(spans[i - 1][1]); // no overlap
    // the bytes at an offset are the transposed reference tensor
    const proj = weights.find((t) => t.name === 'head2.proj.weight_t')!;
    const off = Number(proj.externalData.find((e) => e.key === 'offset')!.value);
    const buf = fs.readFileSync(`${file}.data`);
    const stored = new Float32Array(buf.buffer.slice(buf.byteOffset + off, buf.byteOffset + off + c.d * c.V * 4));
    expect(stored[3 * c.V + 17]).toBe(heads[`2.${c.L}.weight`].data[17 * c.d + 3]);

    checkOnnxHeads(file, shapeOf(c));
    const hidden = uniform(new Rng(3), 3 * 4 * c.d, 2);
    const got = await runOnnxHeads(file, hidden, 3, 4, c.d);
    expect(maxAbsDiff(got, referenceForward(c, heads, undefined, hidden, 12))).toBeLessThan(TOL);

    // the checker notices a truncated or missing data file
    const cut = path.join(tmp, 'external-cut');
    fs.mkdirSync(cut);
    fs.copyFileSync(file, path.join(cut, 'heads.onnx'));
    await expectCode(() => checkOnnxHeads(path.join(cut, 'heads.onnx'), shapeOf(c)), 'E_MODEL', /external data file .* is missing/);
    fs.writeFileSync(path.join(cut, 'heads.onnx.data'), buf.subarray(0, buf.length - 100));
    await expectCode(() => checkOnnxHeads(path.join(cut, 'heads.onnx'), shapeOf(c)), 'E_MODEL', /head2\.proj\.weight_t: bytes .* lie past the end/);

    // writing inline over an external export removes the stale data file
    const again = await writeOnnxHeads({ out: file, heads, shape: shapeOf(c) });
    expect(again.externalData).toBe(false);
    expect(fs.readdirSync(dir)).toEqual(['heads.onnx']);
    checkOnnxHeads(file, shapeOf(c));
  });

  test('shared heads with external data and a 4 KiB alignment', async () => {
    const cs: Case = { d: 16, V: 77, L: 1, lmHead: 'shared' };
    const { heads, shared } = randomHeads(cs, 6);
    const file = path.join(tmp, 'external-shared', 'model.onnx');
    const r = await writeOnnxHeads({ out: file, heads, shape: shapeOf(cs), sharedLmHead: shared, externalDataThreshold: 1000, externalDataAlignment: 4096 });
    expect(r.externalData).toBe(true);
    for (const t of readModel(file).graph.initializer.filter((x) => x.name !== 'unsqueeze_axes')) {
      expect(Number(t.externalData.find((e) => e.key === 'offset')!.value) % 4096).toBe(0);
    }
    checkOnnxHeads(file, shapeOf(cs));
    const hidden = uniform(new Rng(4), 2 * 2 * cs.d, 2);
    expect(maxAbsDiff(await runOnnxHeads(file, hidden, 2, 2, cs.d), referenceForward(cs, heads, shared, hidden, 4))).toBeLessThan(TOL);
  });
});

test('shared mode stores the lm_head once', async () => {
  const d = 32;
  const V = 512;
  const base = randomHeads({ d, V, L: 1, lmHead: 'shared' }, 8);
  const sharedFile = path.join(tmp, 'size', 'shared.onnx');
  const perHeadFile = path.join(tmp, 'size', 'per_head.onnx');
  const sr = await writeOnnxHeads({ out: sharedFile, heads: base.heads, shape: { numHeads: K, numLayers: 1, hiddenSize: d, vocabSize: V }, sharedLmHead: base.shared });
  const per = randomHeads({ d, V, L: 1, lmHead: 'per_head' }, 8);
  const pr = await writeOnnxHeads({ out: perHeadFile, heads: per.heads, shape: { numHeads: K, numLayers: 1, hiddenSize: d, vocabSize: V } });
  const blocks = K * (d * d + d) * 4;
  const lm = V * d * 4;
  expect(sr.bytes).toBeGreaterThanOrEqual(blocks + lm);
  expect(sr.bytes).toBeLessThan(blocks + lm + 16_000); // one copy + the graph
  expect(pr.bytes).toBeGreaterThanOrEqual(blocks + K * lm);
  const projections = readModel(sharedFile).graph.initializer.filter((t) => t.dims.map(toNum).join(',') === `${d},${V}`);
  expect(projections.map((t) => t.name)).toEqual(['lm_head.weight_t']);
  const uses = readModel(sharedFile).graph.node.filter((n) => n.input.includes('lm_head.weight_t'));
  expect(uses.length).toBe(K);
});

describe('checkOnnxHeads catches edited models', () => {
  const c: Case = { d: 16, V: 40, L: 2, lmHead: 'per_head' };
  let file: string;

  beforeAll(async () => {
    file = path.join(tmp, 'check', 'heads.onnx');
    await writeOnnxHeads({ out: file, heads: randomHeads(c, 9).heads, shape: shapeOf(c) });
  });

  function edited(name: string, edit: (m: DecodedModel) => void): string {
    const m = readModel(file);
    edit(m);
    const out = path.join(tmp, 'check', `${name}.onnx`);
    writeModel(out, m);
    return out;
  }

  test('a renamed initializer', async () => {
    const f = edited('renamed', (m) => {
      m.graph.initializer.find((t) => t.name === 'head1.block0.bias')!.name = 'head1.block0.b';
    });
    await expectCode(() => checkOnnxHeads(f, shapeOf(c)), 'E_MODEL', /missing initializer head1\.block0\.bias \[16\] \(from 1\.0\.linear\.bias\)[\s\S]*unexpected initializer head1\.block0\.b[\s\S]*reads head1\.block0\.bias/);
  });

  test('wrong initializer dims', async () => {
    const f = edited('dims', (m) => {
      m.graph.initializer.find((t) => t.name === 'head0.proj.weight_t')!.dims = [40, 16];
    });
    await expectCode(() => checkOnnxHeads(f, shapeOf(c)), 'E_MODEL', /initializer head0\.proj\.weight_t is \[40,16\], expected \[16,40\]/);
  });

  test('wrong input dims, fixed batch, renamed output, wrong opset', async () => {
    const f = edited('io', (m) => {
      const dim = m.graph.input[0].type.tensorType.shape.dim;
      dim[0] = onnx.TensorShapeProto.Dimension.create({ dimValue: 1 });
      dim[2] = onnx.TensorShapeProto.Dimension.create({ dimValue: 17 });
      m.graph.output[0].name = 'out';
      m.opsetImport[0].version = 13;
    });
    await expectCode(() => checkOnnxHeads(f, shapeOf(c)), 'E_MODEL', /opset 13[\s\S]*input hidden_states dim 0 is 1, expected the symbolic dim "batch"[\s\S]*input hidden_states dim 2 is 17, expected 16[\s\S]*graph outputs \[out\], expected \[logits\]/);
  });

  test('a model of another shape, or another lm_head mode', async () => {
    await expectCode(() => checkOnnxHeads(file, { ...shapeOf(c), vocabSize: 41 }), 'E_MODEL', /metadata vocab_size is "40", expected "41"[\s\S]*output logits dim 3 is 40, expected 41/);
    await expectCode(() => checkOnnxHeads(file, { ...shapeOf(c), numLayers: 1 }), 'E_MODEL', /unexpected initializer head0\.block1\.weight_t/);
    await expectCode(() => checkOnnxHeads(file, { ...shapeOf(c), lmHead: 'shared' }), 'E_MODEL', /missing initializer lm_head\.weight_t/);
  });

  test('truncated inline data, a foreign op, not ONNX at all, no file', async () => {
    const f = edited('data', (m) => {
      const t = m.graph.initializer.find((x) => x.name === 'head0.block1.weight_t')!;
      t.rawData = t.rawData.subarray(0, 8);
      m.graph.node[0].opType = 'Gemm';
    });
    await expectCode(() => checkOnnxHeads(f, shapeOf(c)), 'E_MODEL', /head0\.block1\.weight_t holds 8 bytes of data, expected 1024[\s\S]*op Gemm is not part of the layout/);
    const junk = path.join(tmp, 'check', 'junk.onnx');
    fs.writeFileSync(junk, 'this is not protobuf \xff\xff\xff\xff\xff');
    await expectCode(() => checkOnnxHeads(junk, shapeOf(c)), 'E_MODEL');
    await expectCode(() => checkOnnxHeads(path.join(tmp, 'check', 'nope.onnx'), shapeOf(c)), 'E_IO', /nope\.onnx/);
  });
});

describe('writeOnnxHeads refuses heads that do not match', () => {
  const c: Case = { d: 16, V: 40, L: 1, lmHead: 'per_head' };
  const out = () => path.join(tmp, 'refuse', 'heads.onnx');

  test('missing, misshaped, unexpected and non-finite tensors, all reported, nothing written', async () => {
    const { heads } = randomHeads(c, 10);
    delete heads['1.0.linear.bias'];
    heads['2.1.weight'] = { shape: [16, 40], data: new Float32Array(640) };
    heads['3.0.linear.weight'] = { shape: [16, 16], data: new Float32Array(256) };
    heads['0.0.linear.weight'].data[3] = NaN;
    await expectCode(() => writeOnnxHeads({ out: out(), heads, shape: shapeOf(c) }), 'E_MODEL', /missing 1\.0\.linear\.bias \[16\][\s\S]*2\.1\.weight is \[16,40\], expected \[40,16\][\s\S]*unexpected tensor 3\.0\.linear\.weight/);
    await expectCode(() => writeOnnxHeads({ out: out(), heads: randomHeads(c, 10).heads, shape: shapeOf(c), sharedLmHead: new Float32Array(640) }), 'E_MODEL', /unexpected tensor 0\.1\.weight \(a per-head projection, but a shared lm_head was given\)/);
    const nan = randomHeads(c, 10).heads;
    nan['0.0.linear.weight'].data[3] = NaN;
    await expectCode(() => writeOnnxHeads({ out: out(), heads: nan, shape: shapeOf(c) }), 'E_MODEL', /0\.0\.linear\.weight has 1 NaN\/Inf/);
    expect(fs.existsSync(out())).toBe(false);
  });

  test('a wrong shared lm_head size, a reserved metadata key, a bad shape', async () => {
    const { heads, shared } = randomHeads({ ...c, lmHead: 'shared' }, 11);
    await expectCode(() => writeOnnxHeads({ out: out(), heads, shape: shapeOf(c), sharedLmHead: shared!.subarray(1) }), 'E_MODEL', /shared lm_head has 639 values/);
    await expectCode(() => writeOnnxHeads({ out: out(), heads, shape: shapeOf(c), sharedLmHead: shared, metadata: { layout: 'x' } }), 'E_CONFIG', /"layout"/);
    await expectCode(() => writeOnnxHeads({ out: out(), heads, shape: { ...shapeOf(c), numHeads: 0 }, sharedLmHead: shared }), 'E_CONFIG', /numHeads = 0/);
    await expectCode(() => runOnnxHeads(out(), new Float32Array(16), 1, 1, 16), 'E_IO');
  });
});
