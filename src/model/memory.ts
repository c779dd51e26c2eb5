/** Float32 memory estimates for a decoder: used by `info` and checked before loading weights. */
import { fail } from '../errors.js';
import { parameterCount, type DecoderConfig } from './config.js';

export interface MemoryEstimate {
  /** Context length the estimate is for. */
  contextTokens: number;
  weightsBytes: number;
  kvCacheBytes: number;
  activationBytes: number;
  totalBytes: number;
}

/**
 * Float32 memory for generation at batch 1 with `contextTokens` of context: weights (a tied lm_head
 * is stored a second time, transposed, so every matmul is the fast untransposed one), the KV cache,
 * and the prefill's largest transient activations (one layer's tensors plus one attention group's scores).
 */
export function estimateMemory(c: DecoderConfig, contextTokens: number): MemoryEstimate {
  const f = 4;
  const N = contextTokens;
  const weightsBytes = f * (parameterCount(c) + (c.tieWordEmbeddings ? c.vocabSize * c.hiddenSize : 0));
  const kvCacheBytes = f * 2 * c.numLayers * c.numKvHeads * c.headDim * N;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const perToken = 4 * c.hiddenSize + (q + 2 * kv) + 3 * q + 3 * c.intermediateSize;
  const scores = 3 * (c.numHeads / c.numKvHeads) * N * N; // scores, probabilities, bias for one kv group
  const activationBytes = f * (N * perToken + scores + c.vocabSize);
  return { contextTokens: N, weightsBytes, kvCacheBytes, activationBytes, totalBytes: weightsBytes + kvCacheBytes + activationBytes };
}


/**
 * Refuse to load a model whose weights plus a minimal working set cannot fit the backend (the wasm heap
 * is 4 GiB). Checked before any weight is read, so the user gets the advice instead of an abort.
 */
export function checkFitsBackend(c: DecoderConfig, backendName: string, maxTensorBytes: number, where: string): void {
  const m = estimateMemory(c, Math.min(512, c.maxPositionEmbeddings));
  if (m.totalBytes > maxTensorBytes) {
    const gib = (n: number): string => `${(n / 1024 ** 3).toFixed(2)} GiB`;
    fail('E_BACKEND', `${where} needs about ${gib(m.totalBytes)} in float32 (weights ${gib(m.weightsBytes)}) but the ${backendName} backend holds at most ${gib(maxTensorBytes)}. ` +
      'Use the native backend (--backend native, with @tensorflow/tfjs-node-gpu or @tensorflow/tfjs-node installed), or a smaller model.');
  }
}
