/**
 * MEDUSA-2 training end to end on the project's structured model (assets/structured-model) and data
 * self-distilled from it (greedy, with the teacher's top-k):
 *   - gradients reach exactly the trainable tensors: frozen tensors bit-identical, trained ones changed (LoRA, full);
 *   - an interrupted and resumed run ends byte-identical to an uninterrupted one;
 *   - MEDUSA-2 reaches a higher head-0 accuracy than MEDUSA-1 at the same step budget while the gate's KL stays
 *     under its threshold (the key claim);
 *   - a deliberately high learning rate fails the gate (action fail): E_TRAIN after the checkpoint and summary.json;
 *   - `export --format hf` of the run loads and its logits equal the adapter model's.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { structuredModelPath } from '../src/model/embedded.js';
import { trainingSamples } from '../src/model/structured-corpus.js';
import { runDistill } from '../src/recipes/distill.js';
import { loadTrainConfig } from '../src/config.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { runMedusa2 } from '../src/recipes/medusa2.js';
import { readHeader, readTensor, writeSafetensors } from '../src/io/safetensors.js';
import { MedusaError } from '../src/errors.js';
import { main } from '../src/cli.js';
import * as tf from '@tensorflow/tfjs';
import { runExport } from '../src/recipes/export.js';
import { latestCheckpoint, listCheckpoints, loadCheckpoint } from '../src/train/checkpoint.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward } from '../src/model/decoder.js';
import { disposeWeights } from '../src/model/weights.js';
import { createTrainableBackbone } from '../src/train/trainable-backbone.js';

let tmp: string;
let model: string;
let dataset: string;
/** The same kind of data without the teacher's top-k columns. */
let plainData: string;
const quiet = (): void => {};

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-m2-'));
  model = structuredModelPath();
  await initBackend('wasm');
  const prompts = path.join(tmp, 'prompts.jsonl');
  fs.writeFileSync(prompts, trainingSamples(64, 77).map((s) => JSON.stringify({ prompt: s.prompt })).join('\n') + '\n');
  dataset = path.join(tmp, 'data');
  await runDistill({
    inputs: [prompts], format: 'auto', out: dataset, model, engine: 'local', urls: [], inFlight: 1, timeoutMs: 60_000, retries: 0, backoffMs: 0,
    sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: 64, maxTotalTokens: 160, batchSize: 16, backboneEngine: 'auto',
    shardSize: 64, topk: 8, overwrite: false, log: quiet,
  });
  plainData = path.join(tmp, 'plain');
  await runDistill({
    inputs: [prompts], format: 'auto', out: plainData, model, engine: 'local', urls: [], inFlight: 1, timeoutMs: 60_000, retries: 0, backoffMs: 0,
    sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: 16, maxTotalTokens: 160, batchSize: 16, backboneEngine: 'auto',
    shardSize: 64, topk: 0, limit: 4, overwrite: false, log: quiet,
  });
}, 300_000);
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function m2config(name: string, ...sets: string[]) {
  return loadTrainConfig(null, [
    'recipe=medusa2', `model.path=${model}`, `data.train=${JSON.stringify([dataset])}`, `run.dir=${tmp}`, `run.name=${name}`, 'model.backend=wasm',
    'data.max_seq_len=128', 'data.batch_size=8', 'data.eval_fraction=0.125', 'heads.num_heads=2', ...sets,
  ]).config;
}

/** Every tensor of a safetensors file, by name, as raw bytes. */
function tensorBytes(file: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const [name, info] of readHeader(file).tensors) {
    const t = readTensor(info).data as Float32Array;
    out.set(name, Buffer.from(t.buffer, t.byteOffset, t.byteLength));
  }
  return out;
}


const HF = (i: number, m: string): string => `model.layers.${i}.${m}`;
const ATTN = (m: string): string => `self_attn.${m}`;

/** The latest checkpoint's backbone tensors (raw bytes by name). */
function backboneOf(runDir: string): Map<string, Buffer> {
  const cks = listCheckpoints(runDir);
  return tensorBytes(path.join(cks[cks.length - 1].path, 'backbone.safetensors'));
}

test('LoRA: gradients reach exactly the adapters of the configured targets; heads warmup leaves them at their init', async () => {
  const sets = ['medusa2.backbone.mode=lora', 'medusa2.backbone.lora.targets=[q_proj,v_proj]', 'train.max_steps=3', 'checkpoint.every=3', 'eval.every=100', 'data.eval_fraction=0'];
  // heads warmup over every step: the backbone never trains, its adapters stay exactly at their initialisation
  await runMedusa2({ config: m2config('lora-frozen', ...sets, 'medusa2.heads_warmup_steps=3'), commandLine: ['test'], resume: false, log: quiet });
  await runMedusa2({ config: m2config('lora-joint', ...sets, 'medusa2.heads_warmup_steps=1'), commandLine: ['test'], resume: false, log: quiet });
  const init = backboneOf(path.join(tmp, 'lora-frozen'));
  const tuned = backboneOf(path.join(tmp, 'lora-joint'));
  const expected = [0, 1, 2, 3].flatMap((i) => ['q_proj', 'v_proj'].flatMap((m) => ['lora_A', 'lora_B'].map((ab) => `base_model.model.${HF(i, ATTN(m))}.${ab}.weight`))).sort();
  expect([...init.keys()].sort()).toEqual(expected);
  expect([...tuned.keys()].sort()).toEqual(expected);
  for (const name of expected) {
    const t0 = new Float32Array(new Uint8Array(init.get(name)!).buffer);
    if (name.includes('lora_B')) expect(t0.every((x) => x === 0)).toBe(true); // B starts at zero: step 0 is the base model
    expect(Buffer.compare(init.get(name)!, tuned.get(name)!)).not.toBe(0); // every adapter trained
  }
  const m = fs.readFileSync(path.join(tmp, 'lora-joint', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'train');
  expect(m.map((l) => l.phase)).toEqual(['heads_warmup', 'joint', 'joint']);
  expect(m[0].lm_loss).toBe(0);
  // first joint step: B is still zero, so the student is the original model and KL(teacher || student) is ~0
  // (float rounding between the distill engine and the training forward)
  expect(Math.abs(m[1].lm_loss)).toBeLessThan(1e-4);
  for (const l of m) expect(Object.keys(l)).toEqual(expect.arrayContaining(['loss', 'lm_loss', 'heads', 'lambda', 'lr', 'heads_lr', 'grad_norm']));
  // lambda: lambda_0 (0.2) during the heads warmup, then the sine schedule over the 2 joint steps: sin(pi/2 x j/2), j = 0, 1
  expect(m.map((l) => l.lambda)).toEqual([0.2, 0, expect.closeTo(0.2 * Math.sin(Math.PI / 4), 12)]);
  expect(m.every((l) => Math.abs(l.heads_lr - 4 * l.lr) < 1e-15)).toBe(true);
}, 300_000);

test('export --format hf of the LoRA run: reloads, its logits equal the adapter model, untouched tensors bit-identical to the base', async () => {
  const runDir = path.join(tmp, 'lora-joint');
  const out = path.join(tmp, 'lora-joint-hf');
  const r = await runExport({ run: runDir, format: 'hf', out, dtype: 'f32', force: false, log: quiet });
  expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
  // the adapter model: the base decoder + the checkpoint's adapters through the trainable backbone's hook
  const ck = loadCheckpoint(latestCheckpoint(runDir)!);
  const { decoder: base } = loadDecoder(model);
  const { decoder: merged } = loadDecoder(out);
  const adapters = createTrainableBackbone(base, { mode: 'lora', rank: 8, alpha: 16, dropout: 0, targets: ['q_proj', 'v_proj'], trainEmbeddings: false }, 0);
  try {
    adapters.importTensors(ck.backbone!, 'test');
    const ids = Int32Array.from({ length: 2 * 24 }, (_, i) => 5 + ((i * 37) % 900));
    const [want, got] = tf.tidy(() => [
      decoderForward(base, { ids, batch: 2, seqLen: 24, logits: 'all', hook: adapters.hook(null) }).logits!.dataSync() as Float32Array,
      decoderForward(merged, { ids, batch: 2, seqLen: 24, logits: 'all' }).logits!.dataSync() as Float32Array,
    ]);
    const plain = tf.tidy(() => decoderForward(base, { ids, batch: 2, seqLen: 24, logits: 'all' }).logits!.dataSync() as Float32Array);
    let diff = 0;
    let moved = 0;
    let scale = 0;
    for (let i = 0; i < want.length; i++) {
      diff = Math.max(diff, Math.abs(want[i] - got[i]));
      moved = Math.max(moved, Math.abs(want[i] - plain[i]));
      scale = Math.max(scale, Math.abs(want[i]));
    }
    // equal to float32 rounding: W x + (alpha/r) B A x and (W + (alpha/r) B A) x round differently (|logits| up to ~20 here)
    expect(diff).toBeLessThan(1e-5 * Math.max(1, scale));
    expect(moved).toBeGreaterThan(1e-4); // the adapters did change the model
  } finally {
    adapters.dispose();
    disposeWeights(base.weights);
    disposeWeights(merged.weights);
  }
  // every tensor the config did not train is the base's, bit for bit (F16 on disk, exactly representable in F32)
  const baseT = readHeader(path.join(model, 'model.safetensors')).tensors;
  const outT = readHeader(path.join(out, 'model.safetensors')).tensors;
  expect([...outT.keys()].sort()).toEqual([...baseT.keys()].sort());
  for (const [name, info] of outT) {
    const b = readTensor(baseT.get(name)!).data as Float32Array;
    const o = readTensor(info).data as Float32Array;
    const trained = /\.(q_proj|v_proj)\.weight$/.test(name);
    expect([name, o.some((x, i) => x !== b[i])]).toEqual([name, trained]);
  }
}, 300_000);

test('kd with the frozen teacher: the first joint step (B = 0) has KL ~0, later steps move away from the original', async () => {
  await runMedusa2({ config: m2config('frozen-teacher', 'loss.teacher=frozen', 'train.max_steps=3', 'train.lr=1e-2', 'checkpoint.every=100', 'eval.every=100', 'data.eval_fraction=0'), commandLine: ['test'], resume: false, log: quiet });
  const m = fs.readFileSync(path.join(tmp, 'frozen-teacher', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'train');
  expect(Math.abs(m[0].lm_loss)).toBeLessThan(1e-6); // the teacher is the same decoder without the adapters: the same logits
  expect(m[2].lm_loss).toBeGreaterThan(1e-6);
}, 300_000);

test('full last layer: exactly the last layer and the final norm train, each of its tensors changes', async () => {
  const s = await runMedusa2({
    config: m2config('full', 'medusa2.backbone.mode=full', 'medusa2.backbone.full_last_layers=1', 'train.max_steps=2', 'checkpoint.every=2', 'eval.every=100', 'data.eval_fraction=0'),
    commandLine: ['test'], resume: false, log: quiet,
  });
  expect(s.backboneMode).toBe('full');
  const tuned = backboneOf(path.join(tmp, 'full'));
  const last = ['input_layernorm.weight', 'post_attention_layernorm.weight', ATTN('q_proj.weight'), ATTN('k_proj.weight'), ATTN('v_proj.weight'), ATTN('o_proj.weight'), 'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight'].map((m) => HF(3, m));
  expect([...tuned.keys()].sort()).toEqual([...last, 'model.norm.weight'].sort());
  const base = readHeader(path.join(model, 'model.safetensors')).tensors;
  for (const [name, bytes] of tuned) {
    const b = readTensor(base.get(name)!).data as Float32Array; // the base (F16 on disk) as float32
    const t = new Float32Array(new Uint8Array(bytes).buffer);
    expect(t.length).toBe(b.length);
    expect(t.some((x, i) => x !== b[i])).toBe(true);
  }
}, 300_000);

test('interrupted and resumed: checkpoint tensors byte-identical to an uninterrupted run', async () => {
  const sets = ['train.max_steps=5', 'checkpoint.every=2', 'train.grad_accum=2', 'data.batch_size=4', 'eval.every=3', 'train.weight_decay=0.01', 'medusa2.heads_warmup_steps=1',
    'medusa2.backbone.lora.dropout=0.1'];
  const whole = await runMedusa2({ config: m2config('whole', ...sets), commandLine: ['test'], resume: false, log: quiet });
  expect(whole.steps).toBe(5);
  let polls = 0;
  const part = await runMedusa2({ config: m2config('part', ...sets), commandLine: ['test'], resume: false, log: quiet, shouldStop: () => ++polls >= 3 });
  expect(part.stopped).toBe(true);
  expect(listCheckpoints(path.join(tmp, 'part')).map((c) => c.step)).toEqual([2, 3]);
  const resumed = await runMedusa2({ config: m2config('part', ...sets), commandLine: ['test'], resume: true, log: quiet });
  expect(resumed.steps).toBe(5);
  for (const f of ['heads.safetensors', 'backbone.safetensors', 'optimizer.safetensors']) {
    expect(Buffer.compare(fs.readFileSync(path.join(whole.checkpoint!, f)), fs.readFileSync(path.join(resumed.checkpoint!, f)))).toBe(0);
  }
  const steps = fs.readFileSync(path.join(tmp, 'part', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'train').map((l) => l.step);
  expect(steps).toEqual([1, 2, 3, 4, 5]);
  const st = JSON.parse(fs.readFileSync(path.join(resumed.checkpoint!, 'state.json'), 'utf8')).state;
  expect(st).toMatchObject({ recipe: 'medusa2', backbone_mode: 'lora', lora: { rank: 8, alpha: 16, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] } });
}, 300_000);

test('MEDUSA-2 reaches a higher head-0 accuracy than MEDUSA-1 at the same step budget, and the gate KL stays under its threshold', async () => {
  // Same data, eval split, heads shape and initialisation (fresh heads from the same seed), 20 steps of batch 8, and the
  // same heads learning rate (1e-2: MEDUSA-2's train.lr 2.5e-3 x heads_lr_multiplier 4). MEDUSA-2 also trains LoRA
  // adapters on every linear layer of the backbone with KD on the teacher's stored top-8, heads term constant at 1.
  const common = ['data.batch_size=8', 'data.eval_fraction=0.125', 'heads.num_heads=2', 'train.max_steps=20', 'train.warmup_ratio=0.1', 'checkpoint.every=1000', 'eval.every=1000'];
  const m1 = await runMedusa1({
    config: loadTrainConfig(null, [`model.path=${model}`, `data.train=${JSON.stringify([dataset])}`, `run.dir=${tmp}`, 'run.name=key-m1', 'model.backend=wasm', 'model.engine=tfjs', 'data.max_seq_len=128', 'train.lr=1e-2', ...common]).config,
    commandLine: ['test'], resume: false, log: quiet,
  });
  const m2 = await runMedusa2({
    config: m2config('key-m2', ...common, 'train.lr=2.5e-3', 'medusa2.heads_lr_multiplier=4', 'loss.heads_coefficient=1', 'loss.heads_schedule=constant', 'loss.lm_loss=kd', 'loss.teacher=topk',
      'medusa2.backbone.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]', 'medusa2.gate.action=warn'),
    commandLine: ['test'], resume: false, log: quiet,
  });
  const acc1 = m1.finalEval!.heads[0].acc[0];
  const acc2 = m2.finalEval!.heads[0].acc[0];
  expect(m2.finalEval!.heads[0].valid).toBe(m1.finalEval!.heads[0].valid); // the same held-out positions
  expect(acc2).toBeGreaterThan(acc1);
  expect(m2.gate!.meanKl).toBeLessThan(0.05); // medusa2.gate.max_kl's default
  expect(m2.gate!.status).toBe('pass');
  // the figures are in the run's summary and metrics
  const summary = JSON.parse(fs.readFileSync(path.join(tmp, 'key-m2', 'summary.json'), 'utf8'));
  expect(summary.gate.meanKl).toBe(m2.gate!.meanKl);
  const gates = fs.readFileSync(path.join(tmp, 'key-m2', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'gate');
  expect(gates.map((g) => g.step)).toEqual([20]);
  console.log(`head-0 top-1 on held-out data after 20 steps: MEDUSA-1 ${acc1.toFixed(3)}, MEDUSA-2 ${acc2.toFixed(3)}; gate KL ${m2.gate!.meanKl.toExponential(2)}, agreement ${m2.gate!.agreement.toFixed(3)}, ppl ratio ${m2.gate!.pplRatio.toFixed(4)}`);
}, 600_000);

test('heads from a MEDUSA-1 run (medusa2.init_heads): evaluated on the still-frozen backbone they score what MEDUSA-1 scored; a shape mismatch is refused', async () => {
  const m1 = JSON.parse(fs.readFileSync(path.join(tmp, 'key-m1', 'summary.json'), 'utf8'));
  const sets = ['data.batch_size=8', 'data.eval_fraction=0.125', `medusa2.init_heads=${path.join(tmp, 'key-m1')}`, 'train.max_steps=1', 'medusa2.heads_warmup_steps=1',
    'train.lr=1e-12', 'medusa2.heads_lr_multiplier=1', 'train.warmup_ratio=0'];
  const logs: string[] = [];
  const s = await runMedusa2({ config: m2config('from-m1', ...sets), commandLine: ['test'], resume: false, log: (l) => logs.push(l) });
  expect(logs.join('\n')).toContain('heads: from checkpoint');
  expect(s.finalEval!.heads.map((h) => h.acc[0])).toEqual(m1.finalEval.heads.map((h: { acc: number[] }) => h.acc[0]));
  await expect(runMedusa2({ config: m2config('from-m1-bad', ...sets, 'heads.num_heads=3'), commandLine: ['test'], resume: false, log: quiet }))
    .rejects.toMatchObject({ code: 'E_CONFIG', message: expect.stringContaining('medusa2.init_heads') });
}, 300_000);

test('a NaN loss stops the run with E_TRAIN and keeps the last good checkpoint', async () => {
  const sets = ['checkpoint.every=1', 'train.max_steps=4', 'data.eval_fraction=0', 'medusa2.backbone.lora.targets=[q_proj]'];
  let polls = 0;
  await runMedusa2({ config: m2config('nan', ...sets), commandLine: ['test'], resume: false, log: quiet, shouldStop: () => ++polls >= 2 });
  const cks = listCheckpoints(path.join(tmp, 'nan'));
  expect(cks.map((c) => c.step)).toEqual([1, 2]);
  // poison one adapter weight of the latest checkpoint, as an overflow would
  const file = path.join(cks[1].path, 'backbone.safetensors');
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [name, info] of readHeader(file).tensors) tensors[name] = { dtype: 'F32', shape: info.shape, data: readTensor(info).data as Float32Array };
  tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'].data[0] = NaN;
  writeSafetensors(file, tensors);
  const err = await runMedusa2({ config: m2config('nan', ...sets), commandLine: ['test'], resume: true, log: quiet }).catch((e: unknown) => e);
  expect(err).toMatchObject({ code: 'E_TRAIN', message: expect.stringContaining('at step 3') });
  expect((err as Error).message).toContain(cks[1].path);
  expect(listCheckpoints(path.join(tmp, 'nan')).map((c) => c.step)).toEqual([1, 2]);
}, 300_000);

test('a deliberately high learning rate fails the gate (action fail): E_TRAIN after the checkpoint and summary.json', async () => {
  const sets = ['medusa2.backbone.mode=full', 'medusa2.backbone.full_last_layers=2', 'train.lr=3e-2', 'train.max_steps=3', 'checkpoint.every=100', 'eval.every=100',
    'loss.lm_loss=ce', 'medusa2.gate.action=fail'];
  // through the CLI: E_TRAIN (exit code), and the run report is still written (it shows why the run failed)
  const base = ['recipe=medusa2', `model.path=${model}`, `data.train=${JSON.stringify([dataset])}`, `run.dir=${tmp}`, 'run.name=damaged', 'model.backend=wasm',
    'data.max_seq_len=128', 'data.batch_size=8', 'data.eval_fraction=0.125', 'heads.num_heads=2', ...sets];
  const out: string[] = [];
  const code = await main(['train', '--no-progress', '--no-plan', ...base.flatMap((kv) => ['--set', kv])], { out: (l) => out.push(l), err: (l) => out.push(l) });
  expect(code).toBe(new MedusaError('E_TRAIN', '').exitCode);
  expect(out.join('\n')).toMatch(/gate/);
  expect(out.join('\n')).toContain(`report: ${path.join(tmp, 'damaged', 'report.html')}`);
  const html = fs.readFileSync(path.join(tmp, 'damaged', 'report.html'), 'utf8');
  const embedded = /<script type="application\/json" id="summary-data">(.*?)<\/script>/s.exec(html);
  expect(JSON.parse(embedded![1]).gate).toMatchObject({ status: 'fail' });
  const summary = JSON.parse(fs.readFileSync(path.join(tmp, 'damaged', 'summary.json'), 'utf8'));
  expect(summary.steps).toBe(3);
  expect(summary.gate.status).toBe('fail');
  expect(summary.gate.meanKl).toBeGreaterThan(0.05);
  expect(listCheckpoints(path.join(tmp, 'damaged')).map((c) => c.step)).toEqual([3]);
  const gates = fs.readFileSync(path.join(tmp, 'damaged', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'gate');
  expect(gates).toHaveLength(1);
  expect(gates[0]).toMatchObject({ step: 3, status: 'fail' });
  // the same run with action warn finishes, with a warning line
  const logs: string[] = [];
  const s = await runMedusa2({ config: m2config('damaged-warn', ...sets, 'medusa2.gate.action=warn'), commandLine: ['test'], resume: false, log: (l) => logs.push(l) });
  expect(s.gate!.status).toBe('warn');
  expect(logs.join('\n')).toContain('warning: base-quality gate');
}, 300_000);

test('kd with teacher topk on a dataset without teacher columns is refused, naming the dataset and distill --teacher-topk', async () => {
  const c = loadTrainConfig(null, ['recipe=medusa2', `model.path=${model}`, `data.train=${JSON.stringify([plainData])}`, `run.dir=${tmp}`, 'run.name=no-topk', 'model.backend=wasm']).config;
  const err = await runMedusa2({ config: c, commandLine: ['test'], resume: false, log: quiet }).catch((e: unknown) => e);
  expect(err).toMatchObject({ code: 'E_CONFIG' });
  expect((err as Error).message).toContain(plainData);
  expect((err as Error).message).toContain('--teacher-topk');
});
