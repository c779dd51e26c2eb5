/**
 * Accuracy of Medusa heads on live greedy decoding: how often head k's rank-j guess is the token the
 * base model itself produces k+2 positions later when it decodes greedily (not the distilled data's
 * sampled tokens, which `eval`'s offline accuracy uses).
 *
 * For a prompt of P tokens and its greedy continuation c[0..N-1] (the sequence s = prompt + c):
 *   decoding position i = 0 .. N-1 is sequence position t = P-1+i (i = 0: the last prompt token, whose
 *   hidden state the first Medusa step reads; i >= 1: the generated token c[i-1]);
 *   the base lm_head at t predicts s[t+1] = c[i]; head k at t guesses s[t+k+2] = c[i+k+1].
 * Head k is counted at every position i where c[i+k+1] exists (i <= N-k-2), so it has max(0, N-k-1)
 * positions per prompt; top-j is correct when the label is among the head's first j proposals.
 *
 * `measureLiveAccuracy` decodes greedily with the backbone (generateOn), runs one forward over
 * prompt + continuation for the hidden states, and asks the HeadsProposer (what Medusa decoding asks)
 * for each position's top-k; `countLive` is the pure counting.
 */
import { fail } from '../errors.js';
import { generateOn } from '../engines/backbone-generate.js';
import type { Backbone } from '../engines/decoder-engine.js';
import type { HeadsProposer } from '../engines/heads-proposer.js';
import { argmax } from '../model/sampling.js';

export interface LiveCounts {
  /** Per head: positions whose label exists. */
  valid: number[];
  /** Per head: top-1 .. top-`topk` correct counts, [K][topk]. */
  correct: number[][];
}

export function emptyLiveCounts(numHeads: number, topk: number): LiveCounts {
  return { valid: new Array<number>(numHeads).fill(0), correct: Array.from({ length: numHeads }, () => new Array<number>(topk).fill(0)) };
}

/**
 * Add one continuation's counts. `proposals[i][k]` = head k's token ids, best first, at decoding
 * position i (see the header); exactly max(0, N-1) positions are needed (the last one, i = N-1, has
 * no label for any head). Ranks at or beyond `topk` count as misses.
 */
export function countLive(counts: LiveCounts, continuation: readonly number[], proposals: readonly (readonly (readonly number[])[])[], topk: number): void {
  const K = counts.valid.length;
  const N = continuation.length;
  const need = Math.max(0, N - 1);
  if (proposals.length !== need) fail('E_INTERNAL', `live accuracy: ${proposals.length} positions of proposals for a continuation of ${N} tokens; expected ${need}`);
  if (counts.correct.some((row) => row.length !== topk)) fail('E_INTERNAL', `live accuracy: counts are not for top-${topk}`);
  for (let i = 0; i < need; i++) {
    if (proposals[i].length < K) fail('E_INTERNAL', `live accuracy: position ${i} has proposals of ${proposals[i].length} heads, expected ${K}`);
    for (let k = 0; k < K && i + k + 1 < N; k++) {
      counts.valid[k]++;
      const r = proposals[i][k].indexOf(continuation[i + k + 1]);
      if (r < 0 || r >= topk) continue;
      for (let j = r; j < topk; j++) counts.correct[k][j]++;
    }
  }
}

export interface LiveAccuracy {
  prompts: number;
  /** Greedy tokens generated over all prompts. */
  generatedTokens: number;
  newTokensPerPrompt: number;
  /** Per head: positions counted and top-1..top-k accuracy (fractions; 0 when no positions). */
  heads: { valid: number; topk: number[] }[];
  /** perRank[k][r]: fraction of head k's positions whose label is exactly its rank-r proposal. */
  perRank: number[][];
  /**
   * The base lm_head's argmax in the one forward over prompt + continuation against the greedy token
   * (cached decoding): 1 unless the two forwards disagree (float ties); a check of the alignment.
   */
  baseAgreement: number;
}

export function summariseLive(c: LiveCounts, o: { prompts: number; generatedTokens: number; newTokensPerPrompt: number; baseAgree: number; basePositions: number }): LiveAccuracy {
  const heads = c.valid.map((n, k) => ({ valid: n, topk: c.correct[k].map((x) => (n > 0 ? x / n : 0)) }));
  const perRank = c.correct.map((row, k) => row.map((x, r) => (c.valid[k] > 0 ? (x - (r > 0 ? row[r - 1] : 0)) / c.valid[k] : 0)));
  return {
    prompts: o.prompts, generatedTokens: o.generatedTokens, newTokensPerPrompt: o.newTokensPerPrompt, heads, perRank,
    baseAgreement: o.basePositions > 0 ? o.baseAgree / o.basePositions : 1,
  };
}

export interface LiveOptions {
  /** Greedy tokens generated per prompt (fewer when an eos token comes first). */
  newTokens: number;
  eosIds: number[];
  padId: number;
  /** Proposals asked per head (top-1..top-topk are counted). */
  topk: number;
}

/** Greedy decoding with the backbone, then the heads' proposals along it, counted per head and rank. */
export async function measureLiveAccuracy(backbone: Backbone, proposer: HeadsProposer, prompts: number[][], o: LiveOptions): Promise<LiveAccuracy> {
  const c = backbone.config;
  const d = c.hiddenSize;
  const V = c.vocabSize;
  if (proposer.hiddenSize !== d || proposer.vocabSize !== V) fail('E_USAGE', `heads are for hidden size ${proposer.hiddenSize} / vocab ${proposer.vocabSize}, the model has ${d} / ${V}`);
  if (!Number.isInteger(o.topk) || o.topk < 1 || o.topk > V) fail('E_USAGE', `live accuracy: topk must be an integer in [1, ${V}], got ${o.topk}`);
  const counts = emptyLiveCounts(proposer.numHeads, o.topk);
  let generated = 0;
  let baseAgree = 0;
  let basePositions = 0;
  for (const prompt of prompts) {
    const cont = (await generateOn(backbone, [prompt], { maxNewTokens: o.newTokens, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: o.eosIds, padId: o.padId })).tokens[0];
    generated += cont.length;
    if (cont.length === 0) continue;
    const P = prompt.length;
    const seq = [...prompt, ...cont];
    const fwd = await backbone.forward({ ids: seq, batch: 1, seqLen: seq.length, logits: 'all' });
    const hidden = fwd.hidden; // [1, P+N, d]
    const logits = fwd.logits!; // [1, P+N, V]
    for (let i = 0; i < cont.length; i++) {
      basePositions++;
      if (argmax(logits, (P - 1 + i) * V, V) === cont[i]) baseAgree++;
    }
    const proposals: number[][][] = [];
    for (let i = 0; i + 1 < cont.length; i++) {
      const t = P - 1 + i;
      proposals.push(await proposer.propose(hidden.slice(t * d, (t + 1) * d), o.topk)); // [K][topk]
    }
    countLive(counts, cont, proposals, o.topk);
  }
  return summariseLive(counts, { prompts: prompts.length, generatedTokens: generated, newTokensPerPrompt: o.newTokens, baseAgree, basePositions });
}
