/**
 * The onnx heads engine: the whole MEDUSA-1 step on onnxruntime-node (MLAS kernels on all cores),
 * with the backward written out as ONNX graphs; parameters, gradients and AdamW moments are host
 * Float32Arrays owned by this object, fed to the graphs as inputs (onnxruntime-node reads input
 * buffers in place; nothing that changes between steps is an initializer).
 *
 * Layouts (as the tfjs engine's, so both engines run the same products): W1 [in, out], b1 [d],
 * W2 [d, V]; export/import convert from/to the reference layout (PyTorch [out, in]).
 *
 * Two graphs, built once per trainer (its heads shape) with dynamic row counts, shared by all heads:
 *
 *   train(x [N, d], labels [C, R, 1], rowWeight [C, R, 1], W1_l, b1_l, gW1_l, gb1_l (l < L), W2 [, gW2])
 *     blocks forward:   z_l = h_l W1_l + b1_l,  s_l = sigmoid(z_l),  h_{l+1} = h_l + z_l s_l
 *     Scan over the C chunks of R rows of h_L (loop state: gW2 [d, V], per_head only):
 *       logits = h W2                                     [R, V]
 *       label logit = GatherElements(logits, label)       [R, 1]
 *       p       = Softmax(logits);  dl = ScatterElements(p, label, p_label - 1)   (= p - onehot, in place)
 *       ce      = (max logit - label logit) - log(max p)  [R]   (= log-sum-exp - label logit)
 *       rank    = #(TopK(logits, 10) > label logit)       [R]   (top-j correct: rank < j)
 *       dh      = (dl W2^T) * rowWeight                   [R, d]    (Gemm transB)
 *       gW2    += (h * rowWeight)^T dl                    [d, V]    (Gemm transA, C = gW2)
 *     blocks backward:  dz = dh * s (1 + z (1 - s)),  gW1_l += h_l^T dz,  gb1_l += sum_rows dz,
 *                       dh += dz W1_l^T
 *     outputs: per-row ce and rank [C, R], gW1_l, gb1_l, gW2 in row pieces of <= 8 MiB, and column
 *     sums of the squared accumulated gradients (the clipping norm without another pass over them).
 *   eval(x, labels, W1_l, b1_l, W2): the forward and the Scan without gradients.
 *
 * rowWeight = heads_coefficient * decay^k / norm[k] (the step's valid count) for real rows and 0 for
 * the padding that makes the last chunk full: chunks are balanced (C = ceil(n / chunkRows),
 * R = ceil(n / C) <= chunkRows), padded rows have zero hidden states, label 0 and weight 0, so they
 * add exactly nothing to any gradient; their ce and rank are ignored. Folding the weight into the
 * [R, d] operands instead of the [R, V] gradient saves a pass over the logits; the result differs
 * from the tfjs engine's (p - onehot) * w only by float32 rounding.
 *
 * Why one run per head and micro-batch with a Scan inside, rather than one run per chunk: on this
 * VM fresh memory is slow (page faults) and onnxruntime-node copies every output into a new
 * ArrayBuffer; a per-chunk run would return the [d, V] accumulator per chunk. Here it leaves the
 * graph once per head and micro-batch, split into pieces small enough for malloc to reuse.
 *
 * Gradient accumulation over micro-batches: the accumulators are fed back as inputs (gW2 as the
 * Scan's initial state, gW1 as Gemm's C), zeroed at the start of a step. Clipping and AdamW run as
 * one tight JS loop over the Float32Arrays (an ORT graph would return three [d, V] copies per head);
 * see adamw() for its numerics.
 */
import onnxProto from 'onnx-proto';
import { describe, fail } from '../errors.js';
import { GraphBuilder, type AttrValue, type ElemType } from '../io/onnx.js';
import { headTensorTable, type HeadTensorRow } from '../model/heads.js';
import { headTargets } from '../train/heads-loss.js';
import { CLIP_EPS } from '../train/clip.js';
import { createSession, ortThreads, ortVersion, type Ort, type OrtSession, type OrtTensor } from './ort.js';
import {
  addRanks, checkBatch, TOPK, checkHeadTensors, checkLr, checkOptimizerState, emptyMetrics, headWeight, initialBiases, stepNorm, toInternal, toReference, totalLoss, transpose2d,
  type HeadsBatch, type HeadsMetrics, type HeadsStepResult, type HeadsTrainer, type HeadsTrainerOptions, type HostTensors, type LossAndGrads, type OptimizerState,
} from './heads-trainer.js';

const onnx = onnxProto.onnx;

/** Largest gW2 output piece, in float32 values (8 MiB: below glibc's mmap threshold once it adapts). */
const PIECE_VALUES = 2 * 1024 * 1024;

/** `pieceValues`: the gW2 output piece size (tests use small pieces to cover the split). */
export async function createOnnxHeadsTrainer(o: HeadsTrainerOptions, ort: Ort, why: string, pieceValues = PIECE_VALUES): Promise<OnnxHeadsTrainer> {
  const threads = ortThreads(o.threads);
  const g = buildGraphs(o.shape.numLayers, o.shape.hiddenSize, o.shape.vocabSize, o.shape.lmHead === 'per_head', pieceValues);
  const train = await createSession(ort, g.train, threads, 'heads training');
  let evalSession: OrtSession;
  try {
    evalSession = await createSession(ort, g.eval, threads, 'heads evaluation');
  } catch (e) {
    await train.release();
    throw e;
  }
  return new OnnxHeadsTrainer(o, ort, train, evalSession, g.pieceRows, `onnx (onnxruntime-node ${ortVersion(ort)}, ${threads} intra-op thread${threads === 1 ? '' : 's'})${why}`);
}

// ---------------------------------------------------------------------------------------------
// Graphs

/**
 * Names in a graph: GraphBuilder's own fresh names restart at 0 in every builder, and a Scan body
 * must not reuse a name of its outer graph, so every value gets a builder-specific prefix here.
 */
class Net {
  private n = 0;
  constructor(readonly g: GraphBuilder, private readonly prefix: string) {}
  name(hint: string): string {
    return `${this.prefix}${hint}_${this.n++}`;
  }
  op(op: string, inputs: string[], attrs?: Record<string, AttrValue>, out?: string): string {
    return this.g.node(op, inputs, { outputs: [out ?? this.name(op.toLowerCase())], attrs, name: this.name(`n${op}`) })[0];
  }
  ops(op: string, inputs: string[], outputs: string[], attrs?: Record<string, AttrValue>, name?: string): string[] {
    return this.g.node(op, inputs, { outputs, attrs, name: name ?? this.name(`n${op}`) });
  }
  constant(type: ElemType, dims: number[], data: number[]): string {
    return this.g.initializer(this.name('c'), type, dims, data);
  }
}

interface Graphs {
  train: Uint8Array;
  eval: Uint8Array;
  /** Rows of W2's gradient per output piece. */
  pieceRows: number;
}

const FLOAT = onnx.TensorProto.DataType.FLOAT;

/**
 * The per-chunk cross-entropy of a Scan body. Returns the softmax p [R, V] and `finish(pMax)`, which
 * writes ce and rank given max_j p_j [R, 1]:
 *   ce   = (max - label logit) - log(max_j p_j)     (max_j p_j = 1 / sum_j exp(logit_j - max): the
 *          log-sum-exp without onnxruntime's ReduceLogSumExp, which is ~6x slower than Softmax here)
 *   rank = number of top-min(10, V) logits above the label's = min(#logits above it, 10): all the top-1..10
 *          counts need (TopK instead of Greater + Cast + ReduceSum over [R, V])
 */
function chunkLoss(b: Net, h: string, lab: string, w2: string, V: number, ceOut: string, rankOut: string): { p: string; finish: (pMax: string) => void } {
  const logits = b.op('MatMul', [h, w2]); // [R, V]
  const labelLogit = b.op('GatherElements', [logits, lab], { axis: 1 }); // [R, 1]
  const max = b.op('ReduceMax', [logits], { axes: [1], keepdims: 1 }); // [R, 1]
  const [top] = b.ops('TopK', [logits, b.constant('int64', [1], [Math.min(TOPK, V)])], [b.name('topv'), b.name('topi')], { axis: 1 }); // [R, min(TOPK, V)]
  b.op('ReduceSum', [b.op('Cast', [b.op('Greater', [top, labelLogit])], { to: FLOAT }), b.constant('int64', [1], [1])], { keepdims: 0 }, rankOut); // [R]
  const p = b.op('Softmax', [logits], { axis: 1 }); // [R, V]
  const finish = (pMax: string): void => {
    b.op('Reshape', [b.op('Sub', [b.op('Sub', [max, labelLogit]), b.op('Log', [pMax])]), b.constant('int64', [1], [-1])], undefined, ceOut); // [R]
  };
  return { p, finish };
}

function attachBody(model: InstanceType<typeof onnx.ModelProto>, nodeName: string, body: GraphBuilder): void {
  const node = model.graph!.node!.find((n) => n.name === nodeName);
  if (!node) fail('E_INTERNAL', `ONNX heads graph: no node ${nodeName}`);
  node.attribute!.push(onnx.AttributeProto.create({ name: 'body', type: onnx.AttributeProto.AttributeType.GRAPH, g: body.build().graph }));
}

export function buildGraphs(L: number, d: number, V: number, perHead: boolean, pieceValues = PIECE_VALUES): Graphs {
  const pieceRows = Math.max(1, Math.min(d, Math.floor(pieceValues / V)));
  return { train: buildTrain(L, d, V, perHead, pieceRows), eval: buildEval(L, d, V), pieceRows };
}

/** Inputs and the blocks' forward; returns h_l, z_l, s_l. */
function blocksForward(m: Net, L: number, d: number, withGrads: boolean): { hs: string[]; zs: string[]; ss: string[] } {
  const g = m.g;
  const hs = [g.input('x', 'float32', ['n', d])];
  const zs: string[] = [];
  const ss: string[] = [];
  for (let l = 0; l < L; l++) {
    g.input(`w1_${l}`, 'float32', [d, d]);
    g.input(`b1_${l}`, 'float32', [d]);
    if (withGrads) {
      g.input(`gw1_${l}`, 'float32', [d, d]);
      g.input(`gb1_${l}`, 'float32', [d]);
    }
    const z = m.op('Gemm', [hs[l], `w1_${l}`, `b1_${l}`]); // [n, d]
    const s = m.op('Sigmoid', [z]);
    zs.push(z);
    ss.push(s);
    hs.push(m.op('Add', [hs[l], m.op('Mul', [z, s])]));
  }
  return { hs, zs, ss };
}

/** h_L [n, d] -> [C, R, d] with C, R from the labels' shape [C, R, 1]. */
function toChunks(m: Net, hL: string, d: number): string {
  const cr = m.op('Shape', ['labels'], { start: 0, end: 2 });
  const shape = m.op('Concat', [cr, m.constant('int64', [1], [d])], { axis: 0 });
  return m.op('Reshape', [hL, shape]);
}

function buildTrain(L: number, d: number, V: number, perHead: boolean, pieceRows: number): Uint8Array {
  const g = new GraphBuilder('medusa_heads_train');
  const m = new Net(g, 'm_');
  const { hs, zs, ss } = blocksForward(m, L, d, true);
  g.input('labels', 'int64', ['c', 'r', 1]);
  g.input('row_weight', 'float32', ['c', 'r', 1]);
  g.input('w2', 'float32', [d, V]);
  if (perHead) g.input('gw2', 'float32', [d, V]);
  const h3 = toChunks(m, hs[L], d);

  // --- Scan body: one chunk of R rows ---
  const bg = new GraphBuilder('medusa_heads_chunk');
  const b = new Net(bg, 'b_');
  if (perHead) bg.input('b_gw2_in', 'float32', [d, V]);
  bg.input('b_h', 'float32', ['r', d]);
  bg.input('b_lab', 'int64', ['r', 1]);
  bg.input('b_rw', 'float32', ['r', 1]);
  const { p, finish } = chunkLoss(b, 'b_h', 'b_lab', 'w2', V, 'b_ce', 'b_rank'); // softmax [R, V]
  const pLabel = b.op('GatherElements', [p, 'b_lab'], { axis: 1 }); // [R, 1]
  const dl = b.op('ScatterElements', [p, 'b_lab', b.op('Sub', [pLabel, b.constant('float32', [], [1])])], { axis: 1 }); // p - onehot
  // max_j p_j read from dl (= p but p_label - 1 at the label) and p_label: nothing but the scatter reads p
  // after it, so onnxruntime scatters in place instead of copying [R, V]
  finish(b.op('Max', [b.op('ReduceMax', [dl], { axes: [1], keepdims: 1 }), pLabel]));
  b.op('Mul', [b.op('Gemm', [dl, 'w2'], { transB: 1 }), 'b_rw'], undefined, 'b_dh'); // [R, d]
  if (perHead) b.op('Gemm', [b.op('Mul', ['b_h', 'b_rw']), dl, 'b_gw2_in'], { transA: 1, beta: { float: 1 } }, 'b_gw2_out'); // [d, V]
  if (perHead) bg.output('b_gw2_out', 'float32', [d, V]);
  bg.output('b_ce', 'float32', ['r']);
  bg.output('b_rank', 'float32', ['r']);
  bg.output('b_dh', 'float32', ['r', d]);

  const scanIn = [...(perHead ? ['gw2'] : []), h3, 'labels', 'row_weight'];
  const gw2Fin = m.name('gw2_fin');
  const dh3 = m.name('dh3');
  m.ops('Scan', scanIn, [...(perHead ? [gw2Fin] : []), 'ce', 'rank', dh3], { num_scan_inputs: 3 }, 'scan');
  g.output('ce', 'float32', ['c', 'r']);
  g.output('rank', 'float32', ['c', 'r']);

  // --- blocks backward ---
  // squared norms as partial sums over the first axis ([cols] per matrix, [1] per vector), added up in
  // float64 on the host: onnxruntime's full float32 ReduceSumSquare of a [512, 32000] gradient was off
  // by 3e-4 relative (tf.sum, which the tfjs engine keeps for bit-compatibility, by 1e-2)
  const sq: string[] = [];
  let sqLength = 0;
  const sumSq = (t: string, shape: number[]): void => {
    const colSums = m.op('ReduceSumSquare', [t], { axes: [0], keepdims: 0 });
    sq.push(shape.length === 1 ? m.op('Reshape', [colSums, m.constant('int64', [1], [1])]) : colSums);
    sqLength += shape.length === 1 ? 1 : shape[1];
  };
  let dh = m.op('Reshape', [dh3, m.constant('int64', [2], [-1, d])]); // [n, d]
  const one = m.constant('float32', [], [1]);
  for (let l = L - 1; l >= 0; l--) {
    const dsilu = m.op('Mul', [ss[l], m.op('Add', [one, m.op('Mul', [zs[l], m.op('Sub', [one, ss[l]])])])]);
    const dz = m.op('Mul', [dh, dsilu]); // [n, d]
    m.op('Gemm', [hs[l], dz, `gw1_${l}`], { transA: 1, beta: { float: 1 } }, `gw1_${l}_out`); // [d, d] (in, out)
    m.op('Add', [`gb1_${l}`, m.op('ReduceSum', [dz, m.constant('int64', [1], [0])], { keepdims: 0 })], undefined, `gb1_${l}_out`);
    g.output(`gw1_${l}_out`, 'float32', [d, d]);
    g.output(`gb1_${l}_out`, 'float32', [d]);
    if (l > 0) dh = m.op('Add', [dh, m.op('Gemm', [dz, `w1_${l}`], { transB: 1 })]);
  }
  for (let l = 0; l < L; l++) {
    sumSq(`gw1_${l}_out`, [d, d]);
    sumSq(`gb1_${l}_out`, [d]);
  }
  if (perHead) {
    const pieces = Math.ceil(d / pieceRows);
    const sizes = Array.from({ length: pieces }, (_, i) => Math.min(pieceRows, d - i * pieceRows));
    const names = sizes.map((_, i) => `gw2_out_${i}`);
    if (pieces === 1) m.op('Identity', [gw2Fin], undefined, names[0]);
    else m.ops('Split', [gw2Fin, m.constant('int64', [pieces], sizes)], names, { axis: 0 });
    sizes.forEach((rows, i) => g.output(names[i], 'float32', [rows, V]));
    sumSq(gw2Fin, [d, V]);
  }
  m.op('Concat', sq, { axis: 0 }, 'sumsq');
  g.output('sumsq', 'float32', [sqLength]);

  const model = g.build();
  attachBody(model, 'scan', bg);
  return onnx.ModelProto.encode(model).finish();
}

function buildEval(L: number, d: number, V: number): Uint8Array {
  const g = new GraphBuilder('medusa_heads_eval');
  const m = new Net(g, 'm_');
  const { hs } = blocksForward(m, L, d, false);
  g.input('labels', 'int64', ['c', 'r', 1]);
  g.input('w2', 'float32', [d, V]);
  const h3 = toChunks(m, hs[L], d);
  const bg = new GraphBuilder('medusa_heads_eval_chunk');
  const b = new Net(bg, 'b_');
  bg.input('b_h', 'float32', ['r', d]);
  bg.input('b_lab', 'int64', ['r', 1]);
  const { p, finish } = chunkLoss(b, 'b_h', 'b_lab', 'w2', V, 'b_ce', 'b_rank');
  finish(b.op('ReduceMax', [p], { axes: [1], keepdims: 1 }));
  bg.output('b_ce', 'float32', ['r']);
  bg.output('b_rank', 'float32', ['r']);
  m.ops('Scan', [h3, 'labels'], ['ce', 'rank'], { num_scan_inputs: 2 }, 'scan');
  g.output('ce', 'float32', ['c', 'r']);
  g.output('rank', 'float32', ['c', 'r']);
  const model = g.build();
  attachBody(model, 'scan', bg);
  return onnx.ModelProto.encode(model).finish();
}

// ---------------------------------------------------------------------------------------------
// The trainer

interface Slot {
  row: HeadTensorRow;
  /** Parameter, gradient accumulator and moments, internal layout. */
  p: Float32Array;
  g: Float32Array;
  m: Float32Array;
  v: Float32Array;
  weightDecay: number;
}

/** A head's rows of a micro-batch, gathered and padded into balanced chunks. */
interface HeadRows {
  n: number;
  C: number;
  R: number;
  x: Float32Array; // [C*R, d]
  labels: BigInt64Array; // [C*R]
}

export class OnnxHeadsTrainer implements HeadsTrainer {
  readonly engine = 'onnx' as const;
  private readonly K: number;
  private readonly L: number;
  private readonly d: number;
  private readonly V: number;
  /** slots by name, in headTensorTable order. */
  private readonly slots: Slot[];
  private readonly byName = new Map<string, Slot>();
  /** The frozen base lm_head [d, V] (shared mode only). */
  private readonly base: Float32Array | null;
  /** Per head: squared norms of its accumulated gradients as of its last run in this step. */
  private sumSq: number[];
  private steps = 0;
  private disposed = false;

  constructor(
    private readonly o: HeadsTrainerOptions,
    private readonly ort: Ort,
    private readonly train: OrtSession,
    private readonly evalSession: OrtSession,
    private readonly pieceRows: number,
    readonly description: string,
  ) {
    const s = o.shape;
    this.K = s.numHeads;
    this.L = s.numLayers;
    this.d = s.hiddenSize;
    this.V = s.vocabSize;
    const baseInternal = transpose2d(o.baseLmHead, this.V, this.d); // [d, V]
    this.base = s.lmHead === 'shared' ? baseInternal : null;
    const biases = initialBiases(s, o.seed);
    let baseTaken = this.base !== null;
    this.slots = headTensorTable(s).map((row) => {
      const size = row.shape.reduce((a, b) => a * b, 1);
      // reference init: W1 = 0, b1 from the seeded stream (initHeads' order), W2 = a copy of the base lm_head
      let p: Float32Array;
      if (row.kind === 'w1') p = new Float32Array(size);
      else if (row.kind === 'b1') p = biases[row.head][row.layer];
      else if (!baseTaken) {
        p = baseInternal; // the first head takes the transposed copy itself
        baseTaken = true;
      } else p = Float32Array.from(baseInternal);
      return { row, p, g: new Float32Array(size), m: new Float32Array(size), v: new Float32Array(size), weightDecay: row.kind === 'b1' ? 0 : o.weightDecay };
    });
    for (const sl of this.slots) this.byName.set(sl.row.name, sl);
    this.sumSq = new Array<number>(this.K).fill(0);
  }

  private slot(k: number, kind: 'w1' | 'b1' | 'w2', l: number): Slot {
    return this.byName.get(kind === 'w1' ? `${k}.${l}.linear.weight` : kind === 'b1' ? `${k}.${l}.linear.bias` : `${k}.${l}.weight`)!;
  }

  private w2(k: number): Float32Array {
    return this.base ?? this.slot(k, 'w2', this.L).p;
  }

  private tensor(data: Float32Array | BigInt64Array, dims: number[]): OrtTensor {
    return data instanceof BigInt64Array ? new this.ort.Tensor('int64', data, dims) : new this.ort.Tensor('float32', data, dims);
  }

  private async run(session: OrtSession, feeds: Record<string, OrtTensor>, what: string): Promise<Record<string, OrtTensor>> {
    try {
      return await session.run(feeds);
    } catch (e) {
      fail('E_ENGINE', `onnxruntime failed in the heads ${what}: ${describe(e).split('\n')[0]}`, e);
    }
  }

  private gather(b: HeadsBatch, k: number): HeadRows {
    const d = this.d;
    const { rows, labels } = headTargets(b.ids, b.lossMask, b.lengths, b.T, k);
    const n = rows.length;
    const C = Math.ceil(n / this.o.chunkRows);
    const R = Math.ceil(n / C);
    const x = new Float32Array(C * R * d);
    for (let i = 0; i < n; i++) x.set(b.hidden.subarray(rows[i] * d, rows[i] * d + d), i * d);
    const lab = new BigInt64Array(C * R);
    for (let i = 0; i < n; i++) lab[i] = BigInt(labels[i]);
    return { n, C, R, x, labels: lab };
  }

  private async runEval(b: HeadsBatch, k: number, out: HeadsMetrics): Promise<void> {
    const hr = this.gather(b, k);
    out.valid[k] += hr.n;
    if (hr.n === 0) return;
    const feeds: Record<string, OrtTensor> = {
      x: this.tensor(hr.x, [hr.C * hr.R, this.d]),
      labels: this.tensor(hr.labels, [hr.C, hr.R, 1]),
      w2: this.tensor(this.w2(k), [this.d, this.V]),
    };
    for (let l = 0; l < this.L; l++) {
      feeds[`w1_${l}`] = this.tensor(this.slot(k, 'w1', l).p, [this.d, this.d]);
      feeds[`b1_${l}`] = this.tensor(this.slot(k, 'b1', l).p, [this.d]);
    }
    const r = await this.run(this.evalSession, feeds, `evaluation of head ${k} (${hr.n} rows)`);
    this.collectLoss(r, hr.n, k, out);
  }

  private collectLoss(r: Record<string, OrtTensor>, n: number, k: number, out: HeadsMetrics): void {
    const ce = r['ce'].data as Float32Array;
    let s = 0;
    for (let i = 0; i < n; i++) s += ce[i];
    out.ceSum[k] += s;
    addRanks(out.correct[k], r['rank'].data as Float32Array, n);
  }

  /** Forward + backward of head k on one micro-batch, accumulating into the slots' gradients. */
  private async runTrain(b: HeadsBatch, k: number, weight: number, out: HeadsMetrics): Promise<void> {
    const hr = this.gather(b, k);
    out.valid[k] += hr.n;
    if (hr.n === 0) return;
    const { d, V, L } = this;
    const N = hr.C * hr.R;
    const rw = new Float32Array(N);
    rw.fill(weight, 0, hr.n);
    const feeds: Record<string, OrtTensor> = {
      x: this.tensor(hr.x, [N, d]),
      labels: this.tensor(hr.labels, [hr.C, hr.R, 1]),
      row_weight: this.tensor(rw, [hr.C, hr.R, 1]),
      w2: this.tensor(this.w2(k), [d, V]),
    };
    for (let l = 0; l < L; l++) {
      const w = this.slot(k, 'w1', l);
      const bb = this.slot(k, 'b1', l);
      feeds[`w1_${l}`] = this.tensor(w.p, [d, d]);
      feeds[`b1_${l}`] = this.tensor(bb.p, [d]);
      feeds[`gw1_${l}`] = this.tensor(w.g, [d, d]);
      feeds[`gb1_${l}`] = this.tensor(bb.g, [d]);
    }
    const w2slot = this.base ? null : this.slot(k, 'w2', L);
    if (w2slot) feeds['gw2'] = this.tensor(w2slot.g, [d, V]);
    const r = await this.run(this.train, feeds, `training step of head ${k} (${hr.n} rows)`);
    this.collectLoss(r, hr.n, k, out);
    for (let l = 0; l < L; l++) {
      this.slot(k, 'w1', l).g.set(r[`gw1_${l}_out`].data as Float32Array);
      this.slot(k, 'b1', l).g.set(r[`gb1_${l}_out`].data as Float32Array);
    }
    if (w2slot) {
      for (let i = 0, row = 0; row < d; i++, row += this.pieceRows) w2slot.g.set(r[`gw2_out_${i}`].data as Float32Array, row * V);
    }
    const sq = r['sumsq'].data as Float32Array;
    let s = 0;
    for (let i = 0; i < sq.length; i++) s += sq[i];
    this.sumSq[k] = s;
  }

  /** Loss and gradients (accumulated in the slots) of a step's micro-batches. */
  private async accumulate(micro: HeadsBatch[]): Promise<HeadsMetrics> {
    for (const b of micro) checkBatch(b, this.d, this.V, 'onnx heads engine');
    const norm = stepNorm(micro, this.K);
    for (const s of this.slots) s.g.fill(0);
    this.sumSq.fill(0);
    const st = emptyMetrics(this.K);
    for (const b of micro) {
      for (let k = 0; k < this.K; k++) await this.runTrain(b, k, Math.fround(headWeight(this.o, norm, k)), st);
    }
    return st;
  }

  async step(micro: HeadsBatch[], lr: number): Promise<HeadsStepResult> {
    this.checkLive();
    checkLr(lr);
    const o = this.o;
    const st = await this.accumulate(micro);
    if (!Number.isFinite(totalLoss(st, o.decay, o.headsCoefficient))) return { ...st, gradNorm: NaN, applied: false };
    const norm = Math.sqrt(this.sumSq.reduce((a, b) => a + b, 0));
    if (!Number.isFinite(norm)) return { ...st, gradNorm: norm, applied: false };
    // torch's clip_grad_norm_: coefficient max / (norm + 1e-6), applied only when below 1
    const scale = o.maxGradNorm === null ? 1 : Math.min(o.maxGradNorm / (norm + CLIP_EPS), 1);
    const t = this.steps + 1;
    const [beta1, beta2] = o.betas;
    const bc1 = 1 - beta1 ** t;
    const bc2 = 1 - beta2 ** t;
    for (const s of this.slots) {
      adamw(s.p, s.g, s.m, s.v, {
        gradScale: scale === 1 ? 1 : Math.fround(scale),
        beta1: Math.fround(beta1), oneMinusBeta1: Math.fround(1 - beta1),
        beta2: Math.fround(beta2), oneMinusBeta2: Math.fround(1 - beta2),
        bc2Sqrt: Math.fround(Math.sqrt(bc2)), eps: Math.fround(o.eps), negStep: Math.fround(-(lr / bc1)),
        decayFactor: s.weightDecay !== 0 ? Math.fround(1 - lr * s.weightDecay) : 1,
      });
    }
    this.steps = t;
    return { ...st, gradNorm: norm, applied: true };
  }

  async lossAndGrads(micro: HeadsBatch[]): Promise<LossAndGrads> {
    this.checkLive();
    const metrics = await this.accumulate(micro);
    const grads: HostTensors = {};
    for (const s of this.slots) grads[s.row.name] = { shape: s.row.shape.slice(), data: toReference(s.row, s.g) };
    return { metrics, grads };
  }

  async evaluate(batch: HeadsBatch): Promise<HeadsMetrics> {
    this.checkLive();
    checkBatch(batch, this.d, this.V, 'onnx heads engine');
    const st = emptyMetrics(this.K);
    for (let k = 0; k < this.K; k++) await this.runEval(batch, k, st);
    return st;
  }

  exportHeads(): HostTensors {
    this.checkLive();
    const out: HostTensors = {};
    for (const s of this.slots) out[s.row.name] = { shape: s.row.shape.slice(), data: toReference(s.row, s.p) };
    return out;
  }

  importHeads(t: HostTensors, where: string): void {
    this.checkLive();
    checkHeadTensors(this.o.shape, t, where);
    for (const s of this.slots) s.p.set(toInternal(s.row, t[s.row.name].data));
  }

  exportOptimizer(): OptimizerState {
    this.checkLive();
    const tensors: HostTensors = {};
    for (const s of this.slots) {
      tensors[`exp_avg.${s.row.name}`] = { shape: s.row.shape.slice(), data: toReference(s.row, s.m) };
      tensors[`exp_avg_sq.${s.row.name}`] = { shape: s.row.shape.slice(), data: toReference(s.row, s.v) };
    }
    return { step: this.steps, tensors };
  }

  importOptimizer(st: OptimizerState): void {
    this.checkLive();
    checkOptimizerState(this.o.shape, st);
    for (const s of this.slots) {
      s.m.set(toInternal(s.row, st.tensors[`exp_avg.${s.row.name}`].data));
      s.v.set(toInternal(s.row, st.tensors[`exp_avg_sq.${s.row.name}`].data));
    }
    this.steps = st.step;
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    void this.train.release();
    void this.evalSession.release();
  }

  private checkLive(): void {
    if (this.disposed) fail('E_INTERNAL', 'onnx heads trainer used after dispose()');
  }
}

interface AdamWConsts {
  /** float32 clip coefficient, or exactly 1 (no clipping). */
  gradScale: number;
  beta1: number;
  oneMinusBeta1: number;
  beta2: number;
  oneMinusBeta2: number;
  bc2Sqrt: number;
  eps: number;
  negStep: number;
  /** float32 1 - lr * wd, or exactly 1 (no decay). */
  decayFactor: number;
}

/**
 * One AdamW update in place, torch.optim.AdamW's formula and order with float32 scalars:
 *   g = g * clip;  m = m b1 + g (1 - b1);  v = v b2 + ((1 - b2) g) g
 *   p = p (1 - lr wd) + ((-lr / bc1) m) / (sqrt(v) / sqrt(bc2) + eps)
 * The moments are rounded to float32 as they are stored (and used rounded, as torch does); the
 * intermediates of each line stay in float64 and are rounded once, which is closer to the exact
 * result than float32 ops (torch's kernels differ from float32-op-by-op too: they fuse into FMAs).
 * Rounding every operation to float32 (Math.fround) would reproduce the tfjs engine's AdamW bit for
 * bit given the same gradients, at 1.7x the time (113 vs 67 ms per 16M parameters here); the
 * gradients differ between engines by rounding anyway.
 */
function adamw(p: Float32Array, grad: Float32Array, m: Float32Array, v: Float32Array, c: AdamWConsts): void {
  const f = Math.fround;
  const { gradScale, beta1, oneMinusBeta1, beta2, oneMinusBeta2, bc2Sqrt, eps, negStep, decayFactor } = c;
  const n = p.length;
  for (let i = 0; i < n; i++) {
    const g = grad[i] * gradScale;
    const mi = f(m[i] * beta1 + g * oneMinusBeta1);
    const vi = f(v[i] * beta2 + oneMinusBeta2 * g * g);
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decayFactor + (negStep * mi) / (Math.sqrt(vi) / bc2Sqrt + eps);
  }
}
