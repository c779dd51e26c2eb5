/**
 * Batched generation with a KV cache: left-pad the prompts, prefill once, then one cached step per
 * new token for all unfinished rows. Finished rows are fed padding (masked) until every row is done.
 */
import { fail } from '../errors.js';
import { decoderForward, disposeCache, emptyCache, type Decoder } from './decoder.js';
import { Rng, selectToken, streamSeed, SAMPLING_LIMITS, type SamplingParams } from './sampling.js';

export interface GenerateOptions extends SamplingParams {
  maxNewTokens: number;
  /** Base seed; row i samples from streamSeed(seed, seedOffset + i), independent of batch composition. */
  seed: number;
  seedOffset?: number;
  /** Generation stops for a row when it produces one of these (the token is kept). Empty: never. */
  eosIds: number[];
  /** Token id used for padding (any valid id; padded positions are masked). */
  padId: number;
  /** Called after every step with the number of rows still running. */
  onStep?: (step: number, running: number) => void;
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

export function generate(model: Decoder, prompts: number[][], o: GenerateOptions): GenerateResult {
  const c = model.config;
  validateGenerateOptions(o, c.vocabSize);
  const B = prompts.length;
  if (B === 0) return { tokens: [], finish: [], prefillMs: 0, decodeMs: 0, promptTokens: 0, newTokens: 0 };
  const P = Math.max(...prompts.map((p) => p.length));
  if (prompts.some((p) => p.length === 0)) fail('E_USAGE', 'Every prompt needs at least one token.');
  if (P + o.maxNewTokens > c.maxPositionEmbeddings) {
    fail('E_USAGE', `prompt (${P} tokens) + max_new_tokens (${o.maxNewTokens}) exceeds the model's max_position_embeddings (${c.maxPositionEmbeddings}); shorten the prompt or lower max_new_tokens.`);
  }
  const ids = new Int32Array(B * P).fill(o.padId); // [B, P], left-padded
  const mask = new Uint8Array(B * P); // [B, P]
  prompts.forEach((p, b) => {
    ids.set(p, b * P + P - p.length);
    mask.fill(1, b * P + P - p.length, (b + 1) * P);
  });
  const rngs = prompts.map((_, b) => new Rng(streamSeed(o.seed, (o.seedOffset ?? 0) + b)));
  const eos = new Set(o.eosIds);
  const tokens: number[][] = prompts.map(() => []);
  const finish: (FinishReason | null)[] = prompts.map(() => null);
  const cache = emptyCache(B);
  const V = c.vocabSize;
  let prefillMs = 0;
  const t0 = performance.now();
  try {
    let { hidden, logits } = decoderForward(model, { ids, batch: B, seqLen: P, mask, cache, logits: 'last' });
    let data = logits!.dataSync(); // [B, 1, V]
    hidden.dispose();
    logits!.dispose();
    prefillMs = performance.now() - t0;
    for (let step = 0; ; step++) {
      const next = new Int32Array(B).fill(o.padId); // [B, 1]
      const nextMask = new Uint8Array(B); // [B, 1]
      let running = 0;
      for (let b = 0; b < B; b++) {
        if (finish[b] !== null) continue;
        const tok = selectToken(data, b * V, V, o, rngs[b]);
        tokens[b].push(tok);
        if (eos.has(tok)) finish[b] = 'eos';
        else if (tokens[b].length >= o.maxNewTokens) finish[b] = 'length';
        else {
          next[b] = tok;
          nextMask[b] = 1;
          running++;
        }
      }
      o.onStep?.(step, running);
      if (running === 0) break;
      ({ hidden, logits } = decoderForward(model, { ids: next, batch: B, seqLen: 1, mask: nextMask, cache, logits: 'last' }));
      data = logits!.dataSync(); // [B, 1, V]
      hidden.dispose();
      logits!.dispose();
    }
  } finally {
    disposeCache(cache);
  }
  const decodeMs = performance.now() - t0 - prefillMs;
  return {
    tokens,
    finish: finish.map((f) => f ?? 'length'),
    prefillMs,
    decodeMs,
    promptTokens: prompts.reduce((a, p) => a + p.length, 0),
    newTokens: tokens.reduce((a, t) => a + t.length, 0),
  };
}
