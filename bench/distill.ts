/**
 * Self-distillation throughput: the local engine at several batch sizes, and the openai engine
 * against `medusa-train serve` (a separate process) with several requests in flight, on the ~20M
 * benchmark model.
 *
 *   npm run bench:distill -- [--requests 32] [--new 64] [--out docs/bench/distill.json]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { initBackend } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import { disposeWeights } from '../src/model/weights.js';
import { BENCH_20M, writeTinyModel } from '../src/model/tiny.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { createLocalEngine } from '../src/distill/local-engine.js';
import { onnxBackbone, tfjsBackbone } from '../src/engines/decoder-engine.js';
import { createOpenAIEngine } from '../src/distill/openai-engine.js';
import type { GenerationRequest, DistillEngine } from '../src/distill/engine.js';
import { isError } from '../src/distill/engine.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}

async function measure(engine: DistillEngine, reqs: GenerationRequest[]): Promise<{ tokens: number; seconds: number; tps: number }> {
  const t0 = performance.now();
  const res = await engine.generate(reqs);
  const seconds = (performance.now() - t0) / 1000;
  let tokens = 0;
  for (const r of res) {
    if (isError(r)) throw new Error(r.error);
    tokens += r.tokens.length;
  }
  return { tokens, seconds: +seconds.toFixed(2), tps: +(tokens / seconds).toFixed(1) };
}

async function main(): Promise<void> {
  const nReq = Number(arg('requests', '32'));
  const nNew = Number(arg('new', '64'));
  const out = arg('out', '');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-distill-'));
  const model = path.join(dir, 'model');
  writeTinyModel(model, { ...BENCH_20M, seed: 1 });
  const tokenizer = await loadTokenizer(model);
  // Prompts of 24..55 tokens; eos disabled so every request generates exactly nNew tokens.
  const reqs: GenerationRequest[] = Array.from({ length: nReq }, (_, i) => ({
    promptIds: Array.from({ length: 24 + (i * 7) % 32 }, (_, j) => 5 + ((i * 131 + j * 17) % 500)), maxNewTokens: nNew, seed: i,
  }));
  const sampling = { temperature: 0.3, topP: 1, topK: 0 };
  const info = await initBackend('wasm');
  const { decoder } = loadDecoder(model);
  const local: Record<string, unknown> = {};
  for (const kind of ['tfjs', 'onnx'] as const) {
    const backbone = kind === 'tfjs' ? tfjsBackbone(decoder) : await onnxBackbone(decoder);
    for (const bs of [1, 8, 16]) {
      const r = await measure(createLocalEngine({ backbone, sampling, eosIds: [], padId: 0, batchSize: bs, topk: 0 }), reqs);
      local[kind === 'tfjs' ? `batch${bs}` : `onnx_batch${bs}`] = r;
      console.log(`local engine (${kind}) batch ${bs}: ${r.tps} tok/s (${r.tokens} tokens in ${r.seconds} s)`);
    }
    backbone.dispose();
  }
  disposeWeights(decoder.weights);

  // Our server in its own process, so client and server do not share one thread.
  const child = spawn(process.execPath, ['dist/src/bin.js', 'serve', '--model', model, '--port', '0', '--max-batch', '16', '--backend', 'wasm'], { stdio: ['ignore', 'ignore', 'pipe'] });
  const url = await new Promise<string>((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('server did not start in 60 s')), 60_000);
    child.stderr!.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /listening on (http:\/\/[^\s]+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
  const remote: Record<string, unknown> = {};
  try {
    for (const inFlight of [1, 8, 16]) {
      // ignore eos on the server side too: ask for exactly nNew tokens
      const engine = createOpenAIEngine({ urls: [url], inFlight, timeoutMs: 600_000, retries: 0, backoffMs: 100, sampling, tokenizer, vocabSize: 8192, endOfTurnId: 4, log: () => {} });
      const r = await measure(engine, reqs);
      remote[`inFlight${inFlight}`] = r;
      console.log(`openai engine -> serve, ${inFlight} in flight: ${r.tps} tok/s (${r.tokens} tokens in ${r.seconds} s)`);
    }
  } finally {
    child.kill('SIGTERM');
  }
  fs.rmSync(dir, { recursive: true, force: true });
  const record = { date: new Date().toISOString(), backend: info.detail, cpu: os.cpus()[0]?.model, requests: nReq, newTokensPerRequest: nNew, local, openai: remote,
    batchSpeedup: +((local['batch8'] as { tps: number }).tps / (local['batch1'] as { tps: number }).tps).toFixed(2) };
  console.log(`batch 8 / batch 1 throughput: ${record.batchSpeedup}x`);
  if (out) fs.writeFileSync(out, `${JSON.stringify(record, null, 2)}\n`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
