/**
 * MEDUSA-2 joint training throughput and peak memory on the ~20M-parameter benchmark model (BENCH_20M: d 512,
 * 4 layers, V 8192) with 3 heads, against MEDUSA-1 on the same data: LoRA (attention projections, and all
 * linear layers) and full fine-tuning of the last 1 and 2 decoder layers, with the KD loss on stored teacher
 * top-k (and one row with the frozen teacher run alongside). Each configuration runs in its own child process
 * so its peak RSS is its own; tokens/s counts every token of the training batches (prompt + assistant), as
 * the recipes' summaries do, and over the steps after the first (the first step includes tfjs's kernel setup). A job
 * that fails (e.g. the wasm heap running out) is reported as such and the bench goes on.
 *
 *   npm run bench:medusa2 -- [--out docs/bench/medusa2.json] [--jobs 0,1,2 (indexes of the job list below)]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { initBackend } from '../src/backend.js';
import { loadTrainConfig } from '../src/config.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { runMedusa2 } from '../src/recipes/medusa2.js';
import { writeBenchModelAndData } from './random-dataset.js';

interface Job {
  label: string;
  recipe: 'medusa1' | 'medusa2';
  /** --set overrides of the job */
  sets: string[];
  seqLen: number;
  batch: number;
  steps: number;
  model: string;
  dataset: string;
  runDir: string;
}

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

interface TrainLine { type: string; step: number; tokens: number; tokens_per_s: number }

async function child(job: Job): Promise<void> {
  const cfg = loadTrainConfig(null, [
    `recipe=${job.recipe}`, `model.path=${job.model}`, 'model.backend=wasm', `data.train=${JSON.stringify([job.dataset])}`, `run.dir=${job.runDir}`, 'run.name=r',
    `data.max_seq_len=${job.seqLen}`, `data.batch_size=${job.batch}`, `train.max_steps=${job.steps}`, 'heads.num_heads=3',
    'data.eval_fraction=0', 'eval.every=100000', 'checkpoint.every=100000', 'train.warmup_ratio=0', 'log.every=1', ...job.sets,
  ]).config;
  const t0 = performance.now();
  const s = cfg.recipe === 'medusa2'
    ? await runMedusa2({ config: cfg, commandLine: ['bench'], resume: false, log: () => {} })
    : await runMedusa1({ config: cfg, commandLine: ['bench'], resume: false, log: () => {} });
  const wall = (performance.now() - t0) / 1000;
  const lines = fs.readFileSync(path.join(job.runDir, 'r', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as TrainLine).filter((l) => l.type === 'train');
  // steady state: tokens of steps 2..N over their time (secs at a line = tokens / its cumulative tokens_per_s)
  const secsAt = (l: TrainLine): number => l.tokens / l.tokens_per_s;
  const first = lines[0];
  const last = lines[lines.length - 1];
  const steady = lines.length > 1 ? (last.tokens - first.tokens) / (secsAt(last) - secsAt(first)) : s.tokensPerSecond;
  console.log(JSON.stringify({
    label: job.label, recipe: job.recipe, seq_len: job.seqLen, batch: job.batch, steps: s.steps,
    trainable_backbone: 'trainableBackbone' in s ? s.trainableBackbone : 0,
    tokens_per_s: +s.tokensPerSecond.toFixed(1), steady_tokens_per_s: +steady.toFixed(1), seconds_per_step: +((s.trainTokens / s.tokensPerSecond) / s.steps).toFixed(2),
    wall_s: +wall.toFixed(1), peak_rss_mib: Math.round(process.resourceUsage().maxRSS / 1024), backend: s.backend,
  }));
}

async function main(): Promise<void> {
  const jobArg = arg('child', '');
  if (jobArg) return child(JSON.parse(jobArg) as Job);
  const out = arg('out', '');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-m2-'));
  // 32 conversations of 512 tokens with a teacher top-8 per assistant token
  const { model, dataset } = await writeBenchModelAndData(dir, { conversations: 32, seqLen: 512, teacherTopk: 8 });
  await initBackend('wasm');
  // batch 1, plus batch 2 and 4 rows: before the MEDUSA-2 step split its rows into autograd passes (src/train/medusa2-loss.ts),
  // 512 x 2 already ran out of the 4 GiB wasm heap; a failed job is reported as a row and the bench goes on
  const base = { seqLen: 512, batch: 1, steps: 4 };
  const lora = (targets: string, rank = 8): string[] => ['medusa2.backbone.mode=lora', `medusa2.backbone.lora.rank=${rank}`, `medusa2.backbone.lora.targets=${targets}`];
  const jobs: Omit<Job, 'model' | 'dataset' | 'runDir'>[] = [
    { label: 'MEDUSA-1 (tfjs heads, tfjs backbone)', recipe: 'medusa1', sets: ['model.engine=tfjs'], ...base },
    { label: 'MEDUSA-1 (onnx engine)', recipe: 'medusa1', sets: ['model.engine=onnx'], ...base },
    { label: 'MEDUSA-2 LoRA r8 q,k,v,o (kd top-k)', recipe: 'medusa2', sets: lora('[q_proj,k_proj,v_proj,o_proj]'), ...base },
    { label: 'MEDUSA-2 LoRA r8 all linear + lm_head (kd top-k)', recipe: 'medusa2', sets: lora('[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]'), ...base },
    { label: 'MEDUSA-2 full last 1 layer (kd top-k)', recipe: 'medusa2', sets: ['medusa2.backbone.mode=full', 'medusa2.backbone.full_last_layers=1'], ...base },
    { label: 'MEDUSA-2 full last 2 layers (kd top-k)', recipe: 'medusa2', sets: ['medusa2.backbone.mode=full', 'medusa2.backbone.full_last_layers=2'], ...base },
    { label: 'MEDUSA-2 LoRA r8 q,k,v,o (kd, frozen teacher)', recipe: 'medusa2', sets: [...lora('[q_proj,k_proj,v_proj,o_proj]'), 'loss.teacher=frozen'], ...base },
    { label: 'MEDUSA-2 LoRA r8 q,k,v,o (ce)', recipe: 'medusa2', sets: [...lora('[q_proj,k_proj,v_proj,o_proj]'), 'loss.lm_loss=ce'], ...base },
    { label: 'MEDUSA-2 LoRA r8 q,k,v,o (kd top-k), batch 2', recipe: 'medusa2', sets: lora('[q_proj,k_proj,v_proj,o_proj]'), ...base, batch: 2 },
    { label: 'MEDUSA-2 LoRA r8 q,k,v,o (kd top-k), batch 4', recipe: 'medusa2', sets: lora('[q_proj,k_proj,v_proj,o_proj]'), ...base, batch: 4, steps: 2 },
  ];
  const only = arg('jobs', '') ? new Set(arg('jobs', '').split(',').map(Number)) : null;
  const results: unknown[] = [];
  const load: string[] = [];
  for (const [i, j] of jobs.entries()) {
    if (only && !only.has(i)) continue;
    const job: Job = { ...j, model, dataset, runDir: path.join(dir, `run${i}`) };
    load.push(os.loadavg().map((x) => x.toFixed(2)).join(' '));
    const r = spawnSync(process.execPath, [process.argv[1], '--child', JSON.stringify(job)], { encoding: 'utf8', maxBuffer: 1 << 24 });
    if (r.status !== 0) {
      // e.g. the 4 GiB wasm heap running out: a result too (the row says so), not the end of the bench
      const why = r.stderr.split('\n').find((l) => /Error|Aborted/.test(l)) ?? `exit ${r.status}`;
      console.log(`${j.label}: FAILED (${why.trim()})`);
      results.push({ label: j.label, recipe: j.recipe, seq_len: j.seqLen, batch: j.batch, failed: why.trim(), load_before: load[load.length - 1] });
      continue;
    }
    const line = r.stdout.trim().split('\n').pop()!;
    console.log(`${line}  (load before: ${load[load.length - 1]})`);
    results.push({ ...JSON.parse(line), load_before: load[load.length - 1] });
  }
  fs.rmSync(dir, { recursive: true, force: true });
  if (out) fs.writeFileSync(out, `${JSON.stringify({ date: new Date().toISOString(), cpu: os.cpus()[0]?.model, model: '20M (d 512, V 8192, 4 layers)', heads: 3, results }, null, 2)}\n`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
