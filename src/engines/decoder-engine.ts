/**
 * The engine boundary for the frozen backbone's forward (self-distillation generation, hidden states
 * for training, later Medusa tree verification).
 *
 * A `Backbone` runs the decoder on host arrays and returns host arrays, with the semantics of
 * `decoderForward` (src/model/decoder.ts, the reference): positions from the attention mask (position =
 * number of real tokens before it), padding keys masked, causal, Mistral's sliding window by position
 * distance, the cache extended in place, a left-padded row equal to the row alone.
 *
 * Two engines:
 * - `tfjs`: `decoderForward` on the current TensorFlow.js backend, outputs read back with dataSync.
 * - `onnx`: one ONNX graph per model run by onnxruntime-node (native, multi-threaded MLAS kernels);
 *   see src/engines/onnx-decoder.ts. Loaded lazily, so tfjs-only runs never load onnxruntime.
 *
 * A cache belongs to the backbone that made it (`newCache`) and cannot be passed to another one.
 */
import * as tf from '@tensorflow/tfjs';
import { DISABLE_ORT_ENV, disabledByEnv } from './ort.js';
import { describe, fail } from '../errors.js';
import type { DecoderConfig } from '../model/config.js';
import { decoderForward, disposeCache, emptyCache, keepCacheEntries, type Decoder, type KVCache } from '../model/decoder.js';

export type DecoderEngineKind = 'tfjs' | 'onnx';
export const DECODER_ENGINE_KINDS: readonly DecoderEngineKind[] = ['tfjs', 'onnx'];

/** Keys/values of everything a backbone processed for a batch. Opaque: its layout belongs to the engine. */
export interface BackboneCache {
  readonly batch: number;
  /** Cached entries per row (padding entries included). */
  readonly length: number;
  /** Free the cache's memory (idempotent); the cache cannot be used afterwards. */
  dispose(): void;
  /**
   * Keep only the entries at `keep` (indexes into [0, length), strictly ascending), e.g. the prefix
   * plus the accepted nodes of a Medusa tree. The kept entries keep their positions; the next real
   * token gets the last kept real position + 1.
   */
  keepEntries(keep: number[]): void;
}

export interface BackboneForwardArgs {
  /** Token ids, row-major [batch, seqLen]. */
  ids: ArrayLike<number>;
  batch: number;
  seqLen: number;
  /** 1 = real token, 0 = padding, row-major [batch, seqLen]; default all real. Padding on the left of a block's real tokens. */
  mask?: ArrayLike<number>;
  /** When given, the new tokens attend to the cache, and the cache is extended in place. */
  cache?: BackboneCache;
  /**
   * Which logits to compute: every position, the last position of each row, or none; 'argmax' = every
   * position's argmax only (first maximum, as torch.argmax), computed inside the engine so the [batch,
   * seqLen, V] logits never reach JS (Medusa greedy verification needs nothing else).
   */
  logits: BackboneLogits;
  /**
   * Tree attention (Medusa verification; batch 1, no padding mask), as decoderForward's `treeMask`:
   * the new tokens attend to every real cached entry (the sliding window still applies) plus the new
   * tokens `mask` ([T, T], mask[i*T + j] = 1 when query i may attend new token j) allows, and get the
   * given position ids. The cache (if any) is extended with all new tokens; prune it with `keepEntries`.
   */
  treeMask?: { mask: Uint8Array; positions: Int32Array };
}

export type BackboneLogits = 'all' | 'last' | 'none' | 'argmax';

export interface BackboneForwardResult {
  /** Final hidden states after the final norm, [batch, seqLen, d] row-major. */
  hidden: Float32Array;
  /** [batch, seqLen, V] ('all'), [batch, 1, V] ('last'), or null ('none', 'argmax'). */
  logits: Float32Array | null;
  /** 'argmax' only: each position's argmax token id (first maximum), [batch, seqLen] row-major. */
  argmax?: Int32Array;
}

export interface Backbone {
  readonly kind: DecoderEngineKind;
  readonly config: DecoderConfig;
  /** An empty cache for `batch` rows. */
  newCache(batch: number): BackboneCache;
  forward(a: BackboneForwardArgs): Promise<BackboneForwardResult>;
  /** Free the engine's resources (the onnx session). Does not dispose the Decoder it was made from. */
  dispose(): void;
}

// ---------------------------------------------------------------------------------------------
// tfjs

class TfjsCache implements BackboneCache {
  disposed = false;
  constructor(readonly owner: TfjsBackbone, readonly kv: KVCache) {}
  get batch(): number {
    return this.kv.batch;
  }
  get length(): number {
    return this.kv.length;
  }
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    disposeCache(this.kv);
  }
  keepEntries(keep: number[]): void {
    if (this.disposed) fail('E_INTERNAL', 'keepEntries on a disposed tfjs cache');
    keepCacheEntries(this.kv, keep);
  }
}

class TfjsBackbone implements Backbone {
  readonly kind = 'tfjs' as const;
  readonly config: DecoderConfig;
  constructor(readonly decoder: Decoder) {
    this.config = decoder.config;
  }

  newCache(batch: number): BackboneCache {
    checkBatch(batch);
    return new TfjsCache(this, emptyCache(batch));
  }

  async forward(a: BackboneForwardArgs): Promise<BackboneForwardResult> {
    let kv: KVCache | undefined;
    if (a.cache !== undefined) {
      if (!(a.cache instanceof TfjsCache) || a.cache.owner !== this) fail('E_INTERNAL', 'the cache passed to the tfjs backbone was not made by it (use backbone.newCache)');
      if (a.cache.disposed) fail('E_INTERNAL', 'the cache passed to the tfjs backbone was disposed');
      kv = a.cache.kv;
    }
    const argmaxOnly = a.logits === 'argmax';
    const { hidden, logits } = decoderForward(this.decoder, { ids: a.ids, batch: a.batch, seqLen: a.seqLen, mask: a.mask, cache: kv, logits: a.logits === 'argmax' ? 'all' : a.logits, treeMask: a.treeMask });
    try {
      // dataSync gives a host copy on wasm; on cpu the backing array, which disposal does not touch.
      if (argmaxOnly) {
        const ids = tf.argMax(logits!, -1); // [B, T] int32, first maximum
        try {
          return { hidden: hidden.dataSync() as Float32Array, logits: null, argmax: Int32Array.from(ids.dataSync()) };
        } finally {
          ids.dispose();
        }
      }
      return { hidden: hidden.dataSync() as Float32Array, logits: logits ? (logits.dataSync() as Float32Array) : null };
    } finally {
      hidden.dispose();
      logits?.dispose();
    }
  }

  dispose(): void {
    // The Decoder (and its weights) belongs to the caller.
  }
}

/** The reference engine: `decoderForward` on the current TensorFlow.js backend. */
export function tfjsBackbone(decoder: Decoder): Backbone {
  return new TfjsBackbone(decoder);
}

// ---------------------------------------------------------------------------------------------
// onnx

export interface OnnxBackboneOptions {
  /** onnxruntime intra-op threads; default os.cpus().length. */
  threads?: number;
}

/**
 * The native engine: one ONNX graph of the whole decoder (weights as initializers) in one
 * onnxruntime-node InferenceSession, reused for every forward.
 *
 * Weights are read from the decoder's tfjs tensors (no second read of the model folder), so they live
 * twice while both exist: in the tfjs backend (owned by the caller, who may dispose them once only the
 * onnx engine is needed) and in onnxruntime (float32 initializers plus MLAS's pre-packed matrices:
 * measured 1.4x the weights for the 58M-parameter benchmark model). While the session is built, host
 * memory peaks about 2x the weights higher (initializer bytes + the serialized model), released
 * afterwards. Models whose float32 weights exceed one protobuf (2 GiB) are refused (E_UNSUPPORTED)
 * before anything is read.
 */
export async function onnxBackbone(decoder: Decoder, o: OnnxBackboneOptions = {}): Promise<Backbone> {
  let m: typeof import('./onnx-decoder.js');
  try {
    m = await import('./onnx-decoder.js'); // loads onnxruntime-node
  } catch (e) {
    fail('E_BACKEND', `The onnx engine is unavailable: onnxruntime-node failed to load (${describe(e).split('\n')[0]}). Reinstall with \`npm ci\` or use the tfjs engine.`, e);
  }
  return m.createOnnxBackbone(decoder, o);
}

/** The backbone of an engine kind. */
export async function makeBackbone(kind: DecoderEngineKind, decoder: Decoder, o: OnnxBackboneOptions = {}): Promise<Backbone> {
  if (kind === 'tfjs') return tfjsBackbone(decoder);
  if (kind === 'onnx') return onnxBackbone(decoder, o);
  fail('E_USAGE', `Unknown decoder engine '${String(kind)}'. Use one of: ${DECODER_ENGINE_KINDS.join(', ')}.`);
}

export function checkBatch(batch: number): void {
  if (!Number.isInteger(batch) || batch < 1) fail('E_INTERNAL', `cache batch must be a positive integer, got ${batch}`);
}

/** The backbone engine: onnx (native) when asked or when `auto` finds it usable, else tfjs. */
export async function chooseBackbone(kind: 'auto' | 'tfjs' | 'onnx', decoder: Decoder, log: (line: string) => void): Promise<Backbone> {
  if (kind === 'tfjs') return tfjsBackbone(decoder);
  if (kind === 'onnx') return onnxBackbone(decoder);
  if (disabledByEnv()) {
    log(`backbone: onnx disabled by ${DISABLE_ORT_ENV}; using tfjs`);
    return tfjsBackbone(decoder);
  }
  try {
    return await onnxBackbone(decoder);
  } catch (e) {
    log(`backbone: onnx unavailable (${(e as Error).message.split('\n')[0]}); using tfjs`);
    return tfjsBackbone(decoder);
  }
}
