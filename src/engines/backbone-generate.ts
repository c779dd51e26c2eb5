/**
 * Batched generation on any backbone engine (tfjs or onnxruntime): the same sampling, seeds, eos and
 * per-row settings as `startGeneration` (model/generate.ts), with an async forward per step.
 */
import { fail } from '../errors.js';
import { prepareSampling, type GenerateOptions, type StepResult, type FinishReason } from '../model/generate.js';
import type { Backbone, BackboneCache } from './decoder-engine.js';

export interface AsyncGenerationSession {
  readonly batch: number;
  readonly tokens: number[][];
  readonly finish: (FinishReason | null)[];
  readonly prefillMs: number;
  readonly promptTokens: number;
  step(): Promise<StepResult>;
  dispose(): void;
}

export async function startBackboneGeneration(backbone: Backbone, prompts: number[][], o: GenerateOptions): Promise<AsyncGenerationSession> {
  const st = prepareSampling(backbone.config, prompts, o);
  let cache: BackboneCache | null = backbone.newCache(st.B);
  const t0 = performance.now();
  let logits = (await backbone.forward({ ids: st.ids, batch: st.B, seqLen: st.P, mask: st.mask, cache, logits: 'last' })).logits!; // [B, 1, V]
  const prefillMs = performance.now() - t0;
  const session: AsyncGenerationSession = {
    batch: st.B,
    tokens: st.tokens,
    finish: st.finish,
    prefillMs,
    promptTokens: st.promptTokens,
    async step(): Promise<StepResult> {
      if (!cache) fail('E_INTERNAL', 'step() after the session was disposed');
      const { produced, next, nextMask, running } = st.choose(logits);
      if (running > 0) logits = (await backbone.forward({ ids: next, batch: st.B, seqLen: 1, mask: nextMask, cache, logits: 'last' })).logits!;
      else session.dispose();
      return { produced, running };
    },
    dispose(): void {
      cache?.dispose();
      cache = null;
    },
  };
  return session;
}

/** Run a session to the end. */
export async function generateOn(backbone: Backbone, prompts: number[][], o: GenerateOptions): Promise<{ tokens: number[][]; finish: FinishReason[]; prefillMs: number; decodeMs: number; promptTokens: number; newTokens: number }> {
  const t0 = performance.now();
  const s = await startBackboneGeneration(backbone, prompts, o);
  try {
    while ((await s.step()).running > 0);
  } finally {
    s.dispose();
  }
  return {
    tokens: s.tokens, finish: s.finish.map((f) => f ?? 'length'), prefillMs: s.prefillMs, decodeMs: performance.now() - t0 - s.prefillMs,
    promptTokens: s.promptTokens, newTokens: s.tokens.reduce((a, t) => a + t.length, 0),
  };
}
