/**
 * The MEDUSA-1 loss and its hand-written backward against float64 PyTorch autograd
 * (scripts/golden_heads.py -> test/fixtures/heads), per_head and shared lm_head, 1 and 2 layers;
 * chunked equals unchunked; the export/import layout round-trips.
 */
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { exportHeads, importHeads, initHeads, headTensorTable, disposeHeads, type MedusaHeads } from '../src/model/heads.js';
import { headsLoss, TOPK_REPORTED } from '../src/train/heads-loss.js';
import { HEADS_CASES, HEADS_FIXTURES, loadHeadsCase, type HeadsCase } from './helpers/heads-fixtures.js';
import { relErr } from './helpers/golden.js';

type Case = HeadsCase;
const CASES = HEADS_CASES;
const load = loadHeadsCase;

function transpose(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++) out[k * rows + r] = data[r * cols + k];
  return out;
}

function build(c: Case, f32: (n: string) => Float32Array): MedusaHeads {
  const d = c.hidden_size;
  const V = c.vocab_size;
  const base = c.mode === 'shared' ? tf.tensor2d(transpose(f32('lm_head.weight'), V, d), [d, V]) : tf.zeros([d, V]) as tf.Tensor2D;
  const heads = initHeads({ numHeads: c.num_heads, numLayers: c.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.mode }, base, 0);
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  for (const row of headTensorTable(heads.shape)) tensors[row.name] = { shape: row.shape, data: f32(row.name) };
  importHeads(heads, tensors, c.file);
  return heads;
}

describe.each(['wasm', 'cpu'] as const)('heads loss on %s', (backend) => {
  beforeAll(async () => {
    await initBackend(backend);
  });

  describe.each(CASES.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const run = (chunkRows: number) => {
      const { f32, f64, ints } = load(c);
      const heads = build(c, f32);
      const hidden = tf.tensor2d(f32('hidden'), [c.batch * c.seq_len, c.hidden_size]);
      const valid = ints('head_valid');
      const r = headsLoss({
        heads, hidden, ids: ints('input_ids'), lossMask: ints('loss_mask'), lengths: new Array(c.batch).fill(c.seq_len), T: c.seq_len,
        decay: c.decay, headsCoefficient: c.heads_coefficient, norm: valid, chunkRows, computeGrads: true,
      });
      hidden.dispose();
      const grads: Record<string, Float32Array> = {};
      for (const row of headTensorTable(heads.shape)) {
        const g = r.grads!.get(row.name)!;
        const data = g.dataSync() as Float32Array;
        grads[row.name] = row.kind === 'b1' ? Float32Array.from(data) : transpose(data, g.shape[0] as number, g.shape[1] as number); // internal -> PyTorch layout
        g.dispose();
      }
      disposeHeads(heads);
      if (c.mode === 'shared') heads.baseLmHead.dispose();
      return { r, grads, f64, ints };
    };

    test('loss, per-head loss and accuracy, and every gradient match PyTorch within 1e-5 relative', () => {
      const { r, grads, f64, ints } = run(1000);
      const K = c.num_heads;
      expect(r.valid).toEqual(ints('head_valid'));
      const headLoss = r.ceSum.map((s, k) => s / r.valid[k]);
      expect(relErr(headLoss, f64('head_loss'))).toBeLessThan(1e-5);
      const total = headLoss.reduce((acc, l, k) => acc + c.heads_coefficient * Math.pow(c.decay, k) * l, 0);
      expect(Math.abs(total - f64('loss')[0]) / Math.abs(f64('loss')[0])).toBeLessThan(1e-5);
      const acc = f64('head_topk_acc');
      expect(acc.length).toBe(K * TOPK_REPORTED); // goldens carry top-1..10
      for (const row of r.correct) expect(row).toHaveLength(TOPK_REPORTED);
      for (let k = 0; k < K; k++) for (let j = 0; j < TOPK_REPORTED; j++) expect(r.correct[k][j] / r.valid[k]).toBeCloseTo(acc[k * TOPK_REPORTED + j], 10);
      expect(Object.keys(grads).sort()).toEqual([...c.trainable].sort());
      for (const name of c.trainable) {
        const e = relErr(grads[name], f64(`grad.${name}`));
        if (!(e < 1e-5)) throw new Error(`${name}: relative error ${e}`);
      }
    });

    test('chunked (5 rows at a time) equals unchunked', () => {
      const a = run(1000);
      const b = run(5);
      expect(b.r.valid).toEqual(a.r.valid);
      expect(b.r.correct).toEqual(a.r.correct);
      expect(relErr(b.r.ceSum, a.r.ceSum)).toBeLessThan(1e-6);
      for (const name of c.trainable) expect(relErr(b.grads[name], a.grads[name])).toBeLessThan(1e-6);
    });
  });
});

describe('heads layout', () => {
  test('export -> import round-trips bit for bit; init follows the reference', async () => {
    await initBackend('wasm');
    const d = 8;
    const V = 12;
    const base = tf.randomNormal([d, V], 0, 1, 'float32', 3) as tf.Tensor2D;
    const h = initHeads({ numHeads: 2, numLayers: 2, hiddenSize: d, vocabSize: V, lmHead: 'per_head' }, base, 5);
    // W1 starts at zero, W2 is a copy of the base lm_head, biases within PyTorch's default bound
    const ex = exportHeads(h);
    expect(Array.from(ex['0.0.linear.weight'].data).every((x) => x === 0)).toBe(true);
    expect(Array.from(ex['1.2.weight'].data)).toEqual(Array.from(transpose(base.dataSync() as Float32Array, d, V)));
    expect(Array.from(ex['1.1.linear.bias'].data).every((x) => Math.abs(x) <= 1 / Math.sqrt(d))).toBe(true);
    for (const t of Object.values(ex)) for (let i = 0; i < t.data.length; i++) t.data[i] = Math.fround(Math.sin(i + t.data.length));
    importHeads(h, ex, 'test');
    const again = exportHeads(h);
    for (const [n, t] of Object.entries(ex)) expect(Array.from(again[n].data)).toEqual(Array.from(t.data));
    expect(() => importHeads(h, { ...ex, 'extra.weight': { shape: [1], data: new Float32Array(1) } }, 'bad.safetensors')).toThrow(/unexpected tensor extra.weight/);
    const missing = { ...ex };
    delete missing['0.1.linear.bias'];
    expect(() => importHeads(h, missing, 'bad.safetensors')).toThrow(/missing 0.1.linear.bias/);
    disposeHeads(h);
    base.dispose();
  });
});
