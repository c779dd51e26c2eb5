/**
 * Engine benchmark: our hot paths against PyTorch at its best on this CPU, in one invocation.
 *
 *   npm run bench:engines -- [--out docs/bench/engines.json] [--skip-tfjs]
 *
 * PyTorch: bench/torch_ref.py with OPENBLAS_CORETYPE=SkylakeX, the allocator settings and 2 threads
 * (Debian python3-torch + libopenblas0-pthread). Ours: the onnx engine (onnxruntime-node, all cores)
 * and, for reference, the tfjs-wasm engine. Ratio = PyTorch seconds / our seconds (>= 0.9 is the aim).
 * Cases: the MEDUSA-1 step of 3 heads at d=512/V=32000 over 2048 positions and at d=64/V=512
 * (overhead-bound); prefill of 512 tokens and 128 cached decoding steps on a ~50M-parameter Llama.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { initBackend } from '../src/backend.js';
import { MALLOC_ENV, reexecWithAllocatorSettings } from '../src/process.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { loadDecoder } from '../src/model/load.js';
import { argmax, Rng } from '../src/model/sampling.js';
import { createHeadsTrainer, type HeadsEngine, type HeadsBatch } from '../src/engines/heads-trainer.js';
import { onnxBackbone, tfjsBackbone, type Backbone } from '../src/engines/decoder-engine.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}
const flag = (name: string): boolean => process.argv.includes(`--${name}`);

async function best(fn: () => Promise<void>, reps: number): Promise<number> {
  await fn(); // warm-up
  let b = Infinity;
  for (let i = 0; i < reps; i++) {
    const t = performance.now();
    await fn();
    b = Math.min(b, performance.now() - t);
  }
  return b / 1000;
}

async function headsStep(engine: HeadsEngine, d: number, V: number, N: number, reps: number): Promise<number> {
  const rng = new Rng(1);
  const base = new Float32Array(V * d).map(() => (rng.next() - 0.5) * 0.04);
  const trainer = await createHeadsTrainer(engine, {
    shape: { numHeads: 3, numLayers: 1, hiddenSize: d, vocabSize: V, lmHead: 'per_head' }, baseLmHead: base, seed: 0,
    betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0, decay: 0.8, headsCoefficient: 1, chunkRows: 512, maxGradNorm: null,
  });
  const batch: HeadsBatch = {
    hidden: new Float32Array(N * d).map(() => rng.next() * 2 - 1), ids: Int32Array.from({ length: N }, () => Math.floor(rng.next() * V)),
    lossMask: Uint8Array.from({ length: N }, () => 1), lengths: [N], T: N,
  };
  const s = await best(async () => {
    await trainer.step([batch], 1e-3);
  }, reps);
  trainer.dispose();
  return s;
}

async function backbone(b: Backbone, reps: number): Promise<{ prefill: number; decode: number }> {
  const ids = Array.from({ length: 512 }, (_, i) => 5 + ((i * 7919) % 500));
  const prefill = await best(async () => {
    const cache = b.newCache(1);
    await b.forward({ ids, batch: 1, seqLen: 512, cache, logits: 'last' });
    cache.dispose();
  }, reps);
  const decode = await best(async () => {
    const cache = b.newCache(1);
    let r = await b.forward({ ids: ids.slice(0, 32), batch: 1, seqLen: 32, cache, logits: 'last' });
    for (let i = 0; i < 128; i++) r = await b.forward({ ids: [argmax(r.logits!)], batch: 1, seqLen: 1, cache, logits: 'last' });
    cache.dispose();
  }, reps);
  return { prefill, decode };
}

async function main(): Promise<void> {
  const out = arg('out', '');
  const torchRun = spawnSync('/usr/bin/python3', [path.join('bench', 'torch_ref.py'), '--threads', '2', '--reps', '3'], {
    encoding: 'utf8', env: { ...process.env, ...MALLOC_ENV, OPENBLAS_CORETYPE: 'SkylakeX' }, maxBuffer: 1 << 20,
  });
  if (torchRun.status !== 0) throw new Error(`PyTorch reference failed (needs python3-torch and libopenblas0-pthread): ${torchRun.stderr}`);
  const torch = JSON.parse(torchRun.stdout.trim().split('\n').pop()!) as Record<string, number>;
  console.log(`pytorch ${torch['torch']} (2 threads): ${JSON.stringify(torch)}`);
  await initBackend('wasm');
  const ours: Record<string, Record<string, number>> = { onnx: {}, tfjs: {} };
  ours['onnx']['heads_step_big'] = await headsStep('onnx', 512, 32000, 2048, 3);
  ours['onnx']['heads_step_tiny'] = await headsStep('onnx', 64, 512, 2048, 5);
  if (!flag('skip-tfjs')) {
    ours['tfjs']['heads_step_big'] = await headsStep('tfjs', 512, 32000, 2048, 1);
    ours['tfjs']['heads_step_tiny'] = await headsStep('tfjs', 64, 512, 2048, 3);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-engines-'));
  writeTinyModel(path.join(dir, 'm50'), { hiddenSize: 640, numLayers: 8, numHeads: 10, numKvHeads: 5, intermediateSize: 1792, vocabSize: 16384, tieWordEmbeddings: false, seed: 1 });
  const { decoder } = loadDecoder(path.join(dir, 'm50'));
  const ob = await onnxBackbone(decoder);
  Object.assign(ours['onnx'], await backbone(ob, 3).then((r) => ({ prefill_512: r.prefill, decode_128: r.decode })));
  ob.dispose();
  if (!flag('skip-tfjs')) Object.assign(ours['tfjs'], await backbone(tfjsBackbone(decoder), 1).then((r) => ({ prefill_512: r.prefill, decode_128: r.decode })));
  fs.rmSync(dir, { recursive: true, force: true });
  const rows = ['heads_step_big', 'heads_step_tiny', 'prefill_512', 'decode_128'].map((k) => ({
    case: k, pytorch_s: torch[k], onnx_s: ours['onnx'][k], ratio_onnx: torch[k] / ours['onnx'][k], tfjs_s: ours['tfjs'][k] ?? null, ratio_tfjs: ours['tfjs'][k] ? torch[k] / ours['tfjs'][k] : null,
  }));
  for (const r of rows) console.log(`${r.case.padEnd(16)} pytorch ${r.pytorch_s.toFixed(4)} s | onnx ${r.onnx_s.toFixed(4)} s (ratio ${r.ratio_onnx.toFixed(2)}) | tfjs ${r.tfjs_s?.toFixed(4) ?? '-'} s (ratio ${r.ratio_tfjs?.toFixed(2) ?? '-'})`);
  if (out) fs.writeFileSync(out, `${JSON.stringify({ date: new Date().toISOString(), cpu: os.cpus()[0]?.model, cores: os.cpus().length, torch, rows }, null, 2)}\n`);
}

if (!reexecWithAllocatorSettings()) {
  main().then(() => process.exit(0), (e) => {
    console.error(e);
    process.exit(1);
  });
}
