/**
 * The base-quality gate of MEDUSA-2: how far the tuned backbone moved from the original model, measured
 * on held-out distilled data (padded batches from src/data/batches.ts padBatch).
 *
 * Positions: in each row, the assistant tokens j (1 <= j < length, lossMask[j] = 1), each predicted from
 * position j-1 (the LM term's positions), in batch order, at most `maxPositions`. Per position, with p the
 * original model's next-token distribution and q the tuned one's (full vocabulary, float64 on the host):
 * - KL(p || q) = sum_v p(v) (log p(v) - log q(v)), in nats; the gate reports the mean;
 * - greedy agreement: argmax p == argmax q (first maximum, as torch.argmax); the gate reports the fraction;
 * - the negative log-likelihood of the actual token j under each model; perplexity = exp(mean NLL), and
 *   the ratio tuned / original.
 * `gateVerdict` compares the figures with the thresholds (config `medusa2.gate`) and names every crossed one.
 *
 * Models: a `Backbone` (tfjs or onnx engine; async, full logits per batch), or a tfjs `Decoder`, optionally
 * with a ForwardHook factory (the tuned backbone: E1's TrainableBackbone.hook(null)); decoders compute the
 * lm_head only on the selected positions, in chunks, so the [B, T, V] logits never exist.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import type { Backbone } from '../engines/decoder-engine.js';
import { decoderForward, type Decoder, type ForwardHook } from '../model/decoder.js';
import { padBatch, type PaddedBatch, type TrainExample } from '../data/batches.js';

/**
 * A tfjs decoder run with a hook: a ForwardHook (its tensors belong to the caller), or a factory called
 * for each forward inside the gate's tidy (so tensors the hook builds, e.g. full mode's fused weights, are freed).
 */
export interface HookedDecoder {
  decoder: Decoder;
  hook: ForwardHook | (() => ForwardHook);
}
export type DecoderGateModel = Decoder | HookedDecoder;
export type GateModel = Backbone | DecoderGateModel;

export interface GateMetrics {
  /** Positions measured. */
  positions: number;
  /** Mean KL(original || tuned) per position, nats. */
  meanKl: number;
  /** Fraction of positions where both models' greedy next token is the same. */
  agreement: number;
  pplOriginal: number;
  pplTuned: number;
  /** pplTuned / pplOriginal. */
  pplRatio: number;
}

export interface GateThresholds {
  maxKl: number;
  minAgreement: number;
  maxPplRatio: number;
  /** What a crossed threshold means: 'fail' -> status fail; 'warn' -> status warn. */
  action: 'fail' | 'warn';
}

export type GateKey = 'max_kl' | 'min_agreement' | 'max_ppl_ratio';

export interface GateVerdict {
  status: 'pass' | 'warn' | 'fail';
  crossed: { key: GateKey; value: number; limit: number }[];
  /** One line: "passed (...)" or every crossed threshold with its value and limit. */
  message: string;
}

/** Rows of a batch the gate measures: flat index b*T + (j-1) and the token j it predicts. */
interface Selected {
  rows: Int32Array;
  targets: Int32Array;
}

function select(batch: PaddedBatch, budget: number): Selected {
  const rows: number[] = [];
  const targets: number[] = [];
  for (let b = 0; b < batch.B && rows.length < budget; b++) {
    const len = batch.lengths[b];
    for (let j = 1; j < len && rows.length < budget; j++) {
      if (batch.lossMask[b * batch.T + j] !== 1) continue;
      rows.push(b * batch.T + j - 1);
      targets.push(batch.ids[b * batch.T + j]);
    }
  }
  return { rows: Int32Array.from(rows), targets: Int32Array.from(targets) };
}

/** Running sums over positions (float64). */
class Sums {
  n = 0;
  kl = 0;
  agree = 0;
  nllO = 0;
  nllT = 0;

  /** Add positions given both models' logits [n, V] (row-major) and the actual next tokens [n]. */
  add(lo: Float32Array, lt: Float32Array, targets: Int32Array, V: number): void {
    const n = targets.length;
    if (lo.length !== n * V || lt.length !== n * V) fail('E_INTERNAL', `gate: logits hold ${lo.length} / ${lt.length} values, expected ${n} x ${V}`);
    for (let i = 0; i < n; i++) {
      const o = i * V;
      let maxO = -Infinity;
      let maxT = -Infinity;
      let argO = 0;
      let argT = 0;
      for (let v = 0; v < V; v++) {
        if (lo[o + v] > maxO) {
          maxO = lo[o + v];
          argO = v;
        }
        if (lt[o + v] > maxT) {
          maxT = lt[o + v];
          argT = v;
        }
      }
      if (!Number.isFinite(maxO) || !Number.isFinite(maxT)) fail('E_TRAIN', `gate: a model produced non-finite logits at a measured position; the ${Number.isFinite(maxO) ? 'tuned' : 'original'} backbone is broken (NaN/Inf)`);
      let sO = 0;
      let sT = 0;
      for (let v = 0; v < V; v++) {
        sO += Math.exp(lo[o + v] - maxO);
        sT += Math.exp(lt[o + v] - maxT);
      }
      const lseO = maxO + Math.log(sO);
      const lseT = maxT + Math.log(sT);
      let kl = 0;
      for (let v = 0; v < V; v++) {
        const lpO = lo[o + v] - lseO;
        const p = Math.exp(lpO);
        if (p > 0) kl += p * (lpO - (lt[o + v] - lseT));
      }
      this.kl += Math.max(0, kl); // >= 0 mathematically; rounding may leave -1e-17
      if (argO === argT) this.agree++;
      const tok = targets[i];
      this.nllO += lseO - lo[o + tok];
      this.nllT += lseT - lt[o + tok];
      this.n++;
    }
  }

  metrics(): GateMetrics {
    if (this.n === 0) {
      fail('E_CONFIG', 'the base-quality gate found no assistant positions in the held-out data; raise data.eval_fraction / data.eval_max, or check that the dataset has assistant turns');
    }
    const pplOriginal = Math.exp(this.nllO / this.n);
    const pplTuned = Math.exp(this.nllT / this.n);
    return { positions: this.n, meanKl: this.kl / this.n, agreement: this.agree / this.n, pplOriginal, pplTuned, pplRatio: pplTuned / pplOriginal };
  }
}

/** Rows of the lm_head computed at once on a decoder (bounds the [rows, V] logits in memory). */
const CHUNK_ROWS = 256;

function isBackbone(m: GateModel): m is Backbone {
  return typeof (m as Backbone).forward === 'function' && typeof (m as Backbone).newCache === 'function';
}

function decoderOf(m: DecoderGateModel): Decoder {
  return 'hook' in m ? m.decoder : m;
}

/** Logits [n, V] of a decoder at the selected rows of a batch: hidden states, then the lm_head on those rows only. */
function decoderRowLogits(m: DecoderGateModel, batch: PaddedBatch, rows: Int32Array): Float32Array {
  const decoder = decoderOf(m);
  const V = decoder.config.vocabSize;
  const out = new Float32Array(rows.length * V);
  const t = tf.tidy(() => {
    const hook = 'hook' in m ? (typeof m.hook === 'function' ? m.hook() : m.hook) : undefined;
    const { hidden, logits } = decoderForward(decoder, { ids: batch.ids, batch: batch.B, seqLen: batch.T, mask: batch.attention, logits: 'none', hook }); // [B, T, d]
    logits?.dispose();
    const d = decoder.config.hiddenSize;
    const flat = tf.reshape(hidden, [batch.B * batch.T, d]) as tf.Tensor2D; // [B*T, d]
    const w = hook?.weights ?? decoder.weights;
    const parts: tf.Tensor2D[] = [];
    for (let s = 0; s < rows.length; s += CHUNK_ROWS) {
      const idx = tf.tensor1d(rows.subarray(s, Math.min(rows.length, s + CHUNK_ROWS)), 'int32'); // [n]
      const h = tf.gather(flat, idx) as tf.Tensor2D; // [n, d]
      const base = tf.matMul(h, w.lmHead); // [n, V]
      parts.push(hook?.linear ? hook.linear('lm_head', -1, h, base as tf.Tensor2D) : (base as tf.Tensor2D)); // [n, V]
    }
    return parts.length === 1 ? parts[0] : (tf.concat(parts, 0) as tf.Tensor2D); // [rows, V]
  });
  try {
    out.set(t.dataSync() as Float32Array);
  } finally {
    t.dispose();
  }
  return out;
}

/** Logits [n, V] of a Backbone at the selected rows (the engine returns the batch's [B, T, V] logits). */
async function backboneRowLogits(m: Backbone, batch: PaddedBatch, rows: Int32Array): Promise<Float32Array> {
  const V = m.config.vocabSize;
  const r = await m.forward({ ids: batch.ids, batch: batch.B, seqLen: batch.T, mask: batch.attention, logits: 'all' });
  if (r.logits === null || r.logits.length !== batch.B * batch.T * V) fail('E_INTERNAL', `gate: the ${m.kind} backbone returned no [${batch.B}, ${batch.T}, ${V}] logits`);
  const out = new Float32Array(rows.length * V);
  for (let i = 0; i < rows.length; i++) out.set(r.logits.subarray(rows[i] * V, rows[i] * V + V), i * V);
  return out;
}

function vocabOf(m: GateModel): number {
  return isBackbone(m) ? m.config.vocabSize : decoderOf(m).config.vocabSize;
}

function checkPair(original: GateModel, tuned: GateModel, maxPositions: number): number {
  if (!Number.isSafeInteger(maxPositions) || maxPositions < 1) fail('E_CONFIG', `medusa2.gate.max_positions must be an integer >= 1, got ${String(maxPositions)}`);
  const V = vocabOf(original);
  if (vocabOf(tuned) !== V) fail('E_INTERNAL', `gate: the original model's vocabulary (${V}) differs from the tuned one's (${vocabOf(tuned)})`);
  return V;
}

/** Gate figures between two tfjs decoders (synchronous). See the module comment for the definitions. */
export function gateMetricsSync(original: DecoderGateModel, tuned: DecoderGateModel, batches: Iterable<PaddedBatch>, o: { maxPositions: number }): GateMetrics {
  const V = checkPair(original, tuned, o.maxPositions);
  const sums = new Sums();
  for (const batch of batches) {
    if (sums.n >= o.maxPositions) break;
    const sel = select(batch, o.maxPositions - sums.n);
    if (sel.rows.length === 0) continue;
    sums.add(decoderRowLogits(original, batch, sel.rows), decoderRowLogits(tuned, batch, sel.rows), sel.targets, V);
  }
  return sums.metrics();
}

/** Gate figures between two models, any of which may be a Backbone (e.g. the onnx engine for the frozen original). */
export async function gateMetrics(original: GateModel, tuned: GateModel, batches: Iterable<PaddedBatch>, o: { maxPositions: number }): Promise<GateMetrics> {
  const V = checkPair(original, tuned, o.maxPositions);
  const rowLogits = (m: GateModel, b: PaddedBatch, rows: Int32Array): Promise<Float32Array> | Float32Array => (isBackbone(m) ? backboneRowLogits(m, b, rows) : decoderRowLogits(m, b, rows));
  const sums = new Sums();
  for (const batch of batches) {
    if (sums.n >= o.maxPositions) break;
    const sel = select(batch, o.maxPositions - sums.n);
    if (sel.rows.length === 0) continue;
    sums.add(await rowLogits(original, batch, sel.rows), await rowLogits(tuned, batch, sel.rows), sel.targets, V);
  }
  return sums.metrics();
}

/** The figures from logits already computed: [n, V] each, and the actual next tokens [n] (for callers that have the logits). */
export function gateMetricsFromLogits(original: Float32Array, tuned: Float32Array, targets: Int32Array, V: number): GateMetrics {
  const sums = new Sums();
  sums.add(original, tuned, targets, V);
  return sums.metrics();
}

const num = (x: number): string => (Math.abs(x) >= 1e-3 || x === 0 ? x.toFixed(4) : x.toExponential(2));

/** pass when no threshold is crossed; else fail or warn as `t.action` says, naming each crossed threshold. */
export function gateVerdict(m: GateMetrics, t: GateThresholds): GateVerdict {
  const crossed: GateVerdict['crossed'] = [];
  // NaN figures cross every threshold they are compared with (a NaN backbone must not pass).
  if (!(m.meanKl <= t.maxKl)) crossed.push({ key: 'max_kl', value: m.meanKl, limit: t.maxKl });
  if (!(m.agreement >= t.minAgreement)) crossed.push({ key: 'min_agreement', value: m.agreement, limit: t.minAgreement });
  if (!(m.pplRatio <= t.maxPplRatio)) crossed.push({ key: 'max_ppl_ratio', value: m.pplRatio, limit: t.maxPplRatio });
  const figures = `KL ${num(m.meanKl)} nats, agreement ${(100 * m.agreement).toFixed(1)}%, perplexity ${num(m.pplTuned)} vs ${num(m.pplOriginal)} (ratio ${num(m.pplRatio)}) on ${m.positions} positions`;
  if (crossed.length === 0) return { status: 'pass', crossed, message: `passed: ${figures}` };
  return { status: t.action, crossed, message: `${crossed.map(crossedText).join('; ')} (${figures})` };
}

/** One crossed threshold in words, naming its config key. */
export function crossedText(c: GateVerdict['crossed'][number]): string {
  if (c.key === 'max_kl') return `mean KL ${num(c.value)} nats > medusa2.gate.max_kl ${c.limit}`;
  if (c.key === 'min_agreement') return `greedy agreement ${num(c.value)} < medusa2.gate.min_agreement ${c.limit}`;
  return `perplexity ratio ${num(c.value)} > medusa2.gate.max_ppl_ratio ${c.limit}`;
}

/** The gate's result as the MEDUSA-2 recipe records it (flat JSON values for metrics.jsonl / summary.json). */
export interface GateResult extends GateMetrics {
  status: GateVerdict['status'];
  passed: boolean;
  /** One entry per crossed threshold (empty when passed). */
  failures: string[];
  message: string;
}

/**
 * The gate as the recipe runs it: the held-out examples padded into batches of `batchSize` (in order),
 * the original decoder against the same decoder with the tuned backbone's hook (no dropout), thresholds
 * as the config's `medusa2.gate` section.
 */
export function runGate(a: {
  original: Decoder;
  /** The tuned backbone over `original` (E1's TrainableBackbone: its hook(null) is used), or another decoder model. */
  tuned: { hook(dropoutSeed: number | null): ForwardHook } | DecoderGateModel;
  examples: TrainExample[];
  padId: number;
  batchSize: number;
  thresholds: { action: 'fail' | 'warn'; max_kl: number; min_agreement: number; max_ppl_ratio: number; max_positions: number };
}): GateResult {
  if (!Number.isSafeInteger(a.batchSize) || a.batchSize < 1) fail('E_INTERNAL', `runGate: batchSize must be >= 1, got ${String(a.batchSize)}`);
  const g = a.thresholds;
  const t = a.tuned;
  const tuned: DecoderGateModel = 'decoder' in t || 'weights' in t ? t : { decoder: a.original, hook: () => t.hook(null) };
  function* batches(): Generator<PaddedBatch> {
    for (let s = 0; s < a.examples.length; s += a.batchSize) {
      yield padBatch(a.examples, Array.from({ length: Math.min(a.batchSize, a.examples.length - s) }, (_, i) => s + i), a.padId);
    }
  }
  const m = gateMetricsSync(a.original, tuned, batches(), { maxPositions: g.max_positions });
  const v = gateVerdict(m, { maxKl: g.max_kl, minAgreement: g.min_agreement, maxPplRatio: g.max_ppl_ratio, action: g.action });
  return {
    ...m,
    status: v.status,
    passed: v.crossed.length === 0,
    failures: v.crossed.map(crossedText),
    message: v.message,
  };
}
