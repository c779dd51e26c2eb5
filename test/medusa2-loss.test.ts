/**
 * MEDUSA-2 numerics against float64 PyTorch autograd (scripts/golden_medusa2.py -> test/fixtures/medusa2):
 * the combined loss, per-head losses and EVERY trainable gradient for LoRA and full-layer modes, CE and
 * KD (stored top-k with the rest bucket, frozen teacher logits), trainable embeddings (tied and untied);
 * gradients exist for exactly the trainable parameters; frozen base tensors stay bit-identical through
 * optimizer steps; heads warmup; LoRA B = 0 gives exactly the base logits; the heads schedule; the
 * optimizer's param groups.
 *
 * Tolerance: 1e-5 relative to the largest magnitude of each compared tensor (max |ours - golden| /
 * max |golden|). Ours runs in float32 from the same float32 inputs; the golden is float64. The forward
 * through 2 layers, heads and softmax accumulates a few float32 roundings (eps 1.2e-7) per op over
 * sums of at most a few hundred terms, which stays well below 1e-5 of each tensor's scale; the
 * observed errors are printed by the first test.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { readHeader, readTensor, readTensorF32 } from '../src/io/safetensors.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward, type Decoder } from '../src/model/decoder.js';
import { disposeWeights } from '../src/model/weights.js';
import { headTensorTable, importHeads, initHeads, disposeHeads, type MedusaHeads } from '../src/model/heads.js';
import { createTrainableBackbone, gatherRows, headsParams, type BackboneSpec, type TrainableBackbone } from '../src/train/trainable-backbone.js';
import { headsSchedule, medusa2LossAndGrads, type Medusa2Batch } from '../src/train/medusa2-loss.js';
import { AdamW, adamwParamGroups } from '../src/train/optimizer.js';
import { expectMedusa } from './helpers/errors.js';
import { relErr } from './helpers/golden.js';

const FIX = path.resolve('test/fixtures/medusa2');

interface Case {
  name: string;
  file: string;
  model: string;
  backbone: { mode: 'lora'; rank: number; alpha: number; targets: string[]; train_embeddings: boolean } | { mode: 'full'; last_layers: number; train_embeddings: boolean };
  lm_loss: 'ce' | 'kd';
  teacher: 'topk' | 'frozen' | null;
  topk: number;
  heads_coefficient: number;
  decay: number;
  num_heads: number;
  batch: number;
  seq_len: number;
  lengths: number[];
  trainable: string[];
  heads: string[];
}

const CASES = (JSON.parse(fs.readFileSync(path.join(FIX, 'index.json'), 'utf8')) as { cases: Case[] }).cases;

function load(c: Case) {
  const h = readHeader(path.join(FIX, c.file));
  const info = (n: string) => {
    const i = h.tensors.get(n);
    if (!i) throw new Error(`${c.file}: tensor ${n} missing`);
    return i;
  };
  const f32 = (n: string): Float32Array => readTensorF32(info(n));
  const f64 = (n: string): Float64Array => readTensor(info(n)).data as Float64Array;
  const ints = (n: string): number[] => Array.from(readTensor(info(n)).data as BigInt64Array, Number);
  const shape = (n: string): number[] => info(n).shape;
  const has = (n: string): boolean => h.tensors.has(n);
  return { f32, f64, ints, shape, has };
}

function specOf(c: Case): BackboneSpec {
  const b = c.backbone;
  return b.mode === 'lora'
    ? { mode: 'lora', rank: b.rank, alpha: b.alpha, dropout: 0, targets: b.targets, trainEmbeddings: b.train_embeddings }
    : { mode: 'full', lastLayers: b.last_layers, trainEmbeddings: b.train_embeddings };
}

function transpose(data: ArrayLike<number>, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++) out[k * rows + r] = data[r * cols + k];
  return out;
}

/** Internal-layout gradient -> PyTorch layout (2-D linear / LoRA / head weights are held transposed; embeddings and vectors are not). */
function external(name: string, g: tf.Tensor): Float32Array {
  const data = g.dataSync() as Float32Array;
  if (g.shape.length !== 2 || name === 'model.embed_tokens.weight') return Float32Array.from(data);
  return transpose(data, g.shape[0], g.shape[1]);
}

interface Setup {
  decoder: Decoder;
  backbone: TrainableBackbone;
  heads: MedusaHeads;
  batch: Medusa2Batch;
  dispose(): void;
}

function setup(c: Case, L: ReturnType<typeof load>): Setup {
  const { decoder } = loadDecoder(path.join(FIX, c.model));
  const backbone = createTrainableBackbone(decoder, specOf(c), 123);
  const init: Record<string, { shape: number[]; data: Float32Array }> = {};
  for (const n of c.trainable) init[n] = { shape: L.shape(`init.${n}`), data: L.f32(`init.${n}`) };
  backbone.importTensors(init, c.file);
  const d = decoder.config.hiddenSize;
  const V = decoder.config.vocabSize;
  const heads = initHeads({ numHeads: c.num_heads, numLayers: 1, hiddenSize: d, vocabSize: V, lmHead: 'per_head' }, decoder.weights.lmHead, 0);
  const ht: Record<string, { shape: number[]; data: Float32Array }> = {};
  for (const row of headTensorTable(heads.shape)) ht[row.name] = { shape: row.shape, data: L.f32(`heads.${row.name}`) };
  importHeads(heads, ht, c.file);
  const n = c.batch * c.seq_len;
  const batch: Medusa2Batch = {
    ids: Int32Array.from(L.ints('input_ids')), B: c.batch, T: c.seq_len,
    attention: Uint8Array.from(L.ints('attention_mask')), lossMask: Uint8Array.from(L.ints('loss_mask')), lengths: c.lengths,
  };
  let teacherLogits: tf.Tensor3D | null = null;
  if (c.teacher === 'topk') batch.teacher = { topkIds: Int32Array.from(L.ints('teacher_topk_ids')), topkLogprobs: L.f32('teacher_topk_logprobs'), k: c.topk };
  if (c.teacher === 'frozen') {
    teacherLogits = tf.tensor3d(L.f32('teacher_logits'), [c.batch, c.seq_len, V]);
    batch.teacher = { logits: teacherLogits };
  }
  expect(batch.ids.length).toBe(n);
  return {
    decoder, backbone, heads, batch,
    dispose: () => {
      teacherLogits?.dispose();
      disposeHeads(heads);
      backbone.dispose();
      disposeWeights(decoder.weights);
    },
  };
}

/** One loss step of a golden case at its settings (dropout 0); `before` = live tensors before the step. */
function goldenStep(c: Case, trainBackbone: boolean) {
  const L = load(c);
  const s = setup(c, L);
  const before = tf.memory().numTensors;
  const r = medusa2LossAndGrads(s.decoder, s.backbone, s.heads, s.batch, { lmLoss: c.lm_loss, headsCoefficient: c.heads_coefficient, decay: c.decay, trainBackbone, dropoutSeed: 1 });
  return { L, s, before, r };
}

describe.each(['wasm', 'cpu'] as const)('MEDUSA-2 loss on %s', (backendName) => {
  beforeAll(async () => {
    await initBackend(backendName);
  });

  describe.each(CASES.map((c) => [c.name, c] as const))('%s', (_n, c) => {
    test('loss, LM term, per-head losses and every trainable gradient match PyTorch within 1e-5 relative; gradients for exactly the trainable params', () => {
      const { L, s, before, r } = goldenStep(c, true);
      const relLoss = Math.abs(r.loss - L.f64('loss')[0]) / Math.abs(L.f64('loss')[0]);
      expect(relLoss).toBeLessThan(1e-5);
      expect(Math.abs(r.lmLoss - L.f64('lm_loss')[0]) / Math.abs(L.f64('lm_loss')[0])).toBeLessThan(1e-5);
      expect(r.lmValid).toBe(L.ints('lm_valid')[0]);
      expect(r.heads.map((h) => h.valid)).toEqual(L.ints('head_valid'));
      expect(relErr(r.heads.map((h) => h.loss), L.f64('head_loss'))).toBeLessThan(1e-5);
      // gradients: exactly the trainable backbone tensors + the heads, by name
      expect([...r.grads.keys()].sort()).toEqual([...c.trainable, ...c.heads].sort());
      expect(s.backbone.params.map((p) => p.name).sort()).toEqual([...c.trainable].sort());
      const errs: Record<string, number> = {};
      for (const [name, g] of r.grads) {
        const e = relErr(external(name, g), L.f64(`grad.${name}`));
        errs[name] = e;
        g.dispose();
      }
      const worst = Object.entries(errs).sort((a, b) => b[1] - a[1])[0];
      console.log(`${backendName} ${c.name}: loss rel ${relLoss.toExponential(2)}, worst gradient ${worst[0]} rel ${worst[1].toExponential(2)}`);
      for (const [name, e] of Object.entries(errs)) expect([name, e < 1e-5]).toEqual([name, true]);
      expect(tf.memory().numTensors).toBe(before); // the step leaks nothing
      s.dispose();
    });

    test('heads warmup: no backbone gradients, no LM term, the heads gradients unchanged', () => {
      const { L, s, before, r } = goldenStep(c, false);
      expect(tf.memory().numTensors).toBe(before + r.grads.size);
      expect([...r.grads.keys()].sort()).toEqual([...c.heads].sort());
      expect(r.lmLoss).toBe(0);
      expect(r.lmValid).toBe(0);
      const headsOnly = L.f64('loss')[0] - L.f64('lm_loss')[0];
      expect(Math.abs(r.loss - headsOnly) / headsOnly).toBeLessThan(1e-5);
      for (const [name, g] of r.grads) {
        expect([name, relErr(external(name, g), L.f64(`grad.${name}`)) < 1e-5]).toEqual([name, true]);
        g.dispose();
      }
      s.dispose();
    });
  });

  test('frozen base tensors are bit-identical after optimizer steps; every trainable tensor moves', () => {
    for (const c of CASES.filter((x) => ['lora_ce', 'full_emb_ce_tied'].includes(x.name))) {
      const L = load(c);
      const s = setup(c, L);
      const w = s.decoder.weights;
      const frozen: tf.Tensor[] = [w.embed, w.finalNorm, w.lmHead, s.heads.baseLmHead];
      for (const l of w.layers) for (const t of [l.attnNorm, l.wqkv, l.bqkv, l.wo, l.bo, l.qNorm, l.kNorm, l.mlpNorm, l.wgu, l.wdown]) if (t) frozen.push(t);
      const snap = frozen.map((t) => new Uint32Array(new Float32Array(t.dataSync() as Float32Array).buffer));
      const all = [...s.backbone.params, ...headsParams(s.heads)];
      const start = all.map((p) => Float32Array.from(p.variable.dataSync() as Float32Array));
      const opt = new AdamW(adamwParamGroups(all, { weightDecay: 0.1, headsLrMultiplier: 4 }), { betas: [0.9, 0.999], eps: 1e-8 });
      for (let step = 0; step < 3; step++) {
        const r = medusa2LossAndGrads(s.decoder, s.backbone, s.heads, s.batch, { lmLoss: c.lm_loss, headsCoefficient: 0.2, decay: 0.8, trainBackbone: true, dropoutSeed: step });
        opt.step(r.grads, 1e-2);
        for (const g of r.grads.values()) g.dispose();
      }
      opt.dispose();
      frozen.forEach((t, i) => {
        const now = new Uint32Array(new Float32Array(t.dataSync() as Float32Array).buffer);
        expect(Buffer.from(now.buffer).equals(Buffer.from(snap[i].buffer))).toBe(true);
      });
      all.forEach((p, i) => expect([p.name, relErr(p.variable.dataSync() as Float32Array, start[i]) > 1e-4]).toEqual([p.name, true]));
      s.dispose();
    }
  });

  test('one row per autograd pass (maxRowsPerPass 1) gives the single pass\'s losses, counts and gradients, also in the heads warmup', () => {
    for (const c of CASES) {
      for (const trainBackbone of [true, false]) {
        const L = load(c);
        const s = setup(c, L);
        const o = { lmLoss: c.lm_loss, headsCoefficient: c.heads_coefficient, decay: c.decay, trainBackbone, dropoutSeed: 1 };
        const one = medusa2LossAndGrads(s.decoder, s.backbone, s.heads, s.batch, o);
        const before = tf.memory().numTensors;
        const split = medusa2LossAndGrads(s.decoder, s.backbone, s.heads, s.batch, { ...o, maxRowsPerPass: 1 });
        expect(tf.memory().numTensors - before).toBe(split.grads.size); // only the returned gradients stay
        const tag = `${c.name} trainBackbone ${trainBackbone}`;
        expect([tag, Math.abs(split.loss - one.loss) / Math.abs(one.loss) < 1e-5]).toEqual([tag, true]);
        expect([tag, Math.abs(split.lmLoss - one.lmLoss) <= 1e-5 * Math.abs(one.lmLoss)]).toEqual([tag, true]);
        expect(split.lmValid).toBe(one.lmValid);
        split.heads.forEach((h, k) => {
          expect(h.valid).toBe(one.heads[k].valid);
          expect(h.correct).toEqual(one.heads[k].correct);
          expect([tag, k, Math.abs(h.loss - one.heads[k].loss) / Math.abs(one.heads[k].loss) < 1e-5]).toEqual([tag, k, true]);
        });
        expect([...split.grads.keys()].sort()).toEqual([...one.grads.keys()].sort());
        for (const [name, g] of one.grads) expect([tag, name, relErr(split.grads.get(name)!.dataSync(), g.dataSync()) < 1e-5]).toEqual([tag, name, true]);
        for (const g of [...one.grads.values(), ...split.grads.values()]) g.dispose();
        s.dispose();
      }
    }
  });

  test('LoRA with B = 0 (fresh adapters on every target) gives exactly the base logits, with and without dropout', () => {
    const { decoder } = loadDecoder(path.join(FIX, 'llama'));
    const ids = Int32Array.from({ length: 2 * 12 }, (_, i) => 3 + ((i * 7) % 60));
    const mask = Uint8Array.from({ length: 24 }, (_, i) => (i >= 12 + 9 ? 0 : 1));
    const base = decoderForward(decoder, { ids, batch: 2, seqLen: 12, mask, logits: 'all' });
    const bb = createTrainableBackbone(decoder, { mode: 'lora', rank: 4, alpha: 8, dropout: 0.3, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'], trainEmbeddings: false }, 5);
    expect(bb.params).toHaveLength(2 * (2 * 7) + 2);
    for (const seed of [null, 17]) {
      const r = tf.tidy(() => {
        const o = decoderForward(decoder, { ids, batch: 2, seqLen: 12, mask, logits: 'all', hook: bb.hook(seed) });
        return { h: tf.keep(o.hidden), l: tf.keep(o.logits!) };
      });
      expect(Buffer.from((r.l.dataSync() as Float32Array).buffer).equals(Buffer.from((base.logits!.dataSync() as Float32Array).buffer))).toBe(true);
      expect(Buffer.from((r.h.dataSync() as Float32Array).buffer).equals(Buffer.from((base.hidden.dataSync() as Float32Array).buffer))).toBe(true);
      r.h.dispose();
      r.l.dispose();
    }
    // A exported in PEFT layout [r, in] with PEFT's bound 1/sqrt(in); B [out, r] zeros
    const ex = bb.exportTensors();
    const a = ex['base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'];
    expect(a.shape).toEqual([4, 48]);
    expect(Math.max(...a.data.map(Math.abs))).toBeLessThanOrEqual(1 / Math.sqrt(48));
    expect(Math.max(...a.data.map(Math.abs))).toBeGreaterThan(0.5 / Math.sqrt(48));
    expect(ex['base_model.model.lm_head.lora_B.weight'].shape).toEqual([64, 4]);
    expect(ex['base_model.model.lm_head.lora_B.weight'].data.every((x) => x === 0)).toBe(true);
    bb.dispose();
    base.hidden.dispose();
    base.logits!.dispose();
    disposeWeights(decoder.weights);
  });

  test('LoRA dropout acts on the adapter input only, seeded: same seed same output, another seed or none differs', () => {
    const c = CASES.find((x) => x.name === 'lora_ce')!;
    const L = load(c);
    const { decoder } = loadDecoder(path.join(FIX, c.model));
    const spec = { ...(specOf(c) as Extract<BackboneSpec, { mode: 'lora' }>), dropout: 0.5 };
    const bb = createTrainableBackbone(decoder, spec, 1);
    const init: Record<string, { shape: number[]; data: Float32Array }> = {};
    for (const n of c.trainable) init[n] = { shape: L.shape(`init.${n}`), data: L.f32(`init.${n}`) };
    bb.importTensors(init, c.file);
    const ids = Int32Array.from(L.ints('input_ids'));
    const run = (seed: number | null) => tf.tidy(() => decoderForward(decoder, { ids, batch: 2, seqLen: 12, mask: Uint8Array.from(L.ints('attention_mask')), logits: 'all', hook: bb.hook(seed) }).logits!.dataSync() as Float32Array);
    const a1 = run(3);
    const a2 = run(3);
    const b = run(4);
    const none = run(null);
    expect(Array.from(a1)).toEqual(Array.from(a2));
    expect(relErr(a1, b)).toBeGreaterThan(1e-4);
    expect(relErr(a1, none)).toBeGreaterThan(1e-4);
    bb.dispose();
    disposeWeights(decoder.weights);
  });

  test('gatherRows: the scatter-add gradient equals a one-hot matmul gradient, duplicates summed', () => {
    const table = tf.variable(tf.tensor2d(Float32Array.from({ length: 6 * 3 }, (_, i) => Math.sin(i + 1)), [6, 3]));
    const idx = Int32Array.from([4, 1, 4, 0, 4]);
    const dy = tf.tensor2d(Float32Array.from({ length: 5 * 3 }, (_, i) => Math.cos(i * 0.7)), [5, 3]);
    const { grads } = tf.variableGrads(() => tf.sum(tf.mul(gatherRows(table, idx), dy)), [table]);
    const onehot = tf.cast(tf.oneHot(tf.tensor1d(idx, 'int32'), 6), 'float32'); // [5, 6]
    const expected = tf.matMul(onehot, dy, true, false); // [6, 3]
    expect(relErr(grads[table.name].dataSync(), expected.dataSync())).toBeLessThan(1e-6);
    expect(Array.from(grads[table.name].dataSync().slice(6, 9))).toEqual([0, 0, 0]); // row 2 never gathered
    tf.dispose([table, dy, onehot, expected, grads[table.name]]);
  });
});

describe('heads schedule, parameter groups, spec checks', () => {
  beforeAll(async () => {
    await initBackend('cpu');
  });

  test('heads schedule values (constant, linear, sine, sine over the first r fraction)', () => {
    expect(headsSchedule('constant', 0, 100, 0.3)).toBe(1);
    expect(headsSchedule('linear', 0, 100, 0.3)).toBe(0);
    expect(headsSchedule('linear', 25, 100, 0.3)).toBeCloseTo(0.25, 12);
    expect(headsSchedule('linear', 100, 100, 0.3)).toBe(1);
    expect(headsSchedule('sine', 50, 100, 0.3)).toBeCloseTo(Math.SQRT1_2, 12);
    expect(headsSchedule('sine', 100, 100, 0.3)).toBeCloseTo(1, 12);
    expect(headsSchedule('sine_warmup', 15, 100, 0.3)).toBeCloseTo(Math.SQRT1_2, 12);
    expect(headsSchedule('sine_warmup', 0, 100, 0.3)).toBe(0);
    expect(headsSchedule('sine_warmup', 30, 100, 0.3)).toBe(1);
    expect(headsSchedule('sine_warmup', 80, 100, 0.3)).toBe(1);
    expectMedusa(() => headsSchedule('sine_warmup', 1, 10, 0), 'E_CONFIG', 'heads_schedule_fraction');
  });

  test('param groups: heads at lr x multiplier (equal to a plain AdamW at the scaled lr), no decay on biases and norms', () => {
    const { decoder } = loadDecoder(path.join(FIX, 'qwen2-tied'));
    const bb = createTrainableBackbone(decoder, { mode: 'full', lastLayers: 1, trainEmbeddings: false }, 0);
    const heads = initHeads({ numHeads: 2, numLayers: 1, hiddenSize: 32, vocabSize: 64, lmHead: 'per_head' }, decoder.weights.lmHead, 0);
    const groups = adamwParamGroups([...bb.params, ...headsParams(heads)], { weightDecay: 0.05, headsLrMultiplier: 4 });
    const by = new Map(groups.map((g) => [g.name, g]));
    expect(by.get('model.layers.1.self_attn.q_proj.bias')!.weightDecay).toBe(0);
    expect(by.get('model.layers.1.input_layernorm.weight')!.weightDecay).toBe(0);
    expect(by.get('model.norm.weight')!.weightDecay).toBe(0);
    expect(by.get('model.layers.1.mlp.up_proj.weight')!.weightDecay).toBe(0.05);
    expect(by.get('model.layers.1.mlp.up_proj.weight')!.lrScale).toBe(1);
    expect(by.get('0.0.linear.weight')!.lrScale).toBe(4);
    expect(by.get('0.0.linear.weight')!.weightDecay).toBe(0.05);
    expect(by.get('0.0.linear.bias')!.weightDecay).toBe(0);
    expect(groups.some((g) => g.name.startsWith('model.layers.0.'))).toBe(false);
    // lrScale 4 at lr equals lrScale 1 at 4 lr, bit for bit (weight decay included)
    const mk = () => tf.variable(tf.tensor1d([0.5, -1.25, 2]));
    const p1 = mk();
    const p2 = mk();
    const o1 = new AdamW([{ name: 'p', value: p1, weightDecay: 0.1, lrScale: 4 }], { betas: [0.9, 0.99], eps: 1e-8 });
    const o2 = new AdamW([{ name: 'p', value: p2, weightDecay: 0.1 }], { betas: [0.9, 0.99], eps: 1e-8 });
    for (let i = 0; i < 3; i++) {
      const g = tf.tensor1d([0.3 * (i + 1), -0.2, 0.05]);
      o1.step(new Map([['p', g]]), 1e-3);
      o2.step(new Map([['p', g]]), 4e-3);
      g.dispose();
    }
    expect(Array.from(p1.dataSync())).toEqual(Array.from(p2.dataSync()));
    expect(p1.dataSync()[0]).not.toBe(0.5);
    expectMedusa(() => new AdamW([{ name: 'p', value: p1, weightDecay: 0, lrScale: -1 }], { betas: [0.9, 0.99], eps: 1e-8 }), 'E_CONFIG', 'lr multiplier');
    tf.dispose([p1, p2]);
    o1.dispose();
    o2.dispose();
    disposeHeads(heads);
    bb.dispose();
    disposeWeights(decoder.weights);
  });

  test('bad backbone specs and bad imports fail naming the key / tensor', () => {
    const { decoder } = loadDecoder(path.join(FIX, 'llama'));
    expectMedusa(() => createTrainableBackbone(decoder, { mode: 'lora', rank: 0, alpha: 8, dropout: 0, targets: ['q_proj'], trainEmbeddings: false }, 0), 'E_CONFIG', 'lora.rank');
    expectMedusa(() => createTrainableBackbone(decoder, { mode: 'lora', rank: 2, alpha: 8, dropout: 0, targets: ['qproj'], trainEmbeddings: false }, 0), 'E_CONFIG', 'qproj');
    expectMedusa(() => createTrainableBackbone(decoder, { mode: 'full', lastLayers: 3, trainEmbeddings: false }, 0), 'E_CONFIG', 'full_last_layers');
    const bb = createTrainableBackbone(decoder, { mode: 'lora', rank: 2, alpha: 8, dropout: 0, targets: ['q_proj'], trainEmbeddings: false }, 0);
    const ex = bb.exportTensors();
    const name = 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight';
    expectMedusa(() => bb.importTensors({ ...ex, [name]: { shape: [2, 32], data: new Float32Array(64) } }, 'ckpt/backbone.safetensors'), 'E_MODEL', 'ckpt/backbone.safetensors', name);
    // round trip
    ex[name] = { shape: [32, 2], data: Float32Array.from({ length: 64 }, (_, i) => i / 64) };
    bb.importTensors(ex, 'x');
    expect(Array.from(bb.exportTensors()[name].data)).toEqual(Array.from(ex[name].data));
    bb.dispose();
    disposeWeights(decoder.weights);
  });
});
