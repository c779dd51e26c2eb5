/**
 * The batching scheduler: requests wait in a FIFO queue; whenever the engine is idle it takes up to
 * `maxBatch` of them and runs one generation session for all of them (per-row max_tokens and
 * sampling settings, per-row seeds), one `step()` per token, yielding to the event loop between
 * steps so responses stream out and new requests queue for the next batch.
 *
 * Rows decide for themselves when they are finished (eos / stop token, stop string, max_tokens,
 * client gone); the session may keep computing a finished row until the batch ends, which is harmless.
 * The batch ends when every row is finished for its client. An exception in the engine fails the
 * rows of that batch only (500) and the scheduler goes on with the next batch.
 */
import { randomInt } from 'node:crypto';
import type { Decoder } from '../model/decoder.js';
import { type GenerateOptions, type StepResult } from '../model/generate.js';
import { streamSeed } from '../model/sampling.js';
import { ApiError } from './api-error.js';

/** A generation session of any engine: tfjs sessions step synchronously, backbone (onnxruntime) sessions asynchronously. */
export interface SessionLike {
  step(): StepResult | Promise<StepResult>;
  dispose(): void;
}
export type Engine = (model: Decoder, prompts: number[][], o: GenerateOptions) => SessionLike | Promise<SessionLike>;

/** One request as the scheduler sees it. */
export interface Job {
  readonly promptIds: number[];
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP: number;
  readonly topK: number;
  /** 32-bit seed given by the client, or null (a random one is drawn). */
  readonly seed: number | null;
  /** Ids that end this row; the session is told only the ids every row of a batch stops on. */
  readonly stopTokenIds: ReadonlySet<number>;
  /** True once the row needs no more tokens (finished, or its client left). */
  readonly done: boolean;
  /** The batch started: `rows` requests share it. */
  start(rows: number): void;
  /** A new token for this row (only called while !done). */
  token(id: number): void;
  /** The engine failed (or the server is closing): answer the client with this error. */
  fail(e: ApiError | unknown): void;
}

export interface SchedulerStats {
  /** Batches started. */
  batches: number;
  /** Rows per batch, most recent last (the last 1000). */
  batchSizes: number[];
  largestBatch: number;
  queued: number;
  running: number;
  /** Batches that failed with an engine exception. */
  failedBatches: number;
}

export interface SchedulerOptions {
  decoder: Decoder;
  maxBatch: number;
  maxQueue: number;
  padId: number;
  engine: Engine;
  /** Called with one line per batch failure (the server's log). */
  log: (line: string) => void;
}

const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));

export class Scheduler {
  private readonly queue: Job[] = [];
  private running: Job[] = [];
  private loop: Promise<void> | null = null;
  private closing = false;
  private abortRunning: ApiError | null = null;
  private readonly s = { batches: 0, batchSizes: [] as number[], largestBatch: 0, failedBatches: 0 };

  constructor(private readonly o: SchedulerOptions) {}

  stats(): SchedulerStats {
    return { ...this.s, batchSizes: [...this.s.batchSizes], queued: this.queue.length, running: this.running.filter((j) => !j.done).length };
  }

  /** Queue a job; a 503 (with Retry-After) when the queue is full or the server is closing. */
  submit(job: Job): void {
    if (this.closing) throw new ApiError(503, 'The server is shutting down.', { code: 'server_shutting_down', headers: { 'Retry-After': '5' } });
    if (this.queue.length >= this.o.maxQueue) {
      throw new ApiError(503, `The server is overloaded: ${this.queue.length} requests are already waiting (limit ${this.o.maxQueue}). Please retry later.`, {
        code: 'server_overloaded', headers: { 'Retry-After': '1' },
      });
    }
    this.queue.push(job);
    this.kick();
  }

  /** Forget a job that has not started (its client left). Running jobs end through their `done`. */
  withdraw(job: Job): void {
    const i = this.queue.indexOf(job);
    if (i !== -1) this.queue.splice(i, 1);
  }

  /**
   * Stop taking work: queued jobs fail with 503; the running batch finishes (or, with `force`, is
   * abandoned and its rows fail with 503). Resolves when the engine is idle.
   */
  async close(force = false): Promise<void> {
    this.closing = true;
    const err = new ApiError(503, 'The server is shutting down.', { code: 'server_shutting_down', headers: { 'Retry-After': '5' } });
    for (const j of this.queue.splice(0)) j.fail(err);
    if (force) this.abortRunning = err;
    if (this.loop) await this.loop;
  }

  private kick(): void {
    if (this.loop || this.closing) return;
    this.loop = (async () => {
      try {
        // One turn first, so requests arriving together share the first batch.
        await nextTurn();
        while (!this.closing && this.queue.length > 0) {
          const batch = this.takeBatch();
          if (batch.length > 0) await this.runBatch(batch);
          await nextTurn();
        }
      } finally {
        this.loop = null;
        if (!this.closing && this.queue.length > 0) this.kick();
      }
    })();
  }

  /**
   * Up to maxBatch queued jobs in FIFO order that fit one session together: left padding makes the
   * session need max(prompt) + max(max_tokens) positions, which must fit the context. A job that does
   * not fit stays at the head of the queue and leads the next batch (every job fits alone).
   */
  private takeBatch(): Job[] {
    const ctx = this.o.decoder.config.maxPositionEmbeddings;
    const batch: Job[] = [];
    let maxP = 0;
    let maxN = 0;
    for (let i = 0; i < this.queue.length && batch.length < this.o.maxBatch;) {
      const j = this.queue[i];
      if (j.done) {
        this.queue.splice(i, 1);
        continue;
      }
      const p = Math.max(maxP, j.promptIds.length);
      const n = Math.max(maxN, j.maxTokens);
      if (batch.length === 0 || p + n <= ctx) {
        batch.push(j);
        this.queue.splice(i, 1);
        maxP = p;
        maxN = n;
      } else {
        i++;
      }
    }
    return batch;
  }

  private async runBatch(batch: Job[]): Promise<void> {
    this.running = batch;
    this.s.batches++;
    this.s.batchSizes.push(batch.length);
    if (this.s.batchSizes.length > 1000) this.s.batchSizes.shift();
    this.s.largestBatch = Math.max(this.s.largestBatch, batch.length);
    // The session stops a row only on ids every row stops on; rows check their own ids.
    const common = [...batch[0].stopTokenIds].filter((id) => batch.every((j) => j.stopTokenIds.has(id)));
    let session: SessionLike | null = null;
    try {
      session = await this.o.engine(this.o.decoder, batch.map((j) => j.promptIds), {
        maxNewTokens: Math.max(...batch.map((j) => j.maxTokens)),
        temperature: 0, topP: 1, topK: 0, seed: 0,
        seeds: batch.map((j) => (j.seed === null ? randomInt(0, 2 ** 32) : streamSeed(j.seed, 0))),
        perRow: batch.map((j) => ({ maxNewTokens: j.maxTokens, temperature: j.temperature, topP: j.topP, topK: j.topK })),
        eosIds: common,
        padId: this.o.padId,
      });
      // A failure in one row's own handling (its text, its socket) fails that row only.
      const each = (j: Job, f: () => void): void => {
        try {
          f();
        } catch (e) {
          j.fail(e);
        }
      };
      for (const j of batch) each(j, () => j.start(batch.length));
      for (;;) {
        await nextTurn();
        if (this.abortRunning) throw this.abortRunning;
        if (batch.every((j) => j.done)) break;
        const r = await session.step();
        for (let b = 0; b < batch.length; b++) {
          const tok = r.produced[b];
          const j = batch[b];
          if (tok !== null && !j.done) each(j, () => j.token(tok));
        }
        if (r.running === 0) break;
      }
      // A row the session finished must be finished for its client too (defensive: rows stop at or before the session).
      const err = new ApiError(500, 'internal error: the generation session ended before the row finished.', { code: 'internal_error' });
      for (const j of batch) if (!j.done) j.fail(err);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 503)) {
        this.s.failedBatches++;
        this.o.log(`batch of ${batch.length} failed: ${e instanceof Error ? e.message : String(e)}`);
      }
      for (const j of batch) if (!j.done) j.fail(e);
    } finally {
      session?.dispose();
      this.running = [];
    }
  }
}
