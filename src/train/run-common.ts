/**
 * Pieces shared by the training recipes (medusa1, medusa2): the check that datasets were distilled
 * from the model being trained, per-head metrics (summed step statistics -> per-head loss and
 * top-1..10 accuracy), and the resume-time truncation of metrics lines written after the checkpoint
 * a run resumes from.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { latestCheckpoint } from './checkpoint.js';
import { TOPK_REPORTED } from './heads-loss.js';

export interface HeadMetrics {
  loss: number;
  /** top-1 .. top-10 accuracy (the summary prints top-1 and top-5) */
  acc: number[];
  valid: number;
}

export interface StepStats {
  ceSum: number[];
  valid: number[];
  correct: number[][];
}

export function emptyStats(K: number): StepStats {
  return { ceSum: new Array<number>(K).fill(0), valid: new Array<number>(K).fill(0), correct: Array.from({ length: K }, () => new Array<number>(TOPK_REPORTED).fill(0)) };
}

/** Per-head mean loss and accuracies, and the weighted heads loss coef * sum_k decay^k * CE_k. */
export function summarise(st: StepStats, decay: number, coef: number): { loss: number; heads: HeadMetrics[] } {
  const heads = st.ceSum.map((ce, k) => ({
    loss: st.valid[k] > 0 ? ce / st.valid[k] : NaN,
    acc: st.correct[k].map((c) => (st.valid[k] > 0 ? c / st.valid[k] : NaN)),
    valid: st.valid[k],
  }));
  let loss = 0;
  heads.forEach((h, k) => {
    if (h.valid > 0) loss += coef * Math.pow(decay, k) * h.loss;
  });
  return { loss, heads };
}

export function addStats(st: StepStats, r: { ceSum: number[]; valid: number[]; correct: number[][] }): void {
  r.ceSum.forEach((v, k) => (st.ceSum[k] += v));
  r.valid.forEach((v, k) => (st.valid[k] += v));
  r.correct.forEach((row, k) => row.forEach((v, j) => (st.correct[k][j] += v)));
}

/** Drop metrics lines written after `step` (they belong to steps a resumed run repeats). */
export function truncateMetrics(file: string, step: number): void {
  if (!fs.existsSync(file)) return;
  const keep = fs.readFileSync(file, 'utf8').split('\n').filter((l) => {
    if (!l.trim()) return false;
    try {
      return (JSON.parse(l) as { step: number }).step <= step;
    } catch {
      return false;
    }
  });
  fs.writeFileSync(file, keep.length > 0 ? `${keep.join('\n')}\n` : '');
}

/** Refuse datasets distilled from another model or tokenizer (E_CONFIG naming the dataset and the fix). */
export function checkDatasetsMatchModel(datasets: { dir: string; meta: Record<string, string> }[], modelDir: string, configHash: string, tokenizerHash: string): void {
  for (const ds of datasets) {
    const wrong: string[] = [];
    if (ds.meta['base_model_config_sha256'] !== configHash) wrong.push(`base model config sha256 ${ds.meta['base_model_config_sha256']?.slice(0, 12)}… != ${configHash.slice(0, 12)}… (${modelDir})`);
    if (ds.meta['tokenizer_sha256'] !== tokenizerHash) wrong.push(`tokenizer sha256 ${ds.meta['tokenizer_sha256']?.slice(0, 12)}… != ${tokenizerHash.slice(0, 12)}…`);
    if (wrong.length > 0) {
      fail('E_CONFIG', `dataset ${ds.dir} was distilled from another model or tokenizer: ${wrong.join('; ')}. Heads must learn the distribution of the model they serve: distill again with --model ${modelDir}, or point model.path at the dataset's base model.`);
    }
  }
}

/**
 * The run folder before training: with `resume`, its latest checkpoint (or null: a fresh start);
 * without, E_USAGE when it already holds checkpoints. Creates the folder.
 */
export function prepareRunDir(runDir: string, resume: boolean): string | null {
  const latest = latestCheckpoint(runDir);
  if (!resume && latest !== null) {
    fail('E_USAGE', `${runDir} already holds a run with checkpoints. Pass --resume to continue it, or choose another run.name (--set run.name=...).`);
  }
  fs.mkdirSync(runDir, { recursive: true });
  return resume ? latest : null;
}

/** Refuse to resume a checkpoint written with other training settings (its state's config_hash). */
export function checkResumeHash(state: Record<string, unknown>, hash: string, runDir: string): void {
  if (state['config_hash'] !== hash) {
    fail('E_CONFIG', `cannot resume ${runDir}: the config's training settings differ from the run's (config hash ${String(state['config_hash']).slice(0, 12)}… vs ${hash.slice(0, 12)}…). Compare with ${path.join(runDir, 'config.yaml')}, or start a new run.name.`);
  }
}
