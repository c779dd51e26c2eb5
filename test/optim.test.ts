/**
 * The training numerics around the heads: AdamW, gradient-norm clipping and learning-rate
 * schedules, checked against the float64 PyTorch / transformers goldens made by
 * scripts/golden_heads.py (test/fixtures/heads, see its README), on the wasm and cpu backends.
 * Also checks that the heads fixtures themselves are complete and readable by our safetensors reader.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { MedusaError } from '../src/errors.js';
import { readHeader, readTensor, writeSafetensors } from '../src/io/safetensors.js';
import { AdamW, type AdamWState } from '../src/train/optimizer.js';
import { clipGradNorm, globalGradNorm } from '../src/train/clip.js';
import { lrAt, lrFactor, warmupSteps, type ScheduleKind } from '../src/train/schedule.js';
import type { HeadsCase } from './helpers/heads-fixtures.js';

const FIX = path.resolve('test/fixtures/heads');

interface Host {
  dtype: string;
  shape: number[];
  data: number[];
}

/** All tensors of a fixture file, as plain numbers (F64 values exactly, I64 as numbers). */
function readFixture(file: string): Map<string, Host> {
  const out = new Map<string, Host>();
  for (const [name, info] of readHeader(path.join(FIX, file)).tensors) {
    const t = readTensor(info);
    const data = t.data instanceof BigInt64Array ? Array.from(t.data, Number) : Array.from(t.data as Float64Array);
    out.set(name, { dtype: t.dtype, shape: t.shape, data });
  }
  return out;
}

function get(m: Map<string, Host>, name: string): Host {
  const t = m.get(name);
  if (!t) throw new Error(`fixture tensor ${name} missing`);
  return t;
}

interface Index {
  heads: Array<HeadsCase & { topk: number; frozen: string[] }>;
  adamw: { file: string; lr: number; betas: [number, number]; eps: number; steps: number; params: Array<{ name: string; shape: number[]; weight_decay: number }> };
  clip: { file: string; max_norm: number; grads: Array<{ name: string; shape: number[] }>; sets: Array<{ prefix: string; total_norm: number; clip_coef: number }> };
}
interface Schedules {
  cases: Array<{ name: string; kind: ScheduleKind; lr: number; warmup_steps: number; total_steps: number; lrs: number[] }>;
  warmup_steps: Array<{ total_steps: number; warmup_ratio: number; warmup_steps: number }>;
}
const INDEX = JSON.parse(fs.readFileSync(path.join(FIX, 'index.json'), 'utf8')) as Index;
const SCHEDULES = JSON.parse(fs.readFileSync(path.join(FIX, 'schedules.json'), 'utf8')) as Schedules;

/** Largest |a - e| / |e| (0/0 counts as 0); fails the test with the worst index otherwise. */
function expectRelClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rtol: number, what: string): void {
  expect(actual.length).toBe(expected.length);
  let worst = 0;
  let at = -1;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    const r = d === 0 ? 0 : d / Math.abs(expected[i]);
    if (!(r <= worst)) {
      worst = r;
      at = i;
    }
  }
  if (!(worst <= rtol)) throw new Error(`${what}: relative error ${worst} at [${at}] (${actual[at]} vs ${expected[at]}) exceeds ${rtol}`);
}

function expectAbsClose(actual: ArrayLike<number>, expected: ArrayLike<number>, atol: number, what: string): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= atol)) throw new Error(`${what}: |${actual[i]} - ${expected[i]}| = ${d} at [${i}] exceeds ${atol}`);
  }
}

/** The inputs were drawn in float32 and widened: loading them as float32 must be exact. */
function f32Exact(h: Host, what: string): Float32Array {
  const f = Float32Array.from(h.data);
  for (let i = 0; i < f.length; i++) if (f[i] !== h.data[i]) throw new Error(`${what}[${i}] is not float32-representable`);
  return f;
}

function expectCode(fn: () => unknown, code: string, message: RegExp): void {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    expect((e as MedusaError).code).toBe(code);
    expect((e as MedusaError).message).toMatch(message);
    return;
  }
  throw new Error(`expected a ${code} error matching ${String(message)}`);
}

describe.each(['wasm', 'cpu'] as const)('training numerics on %s', (backend) => {
  beforeAll(async () => {
    await initBackend(backend);
    expect(tf.getBackend()).toBe(backend);
  });

  describe('AdamW vs torch.optim.AdamW (float64 golden)', () => {
    const cfg = INDEX.adamw;
    const g = readFixture(cfg.file);

    function makeParams(values: Map<string, Float32Array>): Array<{ name: string; value: tf.Variable; weightDecay: number }> {
      return cfg.params.map((p) => {
        const init = tf.tensor(values.get(p.name)!, p.shape, 'float32');
        const value = tf.variable(init, true);
        init.dispose();
        return { name: p.name, value, weightDecay: p.weight_decay };
      });
    }
    const param0 = new Map(cfg.params.map((p) => [p.name, f32Exact(get(g, `param0.${p.name}`), `param0.${p.name}`)] as const));

    function gradsOf(step: number): Map<string, tf.Tensor> {
      return new Map(cfg.params.map((p) => [p.name, tf.tensor(f32Exact(get(g, `grad${step}.${p.name}`), 'grad'), p.shape, 'float32')] as const));
    }

    function run(opt: AdamW, from: number, to: number): void {
      for (let s = from; s <= to; s++) {
        const grads = gradsOf(s);
        opt.step(grads, cfg.lr);
        for (const t of grads.values()) t.dispose();
      }
    }

    test('3 steps with two weight-decay groups equal the golden params and moments; no tensor leaks', () => {
      const before = tf.memory().numTensors;
      const params = makeParams(param0);
      const opt = new AdamW(params, { betas: cfg.betas, eps: cfg.eps });
      const live = tf.memory().numTensors;
      expect(live).toBe(before + 3 * params.length); // the parameters + two moments each
      for (let s = 1; s <= cfg.steps; s++) {
        run(opt, s, s);
        expect(opt.stepCount).toBe(s);
        expect(tf.memory().numTensors).toBe(live);
        for (const p of params) {
          const got = p.value.dataSync();
          const want = get(g, `param${s}.${p.name}`).data;
          // float32 vs float64: parameters agree to 1e-5 relative...
          expectRelClose(got, want, 1e-5, `param${s}.${p.name}`);
          // ...and the update itself (p_s - p_0, a few lr) to 1e-3 x lr, which a wrong bias
          // correction, weight-decay placement or a missing eps would exceed.
          const p0 = get(g, `param0.${p.name}`).data;
          expectAbsClose(Array.from(got, (x, i) => x - p0[i]), want.map((x, i) => x - p0[i]), 1e-3 * cfg.lr, `update ${s} of ${p.name}`);
        }
      }
      const st = opt.exportState();
      expect(st.step).toBe(cfg.steps);
      expect(Object.keys(st.tensors).sort()).toEqual(cfg.params.flatMap((p) => [`exp_avg.${p.name}`, `exp_avg_sq.${p.name}`]).sort());
      for (const [key, t] of Object.entries(st.tensors)) {
        const want = get(g, key);
        expect(t.shape).toEqual(want.shape);
        expectRelClose(t.data, want.data, 1e-5, key);
      }
      // the zero-gradient entry moved by weight decay only: p0 * (1 - lr*wd)^3
      const w = params[0].value.dataSync()[0];
      expect(Math.abs(w / param0.get('lin1.weight')![0] - (1 - cfg.lr * 0.01) ** 3)).toBeLessThan(1e-6);
      opt.dispose();
      opt.dispose(); // idempotent
      expect(tf.memory().numTensors).toBe(before + params.length);
      for (const p of params) p.value.dispose();
      expect(tf.memory().numTensors).toBe(before);
      expectCode(() => opt.step(new Map(), 1e-3), 'E_INTERNAL', /after dispose/);
    });

    test('exported + imported state (through a safetensors file) continues bit-exactly like an uninterrupted run', () => {
      const before = tf.memory().numTensors;
      const a = makeParams(param0);
      const optA = new AdamW(a, { betas: cfg.betas, eps: cfg.eps });
      run(optA, 1, 3);

      const b = makeParams(param0);
      const optB = new AdamW(b, { betas: cfg.betas, eps: cfg.eps });
      run(optB, 1, 1);
      const saved = optB.exportState();
      const savedParams = new Map(b.map((p) => [p.name, new Float32Array(p.value.dataSync())] as const));
      optB.dispose();
      for (const p of b) p.value.dispose();

      // round trip through a checkpoint file (F32 is exact)
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-optim-'));
      try {
        const file = path.join(dir, 'optimizer.safetensors');
        writeSafetensors(
          file,
          Object.fromEntries(Object.entries(saved.tensors).map(([k, t]) => [k, { dtype: 'F32' as const, shape: t.shape, data: t.data }])),
          { step: String(saved.step) },
        );
        const h = readHeader(file);
        const loaded: AdamWState = { step: Number(h.metadata['step']), tensors: {} };
        for (const [k, info] of h.tensors) {
          const t = readTensor(info);
          loaded.tensors[k] = { shape: t.shape, data: t.data as Float32Array };
        }
        const c = makeParams(savedParams);
        const optC = new AdamW(c, { betas: cfg.betas, eps: cfg.eps });
        optC.importState(loaded);
        expect(optC.stepCount).toBe(1);
        run(optC, 2, 3);
        expect(optC.stepCount).toBe(3);
        for (let i = 0; i < a.length; i++) {
          expect(Array.from(c[i].value.dataSync())).toEqual(Array.from(a[i].value.dataSync()));
        }
        const sa = optA.exportState();
        const sc = optC.exportState();
        expect(sc.step).toBe(sa.step);
        for (const k of Object.keys(sa.tensors)) expect(Array.from(sc.tensors[k].data)).toEqual(Array.from(sa.tensors[k].data));
        optC.dispose();
        for (const p of c) p.value.dispose();
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
      optA.dispose();
      for (const p of a) p.value.dispose();
      expect(tf.memory().numTensors).toBe(before);
    });

    test('importState validates names, shapes, lengths and step (E_CONFIG naming the tensor) and changes nothing on failure', () => {
      const before = tf.memory().numTensors;
      const params = makeParams(param0);
      const opt = new AdamW(params, { betas: cfg.betas, eps: cfg.eps });
      run(opt, 1, 1);
      const good = opt.exportState();
      const clone = (): AdamWState => ({
        step: good.step,
        tensors: Object.fromEntries(Object.entries(good.tensors).map(([k, t]) => [k, { shape: t.shape.slice(), data: t.data.slice() }])),
      });

      const missing = clone();
      delete missing.tensors['exp_avg_sq.lin2.bias'];
      expectCode(() => opt.importState(missing), 'E_CONFIG', /missing tensor "exp_avg_sq\.lin2\.bias"/);

      const extra = clone();
      extra.tensors['exp_avg.lin3.weight'] = { shape: [1], data: new Float32Array(1) };
      expectCode(() => opt.importState(extra), 'E_CONFIG', /"exp_avg\.lin3\.weight"/);

      const badShape = clone();
      badShape.tensors['exp_avg.lin1.weight'] = { shape: [3, 4], data: new Float32Array(12) };
      expectCode(() => opt.importState(badShape), 'E_CONFIG', /"exp_avg\.lin1\.weight" has shape \[3, 4\].*\[4, 3\]/);

      const badLength = clone();
      badLength.tensors['exp_avg.lin1.bias'] = { shape: [4], data: new Float32Array(3) };
      expectCode(() => opt.importState(badLength), 'E_CONFIG', /"exp_avg\.lin1\.bias" must hold 4 float32 values/);

      const badStep = clone();
      badStep.step = -1;
      expectCode(() => opt.importState(badStep), 'E_CONFIG', /step/);

      // nothing changed
      const after = opt.exportState();
      expect(after.step).toBe(1);
      for (const k of Object.keys(good.tensors)) expect(Array.from(after.tensors[k].data)).toEqual(Array.from(good.tensors[k].data));
      // exported data are copies: mutating them does not touch the optimizer
      after.tensors['exp_avg.lin1.weight'].data.fill(123);
      expect(opt.exportState().tensors['exp_avg.lin1.weight'].data[1]).not.toBe(123);

      // step() with missing / misshaped / unknown gradients
      const grads = gradsOf(2);
      const missingGrad = new Map(grads);
      missingGrad.delete('lin1.bias');
      expectCode(() => opt.step(missingGrad, 1e-3), 'E_INTERNAL', /no gradient for parameter "lin1\.bias"/);
      const unknown = new Map(grads);
      const z = tf.zeros([2]);
      unknown.set('other', z);
      expectCode(() => opt.step(unknown, 1e-3), 'E_INTERNAL', /unknown parameters: "other"/);
      const wrong = new Map(grads);
      const w = tf.zeros([4, 4]);
      wrong.set('lin1.weight', w);
      expectCode(() => opt.step(wrong, 1e-3), 'E_INTERNAL', /"lin1\.weight" has shape \[4, 4\]/);
      expectCode(() => opt.step(grads, NaN), 'E_CONFIG', /learning rate/);
      expect(opt.stepCount).toBe(1);
      for (const t of [...grads.values(), z, w]) t.dispose();

      expectCode(() => new AdamW([params[0], params[0]], { betas: cfg.betas, eps: cfg.eps }), 'E_CONFIG', /appears twice/);
      expectCode(() => new AdamW(params, { betas: [0.9, 1], eps: cfg.eps }), 'E_CONFIG', /beta2/);
      expectCode(() => new AdamW([{ ...params[0], weightDecay: -1 }], { betas: cfg.betas, eps: cfg.eps }), 'E_CONFIG', /weight decay/);
      opt.dispose();
      for (const p of params) p.value.dispose();
      expect(tf.memory().numTensors).toBe(before);
    });
  });

  describe('clipGradNorm vs torch.nn.utils.clip_grad_norm_ (float64 golden)', () => {
    const cfg = INDEX.clip;
    const g = readFixture(cfg.file);

    test.each(cfg.sets.map((s) => [s.prefix, s] as const))('%s gradients', (prefix, set) => {
      const before = tf.memory().numTensors;
      const grads = new Map(
        cfg.grads.map((t) => [t.name, tf.tensor(f32Exact(get(g, `${prefix}.grad.${t.name}`), t.name), t.shape, 'float32')] as const),
      );
      const r = clipGradNorm(grads, cfg.max_norm);
      expectRelClose([r.norm], get(g, `${prefix}.total_norm`).data, 1e-6, 'total norm');
      expectRelClose([r.scale], [set.clip_coef], 1e-6, 'clip coefficient');
      expect([...r.grads.keys()]).toEqual(cfg.grads.map((t) => t.name));
      for (const t of cfg.grads) {
        const out = r.grads.get(t.name)!;
        expect(out).not.toBe(grads.get(t.name));
        expect(out.shape).toEqual(t.shape);
        expectRelClose(out.dataSync(), get(g, `${prefix}.clipped.${t.name}`).data, 1e-6, `${prefix}.clipped.${t.name}`);
        // inputs untouched
        expect(Array.from(grads.get(t.name)!.dataSync())).toEqual(Array.from(f32Exact(get(g, `${prefix}.grad.${t.name}`), t.name)));
      }
      if (set.clip_coef === 1) {
        expect(r.scale).toBe(1);
        for (const t of cfg.grads) expect(Array.from(r.grads.get(t.name)!.dataSync())).toEqual(Array.from(grads.get(t.name)!.dataSync()));
      } else {
        expect(r.scale).toBeLessThan(1);
        // the clipped set has norm max_norm (up to the 1e-6 guard)
        expect(Math.abs(globalGradNorm(r.grads) - cfg.max_norm)).toBeLessThan(1e-6);
      }
      for (const t of [...grads.values(), ...r.grads.values()]) t.dispose();
      expect(tf.memory().numTensors).toBe(before);
    });

    test('edge cases: no gradients, zero gradients, non-finite norm, bad max norm', () => {
      const before = tf.memory().numTensors;
      const empty = clipGradNorm(new Map(), 1);
      expect(empty).toMatchObject({ norm: 0, scale: 1 });
      const zeros = new Map([['a', tf.zeros([3])]]);
      const rz = clipGradNorm(zeros, 1);
      expect(rz.norm).toBe(0);
      expect(rz.scale).toBe(1);
      const inf = new Map([['a', tf.tensor([1, Infinity], [2], 'float32')]]);
      const ri = clipGradNorm(inf, 1);
      expect(ri.norm).toBe(Infinity);
      expect(ri.scale).toBe(0);
      expectCode(() => clipGradNorm(zeros, 0), 'E_CONFIG', /max gradient norm/);
      for (const t of [...zeros.values(), ...rz.grads.values(), ...inf.values(), ...ri.grads.values()]) t.dispose();
      expect(tf.memory().numTensors).toBe(before);
    });
  });
});

describe('learning-rate schedules vs transformers (LambdaLR) golden', () => {
  test.each(SCHEDULES.cases.map((c) => [c.name, c] as const))('%s: every step within 1e-12 relative', (_name, c) => {
    const o = { lr: c.lr, kind: c.kind, warmupSteps: c.warmup_steps, totalSteps: c.total_steps };
    const got = c.lrs.map((_, s) => lrAt(s, o));
    expectRelClose(got, c.lrs, 1e-12, c.name);
  });

  test('the main cases are the configured ones (total 20, warmup 3, lr 1e-3) and cover all kinds', () => {
    const main = SCHEDULES.cases.filter((c) => c.name.startsWith('main_'));
    expect(main.map((c) => c.kind).sort()).toEqual(['constant', 'cosine', 'linear']);
    for (const c of main) expect([c.total_steps, c.warmup_steps, c.lr, c.lrs.length]).toEqual([20, 3, 1e-3, 21]);
  });

  test('warmupSteps = ceil(total * ratio) as TrainingArguments.get_warmup_steps', () => {
    for (const w of SCHEDULES.warmup_steps) expect(warmupSteps(w.total_steps, w.warmup_ratio)).toBe(w.warmup_steps);
    expect(warmupSteps(100, 0.07)).toBe(8); // 7.000000000000001 in binary64, like Python
    expectCode(() => warmupSteps(10, 1.5), 'E_CONFIG', /warmup ratio/);
    expectCode(() => warmupSteps(-1, 0.1), 'E_CONFIG', /total steps/);
  });

  test('edge cases: no warmup, total == warmup, steps beyond the total', () => {
    const lr = 1e-3;
    for (const kind of ['cosine', 'linear', 'constant'] as const) {
      // no warmup: the first step uses the full lr
      expect(lrAt(0, { lr, kind, warmupSteps: 0, totalSteps: 10 })).toBe(lr);
      // warmup: the first step uses lambda(0) = 0, the end of warmup the full lr
      expect(lrAt(0, { lr, kind, warmupSteps: 3, totalSteps: 20 })).toBe(0);
      expect(lrAt(3, { lr, kind, warmupSteps: 3, totalSteps: 20 })).toBe(lr);
      // total == warmup: all steps are warmup
      expect([0, 1, 2, 3].map((s) => lrAt(s, { lr, kind, warmupSteps: 4, totalSteps: 4 }))).toEqual([0, 0.25 * lr, 0.5 * lr, 0.75 * lr]);
    }
    for (const s of [21, 22, 30, 35, 1000]) {
      // transformers' cosine would climb back up here (0.5 * lr at progress 1.5); ours stays at 0
      expect(lrAt(s, { lr, kind: 'cosine', warmupSteps: 3, totalSteps: 20 })).toBe(0);
      expect(lrAt(s, { lr, kind: 'linear', warmupSteps: 3, totalSteps: 20 })).toBe(0);
      expect(lrAt(s, { lr, kind: 'constant', warmupSteps: 3, totalSteps: 20 })).toBe(lr);
    }
    expect(lrAt(5, { lr, kind: 'cosine', warmupSteps: 4, totalSteps: 4 })).toBe(0);
    expect(lrAt(20, { lr, kind: 'cosine', warmupSteps: 3, totalSteps: 20 })).toBe(0);
    expect(lrFactor(0, { kind: 'linear', warmupSteps: 0, totalSteps: 0 })).toBe(0);
    expectCode(() => lrAt(-1, { lr, kind: 'cosine', warmupSteps: 0, totalSteps: 5 }), 'E_CONFIG', /step/);
    expectCode(() => lrAt(1.5, { lr, kind: 'cosine', warmupSteps: 0, totalSteps: 5 }), 'E_CONFIG', /step/);
    expectCode(() => lrAt(1, { lr, kind: 'cosine', warmupSteps: 0.5, totalSteps: 5 }), 'E_CONFIG', /warmup steps/);
    expectCode(() => lrAt(1, { lr: NaN, kind: 'cosine', warmupSteps: 0, totalSteps: 5 }), 'E_CONFIG', /learning rate/);
    expectCode(() => lrAt(1, { lr, kind: 'step' as ScheduleKind, warmupSteps: 0, totalSteps: 5 }), 'E_CONFIG', /unknown learning-rate schedule "step"/);
  });
});

describe('heads fixtures (test/fixtures/heads) are complete and consistent', () => {
  test.each(INDEX.heads.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const g = readFixture(c.file);
    const { num_heads: K, num_layers: L, hidden_size: d, vocab_size: V, batch: B, seq_len: T } = c;
    const expected: Record<string, [string, number[]]> = {
      hidden: ['F64', [B, T, d]],
      input_ids: ['I64', [B, T]],
      loss_mask: ['I64', [B, T]],
      logits: ['F64', [K, B, T, V]],
      loss: ['F64', []],
      head_loss: ['F64', [K]],
      head_topk_acc: ['F64', [K, c.topk]],
      head_valid: ['I64', [K]],
    };
    const trainable: string[] = [];
    for (let k = 0; k < K; k++) {
      for (let l = 0; l < L; l++) trainable.push(`${k}.${l}.linear.weight`, `${k}.${l}.linear.bias`);
      if (c.mode === 'per_head') trainable.push(`${k}.${L}.weight`);
    }
    expect(c.trainable).toEqual(trainable);
    expect(c.frozen).toEqual(c.mode === 'shared' ? ['lm_head.weight'] : []);
    const shapeOf = (n: string): number[] => (n.endsWith('.linear.weight') ? [d, d] : n.endsWith('.linear.bias') ? [d] : [V, d]);
    for (const n of trainable) {
      expected[n] = ['F64', shapeOf(n)];
      expected[`grad.${n}`] = ['F64', shapeOf(n)];
    }
    for (const n of c.frozen) expected[n] = ['F64', [V, d]];
    expect([...g.keys()].sort()).toEqual(Object.keys(expected).sort());
    for (const [n, [dtype, shape]] of Object.entries(expected)) {
      expect([n, get(g, n).dtype, get(g, n).shape]).toEqual([n, dtype, shape]);
    }
    // inputs and parameters load exactly as float32
    for (const n of ['hidden', ...trainable, ...c.frozen]) f32Exact(get(g, n), n);
    // loss = coefficient * sum_k decay^k CE_k; valid counts from the mask
    const ce = get(g, 'head_loss').data;
    const total = c.heads_coefficient * ce.reduce((acc, x, k) => acc + c.decay ** k * x, 0);
    expectRelClose([total], get(g, 'loss').data, 1e-12, 'loss');
    const mask = get(g, 'loss_mask').data;
    const valid = Array.from({ length: K }, (_, k) => {
      let n = 0;
      for (let b = 0; b < B; b++) for (let t = 0; t + k + 2 < T; t++) n += mask[b * T + t + k + 2] === 1 ? 1 : 0;
      return n;
    });
    expect(get(g, 'head_valid').data).toEqual(valid);
    // top-j accuracy is non-decreasing in j, and not all zero
    const acc = get(g, 'head_topk_acc').data;
    for (let k = 0; k < K; k++) for (let j = 1; j < c.topk; j++) expect(acc[k * c.topk + j]).toBeGreaterThanOrEqual(acc[k * c.topk + j - 1]);
    expect(Math.max(...acc)).toBeGreaterThan(0);
  });
});
