/**
 * Medusa decoding with greedy acceptance (the reference `medusa_generate` at temperature 0), on the
 * tfjs engine, batch 1.
 *
 * Each step: the base token is the argmax of the last accepted position's logits; the heads read
 * that position's hidden state and propose their top-k tokens; the candidate tree (DESIGN.md §2) is
 * filled from [base, head0 top-k, head1 top-k, ...] and verified with ONE decoder forward using tree
 * attention (every node sees the prefix, the root and its ancestors; position = prefix length +
 * depth). The longest path whose tokens equal the backbone's argmax at their parents is accepted
 * (ties: the first path), the cache keeps the prefix plus the accepted nodes, and the next step
 * starts from the last accepted node. The output equals plain greedy decoding token for token.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { decoderForward, disposeCache, emptyCache, keepCacheEntries, type Decoder, type KVCache } from '../model/decoder.js';
import type { MedusaHeads } from '../model/heads.js';
import { argmax } from '../model/sampling.js';
import { treeBuffers, validateChoices } from './tree.js';
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

/** Each head's top-k token ids on one hidden state [1, d]: [numHeads][topk]. */
export function headsTopK(heads: MedusaHeads, hidden: tf.Tensor2D, topk: number): number[][] {
  const K = heads.shape.numHeads;
  const ids = tf.tidy(() => {
    const rows: tf.Tensor2D[] = [];
    for (let k = 0; k < K; k++) {
      let h: tf.Tensor2D = hidden; // [1, d]
      for (const blk of heads.blocks[k]) {
        const z = tf.add(tf.matMul(h, blk.w), blk.b); // [1, d]
        h = tf.add(h, tf.mul(z, tf.sigmoid(z))); // [1, d]
      }
      rows.push(tf.matMul(h, heads.proj[k] ?? heads.baseLmHead)); // [1, V]
    }
    return tf.topk(tf.concat(rows, 0), topk).indices; // [K, topk]
  });
  const data = ids.dataSync();
  ids.dispose();
  return Array.from({ length: K }, (_, k) => Array.from(data.subarray(k * topk, (k + 1) * topk)));
}

/** Hidden state of one position of a [1, T, d] tensor, as [1, d]. */
function rowOf(hidden: tf.Tensor3D, t: number): tf.Tensor2D {
  const d = hidden.shape[2];
  return tf.tidy(() => tf.reshape(tf.slice(hidden, [0, t, 0], [1, 1, d]), [1, d]) as tf.Tensor2D);
}

export function medusaGenerateGreedy(model: Decoder, heads: MedusaHeads, prompt: number[], o: MedusaDecodeOptions): MedusaDecodeResult {
  const c = model.config;
  const V = c.vocabSize;
  if (prompt.length === 0) fail('E_USAGE', 'The prompt needs at least one token.');
  if (!Number.isInteger(o.maxNewTokens) || o.maxNewTokens < 1) fail('E_USAGE', `max_new_tokens must be a positive integer, got ${o.maxNewTokens}`);
  if (prompt.length + o.maxNewTokens > c.maxPositionEmbeddings) {
    fail('E_USAGE', `prompt (${prompt.length} tokens) + max_new_tokens (${o.maxNewTokens}) exceeds the model's max_position_embeddings (${c.maxPositionEmbeddings}).`);
  }
  if (heads.shape.hiddenSize !== c.hiddenSize || heads.shape.vocabSize !== V) {
    fail('E_USAGE', `heads are for hidden size ${heads.shape.hiddenSize} / vocab ${heads.shape.vocabSize}, the model has ${c.hiddenSize} / ${V}`);
  }
  if (o.topk > V) fail('E_USAGE', `topk ${o.topk} exceeds the vocabulary size ${V}`);
  validateChoices(o.choices, { numHeads: heads.shape.numHeads, topk: o.topk, where: 'medusa_choices' });
  const tree = treeBuffers(o.choices, o.topk);
  const eos = new Set(o.eosIds);
  const N = tree.nodes;
  const W = tree.maxDepth + 1;

  const cache: KVCache = emptyCache(1);
  let lastHidden: tf.Tensor2D | null = null;
  const tokens: number[] = [];
  const acceptLengths: number[] = [];
  let steps = 0;
  try {
    // Prefill.
    const pre = decoderForward(model, { ids: prompt, batch: 1, seqLen: prompt.length, cache, logits: 'last' });
    let lastLogits = pre.logits!.dataSync() as Float32Array; // [V]
    lastHidden = rowOf(pre.hidden, prompt.length - 1);
    pre.hidden.dispose();
    pre.logits!.dispose();

    const emit = (tok: number): boolean => {
      tokens.push(tok);
      return eos.has(tok) || tokens.length >= o.maxNewTokens;
    };
    for (;;) {
      steps++;
      const base = argmax(lastLogits, 0, V);
      if (emit(base)) {
        acceptLengths.push(0);
        break;
      }
      // Candidates: [base, head0 top-k, head1 top-k, ...] -> tree nodes.
      const proposals = o.candidateOverride ? o.candidateOverride({ step: steps - 1, generated: tokens.length }) : headsTopK(heads, lastHidden, o.topk);
      if (proposals.length < tree.maxDepth || proposals.some((r) => r.length < o.topk)) {
        fail('E_INTERNAL', `head proposals must be at least ${tree.maxDepth} rows of ${o.topk} token ids`);
      }
      const cands = [base];
      for (let k = 0; k < tree.maxDepth; k++) for (let r = 0; r < o.topk; r++) cands.push(proposals[k][r]);
      const treeTokens = Array.from(tree.treeIndices, (i) => cands[i]);
      // One verification forward over every node.
      const S = cache.length;
      const start = cache.nextPos[0];
      const positions = Int32Array.from(tree.positionOffsets, (p) => start + p);
      const fwd = decoderForward(model, { ids: treeTokens, batch: 1, seqLen: N, cache, logits: 'all', treeMask: { mask: tree.attentionMask, positions } });
      const logits = fwd.logits!.dataSync() as Float32Array; // [N, V]
      fwd.logits!.dispose();
      const pred = Array.from({ length: N }, (_, n) => argmax(logits, n * V, V));
      // Greedy acceptance: the longest matching path, first on ties.
      const pathTokens = new Int32Array(tree.numPaths * W); // [numPaths, W], -1 padded
      const pathArgmax = new Int32Array(tree.numPaths * W); // [numPaths, W]
      tree.retrieveIndices.forEach((node, i) => {
        pathTokens[i] = node < 0 ? -1 : treeTokens[node];
        pathArgmax[i] = node < 0 ? -1 : pred[node];
      });
      const { bestPath: best, acceptLength: bestLen } = greedyAccept(pathTokens, pathArgmax, tree.numPaths, W);
      const accepted = Array.from(tree.retrieveIndices.subarray(best * W, best * W + bestLen + 1)); // root first
      let done = false;
      let emitted = 0;
      for (let dd = 1; dd <= bestLen && !done; dd++) {
        done = emit(treeTokens[accepted[dd]]);
        emitted++;
      }
      acceptLengths.push(emitted);
      if (done) {
        fwd.hidden.dispose();
        break;
      }
      const last = accepted[bestLen];
      keepCacheEntries(cache, [...Array.from({ length: S }, (_, i) => i), ...accepted.map((n) => S + n)]);
      lastLogits = logits.subarray(last * V, (last + 1) * V);
      lastHidden.dispose();
      lastHidden = rowOf(fwd.hidden, last);
      fwd.hidden.dispose();
    }
  } finally {
    lastHidden?.dispose();
    disposeCache(cache);
  }
  return { tokens, steps, tokensPerStep: tokens.length / steps, acceptLengths };
}
