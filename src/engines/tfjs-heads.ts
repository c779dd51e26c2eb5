/**
 * The tfjs heads engine: initHeads / headsLoss / AdamW / clipGradNorm exactly as the medusa1 recipe
 * uses them (same ops in the same order, so the same numbers bit for bit), on whatever tfjs backend
 * is current (initBackend first). `hidden` is uploaded as a tf tensor per micro-batch.
 *
 * Layouts: the heads and AdamW moments live in the internal tfjs layout (W1 [in, out], W2 [d, V]);
 * export/import convert to and from the reference layout, for the heads and for the optimizer state,
 * so checkpoints move between engines.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { disposeHeads, exportHeads, headTensor, headTensorTable, importHeads, initHeads, trainableParams, type MedusaHeads } from '../model/heads.js';
import { headsLoss } from '../train/heads-loss.js';
import { AdamW } from '../train/optimizer.js';
import { clipGradNorm } from '../train/clip.js';
import {
  addMetrics, checkBatch, checkLr, checkOptimizerState, emptyMetrics, stepNorm, toInternal, toReference, totalLoss, transpose2d,
  type HeadsBatch, type HeadsMetrics, type HeadsStepResult, type HeadsTrainer, type HeadsTrainerOptions, type HostTensors, type LossAndGrads, type OptimizerState,
} from './heads-trainer.js';
import { accumulateGrads } from '../train/grads.js';

export function createTfjsHeadsTrainer(o: HeadsTrainerOptions, why: string): TfjsHeadsTrainer {
  return new TfjsHeadsTrainer(o, why);
}

export class TfjsHeadsTrainer implements HeadsTrainer {
  readonly engine = 'tfjs' as const;
  readonly description: string;
  private readonly heads: MedusaHeads;
  private readonly params: { name: string; value: tf.Variable; weightDecay: boolean }[];
  private readonly opt: AdamW;
  private disposed = false;

  constructor(private readonly o: HeadsTrainerOptions, why: string) {
    const s = o.shape;
    const d = s.hiddenSize;
    const V = s.vocabSize;
    // [V, d] (PyTorch) -> [d, V] (internal), exactly (a host transpose)
    const base = tf.tensor2d(transpose2d(o.baseLmHead, V, d), [d, V]);
    // initHeads makes each variable from a temporary tensor it does not release (the variable shares its
    // data); tidy releases the temporaries, so dispose() frees everything.
    let heads: MedusaHeads | undefined;
    tf.tidy(() => {
      heads = initHeads(s, base, o.seed);
    });
    this.heads = heads!;
    this.params = trainableParams(this.heads);
    this.opt = new AdamW(this.params.map((p) => ({ name: p.name, value: p.value, weightDecay: p.weightDecay ? o.weightDecay : 0 })), { betas: o.betas, eps: o.eps });
    this.description = `tfjs (backend ${tf.getBackend()})${why}`;
  }

  /** The step's summed metrics and accumulated gradients (internal layout, owned by the caller). */
  private accumulate(micro: HeadsBatch[]): { st: HeadsMetrics; grads: Map<string, tf.Tensor> } {
    const o = this.o;
    const s = o.shape;
    const K = s.numHeads;
    for (const b of micro) checkBatch(b, s.hiddenSize, s.vocabSize, 'tfjs heads engine');
    const norm = stepNorm(micro, K); // = the recipe's countValid over the padded batches
    const st = emptyMetrics(K);
    let grads: Map<string, tf.Tensor> | null = null;
    try {
      for (const b of micro) {
        const hidden = tf.tensor2d(b.hidden, [b.lengths.length * b.T, s.hiddenSize]);
        let r;
        try {
          r = headsLoss({ heads: this.heads, hidden, ids: b.ids, lossMask: b.lossMask, lengths: b.lengths, T: b.T, decay: o.decay, headsCoefficient: o.headsCoefficient, norm, chunkRows: o.chunkRows, computeGrads: true });
        } finally {
          hidden.dispose();
        }
        addMetrics(st, r);
        grads = accumulateGrads(grads, r.grads!);
      }
      grads ??= new Map();
      // parameters a step's data did not reach (a head with no valid position) get zero gradients
      for (const p of this.params) if (!grads.has(p.name)) grads.set(p.name, tf.zerosLike(p.value));
    } catch (e) {
      disposeGrads(grads);
      throw e;
    }
    return { st, grads };
  }

  async step(micro: HeadsBatch[], lr: number): Promise<HeadsStepResult> {
    this.checkLive();
    checkLr(lr);
    const o = this.o;
    const { st, grads } = this.accumulate(micro);
    try {
      if (!Number.isFinite(totalLoss(st, o.decay, o.headsCoefficient))) return { ...st, gradNorm: NaN, applied: false };
      if (o.maxGradNorm === null) {
        const norm = globalNorm(grads);
        if (!Number.isFinite(norm)) return { ...st, gradNorm: norm, applied: false };
        this.opt.step(grads, lr);
        return { ...st, gradNorm: norm, applied: true };
      }
      const clip = clipGradNorm(grads, o.maxGradNorm);
      try {
        if (!Number.isFinite(clip.norm)) return { ...st, gradNorm: clip.norm, applied: false };
        this.opt.step(clip.grads, lr);
        return { ...st, gradNorm: clip.norm, applied: true };
      } finally {
        disposeGrads(clip.grads);
      }
    } finally {
      disposeGrads(grads);
    }
  }

  async lossAndGrads(micro: HeadsBatch[]): Promise<LossAndGrads> {
    this.checkLive();
    const { st, grads } = this.accumulate(micro);
    const out: HostTensors = {};
    try {
      for (const row of headTensorTable(this.o.shape)) {
        const g = grads.get(row.name)!;
        out[row.name] = { shape: row.shape.slice(), data: toReference(row, g.dataSync() as Float32Array) };
      }
    } finally {
      disposeGrads(grads);
    }
    return { metrics: st, grads: out };
  }

  async evaluate(batch: HeadsBatch): Promise<HeadsMetrics> {
    this.checkLive();
    const o = this.o;
    const s = o.shape;
    checkBatch(batch, s.hiddenSize, s.vocabSize, 'tfjs heads engine');
    const hidden = tf.tensor2d(batch.hidden, [batch.lengths.length * batch.T, s.hiddenSize]);
    try {
      const r = headsLoss({ heads: this.heads, hidden, ids: batch.ids, lossMask: batch.lossMask, lengths: batch.lengths, T: batch.T, decay: o.decay, headsCoefficient: o.headsCoefficient, norm: new Array<number>(s.numHeads).fill(1), chunkRows: o.chunkRows, computeGrads: false });
      return { ceSum: r.ceSum, valid: r.valid, correct: r.correct };
    } finally {
      hidden.dispose();
    }
  }

  exportHeads(): HostTensors {
    this.checkLive();
    return exportHeads(this.heads);
  }

  importHeads(t: HostTensors, where: string): void {
    this.checkLive();
    // heads.ts importHeads uploads each tensor and assigns it without disposing the upload: tidy releases it
    tf.tidy(() => importHeads(this.heads, t, where));
  }

  exportOptimizer(): OptimizerState {
    this.checkLive();
    const st = this.opt.exportState();
    const tensors: HostTensors = {};
    for (const row of headTensorTable(this.o.shape)) {
      for (const key of [`exp_avg.${row.name}`, `exp_avg_sq.${row.name}`]) {
        tensors[key] = { shape: row.shape.slice(), data: toReference(row, st.tensors[key].data) };
      }
    }
    return { step: st.step, tensors };
  }

  importOptimizer(s: OptimizerState): void {
    this.checkLive();
    const table = checkOptimizerState(this.o.shape, s);
    const tensors: HostTensors = {};
    for (const row of table) {
      const shape = headTensor(this.heads, row).shape.slice();
      for (const key of [`exp_avg.${row.name}`, `exp_avg_sq.${row.name}`]) tensors[key] = { shape, data: toInternal(row, s.tensors[key].data) };
    }
    this.opt.importState({ step: s.step, tensors });
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.opt.dispose();
    disposeHeads(this.heads);
    this.heads.baseLmHead.dispose();
  }

  private checkLive(): void {
    if (this.disposed) fail('E_INTERNAL', 'tfjs heads trainer used after dispose()');
  }
}

function disposeGrads(g: Map<string, tf.Tensor> | null): void {
  if (g) for (const t of g.values()) t.dispose();
}

function globalNorm(g: Map<string, tf.Tensor>): number {
  let s = 0;
  for (const t of g.values()) {
    const sq = tf.tidy(() => tf.sum(tf.square(t)));
    s += sq.dataSync()[0];
    sq.dispose();
  }
  return Math.sqrt(s);
}
