/**
 * Any OpenAI-compatible server as a distillation engine (vLLM, TGI, SGLang, llama.cpp, or our own
 * `medusa-train serve`): many requests in flight, round-robin over base URLs, timeouts, retries with
 * exponential backoff. Prompts are sent as token ids to /v1/completions so the server continues
 * exactly our sequence; the reply's ids are taken from `token_ids` when the server returns them
 * (vLLM's `return_token_ids`, our server), else the text is tokenized locally with the model's tokenizer.
 */
import type { Tokenizer } from '../data/tokenizer.js';
import type { SamplingParams } from '../model/sampling.js';
import type { DistillEngine, GenerationRequest, GenerationResult } from './engine.js';

export interface OpenAIEngineArgs {
  urls: string[];
  /** Served model name; when absent, the first id from GET {url}/v1/models. */
  model?: string;
  inFlight: number;
  timeoutMs: number;
  /** Retries after the first attempt, for network errors, timeouts, 429 and 5xx. */
  retries: number;
  backoffMs: number;
  sampling: SamplingParams;
  tokenizer: Tokenizer;
  /** The model's vocabulary size (config.json; may exceed the tokenizer's when the embedding is padded). */
  vocabSize: number;
  /** Appended when the server says the turn stopped (finish_reason "stop") but returned only text. */
  endOfTurnId: number;
  log: (line: string) => void;
  onTokens?: (n: number) => void;
}

export const OPENAI_LIMITS = { maxBackoffMs: 30_000, maxResponseBytes: 64 * 1024 * 1024 } as const;

/** Counters for the run summary. */
export interface OpenAIStats {
  requests: number;
  attempts: number;
  retried: number;
  failed: number;
  byUrl: Record<string, { ok: number; errors: number }>;
}

class Retryable extends Error {}

function normaliseUrl(u: string): string {
  return u.replace(/\/+$/, '').replace(/\/v1$/, '');
}

async function fetchJson(url: string, init: RequestInit, timeoutMs: number): Promise<{ status: number; body: unknown; retryAfter: number | null }> {
  let res: Response;
  try {
    res = await fetch(url, { ...init, signal: AbortSignal.timeout(timeoutMs) });
  } catch (e) {
    const err = e as { name?: string; cause?: { code?: string }; message?: string };
    if (err.name === 'TimeoutError' || err.name === 'AbortError') throw new Retryable(`timed out after ${timeoutMs} ms`);
    throw new Retryable(`connection failed (${err.cause?.code ?? err.message ?? 'network error'})`);
  }
  const text = await res.text();
  if (text.length > OPENAI_LIMITS.maxResponseBytes) throw new Retryable(`response of ${text.length} bytes is over the limit`);
  let body: unknown = null;
  try {
    body = text.length > 0 ? JSON.parse(text) : null;
  } catch {
    body = { raw: text.slice(0, 200) };
  }
  const ra = res.headers.get('retry-after');
  return { status: res.status, body, retryAfter: ra !== null && Number.isFinite(Number(ra)) ? Number(ra) * 1000 : null };
}

function errorMessage(body: unknown): string {
  const b = body as { error?: { message?: string } | string; raw?: string } | null;
  if (b && typeof b.error === 'object' && b.error?.message) return b.error.message;
  if (b && typeof b.error === 'string') return b.error;
  if (b && b.raw) return b.raw;
  return JSON.stringify(body)?.slice(0, 200) ?? 'no body';
}

export function createOpenAIEngine(a: OpenAIEngineArgs): DistillEngine & { stats: OpenAIStats; resolveModel(): Promise<string> } {
  const urls = a.urls.map(normaliseUrl);
  let next = 0;
  let model = a.model;
  const stats: OpenAIStats = { requests: 0, attempts: 0, retried: 0, failed: 0, byUrl: Object.fromEntries(urls.map((u) => [u, { ok: 0, errors: 0 }])) };
  const V = a.vocabSize;

  async function resolveModel(): Promise<string> {
    if (model) return model;
    const problems: string[] = [];
    for (const u of urls) {
      try {
        const r = await fetchJson(`${u}/v1/models`, { method: 'GET' }, a.timeoutMs);
        const id = (r.body as { data?: { id?: string }[] } | null)?.data?.[0]?.id;
        if (r.status === 200 && typeof id === 'string') {
          model = id;
          return id;
        }
        problems.push(`${u}: HTTP ${r.status} ${errorMessage(r.body)}`);
      } catch (e) {
        problems.push(`${u}: ${(e as Error).message}`);
      }
    }
    throw new Error(`could not list models at any URL (${problems.join('; ')}); pass --served-model`);
  }

  async function one(req: GenerationRequest): Promise<GenerationResult> {
    stats.requests++;
    const m = await resolveModel();
    const body = JSON.stringify({
      model: m,
      prompt: req.promptIds,
      max_tokens: req.maxNewTokens,
      temperature: a.sampling.temperature,
      top_p: a.sampling.topP,
      ...(a.sampling.topK > 0 ? { top_k: a.sampling.topK } : {}),
      seed: req.seed,
      return_token_ids: true,
      skip_special_tokens: false,
    });
    let lastError = '';
    for (let attempt = 0; attempt <= a.retries; attempt++) {
      const url = urls[next++ % urls.length];
      stats.attempts++;
      if (attempt > 0) stats.retried++;
      try {
        const r = await fetchJson(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body }, a.timeoutMs);
        if (r.status === 429 || r.status >= 500) {
          stats.byUrl[url].errors++;
          lastError = `${url}: HTTP ${r.status} ${errorMessage(r.body)}`;
          await sleep(Math.min(r.retryAfter ?? a.backoffMs * 2 ** attempt, OPENAI_LIMITS.maxBackoffMs));
          continue;
        }
        if (r.status !== 200) {
          stats.byUrl[url].errors++;
          stats.failed++;
          return { error: `${url} refused the request: HTTP ${r.status} ${errorMessage(r.body)}` };
        }
        const parsed = parseCompletion(r.body, req, V);
        if ('error' in parsed) {
          stats.byUrl[url].errors++;
          lastError = `${url}: ${parsed.error}`;
          await sleep(Math.min(a.backoffMs * 2 ** attempt, OPENAI_LIMITS.maxBackoffMs));
          continue;
        }
        stats.byUrl[url].ok++;
        const tokens = parsed.tokenIds ? [...parsed.tokenIds] : a.tokenizer.encodeContinuation(parsed.text, true);
        // A turn the server stopped must end with an end-of-turn id (servers that return only text, or ids without the eos).
        if (parsed.finish === 'eos' && (tokens.length === 0 || !a.tokenizer.isEosId(tokens[tokens.length - 1]))) tokens.push(a.endOfTurnId);
        a.onTokens?.(tokens.length);
        return { tokens, finish: parsed.finish };
      } catch (e) {
        if (!(e instanceof Retryable)) throw e;
        stats.byUrl[url].errors++;
        lastError = `${url}: ${e.message}`;
        await sleep(Math.min(a.backoffMs * 2 ** attempt, OPENAI_LIMITS.maxBackoffMs));
      }
    }
    stats.failed++;
    return { error: `gave up after ${a.retries + 1} attempt(s); last error: ${lastError}` };
  }

  return {
    name: 'openai',
    description: `openai (${urls.join(', ')}, ${a.inFlight} in flight)`,
    stats,
    resolveModel,
    async generate(requests: GenerationRequest[]): Promise<GenerationResult[]> {
      const results = new Array<GenerationResult>(requests.length);
      let cursor = 0;
      const worker = async (): Promise<void> => {
        while (cursor < requests.length) {
          const i = cursor++;
          try {
            results[i] = await one(requests[i]);
          } catch (e) {
            stats.failed++;
            results[i] = { error: (e as Error).message };
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(a.inFlight, requests.length) }, worker));
      return results;
    },
    async close(): Promise<void> {},
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

type Parsed = { tokenIds: number[] | null; text: string; finish: 'eos' | 'length' } | { error: string };

/** Validate a /v1/completions response (untrusted). */
export function parseCompletion(body: unknown, req: GenerationRequest, vocabSize: number): Parsed {
  const choice = (body as { choices?: unknown[] } | null)?.choices?.[0] as { text?: unknown; token_ids?: unknown; finish_reason?: unknown } | undefined;
  if (!choice || typeof choice !== 'object') return { error: 'malformed response: no choices[0]' };
  if (typeof choice.text !== 'string') return { error: 'malformed response: choices[0].text is not a string' };
  const fr = choice.finish_reason;
  if (fr !== 'stop' && fr !== 'length') return { error: `unexpected finish_reason ${JSON.stringify(fr)}` };
  let tokenIds: number[] | null = null;
  if (choice.token_ids !== undefined && choice.token_ids !== null) {
    const t = choice.token_ids;
    if (!Array.isArray(t) || t.some((x) => !Number.isInteger(x) || x < 0 || x >= vocabSize)) return { error: `malformed token_ids (not ids in [0, ${vocabSize}))` };
    if (t.length > req.maxNewTokens + 1) return { error: `server returned ${t.length} tokens for max_tokens ${req.maxNewTokens}` };
    tokenIds = t as number[];
  }
  return { tokenIds, text: choice.text, finish: fr === 'stop' ? 'eos' : 'length' };
}
