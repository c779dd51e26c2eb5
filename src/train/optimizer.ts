/**
 * AdamW exactly as torch.optim.AdamW (torch 1.13 `_single_tensor_adamw`, amsgrad off, maximize off),
 * over named float32 tfjs Variables. For every parameter p with gradient g, at step t = 1, 2, ...:
 *
 *   p  <- p * (1 - lr * wd)                         decoupled weight decay (skipped when wd == 0:
 *                                                   torch multiplies by exactly 1.0, a no-op)
 *   m  <- m * beta1 + g * (1 - beta1)               exp_avg
 *   v  <- v * beta2 + ((1 - beta2) * g) * g         exp_avg_sq (addcmul's operation order)
 *   bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t           host binary64, as torch's Python floats
 *   denom = sqrt(v) / sqrt(bc2) + eps
 *   p  <- p + ((-lr / bc1) * m) / denom             addcdiv (its CPU kernel's operation order)
 *
 * Every tensor op runs in float32 with float32 scalars (the host values above rounded once), which
 * is what torch does for float32 parameters. Against the float64 golden (scripts/golden_heads.py)
 * the results agree to float32 rounding: the tests use a relative tolerance of 1e-5 on parameters
 * and moments (float32 epsilon is 1.2e-7; three steps of a handful of rounded operations stay
 * well below 1e-6 relative; observed 1.3e-7) and an absolute tolerance of 1e-3 x lr on the update
 * p_t - p_0 (observed 1.5e-4 x lr), which still sees a wrong bias correction, weight-decay placement
 * or missing eps. Against torch's own float32 AdamW (foreach on or off) on the same inputs, the
 * parameters after 3 steps were bit-identical on wasm and cpu and the moments within 2 ulps (torch's
 * CPU kernels fuse `m*beta1 + (1-beta1)*g` and addcmul into FMAs; tfjs rounds each op).
 *
 * Differences from torch: one step counter for the whole optimizer (torch keeps one per parameter
 * and skips parameters whose .grad is None); here every parameter must receive a gradient at every
 * step, so the counters could never diverge. Parameter groups are expressed per parameter: a weight
 * decay and an lr multiplier `lrScale` (default 1); the lr is passed to each step (from the schedule) and
 * parameter p uses lr x lrScale everywhere torch uses its group's lr (the step size and the decoupled
 * decay), so a parameter with lrScale s behaves exactly as in a torch group whose lr is s x lr.
 * `adamwParamGroups` builds MEDUSA-2's groups (heads lr x heads_lr_multiplier; no decay on biases and
 * norms). The exported state holds no group settings, so MEDUSA-1 optimizer files load unchanged.
 *
 * Tensor ownership: the optimizer updates the caller's Variables in place (Variable.assign) and owns
 * only its moment Variables (non-trainable, so tf.variableGrads never picks them up), which
 * dispose() releases. A step leaves the number of live tensors unchanged.
 */

import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';

export interface AdamWParam {
  /** Unique name; used for gradients and in the exported state ('exp_avg.<name>'). */
  name: string;
  /** A float32 Variable, updated in place by step(). */
  value: tf.Variable;
  /** Decoupled weight decay (torch's weight_decay of the parameter's group); 0 for biases and norms. */
  weightDecay: number;
  /** Multiplier of the step's lr for this parameter (torch: a param group with lr x lrScale); default 1. */
  lrScale?: number;
}

export interface AdamWOptions {
  betas: [number, number];
  eps: number;
}

/** A host copy of the optimizer state: the step count and both moments of every parameter. */
export interface AdamWState {
  step: number;
  /** Keys 'exp_avg.<name>' and 'exp_avg_sq.<name>'; shapes equal the parameters' shapes. */
  tensors: Record<string, { shape: number[]; data: Float32Array }>;
}

interface Slot {
  name: string;
  value: tf.Variable;
  weightDecay: number;
  lrScale: number;
  expAvg: tf.Variable; // m, same shape as value
  expAvgSq: tf.Variable; // v, same shape as value
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function shapeStr(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

/** target <- value, then release value's handle (the variable keeps the data) and the given intermediates. */
function assignFrom(target: tf.Variable, value: tf.Tensor, ...free: tf.Tensor[]): void {
  target.assign(value);
  value.dispose();
  for (const t of free) t.dispose();
}

function zerosVariable(shape: number[]): tf.Variable {
  const z = tf.zeros(shape, 'float32');
  const v = tf.variable(z, false); // shares z's data (ref-counted); z itself can go
  z.dispose();
  return v;
}

export class AdamW {
  private readonly slots: Slot[];
  private readonly beta1: number;
  private readonly beta2: number;
  private readonly eps: number;
  private steps = 0;
  private disposed = false;

  constructor(params: AdamWParam[], o: AdamWOptions) {
    const [beta1, beta2] = o.betas;
    for (const [i, b] of [beta1, beta2].entries()) {
      if (!(Number.isFinite(b) && b >= 0 && b < 1)) fail('E_CONFIG', `AdamW beta${i + 1} must be in [0, 1), got ${String(b)}`);
    }
    if (!(Number.isFinite(o.eps) && o.eps >= 0)) fail('E_CONFIG', `AdamW eps must be a finite number >= 0, got ${String(o.eps)}`);
    const seen = new Set<string>();
    for (const p of params) {
      if (seen.has(p.name)) fail('E_CONFIG', `AdamW: parameter name ${JSON.stringify(p.name)} appears twice; names must be unique`);
      seen.add(p.name);
      if (p.value.dtype !== 'float32') fail('E_CONFIG', `AdamW: parameter ${JSON.stringify(p.name)} has dtype ${p.value.dtype}, expected float32`);
      if (!(Number.isFinite(p.weightDecay) && p.weightDecay >= 0)) {
        fail('E_CONFIG', `AdamW: weight decay of ${JSON.stringify(p.name)} must be a finite number >= 0, got ${String(p.weightDecay)}`);
      }
      if (p.lrScale !== undefined && !(Number.isFinite(p.lrScale) && p.lrScale >= 0)) {
        fail('E_CONFIG', `AdamW: lr multiplier of ${JSON.stringify(p.name)} must be a finite number >= 0, got ${String(p.lrScale)}`);
      }
    }
    this.beta1 = beta1;
    this.beta2 = beta2;
    this.eps = o.eps;
    this.slots = params.map((p) => ({
      name: p.name,
      value: p.value,
      weightDecay: p.weightDecay,
      lrScale: p.lrScale ?? 1,
      expAvg: zerosVariable(p.value.shape),
      expAvgSq: zerosVariable(p.value.shape),
    }));
  }

  /** Number of steps taken so far (torch's state['step']). */
  get stepCount(): number {
    return this.steps;
  }

  /** Parameter names in construction order. */
  get names(): string[] {
    return this.slots.map((s) => s.name);
  }

  /**
   * One AdamW update of every parameter with learning rate `lr`. `grads` must hold exactly one
   * float32 gradient per parameter name, shaped like the parameter; it is read, not disposed.
   */
  step(grads: ReadonlyMap<string, tf.Tensor>, lr: number): void {
    this.checkLive();
    if (!(Number.isFinite(lr) && lr >= 0)) fail('E_CONFIG', `AdamW: learning rate must be a finite number >= 0, got ${String(lr)}`);
    for (const s of this.slots) {
      const g = grads.get(s.name);
      if (g === undefined) fail('E_INTERNAL', `AdamW.step: no gradient for parameter ${JSON.stringify(s.name)}`);
      if (g.dtype !== 'float32') fail('E_INTERNAL', `AdamW.step: gradient of ${JSON.stringify(s.name)} has dtype ${g.dtype}, expected float32`);
      if (!sameShape(g.shape, s.value.shape)) {
        fail('E_INTERNAL', `AdamW.step: gradient of ${JSON.stringify(s.name)} has shape ${shapeStr(g.shape)}, parameter has ${shapeStr(s.value.shape)}`);
      }
    }
    if (grads.size !== this.slots.length) {
      const known = new Set(this.names);
      const extra = [...grads.keys()].filter((n) => !known.has(n));
      fail('E_INTERNAL', `AdamW.step: gradients for unknown parameters: ${extra.map((n) => JSON.stringify(n)).join(', ')}`);
    }

    const t = this.steps + 1;
    const { beta1, beta2, eps } = this;
    // Host binary64, as torch computes these from Python floats.
    const bc1 = 1 - beta1 ** t;
    const bc2 = 1 - beta2 ** t;
    const bc2Sqrt = Math.sqrt(bc2);
    const f32 = (x: number): tf.Scalar => tf.scalar(x, 'float32');

    tf.tidy(() => {
      const sBeta1 = f32(beta1);
      const sOneMinusBeta1 = f32(1 - beta1);
      const sBeta2 = f32(beta2);
      const sOneMinusBeta2 = f32(1 - beta2);
      const sBc2Sqrt = f32(bc2Sqrt);
      const sEps = f32(eps);
      const negStep = new Map<number, tf.Scalar>(); // per distinct lr multiplier
      for (const s of this.slots) {
        const g = grads.get(s.name)!;
        const lrS = lr * s.lrScale; // this parameter's group lr
        if (!negStep.has(s.lrScale)) negStep.set(s.lrScale, f32(-(lrS / bc1)));
        const sNegStep = negStep.get(s.lrScale)!;
        tf.tidy(() => {
          // Intermediates are freed as soon as they are used, so a parameter's update needs at most
          // three parameter-sized temporaries (a tidy alone would keep all ~13 until its end, which
          // matters for a [V, d] projection on the 4 GiB wasm heap).
          // m = m * beta1 + g * (1 - beta1)
          const m1 = tf.mul(s.expAvg, sBeta1);
          const m2 = tf.mul(g, sOneMinusBeta1);
          assignFrom(s.expAvg, tf.add(m1, m2), m1, m2);
          // v = v * beta2 + ((1 - beta2) * g) * g
          const v1 = tf.mul(s.expAvgSq, sBeta2);
          const v2 = tf.mul(g, sOneMinusBeta2);
          const v3 = tf.mul(v2, g);
          v2.dispose();
          assignFrom(s.expAvgSq, tf.add(v1, v3), v1, v3);
          // upd = ((-lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps)
          const d1 = tf.sqrt(s.expAvgSq);
          const d2 = tf.div(d1, sBc2Sqrt);
          d1.dispose();
          const denom = tf.add(d2, sEps);
          d2.dispose();
          const u1 = tf.mul(sNegStep, s.expAvg);
          const upd = tf.div(u1, denom);
          u1.dispose();
          denom.dispose();
          // p = p * (1 - lr * wd) + upd
          if (s.weightDecay !== 0) {
            const decayed = tf.mul(s.value, f32(1 - lrS * s.weightDecay));
            assignFrom(s.value, tf.add(decayed, upd), decayed, upd);
          } else {
            assignFrom(s.value, tf.add(s.value, upd), upd);
          }
        });
      }
    });
    this.steps = t;
  }

  /** Host copies of the step count and moments (e.g. for a checkpoint). */
  exportState(): AdamWState {
    this.checkLive();
    const tensors: AdamWState['tensors'] = {};
    for (const s of this.slots) {
      // dataSync may return the backend's own buffer (cpu backend): copy it.
      tensors[`exp_avg.${s.name}`] = { shape: s.expAvg.shape.slice(), data: new Float32Array(s.expAvg.dataSync() as Float32Array) };
      tensors[`exp_avg_sq.${s.name}`] = { shape: s.expAvgSq.shape.slice(), data: new Float32Array(s.expAvgSq.dataSync() as Float32Array) };
    }
    return { step: this.steps, tensors };
  }

  /**
   * Restore a state from exportState(). Everything is validated before anything changes: the set of
   * tensor names must match this optimizer's parameters exactly and every shape and length must fit.
   * Errors are E_CONFIG naming the tensor. The data is copied.
   */
  importState(s: AdamWState): void {
    this.checkLive();
    if (!Number.isSafeInteger(s.step) || s.step < 0) fail('E_CONFIG', `optimizer state: step must be an integer >= 0, got ${String(s.step)}`);
    const expected = new Map<string, Slot>();
    for (const slot of this.slots) {
      expected.set(`exp_avg.${slot.name}`, slot);
      expected.set(`exp_avg_sq.${slot.name}`, slot);
    }
    const given = Object.keys(s.tensors);
    const unexpected = given.filter((k) => !expected.has(k));
    if (unexpected.length > 0) {
      fail('E_CONFIG', `optimizer state has tensors for no parameter of this model: ${unexpected.slice(0, 5).map((k) => JSON.stringify(k)).join(', ')}` +
        `${unexpected.length > 5 ? ` and ${unexpected.length - 5} more` : ''}; the checkpoint belongs to a different set of heads`);
    }
    for (const [key, slot] of expected) {
      const t = s.tensors[key];
      if (t === undefined) fail('E_CONFIG', `optimizer state is missing tensor ${JSON.stringify(key)}; the checkpoint belongs to a different set of heads or is incomplete`);
      if (!Array.isArray(t.shape) || !sameShape(t.shape, slot.value.shape)) {
        fail('E_CONFIG', `optimizer state tensor ${JSON.stringify(key)} has shape ${Array.isArray(t.shape) ? shapeStr(t.shape) : String(t.shape)}, ` +
          `but parameter ${JSON.stringify(slot.name)} has shape ${shapeStr(slot.value.shape)}`);
      }
      if (!(t.data instanceof Float32Array) || t.data.length !== slot.value.size) {
        fail('E_CONFIG', `optimizer state tensor ${JSON.stringify(key)} must hold ${slot.value.size} float32 values, ` +
          `got ${t.data instanceof Float32Array ? t.data.length : typeof t.data}`);
      }
    }
    for (const slot of this.slots) {
      for (const [key, target] of [[`exp_avg.${slot.name}`, slot.expAvg], [`exp_avg_sq.${slot.name}`, slot.expAvgSq]] as const) {
        const t = s.tensors[key];
        tf.tidy(() => target.assign(tf.tensor(new Float32Array(t.data), t.shape, 'float32')));
      }
    }
    this.steps = s.step;
  }

  /** Release the moment Variables (the parameters belong to the caller). Idempotent. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const s of this.slots) {
      s.expAvg.dispose();
      s.expAvgSq.dispose();
    }
  }

  private checkLive(): void {
    if (this.disposed) fail('E_INTERNAL', 'AdamW used after dispose()');
  }
}

/** A trainable tensor with its group (as src/train/trainable-backbone.ts TrainableParam). */
export interface GroupedParam {
  name: string;
  variable: tf.Variable;
  group: 'backbone' | 'heads';
  /** false for biases and norms. */
  weightDecay: boolean;
}

/**
 * MEDUSA-2's parameter groups: every parameter gets `weightDecay` unless it is a bias or a norm
 * (param.weightDecay false), and the heads learn at lr x headsLrMultiplier (the paper: x4).
 */
export function adamwParamGroups(params: GroupedParam[], o: { weightDecay: number; headsLrMultiplier: number }): AdamWParam[] {
  if (!(Number.isFinite(o.headsLrMultiplier) && o.headsLrMultiplier > 0)) fail('E_CONFIG', `medusa2.heads_lr_multiplier must be a number > 0, got ${String(o.headsLrMultiplier)}`);
  return params.map((p) => ({
    name: p.name,
    value: p.variable,
    weightDecay: p.weightDecay ? o.weightDecay : 0,
    lrScale: p.group === 'heads' ? o.headsLrMultiplier : 1,
  }));
}
