/**
 * The run report (src/report/run-report.ts) on real runs: a MEDUSA-1 run (distill + configs/tiny.yaml on
 * the embedded tiny model) with an eval (--speed, --live), and a short MEDUSA-2 run without eval. The
 * HTML's embedded chart data are read back and checked against metrics.jsonl row by row (every numeric
 * key, exact numbers, no extra points), the accuracy tables against eval/*.json, no external URLs, the
 * SVGs exist with their titles; a truncated last metrics line is reported, not fatal; a folder without
 * metrics or with a corrupt middle line is a clear error naming the file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from './helpers/cli.js';
import { tinyDistill } from './helpers/tiny-run.js';

let tmp: string;
let m1: string;
let m2: string;
let trainOut: string;
let evalOut: string;

beforeAll(async () => {
  let data: string;
  ({ tmp, data } = await tinyDistill('medusa-report-'));
  const dataSet = `data.train=${JSON.stringify([data])}`;
  const t = await run('train', '--config', 'configs/tiny.yaml', '--set', dataSet, '--set', `run.dir=${tmp}`, '--set', 'run.name=medusa1', '--set', 'log.every=2', '--set', 'eval.every=5', '--no-progress', '--no-plan');
  expect(t.code).toBe(0);
  trainOut = t.out;
  m1 = path.join(tmp, 'medusa1');
  const e = await run('eval', '--run', m1, '--budgets', '2,8', '--speed', '2', '--live', '2', '--new-tokens', '8');
  expect(e.code).toBe(0);
  evalOut = e.out;
  // MEDUSA-2 on the same data: lm_loss, heads_loss, lambda, heads_lr and gate rows; no eval files
  const t2 = await run('train', '--config', 'configs/medusa2-tiny.yaml', '--set', 'model.path=null', '--set', dataSet, '--set', `run.dir=${tmp}`, '--set', 'run.name=medusa2',
    '--set', 'loss.lm_loss=ce', '--set', 'train.max_steps=4', '--set', 'medusa2.heads_warmup_steps=2', '--set', 'eval.every=2', '--set', 'log.every=1', '--set', 'checkpoint.every=2',
    '--set', 'medusa2.gate.action=warn', '--no-progress', '--no-plan', '--json');
  expect(t2.code).toBe(0);
  JSON.parse(t2.out); // --json: stdout stays JSON, the report's path goes to stderr
  expect(t2.err).toContain(`report: ${path.join(m2Dir(), 'report.html')}`);
  m2 = m2Dir();
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function m2Dir(): string {
  return path.join(tmp, 'medusa2');
}

/** The JSON blocks of the HTML by id. */
function blocks(html: string): Map<string, unknown> {
  const out = new Map<string, unknown>();
  for (const m of html.matchAll(/<script type="application\/json" id="([^"]+)">([\s\S]*?)<\/script>/g)) out.set(m[1], JSON.parse(m[2]));
  return out;
}

interface Row { x: number; y: number | null; type?: string; step?: number; key: string; series: string; file?: string }
interface Block { id: string; title: string; source: string; rows: Row[] }

/** Every number of a metrics row, flattened here independently of the report: "heads.1.acc.3" -> value. */
function numbers(row: Record<string, unknown>): Map<string, number | null> {
  const out = new Map<string, number | null>();
  const walk = (v: unknown, key: string): void => {
    if (typeof v === 'number' || v === null) out.set(key, v);
    else if (Array.isArray(v)) v.forEach((x, i) => walk(x, `${key}.${i}`));
    else if (typeof v === 'object') Object.entries(v as object).forEach(([k, x]) => walk(x, `${key}.${k}`));
  };
  Object.entries(row).forEach(([k, v]) => {
    if (k !== 'type' && k !== 'step' && k !== 'crossed') walk(v, k);
  });
  return out;
}

/** Check the chart data against metrics.jsonl: every numeric key of every row, exact, and no other point. */
function checkAgainstMetrics(runDir: string, html: string): { keys: Set<string>; types: Set<string> } {
  const charts = [...blocks(html).entries()].filter(([id]) => id.startsWith('chart-')).map(([, v]) => v as Block);
  const plotted = new Map<string, number | null>();
  for (const c of charts.filter((c) => c.source === 'metrics.jsonl')) {
    for (const r of c.rows) {
      const id = `${r.type}|${r.step}|${r.key}`;
      expect(plotted.has(id)).toBe(false); // each number once
      expect(r.x).toBe(r.step);
      plotted.set(id, r.y);
    }
  }
  const lines = fs.readFileSync(path.join(runDir, 'metrics.jsonl'), 'utf8').trim().split('\n');
  const keys = new Set<string>();
  const types = new Set<string>();
  let expected = 0;
  for (const line of lines) {
    const row = JSON.parse(line) as Record<string, unknown>;
    types.add(row['type'] as string);
    for (const [k, v] of numbers(row)) {
      keys.add(`${row['type']}:${k.replace(/\.\d+/g, '.*')}`);
      const id = `${row['type']}|${row['step']}|${k}`;
      expect([id, plotted.get(id)]).toEqual([id, v]);
      expected++;
    }
  }
  expect(plotted.size).toBe(expected);
  return { keys, types };
}

describe('MEDUSA-1 run with eval', () => {
  test('train and eval print the report; the charts hold every number of metrics.jsonl, row by row', () => {
    const html = path.join(m1, 'report.html');
    expect(trainOut).toContain(`report: ${html}`);
    expect(evalOut).toContain(`report: ${html}`);
    const text = fs.readFileSync(html, 'utf8');
    const { keys, types } = checkAgainstMetrics(m1, text);
    expect([...types].sort()).toEqual(['eval', 'train']);
    for (const k of ['train:loss', 'train:lr', 'train:grad_norm', 'train:tokens', 'train:tokens_per_s', 'train:epoch', 'train:heads.*.loss', 'train:heads.*.acc.*', 'train:heads.*.valid', 'eval:loss', 'eval:heads.*.acc.*']) expect(keys).toContain(k);
  });

  test('the accuracy tables and the tree chart are eval/*.json', () => {
    const text = fs.readFileSync(path.join(m1, 'report.html'), 'utf8');
    const b = blocks(text);
    const acc = JSON.parse(fs.readFileSync(path.join(m1, 'eval', 'accuracy.json'), 'utf8'));
    const live = JSON.parse(fs.readFileSync(path.join(m1, 'eval', 'live-accuracy.json'), 'utf8'));
    const trees = JSON.parse(fs.readFileSync(path.join(m1, 'eval', 'trees.json'), 'utf8'));
    const speed = JSON.parse(fs.readFileSync(path.join(m1, 'eval', 'speed.json'), 'utf8'));
    expect(b.get('eval-accuracy-data')).toEqual(acc);
    expect(b.get('eval-live-accuracy-data')).toEqual(live);
    expect(b.get('eval-trees-data')).toEqual(trees);
    expect(b.get('eval-speed-data')).toEqual(speed);
    // the table cells carry the exact numbers: positions, loss, top-1..10 of each head
    const table = (id: string): (number | null)[][] => {
      const t = new RegExp(`<table id="${id}"[^>]*>([\\s\\S]*?)</table>`).exec(text);
      expect(t).not.toBeNull();
      return [...t![1].matchAll(/<tr>([\s\S]*?)<\/tr>/g)].slice(1).map((r) => [...r[1].matchAll(/data-value="([^"]+)"/g)].map((m) => (m[1] === 'null' ? null : Number(m[1]))));
    };
    expect(table('accuracy-table')).toEqual(acc.heads.map((h: { valid: number; loss: number; topk: number[] }) => [h.valid, h.loss, ...h.topk]));
    expect(table('live-accuracy-table')).toEqual(live.heads.map((h: { valid: number; topk: number[] }) => [h.valid, ...h.topk]));
    expect(table('speed-table')).toEqual(speed.rows.map((r: Record<string, number>) => [r.budget, r.nodes, r.expectedTokensPerStep, r.measuredTokensPerStep, r.tokensPerSecond, r.speedup, r.msPerStep, r.overheadMsPerStep]));
    // the shown percentages are the numbers
    expect(text).toContain(`>${(100 * acc.heads[0].topk[0]).toFixed(1)}%</td>`);
    // tokens per step against tree size: expected from trees.json, measured and speedup from speed.json
    const tree = b.get('chart-tree-size-data') as Block;
    const series = (name: string): [number, number | null][] => tree.rows.filter((r) => r.series === name).map((r) => [r.x, r.y]);
    expect(series('expected tokens/step')).toEqual(trees.map((t: { budget: number; expectedTokensPerStep: number }) => [t.budget, t.expectedTokensPerStep]));
    expect(series('measured tokens/step')).toEqual(speed.rows.map((r: { budget: number; measuredTokensPerStep: number }) => [r.budget, r.measuredTokensPerStep]));
    expect(series('wall-clock speedup')).toEqual(speed.rows.map((r: { budget: number; speedup: number }) => [r.budget, r.speedup]));
    const byK = b.get('chart-eval-accuracy-data') as Block;
    expect(byK.rows.filter((r) => r.file === 'eval/accuracy.json').map((r) => r.y)).toEqual(acc.heads.flatMap((h: { topk: number[] }) => h.topk));
    expect(byK.rows.filter((r) => r.file === 'eval/live-accuracy.json').map((r) => r.y)).toEqual(live.heads.flatMap((h: { topk: number[] }) => h.topk));
    // the run's config and summary
    expect(text).toContain('<pre id="config-yaml">');
    expect(b.get('summary-data')).toEqual(JSON.parse(fs.readFileSync(path.join(m1, 'summary.json'), 'utf8')));
    expect((b.get('config-data') as { recipe: string }).recipe).toBe('medusa1');
  });

  test('self-contained: no external URL, no script or stylesheet to fetch; the SVGs exist beside it with their titles', () => {
    const text = fs.readFileSync(path.join(m1, 'report.html'), 'utf8');
    expect(text).not.toMatch(/\b(src|href)\s*=\s*["']?\s*(https?:)?\/\//i);
    expect(text).not.toMatch(/<script\b[^>]*\bsrc=/i);
    expect(text).not.toMatch(/<link\b/i);
    expect(text).not.toMatch(/@import|url\(\s*["']?https?:/i);
    // the only URLs are SVG namespace names (never fetched)
    expect(text.replace(/\bxmlns(:\w+)?="[^"]*"/g, '')).not.toMatch(/https?:\/\//);
    const charts = [...blocks(text).entries()].filter(([id]) => id.startsWith('chart-')).map(([, v]) => v as Block);
    expect(charts.map((c) => c.id)).toEqual(['loss', 'head-loss', 'head-accuracy', 'train-figures', 'eval-figures', 'eval-accuracy', 'tree-size']);
    for (const c of charts) {
      const svg = fs.readFileSync(path.join(m1, `report-${c.id}.svg`), 'utf8');
      expect(svg.startsWith('<svg')).toBe(true);
      expect(svg).toContain(`>${c.title}</text>`);
      expect(text).toContain(svg); // the same SVG inline
    }
  });
});

describe('MEDUSA-2 run without eval', () => {
  test('lm_loss, heads_loss, lambda, heads_lr and the gate figures are all charted; the gate table; no eval section', () => {
    const text = fs.readFileSync(path.join(m2, 'report.html'), 'utf8');
    const { keys, types } = checkAgainstMetrics(m2, text);
    expect([...types].sort()).toEqual(['eval', 'gate', 'train']);
    for (const k of ['train:lm_loss', 'train:heads_loss', 'train:lambda', 'train:heads_lr', 'eval:heads_loss', 'gate:meanKl', 'gate:agreement', 'gate:pplRatio', 'gate:positions']) expect(keys).toContain(k);
    expect(text).toContain('Base-quality gate checks');
    expect(text).toContain('No eval files yet');
    expect(blocks(text).has('eval-accuracy-data')).toBe(false);
    expect((blocks(text).get('summary-data') as { recipe: string }).recipe).toBe('medusa2');
  });
});

describe('damaged and empty run folders', () => {
  const copyRun = (name: string): string => {
    const dir = path.join(tmp, name);
    fs.cpSync(m1, dir, { recursive: true });
    return dir;
  };

  test('a truncated last metrics line (a crash mid-write) is skipped and said so; the report is still written', async () => {
    const dir = copyRun('truncated');
    const file = path.join(dir, 'metrics.jsonl');
    const full = fs.readFileSync(file, 'utf8');
    const cut = '{"type":"train","step":999,"epoch":3,"loss":1.25,"heads":[{"loss":0.5,"acc":[0.1,0.2';
    fs.writeFileSync(file, full + cut);
    const out = path.join(tmp, 'elsewhere', 'r.html');
    const r = await run('report', '--run', dir, '--out', out);
    expect(r.code).toBe(0);
    expect(r.out).toContain(`report: ${out}`);
    expect(r.out).toMatch(/note: .*metrics\.jsonl: line \d+ \(the last\) is truncated/);
    const text = fs.readFileSync(out, 'utf8');
    expect(text).toMatch(/<div class="notes"[\s\S]*line \d+ \(the last\) is truncated/);
    // the complete rows are all there, the cut one is not
    fs.writeFileSync(file, full);
    checkAgainstMetrics(dir, text);
    expect(text).not.toContain('"step":999');
    expect(fs.existsSync(path.join(tmp, 'elsewhere', 'r-loss.svg'))).toBe(true);
  });

  test('no metrics, or a bad line before the last: a clear error naming the file', async () => {
    const empty = path.join(tmp, 'empty-run');
    fs.mkdirSync(empty);
    const r = await run('report', '--run', empty);
    expect(r.code).not.toBe(0);
    expect(r.err).toContain('error [E_IO]');
    expect(r.err).toContain(path.join(empty, 'metrics.jsonl'));
    expect(r.err).toContain('no metrics');
    expect(r.err).not.toMatch(/\n\s+at /);
    const dir = copyRun('corrupt');
    const file = path.join(dir, 'metrics.jsonl');
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    lines[1] = lines[1].slice(0, 20);
    fs.writeFileSync(file, lines.join('\n'));
    const c = await run('report', '--run', dir);
    expect(c.code).not.toBe(0);
    expect(c.err).toContain(`${file}: line 2 is not valid JSON`);
    const missing = await run('report', '--run', path.join(tmp, 'no-such-run'));
    expect(missing.err).toContain('no-such-run is not a folder');
  });
});
