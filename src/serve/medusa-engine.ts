/**
 * The server's engine for `serve --medusa`: each request is decoded alone (batch 1) with Medusa
 * (src/eval/medusa-decode.ts): greedy acceptance at temperature 0 (the same tokens as plain greedy),
 * typical acceptance above, the base-token draws seeded by the request's stream seed.
 *
 * The scheduler takes one token per `step()`: a Medusa step emits 1 + accepted tokens at once, so
 * the session hands them out one per call and runs the next Medusa step when they are gone. Streams
 * therefore get each step's tokens as soon as the step is verified, one SSE event per token as
 * without Medusa. One log line per request gives its steps, tokens per step and mean per-step times.
 */
import { fail } from '../errors.js';
import type { GenerateOptions, StepResult } from '../model/generate.js';
import { streamSeed } from '../model/sampling.js';
import type { Backbone } from '../engines/decoder-engine.js';
import type { HeadsProposer } from '../engines/heads-proposer.js';
import { meanStepTiming, startMedusa } from '../eval/medusa-decode.js';
import type { MedusaChoices } from '../eval/tree.js';
import type { Engine, SessionLike } from './scheduler.js';

export interface MedusaEngineOptions {
  backbone: Backbone;
  proposer: HeadsProposer;
  choices: MedusaChoices;
  topk: number;
  /** Typical acceptance eps / delta for requests at temperature > 0. */
  posteriorThreshold: number;
  posteriorAlpha: number;
  log: (line: string) => void;
}

/** An `Engine` for the scheduler (which must run batches of one request: maxBatch 1). */
export function medusaEngine(m: MedusaEngineOptions): Engine {
  return async (_model, prompts, o: GenerateOptions): Promise<SessionLike> => {
    if (prompts.length !== 1) fail('E_INTERNAL', `the Medusa engine decodes one request at a time, got a batch of ${prompts.length} (the server must run with maxBatch 1)`);
    const row = o.perRow?.[0] ?? {};
    const temperature = row.temperature ?? o.temperature;
    const s = await startMedusa(m.backbone, m.proposer, prompts[0], {
      choices: m.choices, topk: m.topk, maxNewTokens: row.maxNewTokens ?? o.maxNewTokens, eosIds: o.eosIds,
      sampling: { temperature, posteriorThreshold: m.posteriorThreshold, posteriorAlpha: m.posteriorAlpha, seed: o.seeds?.[0] ?? streamSeed(o.seed, 0) },
    });
    const pending: number[] = [];
    let disposed = false;
    return {
      async step(): Promise<StepResult> {
        if (disposed) fail('E_INTERNAL', 'step() after the Medusa session was disposed');
        if (pending.length === 0 && !s.finished) pending.push(...(await s.step()));
        const tok = pending.shift();
        if (tok === undefined) return { produced: [null], running: 0 };
        return { produced: [tok], running: pending.length > 0 || !s.finished ? 1 : 0 };
      },
      dispose(): void {
        if (disposed) return;
        disposed = true;
        s.dispose();
        const r = s.result();
        const t = meanStepTiming(r);
        m.log(`medusa: ${r.tokens.length} tokens in ${r.steps} steps (${r.tokensPerStep.toFixed(2)} tokens/step, ${r.acceptance}); per step propose ${t.proposeMs.toFixed(1)} ms, verify ${t.verifyMs.toFixed(1)} ms, host ${t.hostMs.toFixed(1)} ms`);
      },
    };
  };
}
