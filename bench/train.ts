/**
 * MEDUSA-1 training throughput and memory on the ~20M-parameter benchmark model with 3 heads:
 * per_head and shared lm_head, with and without the hidden-state cache, on wasm and cpu; the
 * achieved GFLOP/s of the head training step as a fraction of the raw matmul rate measured in the
 * same process (tfjs-wasm's matmul for the tfjs engine, onnxruntime's for the onnx engine); and peak RSS as
 * the sequence length doubles. Each configuration runs in its own
 * child process so its peak RSS is its own.
 *
 *   npm run bench:train -- [--out docs/bench/train.json] [--jobs 0,1,2 (indexes of the job list below)]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as tf from '@tensorflow/tfjs';
import { initBackend, type BackendChoice } from '../src/backend.js';
import { loadTrainConfig } from '../src/config.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { writeBenchModelAndData } from './random-dataset.js';
import { GraphBuilder } from '../src/io/onnx.js';

interface Job { engine?: 'tfjs' | 'onnx'; backend: BackendChoice; lmHead: 'per_head' | 'shared'; cache: 'none' | 'memory'; seqLen: number; batch: number; steps: number; model: string; dataset: string; runDir: string }

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

function rawMatmul(m: number, k: number, n: number): number {
  const a = tf.randomNormal([m, k]);
  const b = tf.randomNormal([k, n]);
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    const c = tf.matMul(a, b);
    c.dataSync();
    if (i > 0) best = Math.min(best, performance.now() - t);
    c.dispose();
  }
  a.dispose();
  b.dispose();
  return (2 * m * k * n) / (best / 1000) / 1e9;
}

/** Best-of-3 GFLOP/s of one [m,k] x [k,n] MatMul on onnxruntime (all cores): the raw rate of the onnx engine. */
async function rawMatmulOrt(m: number, k: number, n: number): Promise<number> {
  const ort = await import('onnxruntime-node');
  const g = new GraphBuilder('raw');
  g.input('a', 'float32', [m, k]);
  g.input('b', 'float32', [k, n]);
  g.node('MatMul', ['a', 'b'], { outputs: ['c'] });
  g.output('c', 'float32', [m, n]);
  const s = await ort.InferenceSession.create(g.serialize(), { intraOpNumThreads: os.cpus().length, graphOptimizationLevel: 'all' });
  const a = new ort.Tensor('float32', new Float32Array(m * k).fill(0.5), [m, k]);
  const b = new ort.Tensor('float32', new Float32Array(k * n).fill(0.25), [k, n]);
  let best = Infinity;
  for (let i = 0; i < 4; i++) {
    const t = performance.now();
    await s.run({ a, b });
    if (i > 0) best = Math.min(best, performance.now() - t);
  }
  await s.release();
  return (2 * m * k * n) / (best / 1000) / 1e9;
}

/** FLOPs of one head-training token: blocks fwd+bwd (6 d^2 per layer) and the projection (fwd 2dV, dh 2dV, dW2 2dV if trained). */
function flopsPerPosition(d: number, V: number, heads: number, perHead: boolean): number {
  return heads * (6 * d * d + (perHead ? 6 : 4) * d * V);
}

async function child(job: Job): Promise<void> {
  const cfg = loadTrainConfig(null, [
    `model.path=${job.model}`, `model.backend=${job.backend}`, `data.train=${JSON.stringify([job.dataset])}`, `run.dir=${job.runDir}`, `run.name=r`,
    `data.max_seq_len=${job.seqLen}`, `data.batch_size=${job.batch}`, `train.max_steps=${job.steps}`, `heads.lm_head=${job.lmHead}`,
    `train.cache_hidden_states=${job.cache}`, `model.engine=${job.engine ?? 'tfjs'}`, 'data.eval_fraction=0', 'eval.every=100000', 'checkpoint.every=100000', 'train.warmup_ratio=0',
  ]).config;
  const s = await runMedusa1({ config: cfg, commandLine: ['bench'], resume: false, log: () => {} });
  const lines = fs.readFileSync(path.join(job.runDir, 'r', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { heads: { valid: number }[] });
  const positions = lines.reduce((acc, l) => acc + l.heads.reduce((x, h) => x + h.valid, 0), 0) / 3; // average positions per head
  const d = 512;
  const V = 8192;
  const loopSeconds = s.trainTokens / s.tokensPerSecond;
  const headFlops = flopsPerPosition(d, V, 1, job.lmHead === 'per_head') * positions * 3;
  await initBackend(job.backend);
  const raw = job.engine === 'onnx' ? await rawMatmulOrt(512, d, V) : rawMatmul(job.backend === 'cpu' ? 128 : 512, d, V);
  console.log(JSON.stringify({
    engine: job.engine ?? 'tfjs', backend: s.backend, lm_head: job.lmHead, cache: job.cache, seq_len: job.seqLen, batch: job.batch, steps: s.steps,
    tokens_per_s: +s.tokensPerSecond.toFixed(1), seconds_per_step: +(loopSeconds / s.steps).toFixed(2),
    head_gflops_per_s: +(headFlops / loopSeconds / 1e9).toFixed(2), raw_matmul_gflops: +raw.toFixed(2), fraction_of_raw: +((headFlops / loopSeconds / 1e9) / raw).toFixed(3),
    peak_rss_mib: Math.round(process.resourceUsage().maxRSS / 1024),
  }));
}

async function main(): Promise<void> {
  const jobArg = arg('child', '');
  if (jobArg) return child(JSON.parse(jobArg) as Job);
  const out = arg('out', '');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-train-'));
  // 64 conversations of 1024 tokens
  const { model, dataset } = await writeBenchModelAndData(dir, { conversations: 64, seqLen: 1024, teacherTopk: 0 });
  await initBackend('wasm');
  const jobs: Omit<Job, 'model' | 'dataset' | 'runDir'>[] = [
    { backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 512, batch: 4, steps: 3 },
    { backend: 'wasm', lmHead: 'per_head', cache: 'memory', seqLen: 512, batch: 4, steps: 3 },
    { backend: 'wasm', lmHead: 'shared', cache: 'none', seqLen: 512, batch: 4, steps: 3 },
    { backend: 'wasm', lmHead: 'shared', cache: 'memory', seqLen: 512, batch: 4, steps: 3 },
    // the pure-JS cpu backend is ~40x slower: one short step, no cache (filling it would run the backbone over the whole dataset)
    { backend: 'cpu', lmHead: 'per_head', cache: 'none', seqLen: 128, batch: 1, steps: 1 },
    { backend: 'cpu', lmHead: 'shared', cache: 'none', seqLen: 128, batch: 1, steps: 1 },
    // peak memory as the sequence length doubles (batch 1, no cache)
    { backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 256, batch: 1, steps: 2 },
    { backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 512, batch: 1, steps: 2 },
    { backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 1024, batch: 1, steps: 2 },
    // the native engine (issue #5): onnxruntime for the backbone and the heads' step
    { engine: 'onnx', backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 512, batch: 4, steps: 3 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'per_head', cache: 'memory', seqLen: 512, batch: 4, steps: 3 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'shared', cache: 'none', seqLen: 512, batch: 4, steps: 3 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'shared', cache: 'memory', seqLen: 512, batch: 4, steps: 3 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 256, batch: 1, steps: 2 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 512, batch: 1, steps: 2 },
    { engine: 'onnx', backend: 'wasm', lmHead: 'per_head', cache: 'none', seqLen: 1024, batch: 1, steps: 2 },
  ];
  const only = arg('jobs', '') ? new Set(arg('jobs', '').split(',').map(Number)) : null;
  const results: unknown[] = [];
  for (const [i, j] of jobs.entries()) {
    if (only && !only.has(i)) continue;
    const job: Job = { ...j, model, dataset, runDir: path.join(dir, `run${i}`) };
    const r = spawnSync(process.execPath, [process.argv[1], '--child', JSON.stringify(job)], { encoding: 'utf8', maxBuffer: 1 << 24 });
    if (r.status !== 0) throw new Error(`job ${JSON.stringify(j)} failed: ${r.stderr}`);
    const line = r.stdout.trim().split('\n').pop()!;
    console.log(line);
    results.push(JSON.parse(line));
  }
  fs.rmSync(dir, { recursive: true, force: true });
  if (out) fs.writeFileSync(out, `${JSON.stringify({ date: new Date().toISOString(), cpu: os.cpus()[0]?.model, model: '20M (d 512, V 8192, 4 layers)', heads: 3, results }, null, 2)}\n`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
