/**
 * `medusa-train demo`: the whole embedded pipeline on a fresh machine, no downloads: the built-in
 * prompts (data/prompts/demo.jsonl) distilled by the embedded model, then MEDUSA-1 heads trained with
 * configs/tiny.yaml, then evaluated (per-head accuracy, fitted trees, Medusa decoding against plain
 * decoding). Rerunning resumes the first two stages.
 */
import * as path from 'node:path';
import { packagePath } from '../paths.js';
import { initBackend } from '../backend.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTrainConfig } from '../config.js';
import { latestCheckpoint } from '../train/checkpoint.js';
import { runDistill, formatDistillSummary } from './distill.js';
import { runMedusa1, formatMedusa1Summary } from './medusa1.js';
import { runEval, formatEval } from './eval.js';
import type { Progress } from '../progress.js';

export interface DemoArgs {
  out: string;
  log: (line: string) => void;
  shouldStop: () => boolean;
  progress: (label: string, unit: string) => Progress;
}

export async function runDemo(a: DemoArgs): Promise<string> {
  const backend = await initBackend('auto');
  a.log(`backend: ${backend.detail}`);
  const model = ensureEmbeddedModel();
  const datasetDir = path.join(a.out, 'distill');
  a.log(`demo: 1/3 distill ${packagePath('data', 'prompts', 'demo.jsonl')} with the embedded model -> ${datasetDir}`);
  const d = await runDistill({
    inputs: [packagePath('data', 'prompts', 'demo.jsonl')], format: 'auto', out: datasetDir, model, engine: 'local', urls: [], inFlight: 1,
    timeoutMs: 60_000, retries: 0, backoffMs: 0,
    // The embedded model has random weights (near-uniform logits): greedy decoding gives it a learnable, deterministic output.
    sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: 48, maxTotalTokens: 256,
    batchSize: 8, backboneEngine: 'auto', shardSize: 16, topk: 0, overwrite: false, log: a.log, progress: a.progress('distill', 'conversations'), shouldStop: a.shouldStop,
  });
  const lines = [formatDistillSummary(d)];
  if (!d.complete) return lines.join('\n');
  const runName = 'medusa1';
  const { config } = loadTrainConfig(packagePath('configs', 'tiny.yaml'), [`data.train=${JSON.stringify([datasetDir])}`, `run.dir=${a.out}`, `run.name=${runName}`]);
  a.log(`demo: 2/3 train MEDUSA-1 heads (${packagePath('configs', 'tiny.yaml')}) -> ${path.join(a.out, runName)}`);
  const s = await runMedusa1({
    config, commandLine: ['medusa-train', 'demo', '--out', a.out], resume: latestCheckpoint(path.join(a.out, runName)) !== null,
    log: a.log, progress: a.progress('train', 'steps'), shouldStop: a.shouldStop,
  });
  lines.push(formatMedusa1Summary(s));
  if (s.stopped) return lines.join('\n');
  a.log(`demo: 3/3 evaluate: per-head accuracy, fitted trees, Medusa decoding vs plain decoding`);
  const e = await runEval({ run: path.join(a.out, runName), data: [], budgets: [4, 8, 16], speedPrompts: 4, speedNewTokens: 32, log: a.log });
  lines.push(formatEval(e));
  return lines.join('\n');
}
