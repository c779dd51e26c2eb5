/**
 * Batched generation with a KV cache: left-pad the prompts, prefill once, then one cached step per
 * new token for all unfinished rows. Finished rows are fed padding (masked) until every row is done.
 *
 * `startGeneration` returns a session that advances one token per `step()`, so a caller can stream
 * tokens or yield to the event loop between steps (the server does); `generate` runs it to the end.
 */
import { fail } from '../errors.js';
import { decoderForward, disposeCache, emptyCache, type Decoder, type KVCache } from './decoder.js';
import { Rng, selectToken, streamSeed, SAMPLING_LIMITS, type SamplingParams } from './sampling.js';
import type { DecoderConfig } from './config.js';

export interface GenerateOptions extends SamplingParams {
  maxNewTokens: number;
  /** Base seed; row i samples from streamSeed(seed, seedOffset + i) unless `seeds` gives each row its own. */
  seed: number;
  seedOffset?: number;
  /** Per-row stream seeds (e.g. one per conversation), so results do not depend on batch composition. */
  seeds?: number[];
  /** Generation stops for a row when it produces one of these (the token is kept). Empty: never. */
  eosIds: number[];
  /** Token id used for padding (any valid id; padded positions are masked). */
  padId: number;
  /**
   * Called for every row still running with the raw (untempered) logits the next token is chosen from:
   * logits[offset .. offset+V). Used to record the teacher's distribution.
   */
  onDistribution?: (row: number, logits: Float32Array, offset: number, V: number, chosen: number) => void;
  /** Per-row overrides of the sampling parameters and max_new_tokens (e.g. one per server request). */
  perRow?: RowOverrides[];
}

export interface RowOverrides {
  maxNewTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
}

export type FinishReason = 'eos' | 'length';

export interface GenerateResult {
  /** New tokens per prompt (including the eos token when one ended the row). */
  tokens: number[][];
  finish: FinishReason[];
  prefillMs: number;
  decodeMs: number;
  promptTokens: number;
  newTokens: number;
}

export function validateGenerateOptions(o: GenerateOptions, vocabSize: number): void {
  const bad: string[] = [];
  if (!Number.isInteger(o.maxNewTokens) || o.maxNewTokens < 1 || o.maxNewTokens > 1_000_000) bad.push(`max_new_tokens must be an integer in [1, 1000000], got ${o.maxNewTokens}`);
  if (!(o.temperature >= 0 && o.temperature <= SAMPLING_LIMITS.maxTemperature)) bad.push(`temperature must be in [0, ${SAMPLING_LIMITS.maxTemperature}] (0 = greedy), got ${o.temperature}`);
  if (!(o.topP > 0 && o.topP <= 1)) bad.push(`top_p must be in (0, 1], got ${o.topP}`);
  if (!Number.isInteger(o.topK) || o.topK < 0) bad.push(`top_k must be a non-negative integer (0 = off), got ${o.topK}`);
  if (!Number.isInteger(o.seed)) bad.push(`seed must be an integer, got ${o.seed}`);
  if (!Number.isInteger(o.padId) || o.padId < 0 || o.padId >= vocabSize) bad.push(`pad id ${o.padId} is outside the vocabulary [0, ${vocabSize})`);
  if (bad.length > 0) fail('E_USAGE', `Invalid generation settings:\n  - ${bad.join('\n  - ')}`);
}

export interface StepResult {
  /** The token each row produced in this step, or null for rows already finished. */
  produced: (number | null)[];
  /** Rows still running after this step. */
  running: number;
}

export interface GenerationSession {
  readonly batch: number;
  /** New tokens so far, per row. */
  readonly tokens: number[][];
  /** Why each row finished, null while running. */
  readonly finish: (FinishReason | null)[];
  readonly prefillMs: number;
  readonly promptTokens: number;
  /** Choose the next token of every running row and run the backbone on them. */
  step(): StepResult;
  /** Free the KV cache (idempotent). */
  dispose(): void;
}

/** Per-session sampling state shared by every engine's generation loop (validated, left-padded prompts). */
export interface SamplingState {
  B: number;
  P: number;
  V: number;
  /** Left-padded prompts [B, P] and their mask. */
  ids: Int32Array;
  mask: Uint8Array;
  padId: number;
  tokens: number[][];
  finish: (FinishReason | null)[];
  promptTokens: number;
  choose(logits: Float32Array): { produced: (number | null)[]; next: Int32Array; nextMask: Uint8Array; running: number };
}

/** Validate the prompts and settings, left-pad, and set up each row's sampler. */
export function prepareSampling(c: DecoderConfig, prompts: number[][], o: GenerateOptions): SamplingState {
  validateGenerateOptions(o, c.vocabSize);
  const B = prompts.length;
  if (B === 0) fail('E_USAGE', 'No prompts to generate from.');
  if (o.seeds && o.seeds.length !== B) fail('E_INTERNAL', `seeds has ${o.seeds.length} entries for ${B} prompts`);
  if (o.perRow && o.perRow.length !== B) fail('E_INTERNAL', `perRow has ${o.perRow.length} entries for ${B} prompts`);
  // Effective per-row settings, each validated.
  const rows = prompts.map((_, b) => {
    const r = { ...o, ...(o.perRow?.[b] ?? {}) };
    if (o.perRow?.[b]) validateGenerateOptions(r, c.vocabSize);
    return r;
  });
  if (prompts.some((p) => p.length === 0)) fail('E_USAGE', 'Every prompt needs at least one token.');
  const P = Math.max(...prompts.map((p) => p.length));
  // Positions are per row (left padding takes none), so the limit is per row: its prompt + its new tokens.
  prompts.forEach((p, b) => {
    if (p.length + rows[b].maxNewTokens > c.maxPositionEmbeddings) {
      fail('E_USAGE', `prompt (${p.length} tokens) + max_new_tokens (${rows[b].maxNewTokens}) exceeds the model's max_position_embeddings (${c.maxPositionEmbeddings}); shorten the prompt or lower max_new_tokens.`);
    }
  });
  const ids = new Int32Array(B * P).fill(o.padId); // [B, P], left-padded
  const mask = new Uint8Array(B * P); // [B, P]
  prompts.forEach((p, b) => {
    ids.set(p, b * P + P - p.length);
    mask.fill(1, b * P + P - p.length, (b + 1) * P);
  });
  const rngs = prompts.map((_, b) => new Rng(o.seeds ? o.seeds[b] : streamSeed(o.seed, (o.seedOffset ?? 0) + b)));
  const eos = new Set(o.eosIds);
  const tokens: number[][] = prompts.map(() => []);
  const finish: (FinishReason | null)[] = prompts.map(() => null);
  const V = c.vocabSize;
  return {
    B, P, V, ids, mask, padId: o.padId, tokens, finish,
    promptTokens: prompts.reduce((a, p) => a + p.length, 0),
    choose(logits: Float32Array) {
      const next = new Int32Array(B).fill(o.padId); // [B, 1]
      const nextMask = new Uint8Array(B); // [B, 1]
      const produced: (number | null)[] = new Array<number | null>(B).fill(null);
      let running = 0;
      for (let b = 0; b < B; b++) {
        if (finish[b] !== null) continue;
        const tok = selectToken(logits, b * V, V, rows[b], rngs[b]);
        o.onDistribution?.(b, logits, b * V, V, tok);
        tokens[b].push(tok);
        produced[b] = tok;
        if (eos.has(tok)) finish[b] = 'eos';
        else if (tokens[b].length >= rows[b].maxNewTokens) finish[b] = 'length';
        else {
          next[b] = tok;
          nextMask[b] = 1;
          running++;
        }
      }
      return { produced, next, nextMask, running };
    },
  };
}

/** Validate, left-pad and prefill the prompts; the returned session produces one token per step. */
export function startGeneration(model: Decoder, prompts: number[][], o: GenerateOptions): GenerationSession {
  const st = prepareSampling(model.config, prompts, o);
  let cache: KVCache | null = emptyCache(st.B);
  const t0 = performance.now();
  let logits: Float32Array = forwardLast(model, st.ids, st.B, st.P, st.mask, cache); // [B, V]
  const prefillMs = performance.now() - t0;

  const session: GenerationSession = {
    batch: st.B,
    tokens: st.tokens,
    finish: st.finish,
    prefillMs,
    promptTokens: st.promptTokens,
    step(): StepResult {
      if (!cache) fail('E_INTERNAL', 'step() after the session was disposed');
      const { produced, next, nextMask, running } = st.choose(logits);
      if (running > 0) logits = forwardLast(model, next, st.B, 1, nextMask, cache);
      else session.dispose();
      return { produced, running };
    },
    dispose(): void {
      if (cache) disposeCache(cache);
      cache = null;
    },
  };
  return session;
}

/** One forward over [B, T] new tokens into the cache; returns the last position's logits [B, V] on the host. */
function forwardLast(model: Decoder, ids: Int32Array, B: number, T: number, mask: Uint8Array, cache: KVCache): Float32Array {
  const { hidden, logits } = decoderForward(model, { ids, batch: B, seqLen: T, mask, cache, logits: 'last' });
  try {
    return logits!.dataSync() as Float32Array; // [B, 1, V]
  } finally {
    hidden.dispose();
    logits!.dispose();
  }
}

export function generate(model: Decoder, prompts: number[][], o: GenerateOptions): GenerateResult {
  if (prompts.length === 0) return { tokens: [], finish: [], prefillMs: 0, decodeMs: 0, promptTokens: 0, newTokens: 0 };
  const t0 = performance.now();
  const s = startGeneration(model, prompts, o);
  try {
    while (s.step().running > 0);
  } finally {
    s.dispose();
  }
  const decodeMs = performance.now() - t0 - s.prefillMs;
  return {
    tokens: s.tokens,
    finish: s.finish.map((f) => f ?? 'length'),
    prefillMs: s.prefillMs,
    decodeMs,
    promptTokens: s.promptTokens,
    newTokens: s.tokens.reduce((a, t) => a + t.length, 0),
  };
}
