/**
 * `plan`: its memory and time estimates for configs/tiny.yaml against a real short training run of the
 * same config, measured from outside (a fresh child process each, like the CLI; the child's peak RSS from
 * process.resourceUsage().maxRSS, the loop time from the run's summary.json), its disk figures against
 * the files the run wrote, and configs that do not fit the (faked) machine reported with the reason.
 *
 * Factors: time within 3x either way — the probe times a handful of ~10 ms calls and the run's loop is
 * about a second, on a shared 2-core machine where other tests and helpers run at the same time (load
 * 2-4), so scheduling noise alone moves either figure by tens of percent; 3x still catches a wrong time
 * model (e.g. counting the backbone on every step when the cache serves it, ~2x, or per-step instead of
 * per-token scaling, which is off by the batch-size spread). Memory within 1.5x either way: both are whole
 * process RSS of the same runtime, weights and engines (~190 MiB here), and the activations the model
 * extrapolates are a few MiB, so the difference is allocator and GC timing.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { loadTrainConfig } from '../src/config.js';
import { loadExamples, splitEval } from '../src/data/batches.js';
import { hiddenCacheBytes } from '../src/data/hidden-cache.js';
import { MALLOC_ENV } from '../src/process.js';
import { planRun, formatPlan, type PlanReport } from '../src/plan/plan.js';
import { run } from './helpers/cli.js';

let tmp: string;
let data: string;

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-plan-'));
  process.env['MEDUSA_TRAIN_CACHE'] = path.join(tmp, 'cache');
  data = path.join(tmp, 'distill');
  const d = await run('distill', '--input', 'data/prompts/demo.jsonl', '--out', data, '--temperature', '0', '--max-new-tokens', '48', '--max-total-tokens', '256', '--no-progress');
  expect(d.code).toBe(0);
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** The CLI in a fresh node process (as bin.ts runs it: allocator settings, no re-exec), with its peak RSS. */
function cliChild(args: string[]): { code: number; out: string; maxRssBytes: number } {
  const script = `const { main } = await import(process.argv[1]); const out = [];
const code = await main(process.argv.slice(2), { out: (s) => out.push(s), err: (s) => process.stderr.write(s + '\\n') });
process.stdout.write(JSON.stringify({ code, out: out.join('\\n'), maxRssBytes: process.resourceUsage().maxRSS * 1024 }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, path.resolve('dist/src/cli.js'), ...args], {
    encoding: 'utf8', env: { ...process.env, ...MALLOC_ENV, MEDUSA_TRAIN_NO_REEXEC: '1' }, maxBuffer: 64 << 20,
  });
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as { code: number; out: string; maxRssBytes: number };
}

const within = (got: number, want: number, factor: number): void => {
  expect(got).toBeGreaterThan(want / factor);
  expect(got).toBeLessThan(want * factor);
};

function configArgs(name: string, extra: string[] = []): string[] {
  return ['--config', 'configs/tiny.yaml', '--set', `data.train=${JSON.stringify([data])}`, '--set', `run.dir=${tmp}`, '--set', `run.name=${name}`,
    '--set', 'train.max_steps=60', '--set', 'train.cache_hidden_states=disk', ...extra];
}

test('plan estimates memory within 1.5x and time within 3x of a measured short run of configs/tiny.yaml; disk figures equal the written files', () => {
  const p = cliChild(['plan', ...configArgs('measured'), '--json']);
  expect(p.code).toBe(0);
  const plan = JSON.parse(p.out) as PlanReport;
  const t = cliChild(['train', ...configArgs('measured'), '--no-plan', '--no-progress', '--json']);
  expect(t.code).toBe(0);
  const s = JSON.parse(t.out) as { steps: number; totalSteps: number; trainTokens: number; tokensPerSecond: number; runDir: string };
  expect(plan.data.totalSteps).toBe(60);
  expect(s.steps).toBe(60);
  // the training loop's wall time (steps + evaluations + checkpoints at every 20), from the run's own figures
  const loopSeconds = s.trainTokens / s.tokensPerSecond;
  const planned = plan.time!.trainSeconds + plan.time!.evalSeconds + plan.time!.checkpointSeconds;
  expect([plan.time!.evals, plan.time!.checkpoints]).toEqual([3, 3]);
  // padded tokens the plan walked vs the real tokens the run counted: the same batches
  expect(plan.data.paddedTokens).toBeGreaterThanOrEqual(s.trainTokens);
  within(planned / 60, loopSeconds / 60, 3);
  within(plan.memory!.peakBytes, t.maxRssBytes, 1.5);
  process.stderr.write(`plan: ${(1000 * planned / 60).toFixed(2)} ms/step, peak ${(plan.memory!.peakBytes / 2 ** 20).toFixed(1)} MiB; run: ${(1000 * loopSeconds / 60).toFixed(2)} ms/step, max RSS ${(t.maxRssBytes / 2 ** 20).toFixed(1)} MiB\n`);
  // disk: the hidden-state cache is hiddenCacheBytes over the run's cached examples, and is the size of the file written
  const { config } = loadTrainConfig('configs/tiny.yaml', [`data.train=${JSON.stringify([data])}`]);
  const ex = loadExamples(config.data.train, { maxSeqLen: config.data.max_seq_len });
  const split = splitEval(ex.examples, { fraction: config.data.eval_fraction, max: config.data.eval_max, seed: config.run.seed });
  const lengths = [...split.train, ...split.eval].map((e) => e.inputIds.length);
  expect(plan.disk.hiddenCache).toEqual({ where: 'disk', bytes: hiddenCacheBytes(lengths, plan.model.hiddenSize, 'f16') });
  const bins = fs.readdirSync(path.join(s.runDir, 'cache')).filter((f) => f.endsWith('.bin'));
  expect(bins).toHaveLength(1);
  expect(fs.statSync(path.join(s.runDir, 'cache', bins[0])).size).toBe(plan.disk.hiddenCache.bytes);
  // a checkpoint is its f32 tensors plus small headers and state.json
  const ck = path.join(s.runDir, 'checkpoints', fs.readdirSync(path.join(s.runDir, 'checkpoints'))[0]);
  const ckBytes = fs.readdirSync(ck).reduce((n, f) => n + fs.statSync(path.join(ck, f)).size, 0);
  expect(ckBytes).toBeGreaterThanOrEqual(plan.disk.checkpoints.perCheckpoint);
  expect(ckBytes).toBeLessThan(plan.disk.checkpoints.perCheckpoint * 1.02);
  // the dataset figure is the folder's bytes
  const dsBytes = fs.readdirSync(data, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).reduce((n, e) => n + fs.statSync(path.join(e.parentPath, e.name)).size, 0);
  expect(plan.disk.datasetsBytes).toBe(dsBytes);
  expect(plan.fits).toBe(true);
});

test('medusa2 (configs/medusa2-tiny.yaml on the tiny model, teacher top-k): memory within 1.5x and time within 3x of a measured short run', async () => {
  const topk = path.join(tmp, 'distill-topk');
  const d = await run('distill', '--input', 'data/prompts/demo.jsonl', '--out', topk, '--temperature', '0', '--max-new-tokens', '48', '--max-total-tokens', '256', '--teacher-topk', '4', '--no-progress');
  expect(d.code).toBe(0);
  const args = ['--config', 'configs/medusa2-tiny.yaml', '--set', 'model.path=null', '--set', `data.train=${JSON.stringify([topk])}`, '--set', `run.dir=${tmp}`, '--set', 'run.name=m2',
    '--set', 'train.max_steps=20', '--set', 'medusa2.heads_warmup_steps=5', '--set', 'eval.every=10', '--set', 'medusa2.gate.action=warn'];
  const p = cliChild(['plan', ...args, '--json']);
  const plan = JSON.parse(p.out) as PlanReport;
  const t = cliChild(['train', ...args, '--no-plan', '--no-progress', '--json']);
  const s = JSON.parse(t.out) as { steps: number; trainTokens: number; tokensPerSecond: number };
  expect([plan.recipe, plan.data.totalSteps, s.steps]).toEqual(['medusa2', 20, 20]);
  expect(plan.time!.probe.map((x) => x.part)).toEqual(['joint step (teacher + medusa2LossAndGrads + clip + AdamW)', 'heads-only step']);
  expect(plan.disk.hiddenCache).toEqual({ where: 'none', bytes: 0 });
  const loopSeconds = s.trainTokens / s.tokensPerSecond;
  const planned = plan.time!.trainSeconds + plan.time!.evalSeconds + plan.time!.checkpointSeconds;
  process.stderr.write(`medusa2 plan: ${(1000 * planned / 20).toFixed(2)} ms/step, peak ${(plan.memory!.peakBytes / 2 ** 20).toFixed(1)} MiB; run: ${(1000 * loopSeconds / 20).toFixed(2)} ms/step, max RSS ${(t.maxRssBytes / 2 ** 20).toFixed(1)} MiB\n`);
  within(planned / 20, loopSeconds / 20, 3);
  within(plan.memory!.peakBytes, t.maxRssBytes, 1.5);
});

describe('configs that do not fit are reported with the reason', () => {
  const config = (sets: string[]) => loadTrainConfig('configs/tiny.yaml', [`data.train=${JSON.stringify([data])}`, `run.dir=${tmp}`, 'run.name=nofit', ...sets]).config;

  test('disk: a disk cache + checkpoints beyond the free space', async () => {
    const r = await planRun(config(['train.cache_hidden_states=disk']), { probe: false, machine: { freeDiskBytes: 100_000 } });
    expect(r.fits).toBe(false);
    expect(r.problems).toHaveLength(1);
    expect(r.problems[0]).toMatch(/^disk: the run writes .*hidden-state cache .* but .* has 0\.1 MiB free/);
    expect(r.disk.newBytes).toBe(r.disk.hiddenCache.bytes + r.disk.checkpoints.bytes);
    expect(formatPlan(r)).toContain('DOES NOT FIT');
    // the same config fits the real disk
    expect((await planRun(config(['train.cache_hidden_states=disk']), { probe: false })).fits).toBe(true);
  });

  test('memory: a batch of every conversation at once scales the measured activations past the available memory', async () => {
    const small = await planRun(config([]), { probeSteps: 1 });
    expect(small.fits).toBe(true);
    // whole-dataset batches: the plan probes that batch, so the growth is measured at its size
    const big = await planRun(config(['data.batch_size=64']), { probeSteps: 1, machine: { freeMemBytes: small.memory!.peakBytes } });
    expect(big.data.maxBatch.B).toBe(big.data.trainConversations);
    expect(big.memory!.probeTokens).toBe(big.data.maxBatch.B * big.data.maxBatch.T);
    expect(big.memory!.peakBytes).toBeGreaterThan(small.memory!.peakBytes);
    expect(big.fits).toBe(false);
    expect(big.problems.join('\n')).toMatch(/^memory: the run needs about .* at its peak but .* is available/m);
    expect(big.problems.join('\n')).toContain('lower data.batch_size or data.max_seq_len');
  });
});

test('train prints the plan at its start; --no-plan skips it', async () => {
  const base = ['--config', 'configs/tiny.yaml', '--set', `data.train=${JSON.stringify([data])}`, '--set', `run.dir=${tmp}`, '--set', 'train.max_steps=2', '--no-progress'];
  const a = await run('train', ...base, '--set', 'run.name=printed');
  expect(a.code).toBe(0);
  expect(a.err).toMatch(/^plan: medusa1 on /m);
  expect(a.err).toMatch(/memory: peak about .*\n\s+model: peak RSS = /);
  expect(a.err.indexOf('plan: medusa1')).toBeLessThan(a.err.indexOf('run: '));
  const b = await run('train', ...base, '--set', 'run.name=unplanned', '--no-plan');
  expect(b.code).toBe(0);
  expect(b.err).not.toContain('plan:');
});
