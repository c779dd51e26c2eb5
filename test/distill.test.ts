/**
 * `medusa-train distill` end to end: tokens equal `generate` on both engines, kill -9 and resume
 * equals an uninterrupted run, server faults are retried or accounted, bad rows are counted.
 * The kill test runs the built CLI (dist/, made by `npm test`'s tsc step) in a child process.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as http from 'node:http';
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import { initBackend } from '../src/backend.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { loadDecoder } from '../src/model/load.js';
import { disposeWeights } from '../src/model/weights.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { openDataset, iterateRecords } from '../src/data/dataset.js';
import { startServer, type ServerHandle } from '../src/serve/server.js';
import { runServe } from '../src/recipes/serve.js';
import { run, type Run } from './helpers/cli.js';


interface Rec { id: string; sourceIndex: number; inputIds: number[]; lossMask: number[]; topk: number[] | null; lp: number[] | null; roles: string[] }
function records(dir: string): Rec[] {
  const ds = openDataset(dir);
  return [...iterateRecords(ds)].map((r) => ({
    id: r.id, sourceIndex: r.sourceIndex, inputIds: Array.from(r.inputIds), lossMask: Array.from(r.lossMask), roles: r.turnRoles,
    topk: r.teacherTopkIds ? Array.from(r.teacherTopkIds) : null, lp: r.teacherTopkLogprobs ? Array.from(r.teacherTopkLogprobs) : null,
  }));
}
const generatedOf = (r: Rec): number[] => r.inputIds.filter((_, i) => r.lossMask[i] === 1);

let tmp: string;
let model: string;
let server: ServerHandle;
let unload: () => void;
const PROMPTS = ['Tell me about bees.', 'Why is the sea salty?', 'Write one line about trains.', 'Hello!'];

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-distill-'));
  process.env['MEDUSA_TRAIN_CACHE'] = path.join(tmp, 'cache');
  model = path.join(tmp, 'model');
  writeTinyModel(model, { seed: 5, maxPositionEmbeddings: 512 });
  fs.writeFileSync(path.join(tmp, 'prompts.jsonl'), PROMPTS.map((p) => JSON.stringify({ prompt: p })).join('\n') + '\n');
  await initBackend('wasm');
  const { decoder } = loadDecoder(model);
  unload = () => disposeWeights(decoder.weights);
  server = await startServer({ decoder, tokenizer: await loadTokenizer(model), modelName: 'tiny', host: '127.0.0.1', port: 0, maxBatch: 4, maxQueue: 64, maxNewTokensLimit: 400, log: () => {} });
});
afterAll(async () => {
  await server.close();
  unload();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const common = (out: string, ...extra: string[]): string[] => ['distill', '--input', path.join(tmp, 'prompts.jsonl'), '--out', out, '--model', model, '--temperature', '0', '--max-new-tokens', '12', '--no-progress', '--backend', 'wasm', ...extra];

describe('greedy distill equals generate', () => {
  test('local engine: prompt and generated tokens equal `generate --chat`', async () => {
    const out = path.join(tmp, 'ds-local');
    const d = await run(...common(out, '--teacher-topk', '3'));
    expect(d.code).toBe(0);
    const recs = records(out);
    expect(recs.map((r) => r.id)).toEqual(PROMPTS.map((_, i) => `prompts.jsonl:${i + 1}`));
    for (const [i, p] of PROMPTS.entries()) {
      const g = JSON.parse((await run('generate', '--model', model, '--chat', '--prompt', p, '--max-new-tokens', '12', '--json', '--backend', 'wasm')).out);
      const r = recs[i];
      const firstGen = r.lossMask.indexOf(1);
      expect(r.inputIds.slice(0, firstGen)).toEqual(g.outputs[0].promptTokens);
      expect(generatedOf(r)).toEqual(g.outputs[0].tokens);
      // teacher top-1 is the greedy token itself, with k=3 entries per generated token
      expect(r.topk!.length).toBe(3 * generatedOf(r).length);
      generatedOf(r).forEach((tok, j) => expect(r.topk![3 * j]).toBe(tok));
    }
  });

  test('openai engine against `serve` gives the same dataset tokens', async () => {
    const local = records(path.join(tmp, 'ds-local'));
    const out = path.join(tmp, 'ds-openai');
    const d = await run(...common(out, '--engine', 'openai', '--url', server.url, '--in-flight', '3'));
    expect(d.code).toBe(0);
    const remote = records(out);
    expect(remote.map((r) => [r.id, r.inputIds, r.lossMask])).toEqual(local.map((r) => [r.id, r.inputIds, r.lossMask]));
  });
});

/** A loopback port with nothing listening. */
async function deadPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** A proxy to `server` that fails the first requests with 500s and hangs on some (bounded). */
async function flakyProxy(plan: ('500' | 'hang' | 'ok')[]): Promise<{ url: string; close: () => Promise<void>; seen: () => number }> {
  let n = 0;
  const hanging: http.ServerResponse[] = [];
  const proxy = http.createServer((req, res) => {
    const what = plan[n++] ?? 'ok';
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', async () => {
      if (what === '500') {
        res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: 'injected failure', type: 'server_error' } }));
      } else if (what === 'hang') {
        hanging.push(res);
      } else {
        const r = await fetch(`${server.url}${req.url}`, { method: req.method, headers: { 'content-type': 'application/json' }, body: req.method === 'POST' ? Buffer.concat(chunks) : undefined });
        res.writeHead(r.status, { 'content-type': 'application/json' }).end(await r.text());
      }
    });
  });
  await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', () => r()));
  return {
    url: `http://127.0.0.1:${(proxy.address() as net.AddressInfo).port}`,
    seen: () => n,
    close: async () => {
      for (const h of hanging) h.destroy();
      proxy.closeAllConnections();
      await new Promise<void>((r) => proxy.close(() => r()));
    },
  };
}

test('openai engine against `serve` on the onnx backbone gives the same dataset tokens as the local engine', async () => {
  const srv = await runServe({ model, host: '127.0.0.1', port: 0, maxBatch: 4, maxQueue: 64, maxNewTokensLimit: 400, backboneEngine: 'onnx', log: () => {} });
  try {
    const out = path.join(tmp, 'ds-openai-onnx');
    const d = await run(...common(out, '--engine', 'openai', '--url', srv.url, '--in-flight', '4'));
    expect(d.code).toBe(0);
    const local = records(path.join(tmp, 'ds-local'));
    expect(records(out).map((r) => [r.id, r.inputIds, r.lossMask])).toEqual(local.map((r) => [r.id, r.inputIds, r.lossMask]));
  } finally {
    await srv.close();
  }
});

describe('openai engine faults', () => {
  test('500s, timeouts and a refused URL are retried; nothing is lost', async () => {
    const proxy = await flakyProxy(['500', 'hang', '500', 'ok', '500']);
    const dead = `http://127.0.0.1:${await deadPort()}`;
    const out = path.join(tmp, 'ds-faults');
    const d = await run(...common(out, '--engine', 'openai', '--url', dead, '--url', proxy.url, '--served-model', 'tiny', '--in-flight', '2', '--retries', '8', '--backoff-ms', '1', '--timeout', '1', '--json'));
    await proxy.close();
    expect(d.code).toBe(0);
    const s = JSON.parse(d.out);
    expect(s.written).toBe(PROMPTS.length);
    expect(s.failed).toBe(0);
    expect(s.openai.retried).toBeGreaterThan(0);
    expect(s.openai.byUrl[dead].errors).toBeGreaterThan(0);
    expect(s.openai.byUrl[dead].ok).toBe(0);
    expect(proxy.seen()).toBeGreaterThanOrEqual(5);
    // same tokens as without faults
    expect(records(out).map((r) => r.inputIds)).toEqual(records(path.join(tmp, 'ds-local')).map((r) => r.inputIds));
  });

  test('a server that keeps failing: every conversation is accounted as failed, with the reason', async () => {
    const proxy = await flakyProxy(Array(100).fill('500'));
    const out = path.join(tmp, 'ds-down');
    const d = await run(...common(out, '--engine', 'openai', '--url', proxy.url, '--served-model', 'tiny', '--retries', '1', '--backoff-ms', '1', '--json'));
    await proxy.close();
    expect(d.code).toBe(0);
    const s = JSON.parse(d.out);
    expect(s.written).toBe(0);
    expect(s.failed).toBe(PROMPTS.length);
    expect(s.written + s.failed + s.skipped).toBe(s.input);
    expect(s.failures[0].reason).toContain('injected failure');
    expect(openDataset(out).manifest.failures.length).toBe(PROMPTS.length);
  });
});

describe('inputs and accounting', () => {
  test('malformed rows are counted skips; written + failed + skipped == input', async () => {
    const file = path.join(tmp, 'mixed.jsonl');
    fs.writeFileSync(file, [
      JSON.stringify({ conversations: [{ from: 'system', value: 'Be brief.' }, { from: 'human', value: 'Hi' }, { from: 'gpt', value: 'x' }, { from: 'human', value: 'More?' }] }),
      '{not json',
      JSON.stringify({ conversations: [{ from: 'gpt', value: 'only an answer' }] }),
      JSON.stringify({ conversations: [{ from: 'human', value: 'Tell me a joke' }] }),
    ].join('\n') + '\n');
    const out = path.join(tmp, 'ds-mixed');
    const d = await run('distill', '--input', file, '--out', out, '--model', model, '--max-new-tokens', '6', '--no-progress', '--json', '--backend', 'wasm');
    expect(d.code).toBe(0);
    const s = JSON.parse(d.out);
    expect(s.input).toBe(4);
    expect(s.skipped).toBe(2);
    expect(s.written + s.failed + s.skipped).toBe(4);
    expect(s.skips.map((k: { row: number }) => k.row).sort()).toEqual([2, 3]);
    const recs = records(out);
    expect(recs[0].roles.slice(0, 3)).toEqual(['system', 'user', 'assistant']);
  });

  test('resuming with other settings is refused, naming the setting', async () => {
    const r = await run(...common(path.join(tmp, 'ds-local'), '--max-new-tokens', '13'));
    expect(r.code).not.toBe(0);
    expect(r.err).toContain('sampling');
    expect(r.err).toContain('--overwrite');
  });
});

describe('kill -9 and resume', () => {
  function spawnDistill(out: string, prompts: string): ReturnType<typeof spawn> {
    return spawn(process.execPath, ['dist/src/bin.js', 'distill', '--input', prompts, '--out', out, '--model', model, '--temperature', '0.7', '--seed', '9',
      '--max-new-tokens', '48', '--shard-size', '3', '--batch-size', '2', '--teacher-topk', '2', '--no-progress', '--backend', 'wasm'],
    // no re-exec: SIGKILL must hit the process that writes the dataset
    { stdio: 'ignore', env: { ...process.env, MEDUSA_TRAIN_NO_REEXEC: '1' } });
  }

  test('a run killed mid-way and rerun equals an uninterrupted run', async () => {
    const prompts = path.join(tmp, 'many.jsonl');
    const lines: string[] = [];
    for (let i = 0; i < 30; i++) lines.push(JSON.stringify({ id: `c${i}`, messages: [{ role: 'user', content: `${PROMPTS[i % 4]} (${i})` }, { role: 'assistant', content: 'x' }, { role: 'user', content: 'And then?' }] }));
    fs.writeFileSync(prompts, lines.join('\n') + '\n');
    const killed = path.join(tmp, 'ds-killed');
    const whole = path.join(tmp, 'ds-whole');
    const child = spawnDistill(killed, prompts);
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    const t0 = Date.now();
    let shardsAtKill = 0;
    while (Date.now() - t0 < 60_000) {
      const m = path.join(killed, 'manifest.json');
      if (fs.existsSync(m)) {
        try {
          shardsAtKill = (JSON.parse(fs.readFileSync(m, 'utf8')) as { shards: unknown[] }).shards.length;
        } catch {
          shardsAtKill = 0;
        }
      }
      if (shardsAtKill >= 2) break;
      await new Promise((r) => setTimeout(r, 5));
    }
    child.kill('SIGKILL');
    await exited;
    expect(shardsAtKill).toBeGreaterThanOrEqual(2);
    const partial = openDataset(killed);
    expect(partial.manifest.complete).toBe(false);
    expect(partial.rows).toBeLessThan(30);
    // rerun the same command in-process, and an uninterrupted run for reference
    const args = ['distill', '--input', prompts, '--temperature', '0.7', '--seed', '9', '--max-new-tokens', '48', '--shard-size', '3', '--batch-size', '2', '--teacher-topk', '2', '--no-progress', '--backend', 'wasm', '--model', model];
    const resumed = await run(...args, '--out', killed);
    expect(resumed.code).toBe(0);
    expect(resumed.err).toMatch(/resuming .* at conversation \d+/);
    expect((await run(...args, '--out', whole)).code).toBe(0);
    const a = records(killed);
    const b = records(whole);
    expect(a.length).toBe(30);
    expect(a).toEqual(b);
    expect(openDataset(killed).manifest.complete).toBe(true);
  });
});
