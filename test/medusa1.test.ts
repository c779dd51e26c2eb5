/**
 * MEDUSA-1 training end to end: heads learn a structured dataset far above chance, an interrupted
 * and resumed run ends bit-identical to an uninterrupted one, a diverging run stops with E_TRAIN and
 * keeps its last good checkpoint, and a dataset from another model is refused.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { openModelFolder } from '../src/model/load.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { DatasetWriter, type DistilledRecord } from '../src/data/dataset.js';
import { loadTrainConfig } from '../src/config.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { listCheckpoints } from '../src/train/checkpoint.js';
import { runEval } from '../src/recipes/eval.js';
import { validateChoices } from '../src/eval/tree.js';
import { Rng } from '../src/model/sampling.js';
import { readHeader, readTensor, writeSafetensors } from '../src/io/safetensors.js';

let tmp: string;
let model: string;
let dataset: string;
const CYCLE = 37; // tokens 5..41 follow a fixed permutation: the token k+2 ahead is a function of the current one
const next = (t: number): number => 5 + (((t - 5) * 11 + 7) % CYCLE);

/** A distilled-format dataset whose assistant tokens follow a deterministic cycle from a random start. */
async function structuredDataset(dir: string, n: number, meta: Record<string, string>): Promise<void> {
  const rng = new Rng(42);
  const records: DistilledRecord[] = [];
  for (let i = 0; i < n; i++) {
    const prompt = [3, 100 + (i % 50), 200, 4, 3, 300]; // stands in for a rendered user turn
    const len = 40 + (i % 17);
    const gen: number[] = [5 + Math.floor(rng.next() * CYCLE)];
    while (gen.length < len) gen.push(next(gen[gen.length - 1]));
    const ids = [...prompt, ...gen];
    records.push({
      id: `s${i}`, sourceIndex: i, inputIds: ids, lossMask: [...prompt.map(() => 0), ...gen.map(() => 1)],
      turnRoles: ['user', 'assistant'], turnStarts: [0, prompt.length], turnEnds: [prompt.length, ids.length], truncated: false,
    });
  }
  const w = DatasetWriter.open(dir, { meta, topk: 0, mode: 'new' });
  w.appendShard(records, [], [], n);
  w.finish({});
}

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-m1-'));
  model = path.join(tmp, 'model');
  writeTinyModel(model, { seed: 2 });
  await initBackend('wasm');
  const meta = { base_model_config_sha256: openModelFolder(model).configHash, tokenizer_sha256: (await loadTokenizer(model)).hash };
  dataset = path.join(tmp, 'structured');
  await structuredDataset(dataset, 48, meta);
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const quiet = (): void => {};
function config(name: string, ...sets: string[]) {
  return loadTrainConfig(null, [`model.path=${model}`, `data.train=${JSON.stringify([dataset])}`, `run.dir=${tmp}`, `run.name=${name}`, 'model.backend=wasm', 'data.max_seq_len=64', ...sets]).config;
}

test('heads learn a structured dataset: head-0 top-1 far above chance', async () => {
  const s = await runMedusa1({ config: config('learn', 'train.lr=1e-2', 'train.epochs=12', 'data.batch_size=8', 'train.cache_hidden_states=memory', 'eval.every=1000', 'checkpoint.every=1000'), commandLine: ['test'], resume: false, log: quiet });
  const h = s.finalEval!.heads;
  // chance is about 1/37 among the cycle's tokens (1/512 over the vocabulary)
  expect(h[0].acc[0]).toBeGreaterThan(0.5);
  expect(h[1].acc[0]).toBeGreaterThan(0.3);
  const lines = fs.readFileSync(path.join(tmp, 'learn', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  const train = lines.filter((l) => l.type === 'train');
  expect(train.length).toBe(s.steps);
  expect(train[train.length - 1].loss).toBeLessThan(train[0].loss);
  expect(train[0].heads).toHaveLength(3);
  expect(fs.existsSync(path.join(tmp, 'learn', 'config.yaml'))).toBe(true);
  expect(fs.readFileSync(path.join(tmp, 'learn', 'command.txt'), 'utf8')).toContain('test');
}, 300_000);

test.each(['onnx', 'tfjs'])('%s engine: interrupted at step 3 and resumed, final heads bit-identical to an uninterrupted run', async (engine) => {
  const sets = ['train.max_steps=6', 'checkpoint.every=2', 'train.grad_accum=2', 'data.batch_size=4', 'eval.every=3', 'train.weight_decay=0.01', `model.engine=${engine}`];
  const logs: string[] = [];
  const whole = await runMedusa1({ config: config(`whole-${engine}`, ...sets), commandLine: ['test'], resume: false, log: (l) => logs.push(l) });
  expect(logs.join('\n')).toContain(`engines: backbone ${engine}; heads ${engine}`);
  expect(whole.steps).toBe(6);
  let polls = 0;
  const part = await runMedusa1({ config: config(`part-${engine}`, ...sets), commandLine: ['test'], resume: false, log: quiet, shouldStop: () => ++polls >= 3 });
  expect(part.stopped).toBe(true);
  expect(part.steps).toBe(3);
  expect(listCheckpoints(path.join(tmp, `part-${engine}`)).map((c) => c.step)).toEqual([2, 3]);
  const resumed = await runMedusa1({ config: config(`part-${engine}`, ...sets), commandLine: ['test'], resume: true, log: quiet });
  expect(resumed.steps).toBe(6);
  const a = fs.readFileSync(path.join(whole.checkpoint!, 'heads.safetensors'));
  const b = fs.readFileSync(path.join(resumed.checkpoint!, 'heads.safetensors'));
  expect(Buffer.compare(a, b)).toBe(0);
  expect(Buffer.compare(fs.readFileSync(path.join(whole.checkpoint!, 'optimizer.safetensors')), fs.readFileSync(path.join(resumed.checkpoint!, 'optimizer.safetensors')))).toBe(0);
  // metrics of the resumed run continue without duplicated steps
  const steps = fs.readFileSync(path.join(tmp, `part-${engine}`, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'train').map((l) => l.step);
  expect(steps).toEqual([1, 2, 3, 4, 5, 6]);
  // a second run under the same name without --resume is refused
  await expect(runMedusa1({ config: config(`part-${engine}`, ...sets), commandLine: ['test'], resume: false, log: quiet })).rejects.toMatchObject({ code: 'E_USAGE' });
  // resuming with different training settings is refused
  await expect(runMedusa1({ config: config(`part-${engine}`, ...sets, 'train.lr=5e-3'), commandLine: ['test'], resume: true, log: quiet })).rejects.toMatchObject({ code: 'E_CONFIG' });
}, 300_000);

test('a NaN loss stops the run with E_TRAIN; no checkpoint is written after it', async () => {
  const sets = ['checkpoint.every=1', 'train.max_steps=5'];
  let polls = 0;
  await runMedusa1({ config: config('nan', ...sets), commandLine: ['test'], resume: false, log: quiet, shouldStop: () => ++polls >= 2 });
  const cks = listCheckpoints(path.join(tmp, 'nan'));
  expect(cks.map((c) => c.step)).toEqual([1, 2]);
  // poison one weight of the latest checkpoint, as an overflow would
  const file = path.join(cks[1].path, 'heads.safetensors');
  const h = readHeader(file);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  for (const [name, info] of h.tensors) tensors[name] = { dtype: 'F32', shape: info.shape, data: readTensor(info).data as Float32Array };
  tensors['0.0.linear.weight'].data[3] = NaN;
  writeSafetensors(file, tensors);
  let err: unknown;
  try {
    await runMedusa1({ config: config('nan', ...sets), commandLine: ['test'], resume: true, log: quiet });
  } catch (e) {
    err = e;
  }
  expect(err).toMatchObject({ code: 'E_TRAIN', message: expect.stringContaining('at step 3') });
  expect((err as Error).message).toContain(cks[1].path);
  expect(listCheckpoints(path.join(tmp, 'nan')).map((c) => c.step)).toEqual([1, 2]);
});

test('a dataset distilled from another model is refused', async () => {
  const other = path.join(tmp, 'other');
  await structuredDataset(other, 4, { base_model_config_sha256: 'f'.repeat(64), tokenizer_sha256: (await loadTokenizer(model)).hash });
  const cfg = loadTrainConfig(null, [`model.path=${model}`, `data.train=${JSON.stringify([other])}`, `run.dir=${tmp}`, 'run.name=refused', 'model.backend=wasm']).config;
  await expect(runMedusa1({ config: cfg, commandLine: ['test'], resume: false, log: quiet })).rejects.toMatchObject({ code: 'E_CONFIG', message: expect.stringContaining('another model') });
});

test('eval: per-head accuracy of the trained run, trees per budget, medusa_choices.json', async () => {
  const r = await runEval({ run: path.join(tmp, 'learn'), data: [], budgets: [2, 4, 8], log: quiet });
  expect(r.heads).toHaveLength(3);
  expect(r.heads[0].topk[0]).toBeGreaterThan(0.5);
  for (const h of r.heads) for (let j = 1; j < 10; j++) expect(h.topk[j]).toBeGreaterThanOrEqual(h.topk[j - 1]);
  const tps = r.trees.map((t) => t.expectedTokensPerStep);
  expect(tps[1]).toBeGreaterThanOrEqual(tps[0]);
  expect(tps[2]).toBeGreaterThanOrEqual(tps[1]);
  expect(tps[0]).toBeGreaterThan(1.5);
  const choices = JSON.parse(fs.readFileSync(path.join(tmp, 'learn', 'medusa_choices.json'), 'utf8'));
  expect(choices).toEqual(r.chosen.choices);
  expect(() => validateChoices(choices, { numHeads: 3, topk: 10, where: 'medusa_choices.json' })).not.toThrow();
  // the expected value is the sum over nodes of the product of per-rank accuracies along the path
  const expected = 1 + choices.reduce((acc: number, path: number[]) => acc + path.reduce((p: number, rank: number, depth: number) => p * r.perRank[depth][rank], 1), 0);
  expect(r.chosen.expectedTokensPerStep).toBeCloseTo(expected, 10);
});
