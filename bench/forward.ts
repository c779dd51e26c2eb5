/**
 * Forward-pass benchmark: prefill and decode tokens/s of a ~20M-parameter Llama-shaped model, and
 * the achieved GFLOP/s of prefill as a fraction of the backend's raw matmul rate in the same run.
 *
 *   npm run bench:forward -- [--backends wasm,cpu] [--prefill 512] [--decode 128] [--out docs/bench/forward.json]
 *
 * Figures are recorded in docs/PERFORMANCE.md. Not a test: timings are machine-dependent.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend, type BackendChoice } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward, disposeCache, emptyCache } from '../src/model/decoder.js';
import { disposeWeights } from '../src/model/weights.js';
import { parameterCount, type DecoderConfig } from '../src/model/config.js';
import { BENCH_20M, writeTinyModel } from '../src/model/tiny.js';
import { generate } from '../src/model/generate.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

/** Best-of-n GFLOP/s of an untransposed 2-D matmul [m,k] x [k,n] (the shape class every projection uses). */
function rawMatmulGflops(m: number, k: number, n: number, reps: number): number {
  const a = tf.randomNormal([m, k]);
  const b = tf.randomNormal([k, n]);
  let best = Infinity;
  for (let i = 0; i < reps + 1; i++) {
    const t = performance.now();
    const c = tf.matMul(a, b);
    c.dataSync();
    const dt = performance.now() - t;
    c.dispose();
    if (i > 0) best = Math.min(best, dt); // first run warms up
  }
  a.dispose();
  b.dispose();
  return (2 * m * k * n) / (best / 1000) / 1e9;
}

/** FLOPs of a prefill of T tokens at batch 1, as computed (full T x T attention, last-position logits). */
function prefillFlops(c: DecoderConfig, T: number): number {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const perTokenLinear = c.hiddenSize * (q + 2 * kv) + q * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize;
  const attention = 2 * c.numHeads * T * T * c.headDim; // QK^T and PV, multiply-adds
  return 2 * c.numLayers * (T * perTokenLinear + attention) + 2 * c.hiddenSize * c.vocabSize;
}

async function benchBackend(backend: BackendChoice, dir: string, prefillT: number, decodeN: number, reps: number) {
  const info = await initBackend(backend);
  const { decoder } = loadDecoder(dir);
  const c = decoder.config;
  const ids = Array.from({ length: prefillT }, (_, i) => 5 + ((i * 7919) % (c.vocabSize - 5)));
  // warm-up
  { const { hidden, logits } = decoderForward(decoder, { ids: ids.slice(0, 16), batch: 1, seqLen: 16, logits: 'last' }); hidden.dispose(); logits?.dispose(); }
  let bestPrefill = Infinity;
  for (let r = 0; r < reps; r++) {
    const cache = emptyCache(1);
    const t = performance.now();
    const { hidden, logits } = decoderForward(decoder, { ids, batch: 1, seqLen: prefillT, cache, logits: 'last' });
    logits!.dataSync();
    bestPrefill = Math.min(bestPrefill, performance.now() - t);
    hidden.dispose();
    logits!.dispose();
    disposeCache(cache);
  }
  const flops = prefillFlops(c, prefillT);
  const prefillGflops = flops / (bestPrefill / 1000) / 1e9;
  const g = generate(decoder, [ids.slice(0, 32)], { maxNewTokens: decodeN, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 });
  const decodeTps = (g.newTokens - 1) / (g.decodeMs / 1000);
  const g8 = generate(decoder, Array.from({ length: 8 }, (_, i) => ids.slice(i, i + 32)), { maxNewTokens: decodeN, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 });
  const decode8Tps = (g8.newTokens - 8) / (g8.decodeMs / 1000);
  const raw = rawMatmulGflops(prefillT, c.hiddenSize, c.intermediateSize, reps);
  disposeWeights(decoder.weights);
  return {
    backend: info.detail,
    parameters: parameterCount(c),
    prefillTokens: prefillT,
    prefillMs: +bestPrefill.toFixed(1),
    prefillTokensPerSecond: +(prefillT / (bestPrefill / 1000)).toFixed(1),
    prefillGflops: +prefillGflops.toFixed(2),
    rawMatmulGflops: +raw.toFixed(2),
    rawMatmulShape: `[${prefillT}, ${c.hiddenSize}] x [${c.hiddenSize}, ${c.intermediateSize}]`,
    prefillFractionOfRaw: +(prefillGflops / raw).toFixed(3),
    decodeTokens: decodeN,
    decodeTokensPerSecondBatch1: +decodeTps.toFixed(1),
    decodeTokensPerSecondBatch8: +decode8Tps.toFixed(1),
  };
}

async function main(): Promise<void> {
  const backends = arg('backends', 'wasm,cpu').split(',') as BackendChoice[];
  const prefillT = Number(arg('prefill', '512'));
  const decodeN = Number(arg('decode', '128'));
  const out = arg('out', '');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-'));
  const model = path.join(dir, 'model');
  writeTinyModel(model, { ...BENCH_20M, seed: 1 });
  const results = [];
  for (const b of backends) {
    // The pure-JS cpu backend is ~50x slower: use a shorter prefill and decode there.
    const T = b === 'cpu' ? Math.min(prefillT, 128) : prefillT;
    const N = b === 'cpu' ? Math.min(decodeN, 16) : decodeN;
    const r = await benchBackend(b, model, T, N, b === 'cpu' ? 1 : 3);
    console.log(JSON.stringify(r));
    results.push(r);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  const record = { date: new Date().toISOString(), node: process.version, cpus: os.cpus().length, cpu: os.cpus()[0]?.model, results };
  if (out) fs.writeFileSync(out, `${JSON.stringify(record, null, 2)}\n`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
