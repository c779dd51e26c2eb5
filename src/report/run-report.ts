/**
 * The run report (`medusa-train report`, also written at the end of `train` and `eval`): one
 * self-contained HTML file per run (inline CSS and SVG, no scripts to run, nothing fetched) with the
 * training and eval loss curves, per-head loss and top-1..10 accuracy over steps, the other logged
 * figures (learning rate, gradient norm, tokens/s, MEDUSA-2's lm_loss / lambda / gate checks, ...), the
 * eval accuracy tables (held-out and live decoding), expected and measured tokens per step against tree
 * size, and the run's summary.json and config.yaml. Every chart is also written as an SVG file beside the
 * HTML, and its data (long-form rows naming the metrics.jsonl row and key each point comes from) are
 * embedded in the HTML as `<script type="application/json" id="chart-<name>-data">` so they can be read
 * back and checked; the eval and run files shown are embedded the same way (`eval-accuracy-data`, ...).
 *
 * Inputs (all from the run folder; only metrics.jsonl is required): metrics.jsonl (rows {type, step,
 * ...}; a truncated last line, as a crash leaves, is skipped and said so), summary.json, config.yaml,
 * command.txt, eval/accuracy.json, eval/live-accuracy.json, eval/trees.json, eval/speed.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { parse as parseYaml } from 'yaml';
import { fail } from '../errors.js';
import { writeFileAtomic } from '../io/atomic.js';
import { latestCheckpoint } from '../train/checkpoint.js';
import { VERSION } from '../version.js';
import { chartSvg, type ChartOptions, type ChartRow } from './chart.js';

export interface RunReportFiles {
  /** The HTML file. */
  html: string;
  /** One SVG per chart, beside the HTML (`<html stem>-<chart>.svg`). */
  svgs: string[];
  /** What the report says about its inputs (skipped metrics line, missing eval, stale eval...). */
  notes: string[];
}

/** One metrics.jsonl row: its type (train, eval, gate, ...), its step and the logged figures. */
export interface MetricsRow {
  type: string;
  step: number;
  [key: string]: unknown;
}

/** A chart's embedded data: the rows it plots, each naming its source. */
export interface ChartData {
  id: string;
  title: string;
  source: string;
  rows: ChartRow[];
}

/** A numeric leaf of a metrics row: dotted key (`heads.2.acc.0`) and value (null: NaN/Inf, written as null by JSON). */
export interface MetricLeaf {
  key: string;
  value: number | null;
}

/** Keys of a metrics row that are not plotted: the row's identity, and the gate's copies of its figures with their limits (the gate table shows them). */
const NOT_PLOTTED = new Set(['type', 'step', 'crossed']);
/** Top-level keys drawn on the loss chart. */
const LOSS_KEYS = ['loss', 'lm_loss', 'heads_loss'];

/**
 * Read metrics.jsonl. A last line that does not parse (a crash mid-write) is skipped and reported in
 * `notes`; any other bad line fails naming the file and line.
 */
export function readMetrics(file: string): { rows: MetricsRow[]; notes: string[] } {
  if (!fs.existsSync(file)) fail('E_IO', `${file} does not exist: the run folder has no metrics. Pass a training run folder (it holds metrics.jsonl once train has logged a step).`);
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  while (lines.length > 0 && lines[lines.length - 1].trim() === '') lines.pop();
  const rows: MetricsRow[] = [];
  const notes: string[] = [];
  for (const [i, line] of lines.entries()) {
    if (line.trim() === '') continue;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch (e) {
      if (i === lines.length - 1) {
        notes.push(`${file}: line ${i + 1} (the last) is truncated (${line.length} characters, not valid JSON), as a crash mid-write leaves it; it was skipped.`);
        continue;
      }
      fail('E_IO', `${file}: line ${i + 1} is not valid JSON (${(e as Error).message}); only the last line may be cut short. Fix or delete that line.`);
    }
    const r = v as Partial<MetricsRow> | null;
    if (r === null || typeof r !== 'object' || Array.isArray(r) || typeof r.type !== 'string' || typeof r.step !== 'number' || !Number.isFinite(r.step)) {
      fail('E_IO', `${file}: line ${i + 1} is not a metrics row (an object with a string "type" and a numeric "step").`);
    }
    rows.push(r as MetricsRow);
  }
  if (rows.length === 0) fail('E_IO', `${file} holds no metrics rows: the run folder has no metrics yet (train logs every log.every steps).`);
  return { rows, notes };
}

/** Every numeric leaf of a metrics row except its type and step (dotted keys; array indexes as segments). */
export function metricLeaves(row: MetricsRow): MetricLeaf[] {
  const out: MetricLeaf[] = [];
  const walk = (v: unknown, key: string): void => {
    if (typeof v === 'number') out.push({ key, value: Number.isFinite(v) ? v : null });
    else if (v === null) out.push({ key, value: null });
    else if (Array.isArray(v)) v.forEach((x, i) => walk(x, `${key}.${i}`));
    else if (typeof v === 'object') for (const [k, x] of Object.entries(v as Record<string, unknown>)) walk(x, `${key}.${k}`);
    // strings and booleans (phase, status, message) are not plotted; the tables show them
  };
  for (const [k, v] of Object.entries(row)) if (!NOT_PLOTTED.has(k)) walk(v, k);
  return out;
}

interface Chart {
  data: ChartData;
  options: Omit<ChartOptions, 'rows' | 'title'>;
  caption: string;
}

/** The charts of metrics.jsonl: losses, per-head loss, per-head top-k accuracy, then the other figures of each row type. */
export function metricsCharts(rows: MetricsRow[]): Chart[] {
  const loss: ChartRow[] = [];
  const headLoss: ChartRow[] = [];
  const acc: ChartRow[] = [];
  const figures = new Map<string, ChartRow[]>();
  for (const r of rows) {
    for (const { key, value } of metricLeaves(r)) {
      const base = { x: r.step, y: value, type: r.type, step: r.step, key };
      const head = /^heads\.(\d+)\.(.+)$/.exec(key);
      const rank = head ? /^acc\.(\d+)$/.exec(head[2]) : null;
      if (LOSS_KEYS.includes(key)) loss.push({ ...base, series: `${r.type} ${key}` });
      else if (head && head[2] === 'loss') headLoss.push({ ...base, series: `head ${head[1]}`, dash: r.type });
      else if (head && rank) acc.push({ ...base, series: `top-${Number(rank[1]) + 1}`, dash: r.type, facet: `head ${head[1]}` });
      else {
        const list = figures.get(r.type) ?? [];
        figures.set(r.type, list);
        list.push(head ? { ...base, series: `head ${head[1]}`, facet: `heads[k].${head[2]}` } : { ...base, series: r.type, facet: key });
      }
    }
  }
  const charts: Chart[] = [];
  const src = 'metrics.jsonl';
  if (loss.length > 0) {
    charts.push({
      data: { id: 'loss', title: 'Loss over training steps', source: src, rows: loss },
      options: { xTitle: 'step', integerX: true, yTitle: 'loss', seriesTitle: 'row type and key' },
      caption: 'Training and held-out eval loss (MEDUSA-2 also logs lm_loss and heads_loss: the combined loss is lm_loss + lambda x heads_loss). Eval rows are logged every eval.every steps and at the end.',
    });
  }
  if (headLoss.length > 0) {
    charts.push({
      data: { id: 'head-loss', title: 'Per-head loss over training steps', source: src, rows: headLoss },
      options: { xTitle: 'step', integerX: true, yTitle: 'cross-entropy', seriesTitle: 'head', dashTitle: 'row type' },
      caption: 'Cross-entropy of each head (head k predicts the token k + 2 positions ahead), on the training batch (train) and on the held-out split (eval).',
    });
  }
  if (acc.length > 0) {
    charts.push({
      data: { id: 'head-accuracy', title: 'Per-head top-k accuracy over training steps', source: src, rows: acc },
      options: { xTitle: 'step', integerX: true, yTitle: 'accuracy', seriesTitle: 'top-k', dashTitle: 'row type', orderedSeries: true, facetColumns: 3, width: 300, height: 180 },
      caption: "One panel per head: the fraction of positions where the head's label is within its top-k guesses (k = 1 .. 10), on training batches and on the held-out split.",
    });
  }
  for (const [type, list] of figures) {
    charts.push({
      data: { id: `${slug(type)}-figures`, title: `Other figures of the ${type} rows`, source: src, rows: list },
      options: { xTitle: 'step', integerX: true, yTitle: 'value', seriesTitle: null, independentY: true, facetColumns: 3, width: 260, height: 130 },
      caption: `Every other number of the "${type}" rows of metrics.jsonl, one panel per key (heads[k].valid = positions each head was scored on).`,
    });
  }
  return charts;
}

// --- eval files --------------------------------------------------------------------------------------

const topk = z.array(z.number().nullable());
const AccuracyFile = z.object({ checkpoint: z.string(), conversations: z.number(), heads: z.array(z.object({ valid: z.number(), topk, loss: z.number().nullable() })), per_rank: z.array(topk) });
const LiveFile = z.object({
  checkpoint: z.string(), engine: z.string(), source: z.string(), prompts: z.number(), new_tokens_per_prompt: z.number(), generated_tokens: z.number(), base_agreement: z.number().nullable(),
  heads: z.array(z.object({ valid: z.number(), topk })), per_rank: z.array(topk),
});
const TreesFile = z.array(z.object({ budget: z.number(), expectedTokensPerStep: z.number(), choices: z.array(z.array(z.number())) }));
const SpeedFile = z.object({
  engine: z.string(), prompts: z.number(), newTokens: z.number(), plainTokensPerSecond: z.number(), plainMsPerToken: z.number(),
  rows: z.array(z.object({ budget: z.number(), nodes: z.number(), expectedTokensPerStep: z.number(), measuredTokensPerStep: z.number(), tokensPerSecond: z.number(), speedup: z.number(), msPerStep: z.number(), overheadMsPerStep: z.number(), sameTokens: z.boolean() })),
  best: z.object({ budget: z.number(), nodes: z.number(), speedup: z.number(), measuredTokensPerStep: z.number() }),
});

/** A JSON file of the run checked against its schema; null when absent. */
function readJson<T>(file: string, schema: z.ZodType<T>, fix: string): T | null {
  if (!fs.existsSync(file)) return null;
  let v: unknown;
  try {
    v = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    return fail('E_IO', `${file} is not valid JSON (${(e as Error).message}); ${fix}`);
  }
  const r = schema.safeParse(v);
  if (!r.success) {
    const issue = r.error.issues[0];
    return fail('E_IO', `${file}: ${issue.path.length > 0 ? issue.path.join('.') : '(top level)'}: ${issue.message}; ${fix}`);
  }
  return r.data;
}

interface EvalFiles {
  accuracy: z.infer<typeof AccuracyFile> | null;
  live: z.infer<typeof LiveFile> | null;
  trees: z.infer<typeof TreesFile> | null;
  speed: z.infer<typeof SpeedFile> | null;
}

function readEval(runDir: string): EvalFiles {
  const dir = path.join(runDir, 'eval');
  const fix = `rerun \`medusa-train eval --run ${runDir}\` to write it again.`;
  return {
    accuracy: readJson(path.join(dir, 'accuracy.json'), AccuracyFile, fix),
    live: readJson(path.join(dir, 'live-accuracy.json'), LiveFile, fix),
    trees: readJson(path.join(dir, 'trees.json'), TreesFile, fix),
    speed: readJson(path.join(dir, 'speed.json'), SpeedFile, fix),
  };
}

/** Eval charts: accuracy by top-k per head (held-out and live), and tokens per step against tree size. */
function evalCharts(ev: EvalFiles): Chart[] {
  const charts: Chart[] = [];
  const acc: ChartRow[] = [];
  ev.accuracy?.heads.forEach((h, k) => h.topk.forEach((y, j) => acc.push({ x: j + 1, y, series: `head ${k}`, dash: 'held-out', file: 'eval/accuracy.json', key: `heads.${k}.topk.${j}` })));
  ev.live?.heads.forEach((h, k) => h.topk.forEach((y, j) => acc.push({ x: j + 1, y, series: `head ${k}`, dash: 'live decoding', file: 'eval/live-accuracy.json', key: `heads.${k}.topk.${j}` })));
  if (acc.length > 0) {
    charts.push({
      data: { id: 'eval-accuracy', title: 'Eval accuracy by top-k', source: 'eval/accuracy.json, eval/live-accuracy.json', rows: acc },
      options: { xTitle: 'k', yTitle: 'top-k accuracy', ordinalX: true, seriesTitle: 'head', dashTitle: 'positions', zeroY: true },
      caption: "Top-k accuracy of each head at the evaluated checkpoint: on the held-out conversations (eval/accuracy.json) and on the base model's own greedy decoding (eval/live-accuracy.json, eval --live).",
    });
  }
  const tree: ChartRow[] = [];
  ev.trees?.forEach((t, i) => tree.push({ x: t.budget, y: t.expectedTokensPerStep, series: 'expected tokens/step', file: 'eval/trees.json', key: `${i}.expectedTokensPerStep`, nodes: t.choices.length }));
  ev.speed?.rows.forEach((r, i) => {
    tree.push({ x: r.budget, y: r.measuredTokensPerStep, series: 'measured tokens/step', file: 'eval/speed.json', key: `rows.${i}.measuredTokensPerStep`, nodes: r.nodes });
    tree.push({ x: r.budget, y: r.speedup, series: 'wall-clock speedup', file: 'eval/speed.json', key: `rows.${i}.speedup`, nodes: r.nodes });
  });
  if (tree.length > 0) {
    charts.push({
      data: { id: 'tree-size', title: 'Tokens per step against tree size', source: 'eval/trees.json, eval/speed.json', rows: tree },
      options: { xTitle: 'tree nodes (budget)', yTitle: 'tokens per step / speedup', ordinalX: true, seriesTitle: null },
      caption: 'Expected tokens per Medusa step of the tree fitted for each node budget (independent heads, eval/trees.json), and, with eval --speed, the tokens per step measured in real Medusa greedy decoding and the wall-clock speedup over plain greedy decoding (eval/speed.json).',
    });
  }
  return charts;
}

// --- HTML --------------------------------------------------------------------------------------------

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function slug(s: string): string {
  return s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '') || 'rows';
}

/** JSON safe inside a <script> element (no "</script>", no "<!--"): every "<" escaped. */
function jsonBlock(id: string, v: unknown): string {
  return `<script type="application/json" id="${esc(id)}">${JSON.stringify(v).replace(/</g, '\\u003c')}</script>`;
}

function num(x: number | null | undefined, digits = 4): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return 'n/a';
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

/** A table cell showing `text`, with the exact number in data-value. */
function cell(x: number | null, text: string): string {
  return `<td data-value="${x === null ? 'null' : String(x)}">${esc(text)}</td>`;
}

const pct = (x: number | null): string => cell(x, x === null ? 'n/a' : `${(100 * x).toFixed(1)}%`);

function accuracyTable(id: string, heads: { valid: number; topk: (number | null)[]; loss?: number | null }[]): string {
  const K = Math.max(0, ...heads.map((h) => h.topk.length));
  const hasLoss = heads.some((h) => h.loss !== undefined);
  const head = `<tr><th>head</th><th>positions</th>${hasLoss ? '<th>loss</th>' : ''}${Array.from({ length: K }, (_, j) => `<th>top-${j + 1}</th>`).join('')}</tr>`;
  const body = heads.map((h, k) => `<tr><th>${k}</th>${cell(h.valid, String(h.valid))}${hasLoss ? cell(h.loss ?? null, num(h.loss ?? null)) : ''}${h.topk.map(pct).join('')}</tr>`).join('\n');
  return `<table id="${esc(id)}" class="num">\n${head}\n${body}\n</table>`;
}

/** Scalars of an object as a key/value table (nested objects and arrays are in the JSON below it). */
function scalarTable(o: Record<string, unknown>): string {
  const rows = Object.entries(o).filter(([, v]) => v === null || ['string', 'number', 'boolean'].includes(typeof v));
  return `<table class="kv">${rows.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(typeof v === 'number' ? num(v) : String(v))}</td></tr>`).join('')}</table>`;
}

const CSS = `
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.notes { background: #fff4d6; border: 1px solid #e0c060; padding: .5em 1em; }
figure { margin: 1.5em 0; overflow-x: auto; } figcaption { color: #555; font-size: .9em; max-width: 900px; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .2em .6em; text-align: left; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
.muted { color: #666; }
`;

/**
 * Write the run's report: `<out>` (default `<runDir>/report.html`) and one SVG per chart beside it.
 * Fails (E_IO, naming the file) when the run has no metrics or a run file is unreadable.
 */
export async function writeRunReport(runDir: string, opts: { out?: string } = {}): Promise<RunReportFiles> {
  if (!fs.existsSync(runDir) || !fs.statSync(runDir).isDirectory()) fail('E_IO', `${runDir} is not a folder: pass a training run folder (<run.dir>/<run.name>).`);
  const metricsFile = path.join(runDir, 'metrics.jsonl');
  const { rows, notes } = readMetrics(metricsFile);
  const summaryFile = path.join(runDir, 'summary.json');
  const summary = readJson(summaryFile, z.record(z.string(), z.unknown()), 'it is rewritten at the end of `medusa-train train` (rerun with --resume).');
  const configFile = path.join(runDir, 'config.yaml');
  const configText = fs.existsSync(configFile) ? fs.readFileSync(configFile, 'utf8') : null;
  let config: Record<string, unknown> | null = null;
  if (configText !== null) {
    try {
      const v: unknown = parseYaml(configText);
      config = v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
    } catch (e) {
      fail('E_IO', `${configFile} is not valid YAML (${(e as Error).message}); it is written by train: rerun with --resume to write it again.`);
    }
  }
  const commandFile = path.join(runDir, 'command.txt');
  const command = fs.existsSync(commandFile) ? fs.readFileSync(commandFile, 'utf8').trim() : null;
  const ev = readEval(runDir);

  const recipe = typeof summary?.['recipe'] === 'string' ? (summary['recipe'] as string) : typeof config?.['recipe'] === 'string' ? (config['recipe'] as string) : 'unknown';
  if (!summary) notes.push(`${summaryFile} does not exist: the run has not finished (or crashed); the curves show what metrics.jsonl holds.`);
  if (!configText) notes.push(`${configFile} does not exist.`);
  if (!rows.some((r) => r.type === 'eval')) notes.push('metrics.jsonl has no eval rows (no held-out split: data.eval_fraction or data.eval_max is 0, or no eval step yet).');
  const latest = latestCheckpoint(runDir);
  const evaluated = ev.accuracy?.checkpoint ?? null;
  if (evaluated && latest && path.resolve(evaluated) !== path.resolve(latest)) notes.push(`the eval files are of ${evaluated}; the latest checkpoint is ${latest} (rerun \`medusa-train eval --run ${runDir}\`).`);

  const charts = [...metricsCharts(rows), ...evalCharts(ev)];
  const html = path.resolve(opts.out ?? path.join(runDir, 'report.html'));
  const stem = path.join(path.dirname(html), path.basename(html).replace(/\.html?$/i, ''));
  fs.mkdirSync(path.dirname(html), { recursive: true });
  const svgText = new Map<string, string>();
  const svgs: string[] = [];
  for (const c of charts) {
    let svg = await chartSvg({ ...c.options, title: c.data.title, rows: c.data.rows });
    // ids inside an inline SVG are document-wide: keep each chart's own
    svg = svg.replace(/\bid="([^"]+)"/g, `id="${c.data.id}-$1"`).replace(/url\(#([^)]+)\)/g, `url(#${c.data.id}-$1)`);
    svgText.set(c.data.id, svg);
    const file = `${stem}-${c.data.id}.svg`;
    writeFileAtomic(file, [Buffer.from(svg)]);
    svgs.push(file);
  }

  const name = path.basename(path.resolve(runDir));
  const figure = (c: Chart): string => [
    `<figure id="chart-${c.data.id}">`,
    svgText.get(c.data.id)!,
    `<figcaption>${esc(c.caption)} <span class="muted">Data: ${esc(c.data.source)}; SVG: ${esc(path.basename(`${stem}-${c.data.id}.svg`))}.</span></figcaption>`,
    jsonBlock(`chart-${c.data.id}-data`, c.data),
    '</figure>',
  ].join('\n');
  const trainCharts = charts.filter((c) => c.data.source === 'metrics.jsonl');
  const evalChartList = charts.filter((c) => c.data.source !== 'metrics.jsonl');
  const counts = [...new Set(rows.map((r) => r.type))].map((t) => `${rows.filter((r) => r.type === t).length} ${t}`).join(', ');
  const parts: string[] = [
    '<!doctype html>',
    '<html lang="en"><head><meta charset="utf-8">',
    `<title>medusa-train run report: ${esc(name)}</title>`,
    `<style>${CSS}</style>`,
    '</head><body>',
    `<h1>Run report: ${esc(name)}</h1>`,
    `<p class="muted">Run folder ${esc(path.resolve(runDir))}; recipe ${esc(recipe)}; metrics.jsonl: ${rows.length} rows (${esc(counts)}), steps ${rows[0].step} to ${rows[rows.length - 1].step}. Written ${esc(new Date().toISOString())} by medusa-train ${esc(VERSION)}.</p>`,
  ];
  if (notes.length > 0) parts.push(`<div class="notes" id="notes"><strong>Notes</strong><ul>${notes.map((n) => `<li>${esc(n)}</li>`).join('')}</ul></div>`);

  parts.push('<h2>Summary</h2>');
  if (summary) parts.push(scalarTable(summary), `<details><summary>summary.json</summary><pre>${esc(JSON.stringify(summary, null, 2))}</pre></details>`, jsonBlock('summary-data', summary));
  else parts.push('<p>No summary.json.</p>');

  parts.push('<h2>Training</h2>', ...trainCharts.map(figure));
  const gates = rows.filter((r) => r.type === 'gate');
  if (gates.length > 0) {
    parts.push(
      '<h3 id="gate">Base-quality gate checks (MEDUSA-2)</h3>',
      '<table class="num"><tr><th>step</th><th>status</th><th>mean KL</th><th>agreement</th><th>ppl ratio</th><th>positions</th><th>message</th></tr>',
      ...gates.map((g) => `<tr><td>${g.step}</td><td>${esc(String(g['status'] ?? ''))}</td><td>${num(g['meanKl'] as number, 6)}</td><td>${num(g['agreement'] as number)}</td><td>${num(g['pplRatio'] as number)}</td><td>${num(g['positions'] as number)}</td><td style="text-align:left">${esc(String(g['message'] ?? ''))}</td></tr>`),
      '</table>',
    );
  }

  parts.push('<h2>Evaluation</h2>');
  if (!ev.accuracy && !ev.live && !ev.trees && !ev.speed) {
    parts.push(`<p>No eval files yet (eval/accuracy.json, eval/trees.json, ...): run <code>medusa-train eval --run ${esc(runDir)} --speed 8 --live 8</code>, then <code>medusa-train report --run ${esc(runDir)}</code>.</p>`);
  }
  if (ev.accuracy) {
    parts.push(`<h3>Held-out accuracy</h3><p class="muted">${ev.accuracy.conversations} conversations, checkpoint ${esc(ev.accuracy.checkpoint)} (eval/accuracy.json).</p>`, accuracyTable('accuracy-table', ev.accuracy.heads), jsonBlock('eval-accuracy-data', ev.accuracy));
  }
  if (ev.live) {
    const l = ev.live;
    parts.push(`<h3>Accuracy on live greedy decoding</h3><p class="muted">${l.prompts} prompts from ${esc(l.source)}, ${l.generated_tokens} greedy tokens on the ${esc(l.engine)} backbone; base lm_head agreement ${num(l.base_agreement)} (eval/live-accuracy.json).</p>`, accuracyTable('live-accuracy-table', l.heads), jsonBlock('eval-live-accuracy-data', l));
  }
  if (ev.trees || ev.speed) {
    parts.push('<h3>Trees</h3>');
    if (ev.speed) {
      const s = ev.speed;
      parts.push(
        `<p class="muted">Medusa greedy decoding against plain greedy decoding: ${esc(s.engine)} backbone, batch 1, ${s.prompts} prompts x ${s.newTokens} tokens; plain ${num(s.plainTokensPerSecond, 1)} tok/s (${num(s.plainMsPerToken, 2)} ms/token). Best: budget ${s.best.budget} (${s.best.nodes} nodes), ${num(s.best.speedup, 2)}x, ${num(s.best.measuredTokensPerStep, 2)} tokens/step.</p>`,
        '<table id="speed-table" class="num"><tr><th>budget</th><th>nodes</th><th>expected tokens/step</th><th>measured tokens/step</th><th>tok/s</th><th>speedup</th><th>ms/step</th><th>overhead ms/step</th><th>same tokens as greedy</th></tr>',
        ...s.rows.map((r) => `<tr>${cell(r.budget, String(r.budget))}${cell(r.nodes, String(r.nodes))}${cell(r.expectedTokensPerStep, num(r.expectedTokensPerStep, 3))}${cell(r.measuredTokensPerStep, num(r.measuredTokensPerStep, 3))}${cell(r.tokensPerSecond, num(r.tokensPerSecond, 1))}${cell(r.speedup, num(r.speedup, 2))}${cell(r.msPerStep, num(r.msPerStep, 2))}${cell(r.overheadMsPerStep, num(r.overheadMsPerStep, 2))}<td>${r.sameTokens ? 'yes' : 'NO'}</td></tr>`),
        '</table>',
        jsonBlock('eval-speed-data', s),
      );
    } else if (ev.trees) {
      parts.push(
        '<table id="trees-table" class="num"><tr><th>budget</th><th>nodes</th><th>expected tokens/step</th></tr>',
        ...ev.trees.map((t) => `<tr>${cell(t.budget, String(t.budget))}${cell(t.choices.length, String(t.choices.length))}${cell(t.expectedTokensPerStep, num(t.expectedTokensPerStep, 3))}</tr>`),
        '</table>',
      );
    }
    if (ev.trees) parts.push(jsonBlock('eval-trees-data', ev.trees));
  }
  parts.push(...evalChartList.map(figure));

  parts.push('<h2>Config</h2>');
  if (command) parts.push(`<p>Command line: <code>${esc(command)}</code></p>`);
  if (configText) parts.push(`<pre id="config-yaml">${esc(configText)}</pre>`, jsonBlock('config-data', config));
  else parts.push('<p>No config.yaml.</p>');
  parts.push('</body></html>', '');
  writeFileAtomic(html, [Buffer.from(parts.join('\n'))]);
  return { html, svgs, notes };
}
