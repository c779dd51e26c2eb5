/**
 * An OpenAI-compatible HTTP server (node:http) over a loaded decoder:
 *
 *   GET  /health                  200 {"status": "ok"} (503 while shutting down)
 *   GET  /v1/models               {object: "list", data: [model]}; GET /v1/models/{id} one model
 *   POST /v1/completions          prompt: string or token ids; SSE with stream: true
 *   POST /v1/chat/completions     messages rendered with the model's chat template
 *
 * Requests are validated here (src/serve/protocol.ts), queued in the batching scheduler
 * (src/serve/scheduler.ts) and answered by their RowJob (src/serve/job.ts). Every error a client can
 * cause has OpenAI's error shape and a 4xx status; an engine failure is a 500 for the requests of
 * that batch only; nothing a client sends or does (malformed bodies, disconnects) stops the server.
 */
import * as http from 'node:http';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { fail, describe, MedusaError } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import { startGeneration } from '../model/generate.js';
import type { Tokenizer } from '../data/tokenizer.js';
import { ApiError, badRequest, toApiError } from './api-error.js';
import { parseChatRequest, parseCompletionRequest, type GenerationRequest, type ProtocolContext } from './protocol.js';
import { Scheduler, type Engine, type SchedulerStats } from './scheduler.js';
import { RowJob, type FinishReason, type RowSink } from './job.js';

export const SERVER_LIMITS = {
  /** Largest request body (413 above it). */
  maxBodyBytes: 16 * 1024 * 1024,
  /** How long a graceful close waits for responses in flight after the engine is idle. */
  closeGraceMs: 10_000,
} as const;

export interface ServerOptions {
  decoder: Decoder;
  tokenizer: Tokenizer;
  /** The id clients pass as `model` (and /v1/models lists). */
  modelName: string;
  host: string;
  /** 0 = an ephemeral port (see the handle's `port`). */
  port: number;
  /** Most requests per generation session. */
  maxBatch: number;
  /** Most requests waiting for a batch; more get 503 with Retry-After. */
  maxQueue: number;
  /** Most new tokens per request (max_tokens above it is a 400; the default of chat requests). */
  maxNewTokensLimit: number;
  /** One line per request, per batch failure, and lifecycle events. */
  log: (line: string) => void;
  /** Request body limit in bytes (default SERVER_LIMITS.maxBodyBytes). */
  maxBodyBytes?: number;
  /** The generation engine (default startGeneration); tests inject faults through it. */
  engine?: Engine;
  /**
   * Set when `engine` decodes with Medusa heads (src/serve/medusa-engine.ts, with maxBatch 1): the
   * protocol refuses top_p / top_k at temperature > 0, and /v1/models shows this object as `medusa`.
   */
  medusa?: Record<string, unknown>;
}

export interface ServerStats extends SchedulerStats {
  /** HTTP requests received. */
  requests: number;
}

export interface ServerHandle {
  /** e.g. http://127.0.0.1:8000 */
  url: string;
  port: number;
  /**
   * Stop accepting connections, answer queued requests 503, let the running batch finish and its
   * responses flush, then close every connection. `force`: abandon the running batch too (its
   * requests get 503) and close connections at once. Idempotent.
   */
  close(opts?: { force?: boolean }): Promise<void>;
  stats(): ServerStats;
}

type Body = Record<string, unknown>;

interface RequestRecord {
  promptTokens: number;
  completionTokens: number;
  batchRows: number;
  note: string;
}

function checkOptions(o: ServerOptions): void {
  const bad: string[] = [];
  const int = (k: keyof ServerOptions, v: unknown, lo: number, hi: number): void => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) bad.push(`${k} must be an integer in [${lo}, ${hi}], got ${String(v)}`);
  };
  int('port', o.port, 0, 65535);
  int('maxBatch', o.maxBatch, 1, 4096);
  int('maxQueue', o.maxQueue, 0, 1_000_000);
  int('maxNewTokensLimit', o.maxNewTokensLimit, 1, 1_000_000);
  if (o.maxBodyBytes !== undefined) int('maxBodyBytes', o.maxBodyBytes, 1, 2 ** 31 - 1);
  if (typeof o.host !== 'string' || o.host.length === 0) bad.push('host must be a non-empty string');
  if (typeof o.modelName !== 'string' || o.modelName.length === 0) bad.push('modelName must be a non-empty string');
  if (bad.length > 0) fail('E_USAGE', `Invalid server settings:\n  - ${bad.join('\n  - ')}`);
}

const nowSeconds = (): number => Math.floor(Date.now() / 1000);

function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function sendError(res: http.ServerResponse, e: ApiError): void {
  sendJson(res, e.status, e.body(), e.headers);
}

/**
 * Read the body up to `limit` bytes. A larger body is a 413, answered after the upload is read and
 * dropped (so clients that send everything before reading see the 413, not a reset), unless it is
 * over `4 x limit`: then at once, and the connection is closed.
 */
function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  const drainLimit = 4 * limit;
  const tooLarge = (close: boolean): ApiError => new ApiError(413, `The request body is larger than this server's limit of ${limit} bytes.`, {
    code: 'request_too_large', headers: close ? { Connection: 'close' } : {},
  });
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > drainLimit) {
      reject(tooLarge(true));
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    req.on('data', (c: Buffer) => {
      if (settled) return;
      size += c.length;
      if (size > drainLimit) {
        settled = true;
        reject(tooLarge(true));
      } else if (size <= limit) {
        chunks.push(c);
      } else if (chunks.length > 0) {
        chunks.length = 0; // over the limit: keep reading, keep nothing
      }
    });
    req.on('end', () => {
      if (settled) return;
      settled = true;
      if (size > limit) reject(tooLarge(false));
      else resolve(Buffer.concat(chunks));
    });
    req.on('error', (e) => {
      if (settled) return;
      settled = true;
      reject(e);
    });
  });
}

function parseJsonBody(buf: Buffer): Body {
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8'));
  } catch (e) {
    throw badRequest(null, `The request body is not valid JSON: ${describe(e)}.`, 'invalid_json');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badRequest(null, 'The request body must be a JSON object.', 'invalid_json');
  return v as Body;
}

export async function startServer(opts: ServerOptions): Promise<ServerHandle> {
  checkOptions(opts);
  const { decoder, tokenizer, modelName, log } = opts;
  const cfg = decoder.config;
  const V = cfg.vocabSize;
  const eosIds = [...new Set([...cfg.eosTokenIds, ...tokenizer.eosIds])].filter((id) => id < V);
  const padCandidates = [cfg.padTokenId, tokenizer.padId, eosIds[0], 0];
  const padId = padCandidates.find((id): id is number => typeof id === 'number' && id >= 0 && id < V) ?? 0;
  const maxBodyBytes = opts.maxBodyBytes ?? SERVER_LIMITS.maxBodyBytes;
  const pctx: ProtocolContext = { modelName, tokenizer, vocabSize: V, maxContext: cfg.maxPositionEmbeddings, maxNewTokensLimit: opts.maxNewTokensLimit, eosIds, medusa: opts.medusa !== undefined };
  const created = nowSeconds();
  const modelCard = { id: modelName, object: 'model', created, owned_by: 'medusa-train', max_model_len: cfg.maxPositionEmbeddings, ...(opts.medusa ? { medusa: opts.medusa } : {}) };

  let closing = false;
  let requests = 0;
  const open = new Set<http.ServerResponse>();
  let onDrained: (() => void) | null = null;

  const scheduler = new Scheduler({ decoder, maxBatch: opts.maxBatch, maxQueue: opts.maxQueue, padId, engine: opts.engine ?? startGeneration, log });

  // --- generation requests ---

  function runGeneration(res: http.ServerResponse, g: GenerationRequest, rec: RequestRecord): void {
    const chat = g.kind === 'chat';
    const id = `${chat ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`;
    const object = chat ? 'chat.completion' : 'text_completion';
    const chunkObject = chat ? 'chat.completion.chunk' : 'text_completion';
    const createdAt = nowSeconds();
    rec.promptTokens = g.promptIds.length;
    const usage = (): { prompt_tokens: number; completion_tokens: number; total_tokens: number } => ({
      prompt_tokens: g.promptIds.length, completion_tokens: job.tokens.length, total_tokens: g.promptIds.length + job.tokens.length,
    });
    const promptIdsField = g.returnTokenIds ? { prompt_token_ids: g.promptIds } : {};
    const writeEvent = (data: unknown): void => {
      if (!res.destroyed && !res.writableEnded) res.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`);
    };
    let firstChunk = true;

    const sink: RowSink = g.stream
      ? {
          start(rows) {
            rec.batchRows = rows;
            if (res.destroyed) return;
            res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no', ...(closing ? { Connection: 'close' } : {}) });
            if (chat) {
              writeEvent({ id, object: chunkObject, created: createdAt, model: modelName, ...promptIdsField, choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }] });
              firstChunk = false;
            }
          },
          delta(text, tokenId, finish) {
            rec.completionTokens = job.tokens.length;
            const ids = g.returnTokenIds ? { token_ids: [tokenId] } : {};
            const first = firstChunk ? promptIdsField : {};
            firstChunk = false;
            const choice = chat
              ? { index: 0, delta: { content: text }, logprobs: null, finish_reason: finish, ...ids }
              : { index: 0, text, logprobs: null, finish_reason: finish, ...ids, ...first };
            writeEvent({ id, object: chunkObject, created: createdAt, model: modelName, ...first, choices: [choice] });
            if (finish !== null) {
              if (g.includeUsage) writeEvent({ id, object: chunkObject, created: createdAt, model: modelName, choices: [], usage: usage() });
              writeEvent('[DONE]');
              res.end();
            }
          },
          error(e) {
            rec.note = e.message;
            if (!res.headersSent) {
              sendError(res, e);
              return;
            }
            writeEvent(e.body());
            writeEvent('[DONE]');
            res.end();
          },
        }
      : {
          start(rows) {
            rec.batchRows = rows;
          },
          delta(_text, _tokenId, finish) {
            rec.completionTokens = job.tokens.length;
            if (finish === null) return;
            sendJson(res, 200, completionBody(finish), closing ? { Connection: 'close' } : {});
          },
          error(e) {
            rec.note = e.message;
            sendError(res, e);
          },
        };

    const completionBody = (finish: FinishReason): unknown => {
      const ids = g.returnTokenIds ? { token_ids: [...job.tokens] } : {};
      const choice = chat
        ? { index: 0, message: { role: 'assistant', content: job.text }, logprobs: null, finish_reason: finish, ...ids }
        : { index: 0, text: job.text, logprobs: null, finish_reason: finish, ...ids, ...promptIdsField };
      return { id, object, created: createdAt, model: modelName, ...promptIdsField, choices: [choice], usage: usage() };
    };

    const job = new RowJob(g, tokenizer, sink);
    res.once('close', () => {
      if (!job.done) {
        job.cancel();
        scheduler.withdraw(job);
      }
    });
    scheduler.submit(job);
  }

  // --- routing ---

  async function handle(req: http.IncomingMessage, res: http.ServerResponse, rec: RequestRecord): Promise<void> {
    const method = req.method ?? 'GET';
    const path = (req.url ?? '/').split('?')[0];
    const route = (allowed: string): boolean => {
      if (method === allowed) return true;
      throw new ApiError(405, `Method ${method} is not allowed on ${path}; use ${allowed}.`, { code: 'method_not_allowed', headers: { Allow: allowed } });
    };
    if (path === '/health') {
      route('GET');
      if (closing) throw new ApiError(503, 'The server is shutting down.', { code: 'server_shutting_down' });
      sendJson(res, 200, { status: 'ok' });
      return;
    }
    if (path === '/v1/models') {
      route('GET');
      sendJson(res, 200, { object: 'list', data: [modelCard] });
      return;
    }
    if (path.startsWith('/v1/models/')) {
      route('GET');
      const raw = path.slice('/v1/models/'.length);
      let name = raw;
      try {
        name = decodeURIComponent(raw);
      } catch {
        // not percent-encoded text: compare as it is
      }
      if (name !== modelName) throw new ApiError(404, `The model \`${name}\` does not exist. This server serves \`${modelName}\`.`, { param: 'model', code: 'model_not_found' });
      sendJson(res, 200, modelCard);
      return;
    }
    const kind = path === '/v1/completions' ? 'completion' : path === '/v1/chat/completions' ? 'chat' : null;
    if (kind === null) throw new ApiError(404, `Invalid URL (${method} ${path}).`, { code: 'not_found' });
    route('POST');
    if (closing) throw new ApiError(503, 'The server is shutting down.', { code: 'server_shutting_down', headers: { 'Retry-After': '5' } });
    const body = parseJsonBody(await readBody(req, maxBodyBytes));
    let g: GenerationRequest;
    try {
      g = kind === 'completion' ? parseCompletionRequest(body, pctx) : parseChatRequest(body, pctx);
    } catch (e) {
      throw toApiError(e, kind === 'completion' ? 'prompt' : 'messages');
    }
    if (res.destroyed) return; // the client left while we read its request
    runGeneration(res, g, rec);
  }

  const server = http.createServer((req, res) => {
    requests++;
    const t0 = performance.now();
    const rec: RequestRecord = { promptTokens: 0, completionTokens: 0, batchRows: 0, note: '' };
    open.add(res);
    res.on('error', () => {}); // a write to a closed socket must not crash the server
    req.on('error', () => {});
    if (closing) res.setHeader('Connection', 'close');
    res.once('close', () => {
      open.delete(res);
      const ms = performance.now() - t0;
      const status = res.writableFinished ? String(res.statusCode) : `${res.headersSent ? res.statusCode : '-'} (client disconnected)`;
      const tokens = rec.promptTokens > 0 ? ` prompt=${rec.promptTokens} completion=${rec.completionTokens}${rec.batchRows > 0 ? ` batch=${rec.batchRows}` : ' (not started)'}` : '';
      const note = rec.note && res.statusCode >= 500 ? ` error="${rec.note.slice(0, 200)}"` : '';
      log(`${req.method} ${(req.url ?? '/').split('?')[0]} ${status}${tokens} ${ms.toFixed(0)}ms${note}`);
      if (open.size === 0 && onDrained) onDrained();
    });
    handle(req, res, rec).catch((e: unknown) => {
      const err = toApiError(e);
      rec.note = err.message;
      if (!res.headersSent) sendError(res, err);
      else if (!res.writableEnded) res.end();
    });
  });
  server.on('clientError', (_err, socket) => {
    // Unparseable HTTP: answer 400 if the socket is still writable (node's default), never throw.
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    else socket.destroy();
  });

  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      const why = e.code === 'EADDRINUSE' ? 'the address is already in use; choose another --port (0 = any free port)' : describe(e);
      reject(new MedusaError('E_USAGE', `Cannot listen on ${opts.host}:${opts.port}: ${why}.`, { cause: e }));
    };
    server.once('error', onError);
    server.listen(opts.port, opts.host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (e) => log(`server error: ${describe(e)}`));

  const addr = server.address() as AddressInfo;
  const hostForUrl = addr.family === 'IPv6' || addr.address.includes(':') ? `[${addr.address}]` : addr.address;
  const url = `http://${hostForUrl}:${addr.port}`;

  let closed: Promise<void> | null = null;
  const close = (o: { force?: boolean } = {}): Promise<void> => {
    if (closed && !o.force) return closed;
    const force = !!o.force;
    const previous = closed;
    closed = (async () => {
      closing = true;
      const serverClosed = new Promise<void>((r) => server.close(() => r()));
      server.closeIdleConnections();
      if (force) server.closeAllConnections();
      await scheduler.close(force);
      if (!force && open.size > 0) {
        // Responses of the last batch are still flushing (or clients are slow to read them).
        await new Promise<void>((r) => {
          const timer = setTimeout(r, SERVER_LIMITS.closeGraceMs);
          onDrained = () => {
            clearTimeout(timer);
            r();
          };
        });
      }
      server.closeAllConnections();
      await serverClosed;
      if (previous) await previous.catch(() => {});
    })();
    return closed;
  };

  return {
    url,
    port: addr.port,
    close,
    stats: () => ({ ...scheduler.stats(), requests }),
  };
}
