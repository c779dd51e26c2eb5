/**
 * `medusa-train demo`: the whole toolkit on the committed structured model (assets/structured-model),
 * no downloads, no GPU:
 *   1. distill the training prompts (data/prompts/structured-train.jsonl, written by
 *      scripts/demo-prompts.ts) with the structured model, greedy -> <out>/train-data
 *   2. distill the held-out prompts (data/prompts/structured.jsonl, never trained on) the same way
 *      -> <out>/eval-data, the evaluation set
 *   3. train MEDUSA-1 heads with configs/demo.yaml -> <out>/medusa1
 *   4. eval on the held-out set: per-head accuracy, trees per node budget, Medusa greedy decoding
 *      measured against plain greedy decoding (--speed), the heads' accuracy on live greedy decoding
 *      (--live); the fastest measured tree becomes the run's medusa_choices.json; the whole report is
 *      kept as <out>/eval-report.json
 *   5. export the heads (medusa layout with the tree, and onnx), each verified -> <out>/export-*
 * Rerunning with the same --out resumes: the datasets and the training resume where they stopped, and
 * the eval report and exports of the same checkpoint are reused. `quick` is a shortened variant (fewer
 * training prompts, one epoch, fewer budgets) for CI; give it its own --out.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { packagePath } from '../paths.js';
import { initBackend } from '../backend.js';
import { structuredModelPath } from '../model/embedded.js';
import { trainingSamples } from '../model/structured-corpus.js';
import { loadTrainConfig } from '../config.js';
import { latestCheckpoint } from '../train/checkpoint.js';
import { writeFileAtomic } from '../io/atomic.js';
import { runDistill, formatDistillSummary, type DistillSummary } from './distill.js';
import { runMedusa1, formatMedusa1Summary } from './medusa1.js';
import { runEval, formatEval, type EvalReport } from './eval.js';
import { runExport, type ExportFormat, type ExportReport } from './export.js';
import type { Progress } from '../progress.js';
import { writeRunReport } from '../report/run-report.js';

/** The committed training prompts: the first `count` distinct prompts of the structured corpus from `seed`. */
export const DEMO_TRAIN_PROMPTS = { file: ['data', 'prompts', 'structured-train.jsonl'], count: 512, seed: 1234 } as const;
/** The held-out prompts (64, every task), distilled as the evaluation set. */
export const DEMO_EVAL_PROMPTS = ['data', 'prompts', 'structured.jsonl'] as const;

/** JSONL rows of data/prompts/structured-train.jsonl (see scripts/demo-prompts.ts). */
export function demoTrainPromptLines(): string[] {
  const { count, seed } = DEMO_TRAIN_PROMPTS;
  const seen = new Set<string>();
  const lines: string[] = [];
  // trainingSamples never yields a held-out prompt; a prefix of a longer draw is the same draw
  for (const s of trainingSamples(2 * count, seed)) {
    if (seen.has(s.prompt)) continue;
    seen.add(s.prompt);
    lines.push(JSON.stringify({ id: `structured-train-${String(lines.length).padStart(3, '0')}`, prompt: s.prompt }));
    if (lines.length === count) return lines;
  }
  return fail('E_INTERNAL', `the structured corpus gave fewer than ${count} distinct training prompts from seed ${seed}`);
}

interface DemoPlan {
  /** Training prompts used (the first n of the file). */
  trainPrompts: number;
  /** configs/demo.yaml overrides beyond the model, data and run folder. */
  overrides: string[];
  budgets: number[];
  /** Held-out prompts for --speed and --live, and tokens generated for each. */
  speedPrompts: number;
  livePrompts: number;
  newTokens: number;
}

const PLANS: Record<'full' | 'quick', DemoPlan> = {
  full: { trainPrompts: DEMO_TRAIN_PROMPTS.count, overrides: [], budgets: [1, 2, 4, 8, 16, 32], speedPrompts: 64, livePrompts: 64, newTokens: 128 },
  quick: { trainPrompts: 192, overrides: ['train.epochs=2'], budgets: [2, 4, 8], speedPrompts: 64, livePrompts: 8, newTokens: 64 },
};

export interface DemoArgs {
  out: string;
  /** The shortened variant (CI). */
  quick: boolean;
  log: (line: string) => void;
  shouldStop: () => boolean;
  progress: (label: string, unit: string) => Progress;
}

/** What <out>/eval-report.json holds: the eval of one checkpoint under one plan. */
interface SavedEval {
  checkpoint: string;
  plan: DemoPlan;
  report: EvalReport;
}

const EXPORTS: ExportFormat[] = ['medusa', 'onnx'];

export async function runDemo(a: DemoArgs): Promise<string> {
  const t0 = performance.now();
  const plan = PLANS[a.quick ? 'quick' : 'full'];
  const out = path.resolve(a.out);
  const backend = await initBackend('auto');
  a.log(`backend: ${backend.detail}`);
  const model = structuredModelPath();
  const lines: string[] = [];
  const stopped = (): string => [...lines, `stopped; rerun \`medusa-train demo${a.quick ? ' --quick' : ''} --out ${a.out}\` to resume`].join('\n');

  // --- 1, 2: greedy self-distillation of the training and the held-out prompts ---
  const distill = async (input: string, dir: string, limit: number | undefined, step: string): Promise<DistillSummary> => {
    a.log(`demo: ${step} distill ${input}${limit !== undefined ? ` (first ${limit})` : ''} with the structured model (greedy) -> ${dir}`);
    const d = await runDistill({
      inputs: [input], format: 'auto', out: dir, model, engine: 'local', urls: [], inFlight: 1, timeoutMs: 60_000, retries: 0, backoffMs: 0,
      // greedy: the heads learn to predict exactly what greedy Medusa decoding will verify
      sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: 256, maxTotalTokens: 512,
      batchSize: 8, backboneEngine: 'auto', shardSize: 64, topk: 0, limit, overwrite: false, log: a.log, progress: a.progress('distill', 'conversations'), shouldStop: a.shouldStop,
    });
    lines.push(formatDistillSummary(d));
    return d;
  };
  const trainData = path.join(out, 'train-data');
  const evalData = path.join(out, 'eval-data');
  const trainLimit = plan.trainPrompts < DEMO_TRAIN_PROMPTS.count ? plan.trainPrompts : undefined;
  if (!(await distill(packagePath(...DEMO_TRAIN_PROMPTS.file), trainData, trainLimit, '1/5')).complete) return stopped();
  if (!(await distill(packagePath(...DEMO_EVAL_PROMPTS), evalData, undefined, '2/5')).complete) return stopped();

  // --- 3: MEDUSA-1 heads ---
  const runName = 'medusa1';
  const runDir = path.join(out, runName);
  const configFile = packagePath('configs', 'demo.yaml');
  const overrides = [`model.path=${JSON.stringify(model)}`, `data.train=${JSON.stringify([trainData])}`, `run.dir=${JSON.stringify(out)}`, `run.name=${runName}`, ...plan.overrides];
  const { config } = loadTrainConfig(configFile, overrides);
  a.log(`demo: 3/5 train MEDUSA-1 heads (${configFile}${plan.overrides.length > 0 ? ` with ${plan.overrides.join(' ')}` : ''}) -> ${runDir}`);
  const s = await runMedusa1({
    config, commandLine: ['medusa-train', 'demo', ...(a.quick ? ['--quick'] : []), '--out', a.out], resume: latestCheckpoint(runDir) !== null,
    log: a.log, progress: a.progress('train', 'steps'), shouldStop: a.shouldStop,
  });
  lines.push(formatMedusa1Summary(s));
  if (s.stopped || a.shouldStop()) return stopped();

  // --- 4: eval on the held-out set (reused when this checkpoint was already evaluated with this plan) ---
  const checkpoint = latestCheckpoint(runDir);
  if (!checkpoint) return fail('E_INTERNAL', `${runDir} has no checkpoint after training`);
  const reportFile = path.join(out, 'eval-report.json');
  let saved = readSavedEval(reportFile);
  const reuse = saved !== null && saved.checkpoint === checkpoint && JSON.stringify(saved.plan) === JSON.stringify(plan);
  if (reuse && saved) {
    a.log(`demo: 4/5 eval: reusing ${reportFile} (same checkpoint)`);
  } else {
    a.log(`demo: 4/5 eval on ${evalData}: per-head accuracy, trees for budgets ${plan.budgets.join(',')}, Medusa vs plain greedy decoding on ${plan.speedPrompts} prompts x ${plan.newTokens} tokens, live accuracy on ${plan.livePrompts}`);
    const ev = (choose?: number, speed = true): Promise<EvalReport> => runEval({
      run: runDir, data: [evalData], budgets: plan.budgets, choose, speedPrompts: speed ? plan.speedPrompts : undefined, speedNewTokens: plan.newTokens,
      livePrompts: speed ? plan.livePrompts : undefined, log: a.log,
    });
    const report = await ev();
    // the tree that decoded fastest here becomes medusa_choices.json (eval wrote the largest budget's)
    const best = report.speed?.best.budget;
    if (best !== undefined && best !== report.chosen.budget) {
      a.log(`demo: budget ${best} decoded fastest: writing its tree as medusa_choices.json`);
      report.chosen = (await ev(best, false)).chosen;
    }
    saved = { checkpoint, plan, report };
    writeFileAtomic(reportFile, [Buffer.from(`${JSON.stringify(saved, null, 2)}\n`)]);
  }
  lines.push(formatEval(saved.report));
  if (a.shouldStop()) return stopped();

  // --- 5: exports, each verified by reloading (redone when the eval was) ---
  const exports: ExportReport[] = [];
  for (const [i, format] of EXPORTS.entries()) {
    const dir = path.join(out, `export-${format}`);
    if (reuse && fs.existsSync(path.join(dir, 'config.json'))) {
      a.log(`demo: 5/5 export ${format}: reusing ${dir}`);
      continue;
    }
    a.log(`demo: 5/5 export ${format} (${i + 1}/${EXPORTS.length}) -> ${dir}`);
    exports.push(await runExport({ run: runDir, format, out: dir, force: true, log: a.log }));
  }
  for (const r of exports) lines.push(`exported ${r.tensors} tensors (${r.dtype}) to ${r.out} in the ${r.format} layout; verified on ${r.verifiedPositions} positions, max |logit difference| ${r.maxAbsDiff}`);

  // --- where everything is ---
  const sp = saved.report.speed;
  const runReport = await writeRunReport(runDir);
  lines.push(
    '',
    `demo${a.quick ? ' --quick' : ''} done in ${((performance.now() - t0) / 1000).toFixed(1)} s (this invocation; base model ${model})`,
    `  datasets:    ${trainData} (training), ${evalData} (held-out prompts)`,
    `  run:         ${runDir} (config.yaml, metrics.jsonl, checkpoints/, medusa_choices.json: budget ${saved.report.chosen.budget})`,
    `  eval report: ${reportFile}; per-step files and the chart in ${path.join(runDir, 'eval')} (speed.svg)`,
    `  run report:  ${runReport.html} (open it in a browser: curves, accuracy tables, tokens/step against tree size; ${runReport.svgs.length} SVG charts beside it)`,
    ...(sp ? [`  best tree:   budget ${sp.best.budget} (${sp.best.nodes} nodes): ${sp.best.measuredTokensPerStep.toFixed(2)} tokens/step, ${sp.best.speedup.toFixed(2)}x plain greedy on ${sp.engine}`] : []),
    `  exports:     ${EXPORTS.map((f) => path.join(out, `export-${f}`)).join(', ')}`,
    `  try:         medusa-train generate --model ${model} --medusa ${runDir} --chat --prompt "Count from 5 to 40."`,
  );
  return lines.join('\n');
}

function readSavedEval(file: string): SavedEval | null {
  if (!fs.existsSync(file)) return null;
  try {
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as Partial<SavedEval>;
    return typeof v.checkpoint === 'string' && v.plan && v.report ? (v as SavedEval) : null;
  } catch {
    return null; // unreadable: evaluate again and overwrite it
  }
}
