/**
 * The engine boundary for training Medusa heads (MEDUSA-1): one optimizer step of the heads on the
 * frozen backbone's final hidden states, with more than one implementation behind it.
 *
 *   - `tfjs` (tfjs-heads.ts): TensorFlow.js on the current tfjs backend, wrapping initHeads /
 *     headsLoss / AdamW / clipGradNorm exactly as the medusa1 recipe does (same numbers, bit for bit).
 *   - `onnx` (onnx-heads.ts): the whole step on onnxruntime-node (multi-threaded MLAS kernels), the
 *     backward written out as ONNX graphs, parameters and AdamW moments as host Float32Arrays.
 *
 * Both engines compute the same thing: per head k, rows gathered where the label (t+k+2) is a
 * generated token (headTargets), loss = heads_coefficient * sum_k decay^k * CE_k with CE_k the mean
 * over the whole step's valid positions of head k (each micro-batch divides by the step's count),
 * exact gradients, global-norm clipping as torch's clip_grad_norm_, AdamW as torch.optim.AdamW (weight
 * decay not on biases). Heads and optimizer state move between engines in the Medusa reference
 * layout (PyTorch [out, in]) under the reference names (heads.ts `headTensorTable`).
 *
 * `createHeadsTrainer('auto', ...)` takes onnx when onnxruntime-node loads and runs a trivial graph,
 * else tfjs, and says which and why in `description`. Setting MEDUSA_TRAIN_DISABLE_ORT=1 in the
 * environment makes onnxruntime count as unavailable (auto falls back to tfjs; forcing onnx fails).
 *
 * The engine modules are imported lazily, so a broken onnxruntime install (or a missing tfjs
 * backend) only matters to the engine that needs it.
 */
import { fail } from '../errors.js';
import { headTensorTable, type HeadsShape, type HeadTensorRow } from '../model/heads.js';
import { Rng } from '../model/sampling.js';
import { headTargets, TOPK_REPORTED } from '../train/heads-loss.js';
import { probeOrt } from './ort.js';

export type HeadsEngine = 'tfjs' | 'onnx';
export const HEADS_ENGINES: readonly (HeadsEngine | 'auto')[] = ['auto', 'onnx', 'tfjs'];

export interface HeadsTrainerOptions {
  shape: HeadsShape;
  /** The base model's lm_head, [V, d] in PyTorch layout (what `lm_head.weight` holds). Copied. */
  baseLmHead: Float32Array;
  /** Seed of the reference initialisation (biases; W1 = 0, W2 = base lm_head). */
  seed: number;
  betas: [number, number];
  eps: number;
  /** AdamW decoupled weight decay of the weights; biases get none. */
  weightDecay: number;
  decay: number;
  headsCoefficient: number;
  /** Rows of vocabulary logits computed at once (bounds peak memory). */
  chunkRows: number;
  /** Global-norm clipping (torch's clip_grad_norm_), or null for none. */
  maxGradNorm: number | null;
  /** onnx: intra-op threads (default: os.cpus().length). Ignored by tfjs. */
  threads?: number;
}

export interface HeadsBatch {
  /** Final hidden states [B*T, d], row b*T + t. */
  hidden: Float32Array;
  /** Token ids [B*T]. */
  ids: ArrayLike<number>;
  /** Loss mask [B*T] (1 = a generated token the heads learn). */
  lossMask: ArrayLike<number>;
  /** Real length of each row (positions >= length are padding). */
  lengths: number[];
  T: number;
}

export interface HeadsMetrics {
  /** Per head: sum of cross-entropy over the valid positions. */
  ceSum: number[];
  /** Per head: valid positions. */
  valid: number[];
  /** Per head: top-1 .. top-10 correct counts, [K][TOPK]. */
  correct: number[][];
}

export interface HeadsStepResult extends HeadsMetrics {
  /** Global L2 norm of the gradients before clipping. */
  gradNorm: number;
  /** false when the loss or a gradient was not finite: parameters and optimizer state unchanged. */
  applied: boolean;
}

export type HostTensors = Record<string, { shape: number[]; data: Float32Array }>;

export interface OptimizerState {
  step: number;
  /** 'exp_avg.<name>' / 'exp_avg_sq.<name>', reference names and layout. */
  tensors: HostTensors;
}

export interface LossAndGrads {
  metrics: HeadsMetrics;
  /** Gradients of the step's loss (before clipping) by reference name, reference layout. */
  grads: HostTensors;
}

export interface HeadsTrainer {
  readonly engine: HeadsEngine;
  /** What runs, e.g. "onnx (onnxruntime-node 1.30.0, 2 intra-op threads)"; with 'auto', why it was chosen. */
  readonly description: string;
  /**
   * One optimizer step: loss + exact gradients over the micro-batches (each normalised by the step's
   * per-head valid counts, as headsLoss's `norm`), global-norm clipping (maxGradNorm), AdamW with `lr`.
   */
  step(micro: HeadsBatch[], lr: number): Promise<HeadsStepResult>;
  /** Forward only (loss sums, counts, top-k) of one batch. */
  evaluate(batch: HeadsBatch): Promise<HeadsMetrics>;
  /** The loss and gradients of a step without any update (tests, gradient checks). */
  lossAndGrads(micro: HeadsBatch[]): Promise<LossAndGrads>;
  /** Heads in the Medusa reference layout (heads.ts headTensorTable names), copies. */
  exportHeads(): HostTensors;
  /** Load reference-layout heads, checked by names, count and shape (E_MODEL naming `where`). */
  importHeads(t: HostTensors, where: string): void;
  /** The AdamW state in the engine-independent format (checkpoints move between engines). */
  exportOptimizer(): OptimizerState;
  /** Restore exportOptimizer()'s format; everything is validated first (E_CONFIG naming the tensor). */
  importOptimizer(s: OptimizerState): void;
  dispose(): void;
}

// ---------------------------------------------------------------------------------------------
// Availability and the factory

/** onnxruntime-node loads and runs a trivial graph (and MEDUSA_TRAIN_DISABLE_ORT is not set). */
export async function onnxAvailable(): Promise<{ ok: boolean; reason?: string }> {
  const p = await probeOrt();
  return p.ok ? { ok: true } : { ok: false, reason: p.reason };
}

export async function createHeadsTrainer(engine: HeadsEngine | 'auto', o: HeadsTrainerOptions): Promise<HeadsTrainer> {
  checkOptions(o);
  if (engine === 'tfjs') {
    const { createTfjsHeadsTrainer } = await import('./tfjs-heads.js');
    return createTfjsHeadsTrainer(o, '');
  }
  if (engine === 'onnx') {
    const p = await probeOrt();
    if (!p.ok || !p.ort) fail('E_BACKEND', `heads engine onnx: onnxruntime-node is not usable: ${p.reason}. Use the tfjs engine (or auto), or reinstall with \`npm ci\`.`);
    const { createOnnxHeadsTrainer } = await import('./onnx-heads.js');
    return createOnnxHeadsTrainer(o, p.ort, '');
  }
  if (engine !== 'auto') fail('E_CONFIG', `heads engine must be one of ${HEADS_ENGINES.join(', ')}, got ${String(engine)}`);
  const p = await probeOrt();
  if (p.ok && p.ort) {
    const { createOnnxHeadsTrainer } = await import('./onnx-heads.js');
    return createOnnxHeadsTrainer(o, p.ort, '; chosen by auto: onnxruntime-node is available');
  }
  const { createTfjsHeadsTrainer } = await import('./tfjs-heads.js');
  return createTfjsHeadsTrainer(o, `; chosen by auto: onnxruntime-node is not usable (${p.reason})`);
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the engines

/** Top-1 .. top-TOPK correct counts are reported (= headsLoss's TOPK_REPORTED, 10). */
export const TOPK = TOPK_REPORTED;

export function checkOptions(o: HeadsTrainerOptions): void {
  const s = o.shape;
  const bad: string[] = [];
  const posInt = (name: string, v: number): void => {
    if (!Number.isSafeInteger(v) || v < 1) bad.push(`${name} must be an integer >= 1, got ${String(v)}`);
  };
  posInt('numHeads', s.numHeads);
  posInt('numLayers', s.numLayers);
  posInt('hiddenSize', s.hiddenSize);
  posInt('vocabSize', s.vocabSize);
  posInt('chunkRows', o.chunkRows);
  if (s.lmHead !== 'per_head' && s.lmHead !== 'shared') bad.push(`lmHead must be per_head or shared, got ${String(s.lmHead)}`);
  if (bad.length === 0 && o.baseLmHead.length !== s.vocabSize * s.hiddenSize) {
    bad.push(`baseLmHead holds ${o.baseLmHead.length} values, expected [${s.vocabSize}, ${s.hiddenSize}] = ${s.vocabSize * s.hiddenSize}`);
  }
  if (o.maxGradNorm !== null && !(Number.isFinite(o.maxGradNorm) && o.maxGradNorm > 0)) bad.push(`maxGradNorm must be null or a finite number > 0, got ${String(o.maxGradNorm)}`);
  if (!(Number.isFinite(o.weightDecay) && o.weightDecay >= 0)) bad.push(`weightDecay must be a finite number >= 0, got ${String(o.weightDecay)}`);
  for (const [i, b] of o.betas.entries()) if (!(Number.isFinite(b) && b >= 0 && b < 1)) bad.push(`beta${i + 1} must be in [0, 1), got ${String(b)}`);
  if (!(Number.isFinite(o.eps) && o.eps >= 0)) bad.push(`eps must be a finite number >= 0, got ${String(o.eps)}`);
  if (o.threads !== undefined && (!Number.isSafeInteger(o.threads) || o.threads < 1)) bad.push(`threads must be an integer >= 1, got ${String(o.threads)}`);
  if (bad.length > 0) fail('E_CONFIG', `heads trainer options:\n  - ${bad.join('\n  - ')}`);
}

export function checkLr(lr: number): void {
  if (!(Number.isFinite(lr) && lr >= 0)) fail('E_CONFIG', `learning rate must be a finite number >= 0, got ${String(lr)}`);
}

export function checkBatch(b: HeadsBatch, d: number, V: number, where: string): void {
  const rows = b.lengths.length * b.T;
  const problems: string[] = [];
  if (!Number.isSafeInteger(b.T) || b.T < 0) problems.push(`T must be an integer >= 0, got ${String(b.T)}`);
  if (b.hidden.length !== rows * d) problems.push(`hidden holds ${b.hidden.length} values, expected [${rows}, ${d}]`);
  if (b.ids.length !== rows) problems.push(`ids holds ${b.ids.length} values, expected ${rows}`);
  if (b.lossMask.length !== rows) problems.push(`lossMask holds ${b.lossMask.length} values, expected ${rows}`);
  for (const len of b.lengths) if (!Number.isSafeInteger(len) || len < 0 || len > b.T) problems.push(`a row length ${String(len)} is outside [0, ${b.T}]`);
  if (problems.length === 0) {
    // labels (ids where the loss mask is 1) must be vocabulary entries
    for (let i = 0; i < rows; i++) {
      if (b.lossMask[i] === 1 && !(Number.isInteger(b.ids[i]) && b.ids[i] >= 0 && b.ids[i] < V)) {
        problems.push(`the label id ${String(b.ids[i])} at row ${Math.floor(i / Math.max(b.T, 1))}, position ${i % Math.max(b.T, 1)} is outside the vocabulary [0, ${V})`);
        break;
      }
    }
  }
  if (problems.length > 0) fail('E_INTERNAL', `${where}: malformed heads batch: ${problems.join('; ')}`);
}

/** Per head: the step's valid positions over all micro-batches (headsLoss's `norm`; = countValid). */
export function stepNorm(micro: HeadsBatch[], K: number): number[] {
  const norm = new Array<number>(K).fill(0);
  for (const b of micro) for (let k = 0; k < K; k++) norm[k] += headTargets(b.ids, b.lossMask, b.lengths, b.T, k).rows.length;
  return norm;
}

/** The per-head loss weight of a micro-batch: heads_coefficient * decay^k / norm[k] (0 when norm is 0). */
export function headWeight(o: HeadsTrainerOptions, norm: number[], k: number): number {
  return norm[k] > 0 ? (o.headsCoefficient * Math.pow(o.decay, k)) / norm[k] : 0;
}

export function emptyMetrics(K: number): HeadsMetrics {
  return { ceSum: new Array<number>(K).fill(0), valid: new Array<number>(K).fill(0), correct: Array.from({ length: K }, () => new Array<number>(TOPK).fill(0)) };
}

export function addMetrics(st: HeadsMetrics, r: HeadsMetrics): void {
  r.ceSum.forEach((v, k) => (st.ceSum[k] += v));
  r.valid.forEach((v, k) => (st.valid[k] += v));
  r.correct.forEach((row, k) => row.forEach((v, j) => (st.correct[k][j] += v)));
}

/** The step's total loss as the medusa1 recipe reports it (heads without positions left out). */
export function totalLoss(m: HeadsMetrics, decay: number, coef: number): number {
  let loss = 0;
  m.ceSum.forEach((ce, k) => {
    if (m.valid[k] > 0) loss += coef * Math.pow(decay, k) * (ce / m.valid[k]);
  });
  return loss;
}

export function transpose2d(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = data[o + c];
  }
  return out;
}

/**
 * Internal layout of a table row: W1 [in, out] (= reference transposed), b1 [d], W2 [d, V]
 * (= reference [V, d] transposed); both engines use it.
 */
export function internalShape(row: HeadTensorRow): number[] {
  return row.kind === 'b1' ? row.shape.slice() : [row.shape[1], row.shape[0]];
}

export function toReference(row: HeadTensorRow, internal: Float32Array): Float32Array {
  return row.kind === 'b1' ? Float32Array.from(internal) : transpose2d(internal, row.shape[1], row.shape[0]);
}

export function toInternal(row: HeadTensorRow, reference: Float32Array): Float32Array {
  return row.kind === 'b1' ? Float32Array.from(reference) : transpose2d(reference, row.shape[0], row.shape[1]);
}

/** Check reference-layout heads against the table (as heads.ts importHeads words it). */
export function checkHeadTensors(s: HeadsShape, tensors: HostTensors, where: string): HeadTensorRow[] {
  const table = headTensorTable(s);
  const problems: string[] = [];
  for (const row of table) {
    const t = tensors[row.name];
    if (!t) problems.push(`missing ${row.name} [${row.shape}]`);
    else if (t.shape.join(',') !== row.shape.join(',')) problems.push(`${row.name} is [${t.shape}], expected [${row.shape}]`);
    else if (!(t.data instanceof Float32Array) || t.data.length !== row.shape.reduce((a, b) => a * b, 1)) problems.push(`${row.name} does not hold ${row.shape.reduce((a, b) => a * b, 1)} float32 values`);
  }
  const known = new Set(table.map((r) => r.name));
  for (const name of Object.keys(tensors)) if (!known.has(name)) problems.push(`unexpected tensor ${name}`);
  if (problems.length > 0) fail('E_MODEL', `${where} does not hold heads of this shape (${s.numHeads} heads x ${s.numLayers} layers, lm_head ${s.lmHead}):\n  - ${problems.join('\n  - ')}`);
  return table;
}

/** Validate an optimizer state against the table (as AdamW.importState words it); nothing changes. */
export function checkOptimizerState(s: HeadsShape, st: OptimizerState): HeadTensorRow[] {
  if (!Number.isSafeInteger(st.step) || st.step < 0) fail('E_CONFIG', `optimizer state: step must be an integer >= 0, got ${String(st.step)}`);
  const table = headTensorTable(s);
  const expected = new Map<string, HeadTensorRow>();
  for (const row of table) {
    expected.set(`exp_avg.${row.name}`, row);
    expected.set(`exp_avg_sq.${row.name}`, row);
  }
  const unexpected = Object.keys(st.tensors).filter((k) => !expected.has(k));
  if (unexpected.length > 0) {
    fail('E_CONFIG', `optimizer state has tensors for no parameter of these heads: ${unexpected.slice(0, 5).map((k) => JSON.stringify(k)).join(', ')}` +
      `${unexpected.length > 5 ? ` and ${unexpected.length - 5} more` : ''}; the checkpoint belongs to a different set of heads`);
  }
  for (const [key, row] of expected) {
    const t = st.tensors[key];
    if (t === undefined) fail('E_CONFIG', `optimizer state is missing tensor ${JSON.stringify(key)}; the checkpoint belongs to a different set of heads or is incomplete`);
    if (!Array.isArray(t.shape) || t.shape.join(',') !== row.shape.join(',')) {
      fail('E_CONFIG', `optimizer state tensor ${JSON.stringify(key)} has shape [${Array.isArray(t.shape) ? t.shape.join(', ') : String(t.shape)}], but parameter ${JSON.stringify(row.name)} has shape [${row.shape.join(', ')}] (reference layout)`);
    }
    const n = row.shape.reduce((a, b) => a * b, 1);
    if (!(t.data instanceof Float32Array) || t.data.length !== n) fail('E_CONFIG', `optimizer state tensor ${JSON.stringify(key)} must hold ${n} float32 values`);
  }
  return table;
}

/**
 * The reference initialisation's biases, in heads.ts initHeads' order and RNG stream: for each head
 * k, each layer l, b ~ U(-1/sqrt(d), 1/sqrt(d)) (PyTorch Linear's default bias init).
 */
export function initialBiases(s: HeadsShape, seed: number): Float32Array[][] {
  const d = s.hiddenSize;
  const rng = new Rng(seed);
  const bound = 1 / Math.sqrt(d);
  const out: Float32Array[][] = [];
  for (let k = 0; k < s.numHeads; k++) {
    const layers: Float32Array[] = [];
    for (let l = 0; l < s.numLayers; l++) {
      const b = new Float32Array(d);
      for (let i = 0; i < d; i++) b[i] = (2 * rng.next() - 1) * bound;
      layers.push(b);
    }
    out.push(layers);
  }
  return out;
}

/** Top-1..TOPK counts from ranks (logits beating the label's). */
export function addRanks(correct: number[], ranks: ArrayLike<number>, n: number): void {
  for (let i = 0; i < n; i++) for (let j = 0; j < TOPK; j++) if (ranks[i] < j + 1) correct[j]++;
}
