/**
 * The heads-training engines (src/engines): the onnx engine's loss, top-k counts and gradients against
 * the float64 PyTorch goldens (test/fixtures/heads), chunked and unchunked; the tfjs engine reproduces
 * the medusa1 recipe's sequence (initHeads, headsLoss, accumulate, clip, AdamW) bit for bit; both engines
 * agree after 3 optimizer steps with accumulation and clipping; optimizer state moves between engines;
 * a non-finite loss leaves everything unchanged; engine choice and fallback; no tfjs tensor leaks.
 */
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { headTensorTable, initHeads, trainableParams, exportHeads, type HeadsShape } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import { headsLoss, TOPK_REPORTED } from '../src/train/heads-loss.js';
import { AdamW } from '../src/train/optimizer.js';
import { clipGradNorm } from '../src/train/clip.js';
import { createHeadsTrainer, onnxAvailable, type HeadsBatch, type HeadsTrainer, type HeadsTrainerOptions, type HostTensors } from '../src/engines/heads-trainer.js';
import { DISABLE_ORT_ENV, probeOrt, setOrtLoaderForTests } from '../src/engines/ort.js';
import { createOnnxHeadsTrainer } from '../src/engines/onnx-heads.js';
import { HEADS_CASES, HEADS_FIXTURES, loadHeadsCase, type HeadsCase } from './helpers/heads-fixtures.js';
import { relErr } from './helpers/golden.js';

// onnxruntime outputs under Jest: see test/setup/realm.ts (jest setupFiles).

type Case = HeadsCase;
const CASES = HEADS_CASES;
const load = loadHeadsCase;

function expectClose(a: HostTensors, b: HostTensors, tol: number, what: string): void {
  expect(Object.keys(a).sort()).toEqual(Object.keys(b).sort());
  for (const name of Object.keys(b)) {
    expect(a[name].shape).toEqual(b[name].shape);
    const e = relErr(a[name].data, b[name].data);
    if (!(e < tol)) throw new Error(`${what}: ${name} differs by ${e} (relative), tolerance ${tol}`);
  }
}

function expectEqualBits(a: HostTensors, b: HostTensors, what: string): void {
  expect(Object.keys(a).sort()).toEqual(Object.keys(b).sort());
  for (const name of Object.keys(b)) {
    const x = a[name].data;
    const y = b[name].data;
    let diff = -1;
    for (let i = 0; i < y.length && diff < 0; i++) if (!Object.is(x[i], y[i])) diff = i;
    if (diff >= 0 || x.length !== y.length) throw new Error(`${what}: ${name} differs at ${diff} (${x[diff]} vs ${y[diff]})`);
  }
}

function options(shape: HeadsShape, baseLmHead: Float32Array, o: Partial<HeadsTrainerOptions> = {}): HeadsTrainerOptions {
  return { shape, baseLmHead, seed: 11, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01, decay: 0.8, headsCoefficient: 0.7, chunkRows: 5, maxGradNorm: 0.5, ...o };
}

beforeAll(async () => {
  await initBackend('wasm');
});

afterEach(() => {
  setOrtLoaderForTests(null);
  delete process.env[DISABLE_ORT_ENV];
});

// ---------------------------------------------------------------------------------------------

describe.each(['onnx', 'tfjs'] as const)('%s engine against the PyTorch goldens', (engine) => {
  describe.each(CASES.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const run = async (chunkRows: number) => {
      const { f32, f64, ints } = load(c);
      const shape: HeadsShape = { numHeads: c.num_heads, numLayers: c.num_layers, hiddenSize: c.hidden_size, vocabSize: c.vocab_size, lmHead: c.mode };
      const base = c.mode === 'shared' ? f32('lm_head.weight') : new Float32Array(c.vocab_size * c.hidden_size);
      const tr = await createHeadsTrainer(engine, options(shape, base, { decay: c.decay, headsCoefficient: c.heads_coefficient, chunkRows }));
      try {
        expect(tr.engine).toBe(engine);
        const tensors: HostTensors = {};
        for (const row of headTensorTable(shape)) tensors[row.name] = { shape: row.shape, data: f32(row.name) };
        tr.importHeads(tensors, c.file);
        const batch: HeadsBatch = { hidden: f32('hidden'), ids: ints('input_ids'), lossMask: ints('loss_mask'), lengths: new Array(c.batch).fill(c.seq_len), T: c.seq_len };
        const r = await tr.lossAndGrads([batch]);
        const ev = await tr.evaluate(batch);
        return { r, ev, f64, ints };
      } finally {
        tr.dispose();
      }
    };

    test.each([1000, 5])('loss, top-k counts and every gradient within 1e-5 relative (chunkRows %i)', async (chunkRows) => {
      const { r, ev, f64, ints } = await run(chunkRows);
      const m = r.metrics;
      expect(m.valid).toEqual(ints('head_valid'));
      const headLoss = m.ceSum.map((s, k) => s / m.valid[k]);
      expect(relErr(headLoss, f64('head_loss'))).toBeLessThan(1e-5);
      const total = headLoss.reduce((acc, l, k) => acc + c.heads_coefficient * Math.pow(c.decay, k) * l, 0);
      expect(Math.abs(total - f64('loss')[0]) / Math.abs(f64('loss')[0])).toBeLessThan(1e-5);
      const acc = f64('head_topk_acc');
      expect(acc.length).toBe(c.num_heads * TOPK_REPORTED); // goldens carry top-1..10
      for (const row of m.correct) expect(row).toHaveLength(TOPK_REPORTED);
      for (let k = 0; k < c.num_heads; k++) for (let j = 0; j < TOPK_REPORTED; j++) expect(m.correct[k][j] / m.valid[k]).toBeCloseTo(acc[k * TOPK_REPORTED + j], 10);
      expect(Object.keys(r.grads).sort()).toEqual([...c.trainable].sort());
      for (const name of c.trainable) {
        const e = relErr(r.grads[name].data, f64(`grad.${name}`));
        if (!(e < 1e-5)) throw new Error(`${name}: relative error ${e}`);
      }
      // evaluation: the same forward
      expect(ev.valid).toEqual(m.valid);
      expect(ev.correct).toEqual(m.correct);
      expect(relErr(ev.ceSum, m.ceSum)).toBeLessThan(1e-6);
    });

    test('chunked (5 rows at a time) equals unchunked', async () => {
      const a = await run(1000);
      const b = await run(5);
      expect(b.r.metrics.valid).toEqual(a.r.metrics.valid);
      expect(b.r.metrics.correct).toEqual(a.r.metrics.correct);
      expect(relErr(b.r.metrics.ceSum, a.r.metrics.ceSum)).toBeLessThan(1e-6);
      for (const name of c.trainable) expect(relErr(b.r.grads[name].data, a.r.grads[name].data)).toBeLessThan(1e-6);
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Random problems

interface Problem { shape: HeadsShape; base: Float32Array; steps: HeadsBatch[][] }

function problem(d: number, V: number, L: number, lmHead: 'per_head' | 'shared', seed: number, stepsN = 3, accum = 2): Problem {
  const rng = new Rng(seed);
  const normal = (): number => {
    const u = Math.max(rng.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
  };
  const base = Float32Array.from({ length: V * d }, () => 0.5 * normal());
  const batch = (): HeadsBatch => {
    const T = 10 + Math.floor(rng.next() * 6);
    const lengths = [T, T - 1 - Math.floor(rng.next() * 4), 4 + Math.floor(rng.next() * 3)];
    const n = lengths.length * T;
    return {
      hidden: Float32Array.from({ length: n * d }, () => normal()),
      ids: Array.from({ length: n }, () => Math.floor(rng.next() * V)),
      lossMask: Array.from({ length: n }, () => (rng.next() < 0.8 ? 1 : 0)),
      lengths,
      T,
    };
  };
  const steps = Array.from({ length: stepsN }, () => Array.from({ length: accum }, batch));
  return { shape: { numHeads: 3, numLayers: L, hiddenSize: d, vocabSize: V, lmHead }, base, steps };
}

const PROBLEMS = [
  ['d=16 V=40 L=1 per_head', 16, 40, 1, 'per_head', 1],
  ['d=32 V=300 L=2 per_head', 32, 300, 2, 'per_head', 2],
  ['d=24 V=120 L=1 shared', 24, 120, 1, 'shared', 3],
  ['d=32 V=300 L=2 shared', 32, 300, 2, 'shared', 4],
] as const;

describe.each(PROBLEMS)('engines agree: %s', (_name, d, V, L, mode, seed) => {
  const lr = 1e-3; // the reference recipe's
  const p = problem(d, V, L, mode, seed);
  const opts = options(p.shape, p.base, { maxGradNorm: 0.5, chunkRows: 7 });

  /** Heads with every parameter random (W1 ~ N(0, 0.1), b1 and W2 ~ N(0, 0.3)), the same for both engines. */
  const randomHeads = (): HostTensors => {
    const rng = new Rng(seed + 100);
    const out: HostTensors = {};
    for (const row of headTensorTable(p.shape)) {
      const std = row.kind === 'w1' ? 0.1 : 0.3;
      out[row.name] = { shape: row.shape, data: Float32Array.from({ length: row.shape.reduce((x, y) => x * y, 1) }, () => std * (rng.next() + rng.next() + rng.next() - 1.5) * 2) };
    }
    return out;
  };

  /*
   * Tolerances. The engines' gradients differ by float32 rounding (different summation orders), about
   * 1e-7 of each tensor's largest entry. AdamW divides each entry by its own running RMS, so an entry
   * whose gradient nearly cancels (say 1e-3 of the largest) sees that rounding amplified ~1000x in its
   * update. Parameters far from zero hide this (1e-5 relative holds with margin: started from random
   * heads, observed up to 4e-7); W1 starts at exactly 0 in the reference init, so after 3 steps its entries are a few lr in
   * size and consist of nothing but such normalised updates: there the parameters are compared with
   * 1e-5 relative plus 1e-3 x lr absolute (0.1% of one step; observed up to 6e-5 x lr), as
   * test/optim.test.ts does for the update. The moments are sums of gradients: 1e-5 relative everywhere (observed up to 2.4e-6).
   */
  test.each(['the reference init', 'random heads'] as const)('3 steps from %s with accumulation 2 and clipping: heads, optimizer state and metrics agree', async (start) => {
    const a = await createHeadsTrainer('tfjs', opts);
    const b = await createHeadsTrainer('onnx', opts);
    try {
      if (start === 'random heads') {
        const h = randomHeads();
        a.importHeads(h, 'random');
        b.importHeads(h, 'random');
      }
      const h0 = b.exportHeads();
      expectEqualBits(h0, a.exportHeads(), 'initial heads');
      let clipped = 0;
      for (const micro of p.steps) {
        const ra = await a.step(micro, lr);
        const rb = await b.step(micro, lr);
        expect(ra.applied).toBe(true);
        expect(rb.applied).toBe(true);
        expect(rb.valid).toEqual(ra.valid);
        expect(rb.correct).toEqual(ra.correct);
        expect(relErr(rb.ceSum, ra.ceSum)).toBeLessThan(1e-5);
        expect(Math.abs(rb.gradNorm - ra.gradNorm) / ra.gradNorm).toBeLessThan(1e-5);
        if (ra.gradNorm > 0.5) clipped++;
      }
      expect(clipped).toBeGreaterThan(0); // clipping was exercised
      const ha = a.exportHeads();
      const hb = b.exportHeads();
      if (start === 'random heads') expectClose(hb, ha, 1e-5, 'heads after 3 steps');
      else {
        for (const name of Object.keys(ha)) {
          let scale = 0;
          for (const x of ha[name].data) scale = Math.max(scale, Math.abs(x));
          const tol = 1e-5 * scale + 1e-3 * lr;
          for (let i = 0; i < ha[name].data.length; i++) {
            if (!(Math.abs(hb[name].data[i] - ha[name].data[i]) <= tol)) throw new Error(`heads after 3 steps: ${name}[${i}] ${hb[name].data[i]} vs ${ha[name].data[i]}, tolerance ${tol}`);
          }
        }
      }
      const sa = a.exportOptimizer();
      const sb = b.exportOptimizer();
      expect(sb.step).toBe(3);
      expect(sa.step).toBe(3);
      expectClose(sb.tensors, sa.tensors, 1e-5, 'optimizer state after 3 steps');
      // the heads moved (by several steps of about lr)
      expect(Object.keys(hb).every((n) => relErr(hb[n].data, h0[n].data) > 1e-3)).toBe(true);
      // evaluation agrees too
      const ea = await a.evaluate(p.steps[0][0]);
      const eb = await b.evaluate(p.steps[0][0]);
      expect(eb.valid).toEqual(ea.valid);
      expect(eb.correct).toEqual(ea.correct);
      expect(relErr(eb.ceSum, ea.ceSum)).toBeLessThan(1e-5);
    } finally {
      a.dispose();
      b.dispose();
    }
  });

  test.each([['tfjs', 'onnx'], ['onnx', 'tfjs']] as const)('state exported by %s continues in %s', async (from, to) => {
    const src = await createHeadsTrainer(from, opts);
    const ref = await createHeadsTrainer(from, opts);
    const dst = await createHeadsTrainer(to, { ...opts, seed: 999 }); // a different init: everything must come from the checkpoint
    try {
      for (const micro of p.steps.slice(0, 2)) {
        await src.step(micro, lr);
        await ref.step(micro, lr);
      }
      dst.importHeads(src.exportHeads(), 'checkpoint');
      dst.importOptimizer(src.exportOptimizer());
      expectEqualBits(dst.exportHeads(), src.exportHeads(), 'imported heads');
      expectEqualBits(dst.exportOptimizer().tensors, src.exportOptimizer().tensors, 'imported optimizer state');
      expect(dst.exportOptimizer().step).toBe(2);
      await ref.step(p.steps[2], lr);
      await dst.step(p.steps[2], lr);
      expectClose(dst.exportHeads(), ref.exportHeads(), 1e-5, 'heads after the continued step');
      expectClose(dst.exportOptimizer().tensors, ref.exportOptimizer().tensors, 1e-5, 'optimizer state after the continued step');
      expect(dst.exportOptimizer().step).toBe(3);
    } finally {
      src.dispose();
      ref.dispose();
      dst.dispose();
    }
  });
});

// ---------------------------------------------------------------------------------------------

/** The medusa1 recipe's step, spelled out as it is in src/recipes/medusa1.ts. */
function recipeSteps(p: Problem, o: HeadsTrainerOptions, lr: number): HostTensors {
  const { shape } = p;
  const d = shape.hiddenSize;
  const V = shape.vocabSize;
  const baseInternal = new Float32Array(V * d);
  for (let v = 0; v < V; v++) for (let i = 0; i < d; i++) baseInternal[i * V + v] = p.base[v * d + i];
  const base = tf.tensor2d(baseInternal, [d, V]);
  const heads = initHeads(shape, base, o.seed);
  const params = trainableParams(heads);
  const opt = new AdamW(params.map((q) => ({ name: q.name, value: q.value, weightDecay: q.weightDecay ? o.weightDecay : 0 })), { betas: o.betas, eps: o.eps });
  for (const micro of p.steps) {
    const norm = new Array<number>(shape.numHeads).fill(0);
    for (const b of micro) {
      for (let k = 0; k < shape.numHeads; k++) {
        for (let r = 0; r < b.lengths.length; r++) for (let t = 0; t + k + 2 < b.lengths[r]; t++) if (b.lossMask[r * b.T + t + k + 2] === 1) norm[k]++;
      }
    }
    let grads: Map<string, tf.Tensor> | null = null;
    for (const b of micro) {
      const hidden = tf.tensor2d(b.hidden, [b.lengths.length * b.T, d]);
      const r = headsLoss({ heads, hidden, ids: b.ids, lossMask: b.lossMask, lengths: b.lengths, T: b.T, decay: o.decay, headsCoefficient: o.headsCoefficient, norm, chunkRows: o.chunkRows, computeGrads: true });
      hidden.dispose();
      if (!grads) grads = r.grads!;
      else {
        for (const [name, t] of r.grads!) {
          const prev = grads.get(name);
          if (!prev) grads.set(name, t);
          else {
            grads.set(name, tf.add(prev, t));
            prev.dispose();
            t.dispose();
          }
        }
      }
    }
    for (const q of params) if (!grads!.has(q.name)) grads!.set(q.name, tf.zerosLike(q.value));
    const clip = clipGradNorm(grads!, o.maxGradNorm!);
    for (const t of grads!.values()) t.dispose();
    opt.step(clip.grads, lr);
    for (const t of clip.grads.values()) t.dispose();
  }
  const out = exportHeads(heads);
  opt.dispose();
  for (const q of params) q.value.dispose();
  base.dispose();
  return out;
}

describe('tfjs engine', () => {
  test('reproduces the medusa1 recipe bit for bit', async () => {
    const p = problem(16, 50, 2, 'per_head', 21);
    const o = options(p.shape, p.base, { maxGradNorm: 0.3, chunkRows: 6 });
    const want = recipeSteps(p, o, 0.01);
    const tr = await createHeadsTrainer('tfjs', o);
    try {
      for (const micro of p.steps) expect((await tr.step(micro, 0.01)).applied).toBe(true);
      expectEqualBits(tr.exportHeads(), want, 'heads');
    } finally {
      tr.dispose();
    }
  });

  test('leaks no tfjs tensors', async () => {
    const p = problem(16, 40, 2, 'per_head', 31);
    const before = tf.memory().numTensors;
    for (const maxGradNorm of [0.5, null]) {
      const tr = await createHeadsTrainer('tfjs', options(p.shape, p.base, { maxGradNorm }));
      await tr.step(p.steps[0], 0.01);
      const live = tf.memory().numTensors;
      await tr.step(p.steps[1], 0.01);
      await tr.lossAndGrads(p.steps[2]);
      await tr.evaluate(p.steps[2][0]);
      tr.importHeads(tr.exportHeads(), 'x');
      tr.importOptimizer(tr.exportOptimizer());
      const nan = { ...p.steps[0][0], hidden: p.steps[0][0].hidden.map((x, i) => (i === 3 ? NaN : x)) };
      await tr.step([nan], 0.01);
      expect(tf.memory().numTensors).toBe(live);
      tr.dispose();
    }
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('onnx engine details', () => {
  test('W2 gradients returned in many uneven pieces equal one piece exactly', async () => {
    const p = problem(32, 300, 2, 'per_head', 61);
    const opts = options(p.shape, p.base);
    const { ort } = await probeOrt();
    const one = await createOnnxHeadsTrainer(opts, ort!, '');
    const many = await createOnnxHeadsTrainer(opts, ort!, '', 1000); // 3 rows of [32, 300] per piece: 11 pieces
    try {
      for (const micro of p.steps.slice(0, 2)) {
        const a = await one.step(micro, 0.01);
        const b = await many.step(micro, 0.01);
        expect(b.gradNorm).toBe(a.gradNorm);
      }
      expectEqualBits(many.exportHeads(), one.exportHeads(), 'heads');
      expectEqualBits(many.exportOptimizer().tensors, one.exportOptimizer().tensors, 'optimizer state');
    } finally {
      one.dispose();
      many.dispose();
    }
  });

  test('heads without positions in a micro-batch or a whole step: zero gradients, both engines agree', async () => {
    const p = problem(16, 60, 1, 'per_head', 71, 2, 2);
    // head 2 has no position in this micro-batch (rows of 4 and 3 tokens), head 1 one
    const short: HeadsBatch = { hidden: p.steps[0][0].hidden.slice(0, 2 * 4 * 16), ids: [1, 2, 3, 4, 5, 6, 7, 0], lossMask: [1, 1, 1, 1, 1, 1, 1, 0], lengths: [4, 3], T: 4 };
    const steps = [[short, p.steps[0][1]], [short]];
    const opts = options(p.shape, p.base);
    const a = await createHeadsTrainer('tfjs', opts);
    const b = await createHeadsTrainer('onnx', opts);
    try {
      const g = await b.lossAndGrads([short]);
      expect(g.metrics.valid).toEqual([3, 1, 0]);
      for (const name of ['2.0.linear.weight', '2.0.linear.bias', '2.1.weight']) expect(g.grads[name].data.every((x) => x === 0)).toBe(true);
      for (const micro of steps) {
        const ra = await a.step(micro, 0.01);
        const rb = await b.step(micro, 0.01);
        expect(rb.applied).toBe(true);
        expect(rb.valid).toEqual(ra.valid);
        expect(Math.abs(rb.gradNorm - ra.gradNorm) / ra.gradNorm).toBeLessThan(1e-5);
      }
      expectClose(b.exportHeads(), a.exportHeads(), 1e-5, 'heads');
      expectClose(b.exportOptimizer().tensors, a.exportOptimizer().tensors, 1e-5, 'optimizer state');
      const e = await b.evaluate(short);
      expect(e.valid).toEqual([3, 1, 0]);
      expect(e.ceSum[2]).toBe(0);
    } finally {
      a.dispose();
      b.dispose();
    }
  });

  test('a label outside the vocabulary is refused before anything runs', async () => {
    const p = problem(16, 40, 1, 'shared', 81, 1, 1);
    for (const engine of ['onnx', 'tfjs'] as const) {
      const t = await createHeadsTrainer(engine, options(p.shape, p.base));
      const bad = { ...p.steps[0][0], ids: Array.from(p.steps[0][0].ids, (x, i) => (i === 5 ? 40 : x)), lossMask: Array.from(p.steps[0][0].lossMask, (x, i) => (i === 5 ? 1 : x)) };
      await expect(t.step([bad], 0.01)).rejects.toThrow(/label id 40 .* outside the vocabulary \[0, 40\)/);
      expect(t.exportOptimizer().step).toBe(0);
      t.dispose();
    }
  });
});

describe.each(['onnx', 'tfjs'] as const)('%s engine: non-finite loss', (engine) => {
  test('NaN in hidden: applied=false, parameters and optimizer state unchanged', async () => {
    const p = problem(16, 40, 1, 'per_head', 41);
    const tr = await createHeadsTrainer(engine, options(p.shape, p.base));
    try {
      await tr.step(p.steps[0], 0.01);
      const heads = tr.exportHeads();
      const state = tr.exportOptimizer();
      const micro = p.steps[1].map((b, i) => (i === 1 ? { ...b, hidden: b.hidden.map((x, j) => (j === 5 ? NaN : x)) } : b));
      const r = await tr.step(micro, 0.01);
      expect(r.applied).toBe(false);
      expectEqualBits(tr.exportHeads(), heads, 'heads');
      const after = tr.exportOptimizer();
      expect(after.step).toBe(state.step);
      expectEqualBits(after.tensors, state.tensors, 'optimizer state');
      // and the next good step proceeds
      expect((await tr.step(p.steps[2], 0.01)).applied).toBe(true);
      expect(tr.exportOptimizer().step).toBe(2);
    } finally {
      tr.dispose();
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('engine choice', () => {
  const p = problem(8, 20, 1, 'shared', 51, 1, 1);
  const opts = options(p.shape, p.base);

  test('auto picks onnx here and says why; forcing tfjs works', async () => {
    expect(await onnxAvailable()).toEqual({ ok: true });
    const a = await createHeadsTrainer('auto', opts);
    expect(a.engine).toBe('onnx');
    expect(a.description).toMatch(/onnxruntime-node .*intra-op thread.*auto/);
    a.dispose();
    const t = await createHeadsTrainer('tfjs', opts);
    expect(t.engine).toBe('tfjs');
    expect((await t.step(p.steps[0], 0.01)).applied).toBe(true);
    t.dispose();
    const two = await createHeadsTrainer('onnx', { ...opts, threads: 1 });
    expect(two.description).toMatch(/1 intra-op thread\b/);
    two.dispose();
  });

  test(`${DISABLE_ORT_ENV}=1: auto falls back to tfjs with the reason; forcing onnx fails`, async () => {
    process.env[DISABLE_ORT_ENV] = '1';
    expect(await onnxAvailable()).toEqual({ ok: false, reason: `disabled by ${DISABLE_ORT_ENV}=1` });
    const a = await createHeadsTrainer('auto', opts);
    expect(a.engine).toBe('tfjs');
    expect(a.description).toContain(`disabled by ${DISABLE_ORT_ENV}=1`);
    a.dispose();
    await expect(createHeadsTrainer('onnx', opts)).rejects.toMatchObject({ code: 'E_BACKEND' });
  });

  test('a broken onnxruntime load falls back cleanly', async () => {
    setOrtLoaderForTests(async () => {
      throw new Error('libonnxruntime.so.1: cannot open shared object file');
    });
    const r = await onnxAvailable();
    expect(r.ok).toBe(false);
    expect(r.reason).toMatch(/failed to load: libonnxruntime\.so\.1/);
    const a = await createHeadsTrainer('auto', opts);
    expect(a.engine).toBe('tfjs');
    expect(a.description).toMatch(/not usable \(onnxruntime-node failed to load: libonnxruntime/);
    expect((await a.step(p.steps[0], 0.01)).applied).toBe(true);
    a.dispose();
  });

  test('bad options are refused with E_CONFIG', async () => {
    await expect(createHeadsTrainer('onnx', { ...opts, baseLmHead: new Float32Array(3) })).rejects.toMatchObject({ code: 'E_CONFIG' });
    await expect(createHeadsTrainer('tfjs', { ...opts, chunkRows: 0 })).rejects.toMatchObject({ code: 'E_CONFIG' });
  });

  test.each(['onnx', 'tfjs'] as const)('%s: import checks names and shapes', async (engine) => {
    const t: HeadsTrainer = await createHeadsTrainer(engine, opts);
    try {
      const h = t.exportHeads();
      expect(() => t.importHeads({ ...h, 'extra.weight': { shape: [1], data: new Float32Array(1) } }, 'bad.safetensors')).toThrow(/unexpected tensor extra.weight/);
      const s = t.exportOptimizer();
      const missing = { ...s.tensors };
      delete missing['exp_avg.0.0.linear.bias'];
      expect(() => t.importOptimizer({ step: 1, tensors: missing })).toThrow(/missing tensor "exp_avg.0.0.linear.bias"/);
    } finally {
      t.dispose();
    }
  });
});
