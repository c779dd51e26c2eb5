/**
 * The MEDUSA-2 combined loss and its gradients for one micro-batch, by tfjs autograd (tf.variableGrads)
 * over the decoder forward (with the trainable backbone's hook) and the heads:
 *
 *   L = L_LM + lambda * sum_k decay^k * L_k
 *
 * L_k: head k's cross-entropy on the token k+2 ahead at assistant positions, exactly MEDUSA-1's
 *   (src/train/heads-loss.ts headTargets: head k at row t learns token t+k+2 when its loss mask is 1),
 *   read from the TRAINABLE backbone's final hidden states, so the heads term back-propagates into the
 *   backbone (as in the paper). Mean over head k's valid positions.
 * L_LM, at every assistant token j (1 <= j < length, lossMask[j] = 1), predicted from row j-1; mean over them:
 *   'ce': hard-label cross-entropy of token j;
 *   'kd': KL(teacher || student) of the next-token distributions.
 *     - teacher = frozen logits [B, T, V] (row t predicts t+1): the exact KL over the vocabulary.
 *     - teacher = stored top-k log-probabilities: the mass outside the top-k is one lumped "rest" bucket.
 *       Teacher rest = max(0, 1 - sum_i exp(lp_i)) (host, float64); student rest = the student's total
 *       probability on every id outside the top-k, its log computed as logsumexp(logits over the
 *       complement) - logsumexp(logits) (no 1 - sum cancellation). With 0 log 0 = 0:
 *         KL = sum_i pT_i (lpT_i - log pS_i) + pT_rest (log pT_rest - log pS_rest)
 *       This is the KL between the two distributions coarsened to k + 1 outcomes: >= 0, 0 when the student
 *       equals the teacher, and it still pushes the student's mass outside the top-k towards the teacher's.
 * lambda = headsCoefficient (lambda_0 x headsSchedule(t), from the caller). During the heads warmup
 * (trainBackbone false) the backbone runs as a frozen feature extractor (no dropout, no gradient) and
 * the LM term is skipped.
 *
 * Autograd keeps every intermediate of the step until the backward: the forward's activations plus the
 * [rows, V] logits of the LM term and of each head. Constants that need no gradient (one-hot label
 * masks, teacher distributions) are built before the gradient scope.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { decoderForward, type Decoder } from '../model/decoder.js';
import type { MedusaHeads } from '../model/heads.js';
import { headTargets, TOPK_REPORTED } from './heads-loss.js';
import { gatherRows, headsParams, type TrainableBackbone, type TrainableParam } from './trainable-backbone.js';
import { streamSeed } from '../model/sampling.js';
import { matMulConstB, matMulFast, weightedNllSum } from './fast-grad.js';
import { accumulateGrads } from './grads.js';

export type HeadsScheduleKind = 'constant' | 'linear' | 'sine' | 'sine_warmup';

export interface Medusa2Batch {
  /** [B*T] right-padded token ids. */
  ids: Int32Array;
  B: number;
  T: number;
  /** [B*T] 1 real token, 0 padding. */
  attention: Uint8Array | Float32Array;
  /** [B*T] 1 = assistant token (learned), 0 otherwise (and on padding). */
  lossMask: Uint8Array | Float32Array;
  /** Real length of each row. */
  lengths: number[];
  /**
   * Teacher for lm_loss 'kd'. topk: [B*T*k], group j = the teacher's top-k for TOKEN j (the distribution
   * token j was drawn from; the dataset's n-th masked token group placed at that token's position),
   * ignored where lossMask is 0. logits: the frozen teacher's [B, T, V] (row t predicts token t+1), read only.
   */
  teacher?: { topkIds: Int32Array; topkLogprobs: Float32Array; k: number } | { logits: tf.Tensor3D };
}

export interface Medusa2LossOptions {
  lmLoss: 'ce' | 'kd';
  /** lambda_0 x headsSchedule(step). */
  headsCoefficient: number;
  /** Per-head weight decay^k. */
  decay: number;
  /** false during the heads warmup: no backbone gradients and no LM term. */
  trainBackbone: boolean;
  /** Seed of this step's LoRA dropout masks. */
  dropoutSeed: number;
  /** Denominators of the means (e.g. the whole optimizer step's counts, for micro-batch accumulation); default this batch's. */
  norm?: { lm: number; heads: number[] };
  /**
   * At most this many batch rows per autograd pass (the gradients of the passes are summed, with this batch's
   * norms: the same result up to float32 summation order). Default: as many rows as fit PASS_BUDGET_BYTES by
   * passBytes()'s estimate (tfjs holds every activation and every intermediate gradient until the backward ends).
   */
  maxRowsPerPass?: number;
}

export interface Medusa2HeadResult {
  /** Mean cross-entropy over this batch's valid positions (NaN when none). */
  loss: number;
  valid: number;
  /** Top-1 .. top-10 correct counts. */
  correct: number[];
}

export interface Medusa2StepResult {
  /** lmLoss + headsCoefficient * sum_k decay^k L_k, with the given norms. */
  loss: number;
  /** The LM term (0 when skipped). */
  lmLoss: number;
  /** Assistant positions in the LM term (0 when skipped). */
  lmValid: number;
  heads: Medusa2HeadResult[];
  /** By TrainableParam.name (backbone ones only when trainBackbone), internal layout. The caller disposes them. */
  grads: Map<string, tf.Tensor>;
}

/** The heads term's coefficient schedule in [0, 1] at `step` of `totalSteps` (the Medusa reference's medusa_scheduler). */
export function headsSchedule(kind: HeadsScheduleKind, step: number, totalSteps: number, fraction: number): number {
  if (!(totalSteps > 0)) fail('E_INTERNAL', `headsSchedule: totalSteps must be > 0, got ${totalSteps}`);
  const x = Math.min(Math.max(step / totalSteps, 0), 1);
  switch (kind) {
    case 'constant': return 1;
    case 'linear': return x;
    case 'sine': return Math.sin((x * Math.PI) / 2);
    case 'sine_warmup':
      if (!(fraction > 0 && fraction <= 1)) fail('E_CONFIG', `loss.heads_schedule_fraction must be in (0, 1], got ${fraction}`);
      return x < fraction ? Math.sin((x / fraction) * (Math.PI / 2)) : 1;
  }
}

/** LM targets: flat row (predicting) and flat token position of every assistant token. */
export function lmTargets(lossMask: ArrayLike<number>, lengths: number[], T: number): { rows: Int32Array; tokens: Int32Array } {
  const rows: number[] = [];
  const tokens: number[] = [];
  for (let b = 0; b < lengths.length; b++) {
    for (let t = 1; t < lengths[b]; t++) {
      const j = b * T + t;
      if (lossMask[j] === 1) {
        rows.push(j - 1);
        tokens.push(j);
      }
    }
  }
  return { rows: Int32Array.from(rows), tokens: Int32Array.from(tokens) };
}

function checkBatch(decoder: Decoder, b: Medusa2Batch, o: Medusa2LossOptions): void {
  const n = b.B * b.T;
  const bad: string[] = [];
  if (b.ids.length !== n) bad.push(`ids has ${b.ids.length} entries, expected B*T = ${n}`);
  if (b.attention.length !== n) bad.push(`attention has ${b.attention.length} entries, expected ${n}`);
  if (b.lossMask.length !== n) bad.push(`lossMask has ${b.lossMask.length} entries, expected ${n}`);
  if (b.lengths.length !== b.B || b.lengths.some((l) => !Number.isInteger(l) || l < 0 || l > b.T)) bad.push(`lengths must be ${b.B} integers in [0, ${b.T}]`);
  if (o.lmLoss === 'kd' && o.trainBackbone) {
    const t = b.teacher;
    if (!t) bad.push("lm_loss 'kd' needs a teacher (stored top-k or frozen logits)");
    else if ('logits' in t) {
      const s = t.logits.shape;
      if (s[0] !== b.B || s[1] !== b.T || s[2] !== decoder.config.vocabSize) bad.push(`teacher logits are [${s.join(', ')}], expected [${b.B}, ${b.T}, ${decoder.config.vocabSize}]`);
    } else if (!Number.isInteger(t.k) || t.k < 1 || t.topkIds.length !== n * t.k || t.topkLogprobs.length !== n * t.k) {
      bad.push(`teacher top-k arrays must hold B*T*k = ${n}*${t.k} entries, got ${t.topkIds.length} ids and ${t.topkLogprobs.length} log-probs`);
    }
  }
  if (bad.length > 0) fail('E_INTERNAL', `medusa2 loss: bad batch: ${bad.join('; ')}`);
}

/** Constants of the LM term, built outside the gradient scope. */
interface LmConst {
  /** [n] labels (ce). */
  onehot?: tf.Tensor2D; // [n, V]
  /** kd: teacher weights on the student's log-probs [n, V] (top-k probs or the full teacher distribution). */
  weights?: tf.Tensor2D; // [n, V]
  /** kd top-k: additive mask, -1e9 on the top-k ids, 0 elsewhere. */
  complementMask?: tf.Tensor2D; // [n, V]
  /** kd top-k: teacher rest mass per position. */
  rest?: tf.Tensor1D; // [n]
  /** sum over positions of sum_i pT log pT (the teacher's negative entropy, host float64). */
  constant: number;
}

const MASKED = -1e9;

/**
 * A dense [n, V] float32 matrix with `values[i]` at (i / per, cols[i]) for i over n * per entries, zeros elsewhere
 * (a scatter: no [n, V] int32 one-hot temporaries; the (row, col) pairs must be distinct).
 */
function scatterRows(n: number, V: number, per: number, cols: Int32Array, values: Float32Array): tf.Tensor2D {
  return tf.tidy(() => {
    const idx = new Int32Array(2 * cols.length);
    for (let i = 0; i < cols.length; i++) {
      idx[2 * i] = Math.floor(i / per);
      idx[2 * i + 1] = cols[i];
    }
    return tf.scatterND(tf.tensor2d(idx, [cols.length, 2], 'int32'), tf.tensor1d(values), [n, V]) as tf.Tensor2D; // [n, V]
  });
}

function buildLmConst(decoder: Decoder, b: Medusa2Batch, o: Medusa2LossOptions, rows: Int32Array, tokens: Int32Array): LmConst {
  const V = decoder.config.vocabSize;
  const n = rows.length;
  if (o.lmLoss === 'ce') {
    const labels = Int32Array.from(tokens, (j) => b.ids[j]);
    return { onehot: scatterRows(n, V, 1, labels, new Float32Array(n).fill(1)), constant: 0 }; // [n, V]
  }
  const t = b.teacher!;
  if ('logits' in t) {
    return tf.tidy(() => {
      const tl = tf.gather(tf.reshape(t.logits, [b.B * b.T, V]), tf.tensor1d(rows, 'int32')) as tf.Tensor2D; // [n, V]
      const tlogp = tf.logSoftmax(tl); // [n, V]
      const p = tf.exp(tlogp) as tf.Tensor2D; // [n, V]
      const constant = tf.sum(tf.mul(p, tlogp)).dataSync()[0];
      return { weights: tf.keep(p), constant };
    }) as LmConst;
  }
  const k = t.k;
  const ids = new Int32Array(n * k);
  const probs = new Float32Array(n * k);
  const rest = new Float32Array(n);
  let constant = 0;
  for (let r = 0; r < n; r++) {
    const j = tokens[r];
    let mass = 0;
    for (let i = 0; i < k; i++) {
      const id = t.topkIds[j * k + i];
      const lp = t.topkLogprobs[j * k + i];
      if (!Number.isInteger(id) || id < 0 || id >= V) fail('E_TRAIN', `teacher top-k id ${id} at token ${j} is outside the vocabulary [0, ${V}); the dataset was distilled with another tokenizer`);
      if (!(Number.isFinite(lp) && lp <= 1e-4)) fail('E_TRAIN', `teacher top-k log-probability ${lp} at token ${j} is not a finite log-probability <= 0`);
      for (let i2 = 0; i2 < i; i2++) if (t.topkIds[j * k + i2] === id) fail('E_TRAIN', `teacher top-k ids at token ${j} repeat id ${id}`);
      const p = Math.exp(lp);
      ids[r * k + i] = id;
      probs[r * k + i] = p;
      mass += p;
      constant += p * lp;
    }
    const pr = Math.max(0, 1 - mass);
    rest[r] = pr;
    if (pr > 0) constant += pr * Math.log(pr);
  }
  return {
    weights: scatterRows(n, V, k, ids, probs), // [n, V] teacher probability on its top-k ids
    complementMask: scatterRows(n, V, k, ids, new Float32Array(n * k).fill(MASKED)), // [n, V]
    rest: tf.tensor1d(rest), // [n]
    constant,
  };
}

function disposeLmConst(c: LmConst | null): void {
  if (!c) return;
  for (const t of [c.onehot, c.weights, c.complementMask, c.rest]) t?.dispose();
}

/**
 * Sum over rows of the LM term (before the mean): CE or KL. logits [n, V]. One fused op with a closed-form
 * gradient (src/train/fast-grad.ts weightedNllSum): CE = -sum log pS(label); KL = sum pT log pT (the constant)
 * - sum_i pT_i log pS_i - pT_rest log pS_rest.
 */
function lmTermSum(logits: tf.Tensor2D, c: LmConst): tf.Scalar {
  if (c.onehot) return weightedNllSum(logits, c.onehot); // [] CE
  const comp = c.complementMask && c.rest ? { mask: c.complementMask, rest: c.rest } : undefined;
  return tf.add(c.constant, weightedNllSum(logits, c.weights!, comp)) as tf.Scalar; // [] KL
}

interface HeadConst {
  rows: Int32Array;
  labels: Int32Array;
  onehot: tf.Tensor2D; // [n, V]
  weight: number;
}

/**
 * Per row of a [n, V] logits matrix: how many logits exceed the label's (host; faster than tf.greater + cast +
 * sum on tfjs-wasm). Reads the values, does not dispose.
 */
function labelRanks(logits: tf.Tensor2D, labels: Int32Array): Int32Array {
  const [n, V] = logits.shape;
  const z = logits.dataSync() as Float32Array;
  const ranks = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const o = i * V;
    const y = z[o + labels[i]];
    let r = 0;
    for (let j = 0; j < V; j++) if (z[o + j] > y) r++;
    ranks[i] = r;
  }
  return ranks;
}

/** The heads term: sum_k coef * decay^k / norm_k * sum CE_k, plus per-head CE sums (kept) and label ranks. */
function headsTerm(heads: MedusaHeads, hidden: tf.Tensor2D, hc: (HeadConst | null)[], out: { ce: tf.Tensor[]; rank: Int32Array[] }): tf.Scalar {
  let total: tf.Scalar = tf.scalar(0);
  hc.forEach((c, k) => {
    if (!c) return;
    let h: tf.Tensor2D = gatherRows(hidden, c.rows); // [n, d]
    for (const blk of heads.blocks[k]) {
      const z = tf.add(matMulFast(h, blk.w), blk.b); // [n, d]
      h = tf.add(h, tf.mul(z, tf.sigmoid(z))) as tf.Tensor2D; // [n, d]
    }
    const proj = heads.proj[k];
    const logits = proj ? matMulFast(h, proj) : matMulConstB(h, heads.baseLmHead); // [n, V] (the shared lm_head is frozen)
    const ce = weightedNllSum(logits, c.onehot); // [] sum of CE
    out.ce[k] = tf.keep(ce);
    out.rank[k] = labelRanks(logits, c.labels); // [n]
    total = tf.add(total, tf.mul(ce, c.weight));
  });
  return total;
}

/** Tensor memory one autograd pass may use by passBytes()'s estimate (the wasm heap is at most 4 GiB and does not shrink). */
export const PASS_BUDGET_BYTES = 1.5 * 1024 ** 3;

/**
 * Estimated peak tensor bytes of one autograd pass over `rows` rows of T tokens: per layer the attention
 * probabilities' chain (nH x T x T, four tensors) and the per-token activations (about 20 d + 6 ff), plus per
 * token the [V] logits chain of the LM term and each head; times 4 bytes x 2.8 (the forward, the intermediate
 * gradients tfjs keeps to the end of the backward, and what else was measured: 1.49 GB peak at 512 tokens of
 * the 20M bench model, d 512, ff 1536, 4 layers, V 8192, 3 heads). trainBackbone false: heads only.
 */
export function passBytes(c: Decoder['config'], numHeads: number, rows: number, T: number, trainBackbone: boolean): number {
  const perLayer = c.numHeads * T * T * 4 + T * (20 * c.hiddenSize + 6 * c.intermediateSize);
  const vocab = T * (numHeads + (trainBackbone ? 1 : 0)) * c.vocabSize * 4;
  return 4 * 2.8 * rows * ((trainBackbone ? c.numLayers * perLayer : 0) + vocab);
}

export function medusa2LossAndGrads(decoder: Decoder, backbone: TrainableBackbone, heads: MedusaHeads, batch: Medusa2Batch, o: Medusa2LossOptions): Medusa2StepResult {
  checkBatch(decoder, batch, o);
  const { B, T } = batch;
  const K = heads.shape.numHeads;
  if (o.maxRowsPerPass !== undefined && !(Number.isInteger(o.maxRowsPerPass) && o.maxRowsPerPass >= 1)) fail('E_INTERNAL', `maxRowsPerPass must be an integer >= 1, got ${o.maxRowsPerPass}`);
  const perRow = passBytes(decoder.config, K, 1, T, o.trainBackbone);
  const rowsPerPass = Math.min(B, o.maxRowsPerPass ?? Math.max(1, Math.floor(PASS_BUDGET_BYTES / perRow)));
  if (rowsPerPass >= B) return onePass(decoder, backbone, heads, batch, o);
  // Several passes with this batch's norms, results summed.
  const lmNorm = o.norm?.lm ?? (o.trainBackbone ? lmTargets(batch.lossMask, batch.lengths, T).rows.length : 0);
  const headNorms = o.norm?.heads ?? Array.from({ length: K }, (_, k) => headTargets(batch.ids, batch.lossMask, batch.lengths, T, k).rows.length);
  const grads = new Map<string, tf.Tensor>();
  let loss = 0;
  let lmSum = 0;
  let lmValid = 0;
  const ceSum = new Array<number>(K).fill(0);
  const valid = new Array<number>(K).fill(0);
  const correct = Array.from({ length: K }, () => new Array<number>(TOPK_REPORTED).fill(0));
  const passes = Math.ceil(B / rowsPerPass);
  for (let p = 0; p < passes; p++) {
    const b0 = p * rowsPerPass;
    const b1 = Math.min(B, b0 + rowsPerPass);
    const t = batch.teacher;
    const teacherLogits = t && 'logits' in t ? (tf.slice(t.logits, [b0, 0, 0], [b1 - b0, T, t.logits.shape[2]]) as tf.Tensor3D) : null; // [rows, T, V]
    const sub: Medusa2Batch = {
      ids: batch.ids.subarray(b0 * T, b1 * T), B: b1 - b0, T,
      attention: batch.attention.subarray(b0 * T, b1 * T), lossMask: batch.lossMask.subarray(b0 * T, b1 * T), lengths: batch.lengths.slice(b0, b1),
      teacher: teacherLogits ? { logits: teacherLogits } : t && !('logits' in t) ? { k: t.k, topkIds: t.topkIds.subarray(b0 * T * t.k, b1 * T * t.k), topkLogprobs: t.topkLogprobs.subarray(b0 * T * t.k, b1 * T * t.k) } : undefined,
    };
    try {
      const r = onePass(decoder, backbone, heads, sub, { ...o, dropoutSeed: streamSeed(o.dropoutSeed, p), norm: { lm: lmNorm, heads: headNorms } });
      loss += r.loss;
      lmSum += r.lmLoss * r.lmValid;
      lmValid += r.lmValid;
      r.heads.forEach((h, k) => {
        if (h.valid > 0) ceSum[k] += h.loss * h.valid;
        valid[k] += h.valid;
        h.correct.forEach((n, j) => (correct[k][j] += n));
      });
      accumulateGrads(grads, r.grads);
    } finally {
      teacherLogits?.dispose();
    }
  }
  return {
    loss, lmLoss: lmValid > 0 ? lmSum / lmValid : 0, lmValid,
    heads: ceSum.map((s, k) => ({ loss: valid[k] > 0 ? s / valid[k] : NaN, valid: valid[k], correct: correct[k] })),
    grads,
  };
}

/** One autograd pass over the whole (sub-)batch. */
function onePass(decoder: Decoder, backbone: TrainableBackbone, heads: MedusaHeads, batch: Medusa2Batch, o: Medusa2LossOptions): Medusa2StepResult {
  const { B, T } = batch;
  const d = decoder.config.hiddenSize;
  const V = decoder.config.vocabSize;
  const K = heads.shape.numHeads;
  if (heads.shape.hiddenSize !== d || heads.shape.vocabSize !== V) fail('E_INTERNAL', `heads are d ${heads.shape.hiddenSize} V ${heads.shape.vocabSize}, the backbone d ${d} V ${V}`);

  // --- host-side targets and the constants of the gradient scope -------------------------------
  const lm = o.trainBackbone ? lmTargets(batch.lossMask, batch.lengths, T) : null;
  const lmValid = lm ? lm.rows.length : 0;
  const lmNorm = o.norm?.lm ?? lmValid;
  const valid = new Array<number>(K).fill(0);
  const hc: (HeadConst | null)[] = [];
  for (let k = 0; k < K; k++) {
    const { rows, labels } = headTargets(batch.ids, batch.lossMask, batch.lengths, T, k);
    valid[k] = rows.length;
    const norm = o.norm?.heads[k] ?? rows.length;
    if (rows.length === 0) {
      hc.push(null);
      continue;
    }
    const weight = norm > 0 ? (o.headsCoefficient * Math.pow(o.decay, k)) / norm : 0;
    hc.push({ rows, labels, weight, onehot: scatterRows(rows.length, V, 1, labels, new Float32Array(rows.length).fill(1)) }); // [n, V]
  }
  const lmc = lm && lmValid > 0 ? buildLmConst(decoder, batch, o, lm.rows, lm.tokens) : null;

  const hp = headsParams(heads);
  const params: TrainableParam[] = o.trainBackbone ? [...backbone.params, ...hp] : hp;
  const out = { ce: new Array<tf.Tensor>(K), rank: new Array<Int32Array>(K) };
  let lmSum: tf.Tensor | null = null;
  // Frozen backbone (heads warmup): hidden states outside the gradient scope.
  const frozenHidden = o.trainBackbone ? null : tf.tidy(() => {
    const r = decoderForward(decoder, { ids: batch.ids, batch: B, seqLen: T, mask: batch.attention, logits: 'none', hook: backbone.hook(null) });
    return tf.reshape(r.hidden, [B * T, d]) as tf.Tensor2D; // [B*T, d]
  });

  const anyTerm = hc.some((c) => c !== null) || lmc !== null;
  let value = 0;
  const grads = new Map<string, tf.Tensor>();
  try {
    if (anyTerm) {
      const f = (): tf.Scalar => {
        let hidden: tf.Tensor2D;
        let total: tf.Scalar = tf.scalar(0);
        if (frozenHidden) hidden = frozenHidden;
        else {
          const hk = backbone.hook(o.dropoutSeed);
          const r = decoderForward(decoder, { ids: batch.ids, batch: B, seqLen: T, mask: batch.attention, logits: 'none', hook: hk });
          hidden = tf.reshape(r.hidden, [B * T, d]) as tf.Tensor2D; // [B*T, d]
          if (lmc && lm) {
            // The LM head on the LM term's rows only (as decoderForward's lm_head: weights, product and adapter of the hook).
            const hRows = gatherRows(hidden, lm.rows); // [n, d]
            const w = hk.weights?.lmHead ?? decoder.weights.lmHead; // [d, V]
            const z: tf.Tensor2D = hk.matMul ? hk.matMul(hRows, w, 'lm_head', -1) : tf.matMul(hRows, w) as tf.Tensor2D; // [n, V]
            const rowsLogits = hk.linear ? hk.linear('lm_head', -1, hRows, z) : z; // [n, V]
            const s = lmTermSum(rowsLogits, lmc); // []
            lmSum = tf.keep(s);
            if (lmNorm > 0) total = tf.add(total, tf.div(s, lmNorm));
          }
        }
        return tf.add(total, headsTerm(heads, hidden, hc, out)) as tf.Scalar;
      };
      const r = tf.variableGrads(f, params.map((p) => p.variable));
      value = r.value.dataSync()[0];
      r.value.dispose();
      const byVar = new Map(params.map((p) => [p.variable.name, p.name] as const));
      for (const [vn, g] of Object.entries(r.grads)) {
        const name = byVar.get(vn);
        if (name === undefined) fail('E_INTERNAL', `medusa2 loss: gradient for an unknown variable ${vn}`);
        grads.set(name, g);
      }
    }
    // Parameters without a path to the loss this batch (e.g. a head with no valid position) get zeros.
    for (const p of params) if (!grads.has(p.name)) grads.set(p.name, tf.zerosLike(p.variable));
  } finally {
    frozenHidden?.dispose();
    disposeLmConst(lmc);
    for (const c of hc) c?.onehot.dispose();
  }

  const headResults: Medusa2HeadResult[] = [];
  for (let k = 0; k < K; k++) {
    const correct = new Array<number>(TOPK_REPORTED).fill(0);
    let ceSum = NaN;
    if (out.ce[k]) {
      ceSum = out.ce[k].dataSync()[0];
      const ranks = out.rank[k];
      for (let i = 0; i < ranks.length; i++) for (let j = 0; j < TOPK_REPORTED; j++) if (ranks[i] < j + 1) correct[j]++;
      out.ce[k].dispose();
    }
    headResults.push({ loss: valid[k] > 0 ? ceSum / valid[k] : NaN, valid: valid[k], correct });
  }
  let lmLoss = 0;
  const ls = lmSum as tf.Tensor | null;
  if (ls) {
    lmLoss = lmValid > 0 ? ls.dataSync()[0] / lmValid : 0;
    ls.dispose();
  }
  return { loss: value, lmLoss, lmValid, heads: headResults, grads };
}
