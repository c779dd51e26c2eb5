/**
 * Medusa decoding (the reference `medusa_generate`), batch 1, on any backbone engine (tfjs or onnx,
 * src/engines/decoder-engine.ts) with any heads proposer (src/engines/heads-proposer.ts).
 *
 * Each step: the base token is chosen from the last accepted position's logits; the heads read that
 * position's hidden state and propose their top-k tokens; the candidate tree (DESIGN.md §2) is filled
 * from [base, head0 top-k, head1 top-k, ...] and verified with ONE decoder forward using tree
 * attention (every node sees the prefix, the root and its ancestors; position = prefix length +
 * depth). Acceptance (src/eval/acceptance.ts) keeps the best path's accepted prefix, the cache keeps
 * the prefix plus the accepted nodes, and the next step starts from the last accepted node.
 *
 * - temperature 0: greedy acceptance (a node is accepted when it equals the argmax at its parent;
 *   the first longest path), argmax base token. The output equals plain greedy decoding token for
 *   token.
 * - temperature > 0: typical acceptance (p(x) > min(eps, delta * exp(-H(p))), p = softmax(logits /
 *   T); among the longest paths the most likely). The base token is, by default (`baseToken:
 *   'typical'`), drawn from the typical set of the last accepted position (the reference's
 *   `get_typical_one_token`, used when its `fast` flag is off) with a mulberry32 generator seeded by
 *   `seed`, so a run is reproducible from its seed and different seeds give different texts.
 *   `baseToken: 'argmax'` is the reference's default `fast = True` path: the base token is the
 *   argmax, so the output is a deterministic function of the prompt and the seed does nothing.
 *   Typical rather than argmax by default because a caller asking for temperature > 0 (an OpenAI
 *   client through `serve`) expects sampling, and every emitted token then comes from the same
 *   typical set (accepted candidates pass the threshold, the base token is drawn above it).
 *
 * Host work per step is what acceptance needs: greedy asks the engine for each node's argmax only
 * (`logits: 'argmax'`, so the [nodes, V] logits never reach JS); typical computes one float64 softmax
 * per tree node whose own path was accepted (plus the base position), never per node of the whole
 * tree. Step timing (propose, verify forward, host work) is part of the result.
 */
import { fail } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import type { MedusaHeads } from '../model/heads.js';
import { Rng } from '../model/sampling.js';
import { treeBuffers, validateChoices, type TreeBuffers } from './tree.js';
import type { DecoderConfig } from '../model/config.js';
import { tfjsBackbone, type Backbone, type BackboneCache } from '../engines/decoder-engine.js';
import { tfjsProposer, type HeadsProposer } from '../engines/heads-proposer.js';
import { acceptOnTree, NodeDistributions, sampleTypical, TYPICAL_DEFAULTS } from './acceptance.js';

/** How tokens are chosen: temperature 0 = greedy; above, typical acceptance. */
export interface MedusaSampling {
  temperature: number;
  /** eps (the reference's posterior_threshold), default 0.09. */
  posteriorThreshold?: number;
  /** delta (the reference's posterior_alpha), default 0.3. */
  posteriorAlpha?: number;
  /** Seed of the base-token draws (temperature > 0, baseToken 'typical'); default 0. */
  seed?: number;
  /** The base token at temperature > 0: drawn from the typical set (default), or the argmax (the reference's `fast` path). */
  baseToken?: 'typical' | 'argmax';
}

export interface MedusaDecodeOptions {
  /** Candidate tree as index paths: [a] = head 0's rank-a token, [a, b] = then head 1's rank-b token, ... */
  choices: number[][];
  /** Candidates taken per head (>= max rank + 1). */
  topk: number;
  maxNewTokens: number;
  /** Decoding stops after one of these (the token is kept). */
  eosIds: number[];
  /** Default: greedy (temperature 0). */
  sampling?: MedusaSampling;
  /**
   * Tests only: replaces the heads' proposals. Returns, per head (at least the tree's depth), `topk`
   * token ids best first. `generated` counts the tokens emitted so far including this step's base
   * token, so head k's ideal guess is the greedy continuation's token at index `generated + k`.
   */
  candidateOverride?: (info: { step: number; generated: number }) => number[][];
  /** Tests only: keep, per emitted token, the logits row [V] it was chosen or verified from (`logitsSeen`). */
  recordLogits?: boolean;
}

/** Milliseconds one step spent: in the heads' proposal, in the tree-verification forward, and on the host (base token, acceptance, cache pruning, copies). */
export interface MedusaStepTiming {
  proposeMs: number;
  verifyMs: number;
  hostMs: number;
}

export interface MedusaDecodeResult {
  tokens: number[];
  /** Decoding steps (tree verifications, plus a final step that only emitted its base token). */
  steps: number;
  tokensPerStep: number;
  /** Per step: head candidates emitted after the base token (so tokens = steps + sum). */
  acceptLengths: number[];
  /** 'greedy' at temperature 0, else 'typical'. */
  acceptance: 'greedy' | 'typical';
  timing: { prefillMs: number; steps: MedusaStepTiming[] };
  /** With recordLogits: [tokens.length, V], row i = the logits token i was chosen or verified from. */
  logitsSeen?: Float32Array;
}

/** Mean per-step milliseconds of a result (0 when it has no steps). */
export function meanStepTiming(r: Pick<MedusaDecodeResult, 'timing'>): MedusaStepTiming {
  const s = r.timing.steps;
  const n = Math.max(s.length, 1);
  const sum = (f: (t: MedusaStepTiming) => number): number => s.reduce((a, t) => a + f(t), 0) / n;
  return { proposeMs: sum((t) => t.proposeMs), verifyMs: sum((t) => t.verifyMs), hostMs: sum((t) => t.hostMs) };
}

/** Validated inputs and the tree buffers. */
function prepare(c: DecoderConfig, heads: HeadsProposer, prompt: number[], o: MedusaDecodeOptions): TreeBuffers {
  const V = c.vocabSize;
  if (prompt.length === 0) fail('E_USAGE', 'The prompt needs at least one token.');
  if (!Number.isInteger(o.maxNewTokens) || o.maxNewTokens < 1) fail('E_USAGE', `max_new_tokens must be a positive integer, got ${o.maxNewTokens}`);
  if (prompt.length + o.maxNewTokens > c.maxPositionEmbeddings) {
    fail('E_USAGE', `prompt (${prompt.length} tokens) + max_new_tokens (${o.maxNewTokens}) exceeds the model's max_position_embeddings (${c.maxPositionEmbeddings}).`);
  }
  if (heads.hiddenSize !== c.hiddenSize || heads.vocabSize !== V) {
    fail('E_USAGE', `heads are for hidden size ${heads.hiddenSize} / vocab ${heads.vocabSize}, the model has ${c.hiddenSize} / ${V}`);
  }
  if (o.topk > V) fail('E_USAGE', `topk ${o.topk} exceeds the vocabulary size ${V}`);
  const s = o.sampling;
  if (s) {
    if (!(s.temperature >= 0 && Number.isFinite(s.temperature))) fail('E_USAGE', `temperature must be a finite number >= 0, got ${s.temperature}`);
    if (s.seed !== undefined && !(Number.isInteger(s.seed) && s.seed >= 0 && s.seed < 2 ** 32)) fail('E_USAGE', `seed must be an integer in [0, 2^32), got ${s.seed}`);
    if (s.baseToken !== undefined && s.baseToken !== 'typical' && s.baseToken !== 'argmax') fail('E_USAGE', `baseToken must be 'typical' or 'argmax', got ${String(s.baseToken)}`);
  }
  validateChoices(o.choices, { numHeads: heads.numHeads, topk: o.topk, where: 'medusa_choices' });
  return treeBuffers(o.choices, o.topk);
}

/** The tree's node tokens from the base token and the heads' proposals ([numHeads][topk]). */
function treeTokensOf(tree: TreeBuffers, topk: number, base: number, proposals: number[][]): number[] {
  if (proposals.length < tree.maxDepth || proposals.some((r) => r.length < topk)) {
    fail('E_INTERNAL', `head proposals must be at least ${tree.maxDepth} rows of ${topk} token ids`);
  }
  const cands = [base];
  for (let k = 0; k < tree.maxDepth; k++) for (let r = 0; r < topk; r++) cands.push(proposals[k][r]);
  return Array.from(tree.treeIndices, (i) => cands[i]);
}

/** A Medusa decoding in progress: `step()` runs one decoding step and returns the tokens it emitted. */
export interface MedusaSession {
  /** True once eos or max_new_tokens ended the decoding (step() then returns []). */
  readonly finished: boolean;
  /** One step: choose the base token, propose, verify, accept; the tokens emitted (1 + accepted). */
  step(): Promise<number[]>;
  /** The result so far (final once finished). */
  result(): MedusaDecodeResult;
  /** Free the cache (idempotent). */
  dispose(): void;
}

/**
 * Start Medusa decoding of one prompt: runs the prefill; each `step()` is one decoding step. The
 * backbone's cache is owned by the session (free it with dispose(), also after finishing).
 */
export async function startMedusa(backbone: Backbone, heads: HeadsProposer, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaSession> {
  const c = backbone.config;
  const V = c.vocabSize;
  const d = c.hiddenSize;
  const tree = prepare(c, heads, prompt, o);
  const N = tree.nodes;
  const W = tree.maxDepth + 1;
  const T = o.sampling?.temperature ?? 0;
  const dist = new NodeDistributions(V, {
    temperature: T,
    posteriorThreshold: o.sampling?.posteriorThreshold ?? TYPICAL_DEFAULTS.posteriorThreshold,
    posteriorAlpha: o.sampling?.posteriorAlpha ?? TYPICAL_DEFAULTS.posteriorAlpha,
  });
  // Greedy verification needs each node's argmax only: the engine computes it, and the [N, V] logits stay inside.
  const argmaxOnly = T === 0 && !o.recordLogits;
  const sampleBase = T > 0 && (o.sampling?.baseToken ?? 'typical') === 'typical';
  const rng = new Rng(o.sampling?.seed ?? 0);
  const eos = new Set(o.eosIds);
  const tokens: number[] = [];
  const acceptLengths: number[] = [];
  const timings: MedusaStepTiming[] = [];
  const seen: Float32Array[] = [];
  let finished = false;

  let cache: BackboneCache | null = backbone.newCache(1);
  let prefillMs: number;
  // The logits [rows, V] that hold the last accepted position's row `lastNode` (dist is reset to them), and its hidden state [d].
  let lastHidden: Float32Array;
  let lastNode = 0;
  try {
    const t0 = performance.now();
    const pre = await backbone.forward({ ids: prompt, batch: 1, seqLen: prompt.length, cache, logits: 'last' });
    // Host copies: an engine may reuse its output buffers.
    lastHidden = pre.hidden.slice((prompt.length - 1) * d, prompt.length * d); // [d]
    dist.reset(pre.logits!.slice(0, V)); // [1, V]
    prefillMs = performance.now() - t0;
  } catch (e) {
    cache.dispose();
    throw e;
  }

  const emit = (tok: number): boolean => {
    tokens.push(tok);
    return eos.has(tok) || tokens.length >= o.maxNewTokens;
  };
  const record = (logits: Float32Array, node: number): void => {
    if (o.recordLogits) seen.push(logits.slice(node * V, (node + 1) * V));
  };
  let lastLogits: Float32Array = dist.logitsView();

  const step = async (): Promise<number[]> => {
    if (finished) return [];
    if (!cache) fail('E_INTERNAL', 'Medusa step() after dispose()');
    const from = tokens.length;
    const t: MedusaStepTiming = { proposeMs: 0, verifyMs: 0, hostMs: 0 };
    timings.push(t);
    let th = performance.now();
    // Base token from the last accepted position.
    const base = sampleBase ? sampleTypical(dist.probs(lastNode), dist.threshold(lastNode), rng.next()) : dist.argmax(lastNode);
    record(lastLogits, lastNode);
    if (emit(base)) {
      acceptLengths.push(0);
      finished = true;
      t.hostMs = performance.now() - th;
      return tokens.slice(from);
    }
    let tp = performance.now();
    t.hostMs += tp - th;
    const proposals = o.candidateOverride ? o.candidateOverride({ step: timings.length - 1, generated: tokens.length }) : await heads.propose(lastHidden, o.topk);
    th = performance.now();
    t.proposeMs = th - tp;
    const treeTokens = treeTokensOf(tree, o.topk, base, proposals);
    // One verification forward over every node. Batch 1 without padding: positions run 0, 1, ... through the
    // prompt and the accepted nodes, so the next position is the cache length.
    const S = cache.length;
    const positions = Int32Array.from(tree.positionOffsets, (p) => S + p);
    tp = performance.now();
    t.hostMs += tp - th;
    const fwd = await backbone.forward({ ids: treeTokens, batch: 1, seqLen: N, cache, logits: argmaxOnly ? 'argmax' : 'all', treeMask: { mask: tree.attentionMask, positions } });
    th = performance.now();
    t.verifyMs = th - tp;
    if (argmaxOnly && !fwd.argmax) fail('E_INTERNAL', `the ${backbone.kind} backbone returned no argmax for logits: 'argmax'`);
    const logits = argmaxOnly ? new Float32Array(0) : fwd.logits!.slice(); // [N, V] host copy (the engine may reuse its buffer)
    if (argmaxOnly) dist.reset(null, fwd.argmax!.slice()); // [N]
    else dist.reset(logits);
    lastLogits = logits;
    const { nodes: accepted } = acceptOnTree(dist, treeTokens, tree.retrieveIndices, tree.numPaths, W); // root first
    const bestLen = accepted.length - 1;
    let emitted = 0;
    for (let dd = 1; dd <= bestLen && !finished; dd++) {
      record(logits, accepted[dd - 1]);
      finished = emit(treeTokens[accepted[dd]]);
      emitted++;
    }
    acceptLengths.push(emitted);
    if (!finished) {
      lastNode = accepted[bestLen];
      cache.keepEntries([...Array.from({ length: S }, (_, i) => i), ...accepted.map((n) => S + n)]);
      lastHidden = fwd.hidden.slice(lastNode * d, (lastNode + 1) * d);
    }
    t.hostMs += performance.now() - th;
    return tokens.slice(from);
  };

  return {
    get finished() {
      return finished;
    },
    step,
    result: () => ({
      tokens: tokens.slice(),
      steps: acceptLengths.length,
      tokensPerStep: tokens.length / Math.max(acceptLengths.length, 1),
      acceptLengths: acceptLengths.slice(),
      acceptance: T === 0 ? 'greedy' : 'typical',
      timing: { prefillMs, steps: timings.map((x) => ({ ...x })) },
      ...(o.recordLogits ? { logitsSeen: concatRows(seen, V) } : {}),
    }),
    dispose: () => {
      cache?.dispose();
      cache = null;
    },
  };
}

function concatRows(rows: Float32Array[], V: number): Float32Array {
  const out = new Float32Array(rows.length * V);
  rows.forEach((r, i) => out.set(r, i * V));
  return out;
}

/** Medusa decoding of one prompt to the end (greedy or typical per `o.sampling`). */
export async function medusaGenerateOn(backbone: Backbone, heads: HeadsProposer, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaDecodeResult> {
  const s = await startMedusa(backbone, heads, prompt, o);
  try {
    while (!s.finished) await s.step();
    return s.result();
  } finally {
    s.dispose();
  }
}

/**
 * Medusa greedy decoding on any backbone (tfjs or onnx), batch 1: the tree verified by the backbone's
 * tree-masked forward and the cache pruned with `keepEntries`; the heads (any `HeadsProposer`) read
 * the backbone's host hidden state of the last accepted node. Equals plain greedy decoding.
 */
export function medusaGenerateGreedyOn(backbone: Backbone, heads: HeadsProposer, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaDecodeResult> {
  return medusaGenerateOn(backbone, heads, prompt, { ...o, sampling: undefined });
}

/** Medusa greedy decoding on the tfjs engine (the reference path of `medusaGenerateGreedyOn`). */
export function medusaGenerateGreedy(model: Decoder, heads: MedusaHeads, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaDecodeResult> {
  return medusaGenerateGreedyOn(tfjsBackbone(model), tfjsProposer(heads), prompt, o);
}
