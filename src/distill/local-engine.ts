/**
 * The embedded backbone as a distillation engine: requests are sorted by prompt length and run in
 * batches with the KV cache; each row samples from its own seeded stream. Optionally records the
 * teacher's top-k log-probabilities (of the untempered distribution) at every generated position.
 */
import { startBackboneGeneration } from '../engines/backbone-generate.js';
import type { Backbone } from '../engines/decoder-engine.js';
import type { SamplingParams } from '../model/sampling.js';
import type { DistillEngine, GenerationRequest, GenerationResult } from './engine.js';

export interface LocalEngineArgs {
  /** The backbone engine (tfjs or onnxruntime) that generates. */
  backbone: Backbone;
  sampling: SamplingParams;
  eosIds: number[];
  padId: number;
  batchSize: number;
  /** Teacher top-k to record (0 = none). */
  topk: number;
  /** Called after each batch with the number of tokens generated. */
  onTokens?: (n: number) => void;
}

/**
 * Top-k of log_softmax(logits[offset .. offset+V)): ids sorted by probability (ties: lower id first),
 * written at out[at .. at+k).
 */
export function topkLogprobs(logits: Float32Array, offset: number, V: number, k: number, outIds: Int32Array, outLp: Float32Array, at: number): void {
  let max = -Infinity;
  for (let i = 0; i < V; i++) max = Math.max(max, logits[offset + i]);
  let sum = 0;
  for (let i = 0; i < V; i++) sum += Math.exp(logits[offset + i] - max);
  const logZ = max + Math.log(sum);
  // Insertion into a sorted list of the k best (descending value, ascending id on ties).
  const ids: number[] = [];
  const vals: number[] = [];
  for (let i = 0; i < V; i++) {
    const v = logits[offset + i];
    if (ids.length === k && v <= vals[k - 1]) continue;
    let j = ids.length;
    while (j > 0 && vals[j - 1] < v) j--;
    ids.splice(j, 0, i);
    vals.splice(j, 0, v);
    if (ids.length > k) {
      ids.pop();
      vals.pop();
    }
  }
  for (let j = 0; j < k; j++) {
    outIds[at + j] = ids[j] ?? 0;
    outLp[at + j] = j < vals.length ? vals[j] - logZ : -Infinity;
  }
}

export function createLocalEngine(a: LocalEngineArgs): DistillEngine {
  const c = a.backbone.config;
  return {
    name: 'local',
    description: `local (${c.architecture}, ${a.backbone.kind} backbone, batch ${a.batchSize})`,
    async generate(requests: GenerationRequest[]): Promise<GenerationResult[]> {
      const results: GenerationResult[] = new Array<GenerationResult>(requests.length);
      // Sorting by length wastes little on padding; the order depends only on the requests, so a rerun batches identically.
      const order = requests.map((_, i) => i).sort((x, y) => requests[x].promptIds.length - requests[y].promptIds.length || x - y);
      for (let s = 0; s < order.length; s += a.batchSize) {
        const idx = order.slice(s, s + a.batchSize);
        const reqs = idx.map((i) => requests[i]);
        const k = a.topk;
        const topIds = reqs.map((r) => (k > 0 ? new Int32Array(r.maxNewTokens * k) : undefined));
        const topLp = reqs.map((r) => (k > 0 ? new Float32Array(r.maxNewTokens * k) : undefined));
        const counts = new Array<number>(reqs.length).fill(0);
        const session = await startBackboneGeneration(a.backbone, reqs.map((r) => r.promptIds), {
          ...a.sampling,
          maxNewTokens: Math.max(...reqs.map((r) => r.maxNewTokens)),
          perRow: reqs.map((r) => ({ maxNewTokens: r.maxNewTokens })),
          seeds: reqs.map((r) => r.seed),
          seed: 0,
          eosIds: a.eosIds,
          padId: a.padId,
          onDistribution: k > 0
            ? (row, logits, offset, V) => {
                topkLogprobs(logits, offset, V, k, topIds[row]!, topLp[row]!, counts[row] * k);
                counts[row]++;
              }
            : undefined,
        });
        try {
          while ((await session.step()).running > 0) {
            await new Promise<void>((r) => setImmediate(r)); // let signals and progress output through
          }
        } finally {
          session.dispose();
        }
        let n = 0;
        idx.forEach((i, row) => {
          const tokens = session.tokens[row];
          n += tokens.length;
          results[i] = {
            tokens,
            finish: session.finish[row] ?? 'length',
            topkIds: k > 0 ? topIds[row]!.slice(0, tokens.length * k) : undefined,
            topkLogprobs: k > 0 ? topLp[row]!.slice(0, tokens.length * k) : undefined,
          };
        });
        a.onTokens?.(n);
      }
      return results;
    },
    async close(): Promise<void> {},
  };
}
