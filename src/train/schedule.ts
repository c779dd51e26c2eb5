/**
 * Learning-rate schedules with linear warmup, as Hugging Face transformers defines them
 * (src/transformers/optimization.py) and applies them through torch's `LambdaLR`:
 *
 * - `cosine`:   get_cosine_schedule_with_warmup (num_cycles 0.5, i.e. half a cosine down to 0)
 * - `linear`:   get_linear_schedule_with_warmup
 * - `constant`: get_constant_schedule_with_warmup
 *
 * `LambdaLR` multiplies the base lr by `lambda(n)` where n counts the scheduler steps taken so far;
 * the trainer's loop is `optimizer.step(); scheduler.step()`, so optimizer step `s` (0-based) uses
 * `lr * lambda(s)`: the very first update uses lambda(0), which is 0 whenever there is a warmup.
 * `lrAt(s, o)` is exactly that value, evaluated in the same binary64 arithmetic as Python, so it
 * matches transformers to the last bit or two (Math.cos vs libm cos may differ by 1 ulp).
 *
 * One deliberate difference: past the end (step > totalSteps) `cosine` and `linear` return 0.
 * transformers' linear lambda does the same (max(0, ...)), but its cosine lambda keeps following
 * the cosine and climbs back up (progress 1.5 gives half the base lr). A trainer never gets there;
 * if it ever did (e.g. resuming with a smaller total), learning should stop rather than restart.
 * Steps 0..totalSteps inclusive follow transformers exactly (checked against
 * test/fixtures/heads/schedules.json, made by scripts/golden_heads.py).
 *
 * Pure functions, no tensors. Invalid arguments are E_CONFIG errors naming the option.
 */

import { fail } from '../errors.js';

export type ScheduleKind = 'cosine' | 'linear' | 'constant';
export const SCHEDULE_KINDS: readonly ScheduleKind[] = ['cosine', 'linear', 'constant'];

export interface ScheduleOptions {
  /** Base (peak) learning rate, reached at the end of warmup. */
  lr: number;
  kind: ScheduleKind;
  /** Number of warmup steps (integer >= 0); 0 starts at the full lr. */
  warmupSteps: number;
  /** Number of optimizer steps of the whole run (integer >= 0). */
  totalSteps: number;
}

/** Cosine cycles of get_cosine_schedule_with_warmup's default: half a wave, from 1 down to 0. */
const NUM_CYCLES = 0.5;

function checkCount(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) fail('E_CONFIG', `${what} must be an integer >= 0, got ${String(v)}`);
}

/**
 * The multiplier transformers' lambda gives for scheduler step `step` (before the base lr is
 * applied). Transcribed from optimization.py: `_get_{cosine,linear,constant}_schedule_with_warmup_lr_lambda`.
 */
export function lrFactor(step: number, o: Omit<ScheduleOptions, 'lr'>): number {
  checkCount('learning-rate schedule step', step);
  checkCount('warmup steps', o.warmupSteps);
  checkCount('total steps', o.totalSteps);
  const warmup = o.warmupSteps;
  const total = o.totalSteps;
  switch (o.kind) {
    case 'constant':
      // float(current_step) / float(max(1.0, num_warmup_steps)), then 1.0
      return step < warmup ? step / Math.max(1, warmup) : 1.0;
    case 'linear':
      if (step < warmup) return step / Math.max(1, warmup);
      return Math.max(0.0, (total - step) / Math.max(1, total - warmup));
    case 'cosine': {
      if (step < warmup) return step / Math.max(1, warmup);
      if (step > total) return 0.0; // see the module comment: transformers would climb back up here
      const progress = (step - warmup) / Math.max(1, total - warmup);
      // Same operation order as Python: math.pi * float(num_cycles) * 2.0 * progress
      return Math.max(0.0, 0.5 * (1.0 + Math.cos(Math.PI * NUM_CYCLES * 2.0 * progress)));
    }
    default:
      return fail('E_CONFIG', `unknown learning-rate schedule ${JSON.stringify(o.kind)}; use one of ${SCHEDULE_KINDS.join(', ')}`);
  }
}

/**
 * The learning rate used by optimizer step `step` (0-based): `lr * lambda(step)`, as torch's
 * LambdaLR computes it (base_lr * lambda). Past `totalSteps`, cosine and linear give 0 and constant
 * gives the full lr.
 */
export function lrAt(step: number, o: ScheduleOptions): number {
  if (!Number.isFinite(o.lr) || o.lr < 0) fail('E_CONFIG', `learning rate must be a finite number >= 0, got ${String(o.lr)}`);
  return o.lr * lrFactor(step, o);
}

/**
 * Warmup steps from a ratio, as transformers' `TrainingArguments.get_warmup_steps` does when no
 * explicit warmup_steps is set: `ceil(totalSteps * warmupRatio)`, in binary64. Note that this keeps
 * Python's rounding quirks, e.g. 100 * 0.07 = 7.000000000000001 gives 8.
 */
export function warmupSteps(totalSteps: number, warmupRatio: number): number {
  checkCount('total steps', totalSteps);
  if (!Number.isFinite(warmupRatio) || warmupRatio < 0 || warmupRatio > 1) {
    fail('E_CONFIG', `warmup ratio must be a number in [0, 1], got ${String(warmupRatio)}`);
  }
  return Math.ceil(totalSteps * warmupRatio);
}
