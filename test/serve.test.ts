/**
 * The OpenAI-compatible server, in process on an ephemeral loopback port over a tiny model: results
 * equal `generate()` on the same ids, seeded sampling does not depend on the batch, streams
 * concatenate to the non-streamed text, requests are batched, every error has OpenAI's shape and
 * leaves the server serving, and a client leaving mid-stream does not disturb the others.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';
import { initBackend } from '../src/backend.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { loadDecoder } from '../src/model/load.js';
import { disposeWeights } from '../src/model/weights.js';
import type { Decoder } from '../src/model/decoder.js';
import { generate, startGeneration, type GenerateOptions } from '../src/model/generate.js';
import { loadTokenizer, type Tokenizer } from '../src/data/tokenizer.js';
import { renderChat } from '../src/data/chat.js';
import { startServer, type ServerHandle } from '../src/serve/server.js';
import { IncrementalDetokenizer, StopStrings } from '../src/serve/text.js';
import { foldSeed } from '../src/serve/protocol.js';
import { main } from '../src/cli.js';
import { openModelFolder } from '../src/model/load.js';
import { disposeHeads, exportHeads, initHeads } from '../src/model/heads.js';
import { saveCheckpoint } from '../src/train/checkpoint.js';
import { runExport } from '../src/recipes/export.js';
import { runServe, type ServeHandle } from '../src/recipes/serve.js';
import { openHeadsSource } from '../src/eval/heads-source.js';
import { readHeader, readTensorF32, writeSafetensors } from '../src/io/safetensors.js';
import { expectMedusa } from './helpers/errors.js';

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

let tmp: string;
let modelDir: string;
let decoder: Decoder;
let tokenizer: Tokenizer;
let server: ServerHandle;
let eosIds: number[];
const logs: string[] = [];
/** A prompt starting with this id makes the injected engine fail at its second step. */
const FAULT_ID = 300;

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-serve-'));
  process.env['MEDUSA_TRAIN_CACHE'] = path.join(tmp, 'cache');
  modelDir = path.join(tmp, 'tiny-serve');
  writeTinyModel(modelDir, { seed: 7, maxPositionEmbeddings: 256 });
  await initBackend('wasm');
  decoder = loadDecoder(modelDir).decoder;
  tokenizer = await loadTokenizer(modelDir);
  eosIds = [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])];
  server = await startServer({
    decoder, tokenizer, modelName: 'tiny-serve', host: '127.0.0.1', port: 0,
    maxBatch: 8, maxQueue: 64, maxNewTokensLimit: 200, log: (l) => logs.push(l),
    engine: (model, prompts, o) => {
      const s = startGeneration(model, prompts, o);
      if (!prompts.some((p) => p[0] === FAULT_ID)) return s;
      let steps = 0;
      return {
        get batch() { return s.batch; }, get tokens() { return s.tokens; }, get finish() { return s.finish; },
        get prefillMs() { return s.prefillMs; }, get promptTokens() { return s.promptTokens; },
        step() {
          if (++steps === 2) throw new Error('injected engine fault');
          return s.step();
        },
        dispose() { s.dispose(); },
      };
    },
  });
});

afterAll(async () => {
  await server?.close();
  if (decoder) disposeWeights(decoder.weights);
  fs.rmSync(tmp, { recursive: true, force: true });
});

// --- helpers ---

async function post(route: string, body: unknown, init: RequestInit = {}): Promise<{ status: number; json: Json; headers: Headers }> {
  const res = await fetch(server.url + route, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body), ...init,
  });
  const text = await res.text();
  let json: Json;
  try {
    json = JSON.parse(text);
  } catch {
    json = { raw: text };
  }
  return { status: res.status, json, headers: res.headers };
}

interface Sse { status: number; events: Json[]; done: boolean; contentType: string | null }

/** POST with stream: true and read the SSE events (at most `maxEvents`, then abort if `abortAfter`). */
async function stream(route: string, body: Json, o: { abortAfter?: number; base?: string } = {}): Promise<Sse> {
  const ac = new AbortController();
  const res = await fetch((o.base ?? server.url) + route, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }), signal: ac.signal });
  const out: Sse = { status: res.status, events: [], done: false, contentType: res.headers.get('content-type') };
  if (!res.body) return out;
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (let i = 0; i < 100_000; i++) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut: number;
    while ((cut = buf.indexOf('\n\n')) !== -1) {
      const ev = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      expect(ev.startsWith('data: ')).toBe(true);
      const data = ev.slice(6);
      if (data === '[DONE]') out.done = true;
      else out.events.push(JSON.parse(data));
    }
    if (o.abortAfter !== undefined && out.events.length >= o.abortAfter) {
      ac.abort();
      await reader.cancel().catch(() => {});
      return out;
    }
  }
  return out;
}

async function waitFor(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const t0 = Date.now();
  for (let i = 0; i < 10_000 && !cond(); i++) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
  expect(cond()).toBe(true);
}

/**
 * Make requests share one batch deterministically: a long streamed "blocker" occupies the engine,
 * the requests queue behind it, then the blocker's client leaves and the queued requests start together.
 */
async function batchedTogether<T>(s: ServerHandle, send: () => Promise<T>[]): Promise<T[]> {
  const ac = new AbortController();
  const blocker = fetch(`${s.url}/v1/completions`, {
    method: 'POST', body: JSON.stringify({ prompt: [1, 2, 3], max_tokens: 200, ignore_eos: true, stream: true }), signal: ac.signal,
  }).catch(() => null);
  await waitFor(() => s.stats().running === 1 && s.stats().queued === 0, 'the blocker to run');
  const batchesBefore = s.stats().batches;
  const pending = send();
  await waitFor(() => s.stats().queued === pending.length, 'the requests to queue');
  expect(s.stats().batches).toBe(batchesBefore); // still the blocker's batch
  ac.abort();
  await blocker;
  const out = await Promise.all(pending);
  const st = s.stats();
  expect(st.batchSizes[st.batchSizes.length - (st.batches - batchesBefore)]).toBe(pending.length);
  return out;
}

function expectOpenAiError(r: { status: number; json: Json }, status: number, param?: string | null, code?: string): void {
  expect(r.status).toBe(status);
  expect(Object.keys(r.json)).toEqual(['error']);
  const e = r.json.error;
  expect(typeof e.message).toBe('string');
  expect(e.message.length).toBeGreaterThan(0);
  expect(e.type).toBe(status >= 500 ? 'server_error' : 'invalid_request_error');
  expect('param' in e && 'code' in e).toBe(true);
  if (param !== undefined) expect(e.param).toBe(param);
  if (code !== undefined) expect(e.code).toBe(code);
}

function reference(prompt: number[], maxNewTokens: number, o: Partial<GenerateOptions> = {}): { tokens: number[]; finish: string; text: string } {
  const r = generate(decoder, [prompt], { maxNewTokens, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId: 0, ...o });
  return { tokens: r.tokens[0], finish: r.finish[0] === 'eos' ? 'stop' : 'length', text: tokenizer.decode(r.tokens[0], { skipSpecialTokens: true }) };
}

const idsPrompt = [1, 300, 270, 280, 290, 301, 9, 40];

// --- tests ---

describe('text helpers', () => {
  test('incremental detokenization concatenates to the full decode, multi-byte characters included', () => {
    const text = 'héllo wörld ✓ 日本語 🙂 done';
    const ids = tokenizer.encode(text, { addSpecialTokens: false });
    const dec = new IncrementalDetokenizer((x) => tokenizer.decode(x, { skipSpecialTokens: true }));
    let out = '';
    const pieces: string[] = [];
    for (const id of ids) {
      const p = dec.push(id);
      expect(p.includes('\uFFFD')).toBe(false);
      pieces.push(p);
      out += p;
    }
    out += dec.flush();
    expect(out).toBe(text);
    expect(pieces.filter((p) => p === '').length).toBeGreaterThan(0); // some characters were split across tokens
  });

  test('stop strings: earliest match, trimmed, partial matches held back', () => {
    const s = new StopStrings(['END', 'xy']);
    expect(s.append('abc E')).toBe(false);
    expect(s.safeLength()).toBe(4); // "E" might start "END"
    expect(s.append('N')).toBe(false);
    expect(s.safeLength()).toBe(4);
    expect(s.append('Dxy')).toBe(true);
    expect(s.final).toBe('abc ');
    const inc = new StopStrings(['END'], true);
    inc.append('aENDb');
    expect(inc.final).toBe('aEND');
    expect(foldSeed(12345)).toBe(12345);
    expect(foldSeed(-1)).not.toBe(foldSeed(2 ** 32 - 1 + 2 ** 32));
  });
});

describe('results equal generate()', () => {
  test('GET /v1/models and /health', async () => {
    const m = await (await fetch(`${server.url}/v1/models`)).json() as Json;
    expect(m.object).toBe('list');
    expect(m.data).toEqual([{ id: 'tiny-serve', object: 'model', created: expect.any(Number), owned_by: 'medusa-train', max_model_len: 256 }]);
    const one = await fetch(`${server.url}/v1/models/tiny-serve`);
    expect((await one.json() as Json).id).toBe('tiny-serve');
    const missing = await fetch(`${server.url}/v1/models/other%ZZ`);
    expectOpenAiError({ status: missing.status, json: await missing.json() }, 404, 'model', 'model_not_found');
    const h = await fetch(`${server.url}/health`);
    expect(h.status).toBe(200);
    await h.arrayBuffer();
  });

  test('greedy completion from token ids: tokens, text, finish and usage', async () => {
    const ref = reference(idsPrompt, 12);
    const r = await post('/v1/completions', { model: 'tiny-serve', prompt: idsPrompt, max_tokens: 12, temperature: 0, return_token_ids: true });
    expect(r.status).toBe(200);
    const j = r.json;
    expect(j.id).toMatch(/^cmpl-/);
    expect(j.object).toBe('text_completion');
    expect(j.model).toBe('tiny-serve');
    expect(typeof j.created).toBe('number');
    expect(j.choices).toHaveLength(1);
    const c = j.choices[0];
    expect(c.index).toBe(0);
    expect(c.token_ids).toEqual(ref.tokens);
    expect(c.text).toBe(ref.text);
    expect(c.finish_reason).toBe(ref.finish);
    expect(c.logprobs).toBeNull();
    expect(j.prompt_token_ids).toEqual(idsPrompt);
    expect(j.usage).toEqual({ prompt_tokens: idsPrompt.length, completion_tokens: ref.tokens.length, total_tokens: idsPrompt.length + ref.tokens.length });
    // without return_token_ids there are no id fields
    const plain = await post('/v1/completions', { prompt: idsPrompt, max_tokens: 12, temperature: 0 });
    expect(plain.json.choices[0].text).toBe(ref.text);
    expect(plain.json.choices[0].token_ids).toBeUndefined();
    expect(plain.json.prompt_token_ids).toBeUndefined();
  });

  test('a stop token id ends the row like eos: kept in token_ids, not in the text', async () => {
    const body = { prompt: 'Once upon a time', max_tokens: 20, temperature: 1, seed: 11 };
    const ids = tokenizer.encode(body.prompt);
    const ref = reference(ids, 20, { temperature: 1, seed: 11 });
    const at = ref.tokens.findIndex((t, i) => i >= 3 && ref.tokens.indexOf(t) === i);
    expect(at).toBeGreaterThanOrEqual(3);
    const stopId = ref.tokens[at];
    const expected = reference(ids, 20, { temperature: 1, seed: 11, eosIds: [...eosIds, stopId] });
    expect(expected.tokens).toEqual(ref.tokens.slice(0, at + 1));
    const r = await post('/v1/completions', { ...body, stop_token_ids: [stopId], return_token_ids: true });
    const c = r.json.choices[0];
    expect(c.token_ids).toEqual(expected.tokens);
    expect(c.finish_reason).toBe('stop');
    expect(c.text).toBe(tokenizer.decode(expected.tokens.slice(0, -1), { skipSpecialTokens: true }));
    expect(r.json.usage.completion_tokens).toBe(expected.tokens.length);
    const st = await stream('/v1/completions', { ...body, stop_token_ids: [stopId], return_token_ids: true });
    const last = st.events[st.events.length - 1].choices[0];
    // The final chunk carries the stop id and only text held back until then (bytes of a split character), never the stop token's text.
    const before = st.events.slice(0, -1).map((e) => e.choices[0].text).join('');
    expect(last).toEqual({ index: 0, text: c.text.slice(before.length), logprobs: null, finish_reason: 'stop', token_ids: [stopId] });
    expect(st.events.map((e) => e.choices[0].text).join('')).toBe(c.text);
  });

  test('a string prompt is tokenized with encode(text)', async () => {
    const prompt = 'The capital of France is';
    const ids = tokenizer.encode(prompt);
    const ref = reference(ids, 10);
    const r = await post('/v1/completions', { prompt, max_tokens: 10, temperature: 0, return_token_ids: true });
    expect(r.json.choices[0].prompt_token_ids).toEqual(ids);
    expect(r.json.choices[0].token_ids).toEqual(ref.tokens);
    expect(r.json.choices[0].text).toBe(ref.text);
    expect(r.json.usage.prompt_tokens).toBe(ids.length);
    // a one-element list of prompts is that prompt
    const one = await post('/v1/completions', { prompt: [prompt], max_tokens: 10, temperature: 0 });
    expect(one.json.choices[0].text).toBe(ref.text);
  });

  test('chat completions render the chat template', async () => {
    const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello! What is the weather?' }] as const;
    const text = renderChat(tokenizer.chatTemplate!, [...messages], { addGenerationPrompt: true, bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken });
    const ids = tokenizer.encode(text, { addSpecialTokens: false });
    const ref = reference(ids, 9);
    const r = await post('/v1/chat/completions', { model: 'tiny-serve', messages, max_tokens: 9, temperature: 0, return_token_ids: true });
    expect(r.status).toBe(200);
    const j = r.json;
    expect(j.id).toMatch(/^chatcmpl-/);
    expect(j.object).toBe('chat.completion');
    expect(j.prompt_token_ids).toEqual(ids);
    expect(j.choices[0].message).toEqual({ role: 'assistant', content: ref.text });
    expect(j.choices[0].token_ids).toEqual(ref.tokens);
    expect(j.choices[0].finish_reason).toBe(ref.finish);
    expect(j.choices[0].logprobs).toBeNull();
    expect(j.usage).toEqual({ prompt_tokens: ids.length, completion_tokens: ref.tokens.length, total_tokens: ids.length + ref.tokens.length });
    // max_completion_tokens is the same; content parts are text
    const r2 = await post('/v1/chat/completions', {
      messages: [messages[0], { role: 'user', content: [{ type: 'text', text: 'Hello! ' }, { type: 'text', text: 'What is the weather?' }] }],
      max_completion_tokens: 9, temperature: 0,
    });
    expect(r2.json.choices[0].message.content).toBe(ref.text);
  });

  test('chat without max_tokens generates up to the server limit', async () => {
    const r = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'Hi' }], temperature: 0, ignore_eos: true });
    expect(r.status).toBe(200);
    expect(r.json.usage.completion_tokens).toBe(200);
    expect(r.json.choices[0].finish_reason).toBe('length');
  });

  test('stop strings trim the text and finish with "stop"', async () => {
    const body = { prompt: 'Once upon a time', max_tokens: 40, temperature: 1, seed: 11 };
    const ref = reference(tokenizer.encode(body.prompt), 40, { temperature: 1, seed: 11 });
    // a stop string taken from the middle of the sampled text
    let stop = '';
    for (let at = 8; at < ref.text.length - 3 && !stop; at++) {
      const cand = ref.text.slice(at, at + 2);
      if (!cand.includes('\uFFFD') && ref.text.indexOf(cand) > 2) stop = cand;
    }
    expect(stop).not.toBe('');
    const cut = ref.text.indexOf(stop);
    const r = await post('/v1/completions', { ...body, stop: [stop, 'never-appears-xyz'], return_token_ids: true });
    expect(r.json.choices[0].finish_reason).toBe('stop');
    expect(r.json.choices[0].text).toBe(ref.text.slice(0, cut));
    expect(r.json.choices[0].token_ids).toEqual(ref.tokens.slice(0, r.json.choices[0].token_ids.length));
    expect(r.json.choices[0].token_ids.length).toBeLessThan(40);
    const s = await stream('/v1/completions', { ...body, stop });
    expect(s.events.map((e) => e.choices[0].text).join('')).toBe(ref.text.slice(0, cut));
    expect(s.events[s.events.length - 1].choices[0].finish_reason).toBe('stop');
    const inc = await post('/v1/completions', { ...body, stop, include_stop_str_in_output: true });
    expect(inc.json.choices[0].text).toBe(ref.text.slice(0, cut + stop.length));
  });
});

describe('sampling and batching', () => {
  const sampled = { prompt: [1, 50, 60, 70, 80], max_tokens: 24, temperature: 1.3, top_p: 0.95, top_k: 100, seed: 1234, return_token_ids: true };

  test('a seeded request gives the same tokens alone and in a batch of 6 (and equals generate with that seed)', async () => {
    const alone = await post('/v1/completions', sampled);
    expect(alone.status).toBe(200);
    const ref = reference(sampled.prompt, 24, { temperature: 1.3, topP: 0.95, topK: 100, seed: 1234 });
    expect(alone.json.choices[0].token_ids).toEqual(ref.tokens);
    const others = [
      { prompt: 'A much longer prompt that pads the batch quite a bit more than the others', max_tokens: 30, temperature: 0.7, seed: 1 },
      { prompt: [1, 2, 3], max_tokens: 3, temperature: 0 },
      { prompt: 'Hello', max_tokens: 40, top_k: 5 },
      { prompt: [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], max_tokens: 10, temperature: 2, top_p: 0.5 },
      { prompt: 'The weather today', max_tokens: 17, temperature: 1, stop: ['e'] },
    ];
    const all = await batchedTogether(server, () => [post('/v1/completions', sampled), ...others.map((b) => post('/v1/completions', b))]);
    for (const r of all) expect(r.status).toBe(200);
    expect(all[0].json.choices[0].token_ids).toEqual(alone.json.choices[0].token_ids);
    expect(all[0].json.choices[0].text).toBe(alone.json.choices[0].text);
    // a different seed gives a different sample
    const other = await post('/v1/completions', { ...sampled, seed: 99 });
    expect(other.json.choices[0].token_ids).not.toEqual(alone.json.choices[0].token_ids);
  });

  test('8 concurrent requests all succeed and are batched', async () => {
    const batchesBefore = server.stats().batches;
    const logStart = logs.length;
    const bodies = Array.from({ length: 8 }, (_, i) => ({ prompt: [1, 100 + i, 200 + i, 50], max_tokens: 8 + i, temperature: 0, return_token_ids: true }));
    const rs = await Promise.all(bodies.map((b) => post('/v1/completions', b)));
    rs.forEach((r, i) => {
      expect(r.status).toBe(200);
      expect(r.json.choices[0].token_ids).toEqual(reference(bodies[i].prompt, bodies[i].max_tokens).tokens);
    });
    const st = server.stats();
    const sizes = st.batchSizes.slice(st.batchSizes.length - (st.batches - batchesBefore));
    expect(sizes.reduce((a, b) => a + b, 0)).toBe(8);
    expect(Math.max(...sizes)).toBeGreaterThan(1);
    const lines = logs.slice(logStart).filter((l) => l.startsWith('POST /v1/completions 200'));
    expect(lines).toHaveLength(8);
    expect(lines.some((l) => /batch=([2-8])/.test(l))).toBe(true);
    expect(lines[0]).toMatch(/prompt=4 completion=\d+ batch=\d+ \d+ms/);
  });
});

describe('streaming', () => {
  test('completion chunks concatenate to the non-streamed text and end with [DONE]', async () => {
    for (const body of [
      { prompt: idsPrompt, max_tokens: 30, temperature: 0 },
      { prompt: 'Once upon a time', max_tokens: 40, temperature: 1.5, seed: 5 }, // random bytes: split characters
    ]) {
      const full = await post('/v1/completions', { ...body, return_token_ids: true });
      const s = await stream('/v1/completions', { ...body, return_token_ids: true, stream_options: { include_usage: true } });
      expect(s.status).toBe(200);
      expect(s.contentType).toMatch(/^text\/event-stream/);
      expect(s.done).toBe(true);
      const chunks = s.events.filter((e) => e.choices.length > 0);
      expect(chunks.length).toBe(full.json.choices[0].token_ids.length); // one chunk per token
      for (const c of chunks) {
        expect(c.object).toBe('text_completion');
        expect(c.id).toBe(chunks[0].id);
      }
      expect(full.json.choices[0].text).toBe(tokenizer.decode(full.json.choices[0].token_ids, { skipSpecialTokens: true }));
      expect(chunks.map((c) => c.choices[0].text).join('')).toBe(full.json.choices[0].text);
      expect(chunks.flatMap((c) => c.choices[0].token_ids)).toEqual(full.json.choices[0].token_ids);
      expect(chunks[0].choices[0].prompt_token_ids).toEqual(full.json.choices[0].prompt_token_ids);
      expect(chunks.slice(0, -1).every((c) => c.choices[0].finish_reason === null)).toBe(true);
      expect(chunks[chunks.length - 1].choices[0].finish_reason).toBe(full.json.choices[0].finish_reason);
      const usage = s.events[s.events.length - 1];
      expect(usage.choices).toEqual([]);
      expect(usage.usage).toEqual(full.json.usage);
    }
  });

  test('chat chunks: role first, then content deltas', async () => {
    const body = { messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 20, temperature: 0.9, seed: 3 };
    const full = await post('/v1/chat/completions', body);
    const s = await stream('/v1/chat/completions', { ...body, return_token_ids: true });
    expect(s.done).toBe(true);
    expect(s.events[0].object).toBe('chat.completion.chunk');
    expect(s.events[0].id).toMatch(/^chatcmpl-/);
    expect(s.events[0].choices[0].delta).toEqual({ role: 'assistant', content: '' });
    expect(s.events[0].prompt_token_ids.length).toBe(full.json.usage.prompt_tokens);
    const rest = s.events.slice(1);
    expect(rest.map((e) => e.choices[0].delta.content).join('')).toBe(full.json.choices[0].message.content);
    expect(rest.length).toBe(full.json.usage.completion_tokens);
    expect(rest[rest.length - 1].choices[0].finish_reason).toBe(full.json.choices[0].finish_reason);
  });

  test('a client aborting its stream does not affect a concurrent request', async () => {
    const other = { prompt: [1, 77, 88, 99], max_tokens: 60, temperature: 0.8, seed: 42, return_token_ids: true };
    const alone = await post('/v1/completions', other);
    const [aborted, together] = await batchedTogether<Json>(server, () => [
      stream('/v1/completions', { prompt: [1, 5, 6, 7], max_tokens: 150, temperature: 0 }, { abortAfter: 3 }),
      post('/v1/completions', other),
    ]);
    expect(aborted.events.length).toBeGreaterThanOrEqual(3);
    expect(aborted.done).toBe(false);
    expect(together.status).toBe(200);
    expect(together.json.choices[0].token_ids).toEqual(alone.json.choices[0].token_ids);
    // the server logs the disconnect and keeps serving
    for (let i = 0; i < 100 && !logs.some((l) => l.includes('client disconnected')); i++) await new Promise((r) => setTimeout(r, 20));
    expect(logs.some((l) => l.includes('client disconnected'))).toBe(true);
    expect((await post('/v1/completions', { prompt: [1, 2], max_tokens: 2 })).status).toBe(200);
  });
});

describe('errors have OpenAI\'s shape and never stop the server', () => {
  test('each bad request gets its status', async () => {
    expectOpenAiError(await post('/v1/completions', '{"prompt": [1, 2'), 400, null, 'invalid_json');
    expectOpenAiError(await post('/v1/completions', '[1, 2]'), 400);
    expectOpenAiError(await post('/v1/completions', { max_tokens: 3 }), 400, 'prompt');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], n: 2 }), 400, 'n');
    expectOpenAiError(await post('/v1/completions', { prompt: [[1, 2], [3]] }), 400, 'prompt');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], model: 'gpt-4' }), 404, 'model', 'model_not_found');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], temperature: -1 }), 400, 'temperature');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], top_p: 0 }), 400, 'top_p');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], max_tokens: 0 }), 400, 'max_tokens');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], max_tokens: 201 }), 400, 'max_tokens');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], stop: 5 }), 400, 'stop');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], logprobs: 1 }), 400, 'logprobs');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2], echo: true }), 400, 'echo');
    expectOpenAiError(await post('/v1/completions', { prompt: '' }), 400, 'prompt');
    const over = await post('/v1/completions', { prompt: Array(200).fill(10), max_tokens: 100 });
    expectOpenAiError(over, 400, 'max_tokens', 'context_length_exceeded');
    expect(over.json.error.message).toContain('256');
    expect(over.json.error.message).toContain('300');
    expectOpenAiError(await post('/v1/completions', { prompt: Array(256).fill(10), max_tokens: 1 }), 400, 'prompt', 'context_length_exceeded');
    const badId = await post('/v1/completions', { prompt: [1, 2, 99999], max_tokens: 2 });
    expectOpenAiError(badId, 400, 'prompt', 'invalid_token_id');
    expect(badId.json.error.message).toContain('99999');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, -2] }), 400, 'prompt');
    expectOpenAiError(await post('/v1/completions', { prompt: [1, 2.5] }), 400, 'prompt');
    expectOpenAiError(await post('/v1/chat/completions', { messages: [] }), 400, 'messages');
    expectOpenAiError(await post('/v1/chat/completions', { messages: [{ role: 'tool', content: 'x' }] }), 400, 'messages[0].role');
    expectOpenAiError(await post('/v1/chat/completions', { messages: [{ role: 'user', content: 3 }] }), 400, 'messages[0].content');
    expectOpenAiError(await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], stream_options: { include_usage: true } }), 400, 'stream_options');
    expectOpenAiError(await post('/v1/nope', { prompt: [1] }), 404);
    const get = await fetch(`${server.url}/v1/completions`);
    expectOpenAiError({ status: get.status, json: await get.json() }, 405);
    expect(get.headers.get('allow')).toBe('POST');
    const del = await fetch(`${server.url}/v1/models`, { method: 'DELETE' });
    expectOpenAiError({ status: del.status, json: await del.json() }, 405);
    const long = await post('/v1/completions', { prompt: 'x'.repeat(256 * 64 + 1) });
    expectOpenAiError(long, 400, 'prompt', 'context_length_exceeded');
    const huge = await post('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(16 * 1024 * 1024 + 10) }));
    expectOpenAiError(huge, 413);
    // after all of that the server still answers
    const ok = await post('/v1/completions', { prompt: idsPrompt, max_tokens: 5, temperature: 0, return_token_ids: true });
    expect(ok.status).toBe(200);
    expect(ok.json.choices[0].token_ids).toEqual(reference(idsPrompt, 5).tokens);
  });

  test('garbage on the socket gets a 400 and the server keeps serving', async () => {
    const port = server.port;
    const reply = await new Promise<string>((resolve, reject) => {
      const sock = net.connect(port, '127.0.0.1', () => sock.write('NOT HTTP AT ALL\r\n\r\n'));
      let data = '';
      sock.on('data', (d) => { data += d.toString(); });
      sock.on('close', () => resolve(data));
      sock.on('error', reject);
      sock.setTimeout(5000, () => sock.destroy());
    });
    expect(reply.startsWith('HTTP/1.1 400')).toBe(true);
    expect((await fetch(`${server.url}/health`)).status).toBe(200);
  });

  test('an engine exception is a 500 for its batch only; the server keeps serving', async () => {
    const bad = await post('/v1/completions', { prompt: [FAULT_ID, 1, 2], max_tokens: 5, ignore_eos: true });
    expectOpenAiError(bad, 500, null, 'internal_error');
    expect(bad.json.error.message).toContain('injected engine fault');
    const badStream = await stream('/v1/completions', { prompt: [FAULT_ID, 1, 2], max_tokens: 5, ignore_eos: true });
    expect(badStream.status).toBe(200); // headers were sent when the batch started
    expect(badStream.events[badStream.events.length - 1].error.code).toBe('internal_error');
    expect(badStream.done).toBe(true);
    const ok = await post('/v1/completions', { prompt: idsPrompt, max_tokens: 5, temperature: 0, return_token_ids: true });
    expect(ok.json.choices[0].token_ids).toEqual(reference(idsPrompt, 5).tokens);
    expect(server.stats().failedBatches).toBe(2);
  });
});

describe('queue limit and shutdown', () => {
  test('a full queue answers 503 with Retry-After; close finishes the running batch and refuses the queued', async () => {
    const logs2: string[] = [];
    const s2 = await startServer({ decoder, tokenizer, modelName: 'q', host: '127.0.0.1', port: 0, maxBatch: 1, maxQueue: 1, maxNewTokensLimit: 200, log: (l) => logs2.push(l) });
    try {
      // A runs; B waits; C does not fit the queue.
      const a = stream('/v1/completions', { prompt: [1, 2, 3], max_tokens: 150, temperature: 0, ignore_eos: true }, { base: s2.url });
      for (let i = 0; i < 500 && s2.stats().running === 0; i++) await new Promise((r) => setTimeout(r, 5));
      expect(s2.stats().running).toBe(1);
      const ac = new AbortController();
      const b = fetch(`${s2.url}/v1/completions`, { method: 'POST', body: JSON.stringify({ prompt: [1, 2], max_tokens: 5 }), signal: ac.signal }).catch(() => 'aborted' as const);
      await waitFor(() => s2.stats().queued === 1, 'B to queue');
      const c = await fetch(`${s2.url}/v1/completions`, { method: 'POST', body: JSON.stringify({ prompt: [1, 2], max_tokens: 5 }) });
      expectOpenAiError({ status: c.status, json: await c.json() }, 503, null, 'server_overloaded');
      expect(c.headers.get('retry-after')).toBe('1');
      // a queued request whose client leaves gives its place up
      ac.abort();
      expect(await b).toBe('aborted');
      await waitFor(() => s2.stats().queued === 0, 'the aborted request to leave the queue');
      const e = fetch(`${s2.url}/v1/completions`, { method: 'POST', body: JSON.stringify({ prompt: [1, 2], max_tokens: 5 }) });
      await waitFor(() => s2.stats().queued === 1, 'the next request to queue');
      // graceful close: A completes, the queued one is refused
      const closed = s2.close();
      const [ra, re] = await Promise.all([a, e]);
      expectOpenAiError({ status: re.status, json: await re.json() }, 503, null, 'server_shutting_down');
      expect(ra.done).toBe(true);
      expect(ra.events.length).toBe(150);
      await closed;
      await expect(fetch(`${s2.url}/health`)).rejects.toThrow();
    } finally {
      await s2.close({ force: true });
    }
  });
});

describe('body limit', () => {
  test('bodies over the limit get 413, declared or chunked, and the server goes on', async () => {
    const s3 = await startServer({ decoder, tokenizer, modelName: 'b', host: '127.0.0.1', port: 0, maxBatch: 2, maxQueue: 4, maxNewTokensLimit: 10, log: () => {}, maxBodyBytes: 1000 });
    try {
      const body = (n: number): string => JSON.stringify({ prompt: [1, 2], max_tokens: 1, user: 'x'.repeat(n) });
      const ok = await fetch(`${s3.url}/v1/completions`, { method: 'POST', body: body(900) });
      expect(ok.status).toBe(200);
      await ok.arrayBuffer();
      const over = await fetch(`${s3.url}/v1/completions`, { method: 'POST', body: body(1000) });
      expectOpenAiError({ status: over.status, json: await over.json() }, 413, null, 'request_too_large');
      // a chunked upload (no Content-Length) far over the limit is cut off
      const chunks = Array.from({ length: 10 }, () => new TextEncoder().encode('x'.repeat(1000)));
      const streamBody = new ReadableStream<Uint8Array>({
        pull(c) {
          const next = chunks.shift();
          if (next) c.enqueue(next);
          else c.close();
        },
      });
      const chunked = await fetch(`${s3.url}/v1/completions`, { method: 'POST', body: streamBody, duplex: 'half' } as RequestInit).catch((e: Error) => e);
      if (!(chunked instanceof Response)) throw new Error(`chunked upload failed: ${String(chunked)}`);
      expectOpenAiError({ status: chunked.status, json: await chunked.json() }, 413);
      const again = await fetch(`${s3.url}/v1/completions`, { method: 'POST', body: body(10) });
      expect(again.status).toBe(200);
      await again.arrayBuffer();
    } finally {
      await s3.close();
    }
  });
});

describe('CLI', () => {
  test('serve --port 0 prints its URL, serves, and exits 0 on SIGTERM', async () => {
    const out: string[] = [];
    const err: string[] = [];
    const done = main(['serve', '--model', modelDir, '--port', '0', '--backend', 'wasm', '--served-model-name', 'cli-model'], { out: (s) => out.push(s), err: (s) => err.push(s) });
    let url: string | undefined;
    for (let i = 0; i < 1000 && !url; i++) {
      url = err.map((l) => /^listening on (http:\/\/127\.0\.0\.1:\d+)$/.exec(l)?.[1]).find((u) => u);
      if (!url) await new Promise((r) => setTimeout(r, 10));
    }
    expect(url).toBeDefined();
    const m = await (await fetch(`${url}/v1/models`)).json() as Json;
    expect(m.data[0].id).toBe('cli-model');
    const r = await fetch(`${url}/v1/completions`, { method: 'POST', body: JSON.stringify({ prompt: 'Hi', max_tokens: 3, model: 'cli-model' }) });
    expect(r.status).toBe(200);
    await r.arrayBuffer();
    process.emit('SIGTERM', 'SIGTERM');
    expect(await done).toBe(0);
    expect(err.some((l) => l.startsWith('POST /v1/completions 200'))).toBe(true);
    expect(err[err.length - 1]).toBe('server closed');
  });
});

describe('serve --medusa and generate --medusa from export folders', () => {
  const TREE = [[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0]];
  let runDir: string;
  let medusaDir: string;
  let vllmDir: string;
  let med: ServeHandle;
  const medLogs: string[] = [];

  async function postTo(base: string, route: string, body: unknown): Promise<{ status: number; json: Json }> {
    const res = await fetch(base + route, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    return { status: res.status, json: await res.json() };
  }

  function plainGreedy(ids: number[], n: number, stop: number[] = eosIds): number[] {
    return generate(decoder, [ids], { maxNewTokens: n, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: stop, padId: 0 }).tokens[0];
  }

  beforeAll(async () => {
    // A run with one checkpoint of fresh heads (W1 = 0, W2 = lm_head: they propose the model's own top tokens), its tree, and two exports.
    runDir = path.join(tmp, 'medusa-run');
    const c = decoder.config;
    const heads = initHeads({ numHeads: 3, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize, lmHead: 'per_head' }, decoder.weights.lmHead, 5);
    saveCheckpoint(runDir, {
      step: 1, heads: exportHeads(heads), optimizer: {},
      state: { step: 1, base_model_config_sha256: openModelFolder(modelDir).configHash, base_model_path: path.resolve(modelDir), heads_shape: { num_heads: 3, num_layers: 1, lm_head: 'per_head', hidden_size: c.hiddenSize, vocab_size: c.vocabSize } },
    }, { keep: 1 });
    disposeHeads(heads);
    fs.writeFileSync(path.join(runDir, 'medusa_choices.json'), JSON.stringify(TREE));
    medusaDir = path.join(tmp, 'medusa-export');
    vllmDir = path.join(tmp, 'vllm-export');
    await runExport({ run: runDir, format: 'medusa', out: medusaDir, force: false, log: () => {} });
    await runExport({ run: runDir, format: 'vllm', out: vllmDir, force: false, log: () => {} });
    med = await runServe({
      model: modelDir, host: '127.0.0.1', port: 0, maxBatch: 8, maxQueue: 16, maxNewTokensLimit: 200, backboneEngine: 'tfjs', medusa: medusaDir, log: (l) => medLogs.push(l),
    });
  });

  afterAll(async () => {
    await med?.close();
  });

  test('/v1/models says the server decodes with Medusa; --max-batch does not apply', async () => {
    const m = await (await fetch(`${med.url}/v1/models`)).json() as Json;
    expect(m.data[0].medusa).toMatchObject({ num_heads: 3, tree_nodes: TREE.length, posterior_threshold: 0.09, posterior_alpha: 0.3 });
    expect(medLogs.some((l) => l.includes('--max-batch does not apply'))).toBe(true);
  });

  test('temperature 0: exactly plain greedy\'s completion, streamed and not, with the usual usage counts; concurrent requests run one at a time', async () => {
    const prompts = [[5, 6, 7], [40, 41], [3, 1, 4, 1, 5, 9, 2, 6], [100]];
    const batchesBefore = med.stats().batches;
    const answers = await Promise.all(prompts.map((p) => postTo(med.url, '/v1/completions', { prompt: p, max_tokens: 40, temperature: 0, return_token_ids: true })));
    let accepted = false;
    for (const [i, p] of prompts.entries()) {
      const want = plainGreedy(p, 40);
      const r = answers[i];
      expect(r.status).toBe(200);
      const choice = r.json.choices[0];
      expect(choice.token_ids).toEqual(want);
      expect(choice.finish_reason).toBe(want.length === 40 && !eosIds.includes(want[39]) ? 'length' : 'stop');
      expect(r.json.usage).toEqual({ prompt_tokens: p.length, completion_tokens: want.length, total_tokens: p.length + want.length });
      const s = await stream('/v1/completions', { prompt: p, max_tokens: 40, temperature: 0, return_token_ids: true, stream_options: { include_usage: true } }, { base: med.url });
      expect(s.status).toBe(200);
      expect(s.done).toBe(true);
      const deltas = s.events.filter((e) => e.choices.length > 0);
      expect(deltas.flatMap((e) => e.choices[0].token_ids)).toEqual(want);
      expect(deltas.map((e) => e.choices[0].text).join('')).toBe(choice.text);
      expect(s.events[s.events.length - 1].usage).toEqual(r.json.usage);
    }
    expect(med.stats().largestBatch).toBe(1);
    expect(med.stats().batches - batchesBefore).toBe(2 * prompts.length);
    for (const l of medLogs) {
      const m = /^medusa: (\d+) tokens in (\d+) steps/.exec(l);
      if (m && Number(m[1]) > Number(m[2])) accepted = true;
    }
    expect(accepted).toBe(true); // some step accepted head tokens
    // chat completions too
    const chat = await postTo(med.url, '/v1/chat/completions', { messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 24, temperature: 0, return_token_ids: true });
    expect(chat.status).toBe(200);
    const ids = tokenizer.encode(renderChat(tokenizer.chatTemplate!, [{ role: 'user', content: 'Hello there' }], { addGenerationPrompt: true, bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken }), { addSpecialTokens: false });
    expect(chat.json.prompt_token_ids).toEqual(ids);
    expect(chat.json.choices[0].token_ids).toEqual(plainGreedy(ids, 24));
  });

  test('temperature > 0: typical acceptance, reproducible from the seed; top_p / top_k are refused', async () => {
    const body = { prompt: [5, 6, 7], max_tokens: 30, temperature: 0.8, seed: 1234, return_token_ids: true, ignore_eos: true };
    const a = await postTo(med.url, '/v1/completions', body);
    const b = await postTo(med.url, '/v1/completions', body);
    expect(a.status).toBe(200);
    expect(a.json.choices[0].token_ids).toHaveLength(30);
    expect(b.json.choices[0].token_ids).toEqual(a.json.choices[0].token_ids);
    const s = await stream('/v1/completions', body, { base: med.url });
    expect(s.events.flatMap((e) => e.choices[0].token_ids)).toEqual(a.json.choices[0].token_ids);
    const others = await Promise.all([1, 2, 3].map((seed) => postTo(med.url, '/v1/completions', { ...body, seed })));
    expect(others.some((o) => o.json.choices[0].token_ids.join() !== a.json.choices[0].token_ids.join())).toBe(true);
    const topP = await postTo(med.url, '/v1/completions', { ...body, top_p: 0.5 });
    expect(topP.status).toBe(400);
    expect(topP.json.error.param).toBe('top_p');
    expect(topP.json.error.message).toContain('typical acceptance');
    const topK = await postTo(med.url, '/v1/completions', { ...body, top_k: 5 });
    expect(topK.status).toBe(400);
    expect(topK.json.error.param).toBe('top_k');
    // greedy ignores top_p, as without Medusa
    expect((await postTo(med.url, '/v1/completions', { ...body, temperature: 0, top_p: 0.5 })).status).toBe(200);
  });

  test('heads source: a published folder without our metadata is matched by shape; no medusa_choices.json = a chain (said); bad trees and sizes are refused naming the file', async () => {
    // The medusa export's tensors again, without the safetensors metadata that records the base model's config hash.
    const foreign = path.join(tmp, 'foreign-medusa');
    fs.mkdirSync(foreign);
    const h = readHeader(path.join(medusaDir, 'medusa_lm_head.safetensors'));
    writeSafetensors(path.join(foreign, 'medusa_lm_head.safetensors'), Object.fromEntries([...h.tensors].map(([n, t]) => [n, { dtype: 'F32' as const, shape: t.shape, data: readTensorF32(t) }])));
    fs.copyFileSync(path.join(medusaDir, 'config.json'), path.join(foreign, 'config.json'));
    const c = decoder.config;
    const base = { dir: modelDir, configHash: openModelFolder(modelDir).configHash, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize };
    const src = openHeadsSource(foreign, base);
    expect(src).toMatchObject({ kind: 'medusa', baseCheck: 'shape', choicesFile: null, choices: [[0], [0, 0], [0, 0, 0]], topk: 1 });
    expect(src.notes.some((n) => n.includes('using a chain of 3 nodes'))).toBe(true);
    expect(openHeadsSource(medusaDir, base)).toMatchObject({ baseCheck: 'config-sha256', choices: TREE });
    expectMedusa(() => openHeadsSource(foreign, { ...base, hiddenSize: c.hiddenSize + 1 }), 'E_CONFIG', path.join(foreign, 'config.json'), `hidden size ${c.hiddenSize}`);
    // a chain decodes like plain greedy too
    const out: string[] = [];
    const err: string[] = [];
    expect(await main(['generate', '--model', modelDir, '--medusa', foreign, '--prompt', 'abc', '--max-new-tokens', '12', '--backbone-engine', 'tfjs', '--json'], { out: (x) => out.push(x), err: (x) => err.push(x) })).toBe(0);
    expect(JSON.parse(out.join('\n')).outputs[0].tokens).toEqual(plainGreedy(tokenizer.encode('abc', { addSpecialTokens: true }), 12));
    // a tree deeper than the heads
    fs.writeFileSync(path.join(foreign, 'medusa_choices.json'), JSON.stringify([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]));
    expectMedusa(() => openHeadsSource(foreign, base), 'E_CONFIG', path.join(foreign, 'medusa_choices.json'));
  });

  test('CLI: generate --medusa from a medusa or vllm export folder equals plain greedy; typical with a seed; top-p refused; another base model refused', async () => {
    const args = ['--model', modelDir, '--prompt', 'The quick brown fox', '--max-new-tokens', '32', '--backbone-engine', 'tfjs', '--json'];
    const run = async (...extra: string[]): Promise<{ code: number; out: string; err: string }> => {
      const out: string[] = [];
      const err: string[] = [];
      const code = await main(['generate', ...args, ...extra], { out: (s) => out.push(s), err: (s) => err.push(s) });
      return { code, out: out.join('\n'), err: err.join('\n') };
    };
    const plain = JSON.parse((await run()).out);
    for (const dir of [medusaDir, vllmDir]) {
      const r = await run('--medusa', dir);
      expect(r.code).toBe(0);
      const j = JSON.parse(r.out);
      expect(j.outputs[0].tokens).toEqual(plain.outputs[0].tokens);
      expect(j.medusa).toMatchObject({ acceptance: 'greedy', nodes: TREE.length, tree: path.join(path.resolve(dir), 'medusa_choices.json') });
      expect(j.medusa.steps).toBeLessThanOrEqual(plain.outputs[0].tokens.length);
      for (const k of ['proposeMs', 'verifyMs', 'hostMs']) expect(j.medusa.meanStepMs[k]).toBeGreaterThanOrEqual(0);
    }
    // the onnx backbone with the heads on onnxruntime too
    const onnx = JSON.parse((await run('--medusa', medusaDir, '--backbone-engine', 'onnx')).out);
    expect(onnx.backend).toBe('onnx (Medusa, heads on onnx)');
    expect(onnx.outputs[0].tokens).toEqual(plain.outputs[0].tokens);
    const t1 = JSON.parse((await run('--medusa', medusaDir, '--temperature', '0.8', '--seed', '7', '--no-eos')).out);
    const t2 = JSON.parse((await run('--medusa', medusaDir, '--temperature', '0.8', '--seed', '7', '--no-eos')).out);
    expect(t1.medusa).toMatchObject({ acceptance: 'typical', posteriorThreshold: 0.09, posteriorAlpha: 0.3, baseToken: 'typical' });
    expect(t1.outputs[0].tokens).toHaveLength(32);
    expect(t2.outputs[0].tokens).toEqual(t1.outputs[0].tokens);
    const refused = await run('--medusa', medusaDir, '--temperature', '0.8', '--top-p', '0.9');
    expect(refused.code).not.toBe(0);
    expect(refused.err).toContain('--top-p');
    // heads exported from another base model's run: the recorded config hash differs
    const other = path.join(tmp, 'other-serve-base');
    writeTinyModel(other, { seed: 8, maxPositionEmbeddings: 512 }); // another config.json (the hash covers the config, not the weights)
    const wrong = await main(['generate', '--model', other, '--medusa', medusaDir, '--prompt', 'hi', '--backbone-engine', 'tfjs'], { out: () => {}, err: (s) => medLogs.push(s) });
    expect(wrong).not.toBe(0);
    expect(medLogs[medLogs.length - 1]).toContain('another base model');
    expect(medLogs[medLogs.length - 1]).toContain(path.join(other, 'config.json'));
  });
});
