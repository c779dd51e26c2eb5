/**
 * Medusa decoding with greedy acceptance (the reference `medusa_generate` at temperature 0), on the
 * any backbone engine (`medusaGenerateGreedyOn`; `medusaGenerateGreedy` = on tfjs), batch 1.
 *
 * Each step: the base token is the argmax of the last accepted position's logits; the heads read
 * that position's hidden state and propose their top-k tokens; the candidate tree (DESIGN.md §2) is
 * filled from [base, head0 top-k, head1 top-k, ...] and verified with ONE decoder forward using tree
 * attention (every node sees the prefix, the root and its ancestors; position = prefix length +
 * depth). The longest path whose tokens equal the backbone's argmax at their parents is accepted
 * (ties: the first path), the cache keeps the prefix plus the accepted nodes, and the next step
 * starts from the last accepted node. The output equals plain greedy decoding token for token.
 */
import { fail } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import type { MedusaHeads } from '../model/heads.js';
import { argmax } from '../model/sampling.js';
import { treeBuffers, validateChoices, type TreeBuffers } from './tree.js';
import type { DecoderConfig } from '../model/config.js';
import { tfjsBackbone, type Backbone } from '../engines/decoder-engine.js';
import { tfjsProposer, type HeadsProposer } from '../engines/heads-proposer.js';
import { greedyAccept } from './acceptance.js';

export interface MedusaDecodeOptions {
  /** Candidate tree as index paths: [a] = head 0's rank-a token, [a, b] = then head 1's rank-b token, ... */
  choices: number[][];
  /** Candidates taken per head (>= max rank + 1). */
  topk: number;
  maxNewTokens: number;
  /** Decoding stops after one of these (the token is kept). */
  eosIds: number[];
  /**
   * Tests only: replaces the heads' proposals. Returns, per head (at least the tree's depth), `topk`
   * token ids best first. `generated` counts the tokens emitted so far including this step's base
   * token, so head k's ideal guess is the greedy continuation's token at index `generated + k`.
   */
  candidateOverride?: (info: { step: number; generated: number }) => number[][];
}

export interface MedusaDecodeResult {
  tokens: number[];
  /** Decoding steps (tree verifications, plus a final step that only emitted its base token). */
  steps: number;
  tokensPerStep: number;
  /** Per step: head candidates emitted after the base token (so tokens = steps + sum). */
  acceptLengths: number[];
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
  validateChoices(o.choices, { numHeads: heads.numHeads, topk: o.topk, where: 'medusa_choices' });
  return treeBuffers(o.choices, o.topk);
}

/** The tree's node tokens from the base token and the heads' proposals ([numHeads][topk]). */
function treeTokensOf(tree: TreeBuffers, o: MedusaDecodeOptions, base: number, proposals: number[][]): number[] {
  if (proposals.length < tree.maxDepth || proposals.some((r) => r.length < o.topk)) {
    fail('E_INTERNAL', `head proposals must be at least ${tree.maxDepth} rows of ${o.topk} token ids`);
  }
  const cands = [base];
  for (let k = 0; k < tree.maxDepth; k++) for (let r = 0; r < o.topk; r++) cands.push(proposals[k][r]);
  return Array.from(tree.treeIndices, (i) => cands[i]);
}

/** Greedy acceptance on the tree forward's logits [N, V]: the accepted nodes, root first (the longest matching path, first on ties). */
function acceptNodes(tree: TreeBuffers, treeTokens: number[], logits: Float32Array, V: number): number[] {
  const N = tree.nodes;
  const W = tree.maxDepth + 1;
  const pred = Array.from({ length: N }, (_, n) => argmax(logits, n * V, V));
  const pathTokens = new Int32Array(tree.numPaths * W); // [numPaths, W], -1 padded
  const pathArgmax = new Int32Array(tree.numPaths * W); // [numPaths, W]
  tree.retrieveIndices.forEach((node, i) => {
    pathTokens[i] = node < 0 ? -1 : treeTokens[node];
    pathArgmax[i] = node < 0 ? -1 : pred[node];
  });
  const { bestPath: best, acceptLength: bestLen } = greedyAccept(pathTokens, pathArgmax, tree.numPaths, W);
  return Array.from(tree.retrieveIndices.subarray(best * W, best * W + bestLen + 1));
}

/**
 * Medusa greedy decoding on any backbone (tfjs or onnx), batch 1: the tree verified by the backbone's
 * tree-masked forward and the cache pruned with `keepEntries`; the heads (any `HeadsProposer`) read
 * the backbone's host hidden state of the last accepted node.
 */
export async function medusaGenerateGreedyOn(backbone: Backbone, heads: HeadsProposer, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaDecodeResult> {
  const c = backbone.config;
  const V = c.vocabSize;
  const d = c.hiddenSize;
  const tree = prepare(c, heads, prompt, o);
  const N = tree.nodes;
  const eos = new Set(o.eosIds);
  const tokens: number[] = [];
  const acceptLengths: number[] = [];
  let steps = 0;
  const emit = (tok: number): boolean => {
    tokens.push(tok);
    return eos.has(tok) || tokens.length >= o.maxNewTokens;
  };
  const cache = backbone.newCache(1);
  try {
    const pre = await backbone.forward({ ids: prompt, batch: 1, seqLen: prompt.length, cache, logits: 'last' });
    // Host copies: an engine may reuse its output buffers.
    let lastHidden = pre.hidden.slice((prompt.length - 1) * d, prompt.length * d); // [d]
    let lastLogits = pre.logits!.slice(0, V); // [V]
    for (;;) {
      steps++;
      const base = argmax(lastLogits, 0, V);
      if (emit(base)) {
        acceptLengths.push(0);
        break;
      }
      const proposals = o.candidateOverride ? o.candidateOverride({ step: steps - 1, generated: tokens.length }) : await heads.propose(lastHidden, o.topk);
      const treeTokens = treeTokensOf(tree, o, base, proposals);
      // One verification forward over every node. Batch 1 without padding: positions run 0, 1, ... through the
      // prompt and the accepted nodes, so the next position is the cache length.
      const S = cache.length;
      const positions = Int32Array.from(tree.positionOffsets, (p) => S + p);
      const fwd = await backbone.forward({ ids: treeTokens, batch: 1, seqLen: N, cache, logits: 'all', treeMask: { mask: tree.attentionMask, positions } });
      const logits = fwd.logits!; // [N, V]
      const accepted = acceptNodes(tree, treeTokens, logits, V); // root first
      const bestLen = accepted.length - 1;
      let done = false;
      let emitted = 0;
      for (let dd = 1; dd <= bestLen && !done; dd++) {
        done = emit(treeTokens[accepted[dd]]);
        emitted++;
      }
      acceptLengths.push(emitted);
      if (done) break;
      const last = accepted[bestLen];
      cache.keepEntries([...Array.from({ length: S }, (_, i) => i), ...accepted.map((n) => S + n)]);
      lastHidden = fwd.hidden.slice(last * d, (last + 1) * d);
      lastLogits = logits.slice(last * V, (last + 1) * V);
    }
  } finally {
    cache.dispose();
  }
  return { tokens, steps, tokensPerStep: tokens.length / steps, acceptLengths };
}

/** Medusa greedy decoding on the tfjs engine (the reference path of `medusaGenerateGreedyOn`). */
export function medusaGenerateGreedy(model: Decoder, heads: MedusaHeads, prompt: number[], o: MedusaDecodeOptions): Promise<MedusaDecodeResult> {
  return medusaGenerateGreedyOn(tfjsBackbone(model), tfjsProposer(heads), prompt, o);
}
