/**
 * The training configuration: a YAML file (configs/*.yaml) plus `--set a.b.c=value` overrides, validated
 * against one strict zod schema into a fully resolved `TrainConfig`.
 *
 * The resolved object keeps the YAML's snake_case keys, so what is saved in the run folder
 * (`config.yaml`) is exactly what a user would write, and loads back to the same config. Every problem
 * (YAML values, unknown keys, bad overrides) is collected and reported in ONE `E_CONFIG` error, one line
 * per problem: `  - <yaml.path>: <problem>`, with the file line or the `--set` option it came from.
 * Every key is documented in docs/CONFIG.md.
 *
 * Imports: errors, yaml, zod and Node builtins only (data flow: cli -> config -> recipes).
 */
import { createHash } from 'node:crypto';
import { writeFileAtomic } from './io/atomic.js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import YAML, { isMap, isScalar, isSeq, type Node as YamlNode } from 'yaml';
import { z } from 'zod';
import { fail, describe as describeError } from './errors.js';
import { VERSION } from './version.js';

/** Config files larger than this are refused (a real config is a few KiB). */
export const CONFIG_FILE_LIMIT = 1024 * 1024;

// ---------------------------------------------------------------------------------------------------
// Schema

/** What a key accepts (used in error messages) and what it does (used in the saved config's comments). */
interface FieldInfo {
  expects: string;
  doc: string;
}
const fieldInfo = z.registry<FieldInfo>();

function field<T extends z.ZodType>(schema: T, expects: string, doc: string): T {
  fieldInfo.add(schema, { expects, doc });
  return schema;
}

const int = (min: number, max: number = Number.MAX_SAFE_INTEGER) => z.number().int().min(min).max(max);
const bool = (def: boolean, doc: string) => field(z.boolean().default(def), 'true or false', doc);
const enumOf = <const T extends readonly [string, ...string[]]>(values: T, def: T[number], doc: string) =>
  field(z.enum(values).default(def as never), `one of ${values.join(' | ')}`, doc);

/** A folder name: not empty, no path separators or control characters, not `.` / `..`. */
const folderName = z
  .string()
  .min(1)
  .max(255)
  .refine((s) => !/[/\\\u0000-\u001f\u007f]/.test(s) && s !== '.' && s !== '..');

const runShape = {
  name: field(
    folderName.nullable().default(null),
    'a folder name (no slashes, at most 255 characters) or null',
    'run folder name; null = "<recipe>-<model folder name>" ("<recipe>-tiny" for the embedded model)',
  ),
  dir: field(z.string().min(1).default('runs'), 'a non-empty folder path', 'parent folder of runs: the run folder is <dir>/<name>'),
  seed: field(int(0, 2 ** 32 - 1).default(0), 'an integer in [0, 4294967295]', 'seed for head initialisation, shuffling and the eval split'),
};

const modelShape = {
  path: field(
    z.string().min(1).nullable().default(null),
    'a folder path or null',
    'Hugging Face model folder (config.json, safetensors, tokenizer); null = the embedded tiny model',
  ),
  backend: enumOf(['auto', 'native', 'wasm', 'cpu'], 'auto', 'TensorFlow.js backend: auto = native if installed, else wasm, else cpu'),
  engine: enumOf(['auto', 'tfjs', 'onnx'], 'auto', "engine for the hot paths (the frozen backbone's forward, the heads' training step): auto = onnx (onnxruntime, native CPU speed) when it loads, else tfjs"),
};

const dataShape = {
  train: field(
    z.array(z.string().min(1)).min(1).prefault([]),
    'a list of dataset folders, e.g. [runs/my-distill]',
    'dataset folders written by `medusa-train distill --out <dir>`; at least one',
  ),
  eval_fraction: field(z.number().min(0).max(0.5).default(0.05), 'a number in [0, 0.5]', 'fraction of conversations held out for evaluation'),
  eval_max: field(int(0).default(256), 'an integer >= 0', 'at most this many held-out conversations'),
  max_seq_len: field(int(8, 1_048_576).default(2048), 'an integer in [8, 1048576]', 'longer conversations are truncated to this many tokens'),
  batch_size: field(int(1, 4096).default(4), 'an integer in [1, 4096]', 'sequences per micro-batch'),
  shuffle: bool(true, 'shuffle the training batches every epoch (seeded)'),
  group_by_length: bool(true, 'batch sequences of similar length together so little is spent on padding'),
};

const headsShape = {
  num_heads: field(int(1, 16).default(3), 'an integer in [1, 16]', 'Medusa heads; head k predicts the token k+1 positions ahead of the next one'),
  num_layers: field(int(1, 8).default(1), 'an integer in [1, 8]', 'residual SiLU blocks per head'),
  lm_head: enumOf(
    ['per_head', 'shared'],
    'per_head',
    'per_head = each head trains its own vocabulary projection, initialised from the base lm_head ("v1"); shared = all heads use the frozen base lm_head ("v2", much less memory)',
  ),
};

const lossShape = {
  decay: field(z.number().gt(0).max(1).default(0.8), 'a number in (0, 1]', 'head k (from 0) is weighted decay^k'),
  heads_coefficient: field(z.number().gt(0).max(100).default(1.0), 'a number in (0, 100]', 'multiplier of the summed heads loss'),
  chunk_rows: field(int(1, 1_048_576).default(512), 'an integer in [1, 1048576]', 'rows of vocabulary logits computed at once (bounds memory)'),
};

const beta = z.number().min(0).lt(1);
const trainShape = {
  epochs: field(int(1, 1000).default(1), 'an integer in [1, 1000]', 'passes over the training data (ignored when max_steps is set)'),
  max_steps: field(int(1).nullable().default(null), 'an integer >= 1 or null', 'optimizer steps to run; null = as many as epochs give'),
  lr: field(z.number().gt(0).max(1).default(1e-3), 'a number in (0, 1]', 'peak learning rate (AdamW)'),
  weight_decay: field(z.number().min(0).max(1).default(0), 'a number in [0, 1]', 'AdamW decoupled weight decay'),
  betas: field(z.tuple([beta, beta]).default([0.9, 0.999]), 'a list [beta1, beta2], each in [0, 1)', 'AdamW moment decay rates'),
  eps: field(z.number().gt(0).lt(1).default(1e-8), 'a number in (0, 1)', 'AdamW epsilon'),
  schedule: enumOf(['cosine', 'linear', 'constant'], 'cosine', 'learning-rate decay after warmup'),
  warmup_ratio: field(z.number().min(0).max(1).default(0.1), 'a number in [0, 1]', 'fraction of the steps with linear warmup from 0'),
  grad_accum: field(int(1, 4096).default(1), 'an integer in [1, 4096]', 'micro-batches per optimizer step'),
  max_grad_norm: field(z.number().gt(0).nullable().default(1.0), 'a number > 0 or null', 'clip the global gradient norm to this; null = no clipping'),
  cache_hidden_states: enumOf(
    ['none', 'memory', 'disk'],
    'none',
    "keep the frozen backbone's hidden states after the first epoch instead of recomputing them (none | memory | disk in the run folder)",
  ),
  cache_dtype: enumOf(['f16', 'f32'], 'f16', 'precision of cached hidden states (only used when caching)'),
};

const checkpointShape = {
  every: field(int(1).default(200), 'an integer >= 1', 'save a checkpoint every this many steps (and at the end)'),
  keep: field(int(1).default(3), 'an integer >= 1', 'keep only the newest this many checkpoints'),
};

const evalShape = {
  every: field(int(1).default(200), 'an integer >= 1', 'evaluate every this many steps (and at the end)'),
};

const logShape = {
  every: field(int(1).default(1), 'an integer >= 1', 'steps between metrics lines'),
};

/** Keys of each section, in the order they are written. */
const SECTION_SHAPES = {
  run: runShape,
  model: modelShape,
  data: dataShape,
  heads: headsShape,
  loss: lossShape,
  train: trainShape,
  checkpoint: checkpointShape,
  eval: evalShape,
  log: logShape,
} as const;

const SECTION_DOCS: Record<keyof typeof SECTION_SHAPES, string> = {
  run: 'where the run is written',
  model: 'the base model (frozen)',
  data: 'training data',
  heads: 'Medusa heads',
  loss: 'training loss',
  train: 'optimizer and schedule',
  checkpoint: 'checkpoints in <run>/checkpoints',
  eval: 'evaluation on the held-out conversations',
  log: 'metrics in <run>/metrics.jsonl and on the terminal',
};

const recipeSchema = field(z.literal('medusa1').default('medusa1'), 'medusa1', 'training recipe: medusa1 = frozen backbone, train only the heads');

/** The schema before derived values (run.name) are filled in. */
const TrainConfigObject = z.strictObject({
  recipe: recipeSchema,
  run: z.strictObject(runShape).prefault({}),
  model: z.strictObject(modelShape).prefault({}),
  data: z.strictObject(dataShape).prefault({}),
  heads: z.strictObject(headsShape).prefault({}),
  loss: z.strictObject(lossShape).prefault({}),
  train: z.strictObject(trainShape).prefault({}),
  checkpoint: z.strictObject(checkpointShape).prefault({}),
  eval: z.strictObject(evalShape).prefault({}),
  log: z.strictObject(logShape).prefault({}),
});

/** The default run name: `<recipe>-<model folder basename>` (`<recipe>-tiny` for the embedded model). */
export function defaultRunName(recipe: string, modelPath: string | null): string {
  const base = modelPath === null ? 'tiny' : path.basename(path.resolve(modelPath));
  return `${recipe}-${base || 'model'}`;
}

/** The strict schema of a training config: parses YAML values (snake_case keys) into a fully resolved config. */
export const TrainConfigSchema = TrainConfigObject.transform((c) => ({
  ...c,
  run: { ...c.run, name: c.run.name ?? defaultRunName(c.recipe, c.model.path) },
}));

/** A fully resolved training config: every default applied, `run.name` filled in, YAML key names. */
export type TrainConfig = z.output<typeof TrainConfigSchema>;

/** Every key as a YAML path (`recipe`, `run.name`, ...), in file order. */
export const CONFIG_KEYS: readonly string[] = [
  'recipe',
  ...Object.entries(SECTION_SHAPES).flatMap(([s, shape]) => Object.keys(shape).map((k) => `${s}.${k}`)),
];

// ---------------------------------------------------------------------------------------------------
// Problems

interface Override {
  arg: string;
  path: string[];
}

function fmtPath(p: readonly PropertyKey[]): string {
  let out = '';
  for (const seg of p) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else out += out === '' ? String(seg) : `.${String(seg)}`;
  }
  return out === '' ? '(top level)' : out;
}

function show(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (typeof v === 'string') return JSON.stringify(v.length > 60 ? `${v.slice(0, 57)}...` : v);
  if (Array.isArray(v)) return `a list ${truncate(JSON.stringify(v))}`;
  if (typeof v === 'object') return 'a mapping';
  return String(v);
}

function truncate(s: string): string {
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function kindOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return `a list ${truncate(JSON.stringify(v))}`;
  if (typeof v === 'object') return 'a mapping';
  if (typeof v === 'string') return `the string ${show(v)}`;
  if (typeof v === 'number') return Number.isFinite(v) ? `the number ${v}` : String(v);
  return `${typeof v} ${String(v)}`;
}

function valueAt(root: unknown, p: readonly PropertyKey[]): unknown {
  let cur: unknown = root;
  for (const seg of p) {
    if (cur === null || typeof cur !== 'object') return undefined;
    if (!Object.prototype.hasOwnProperty.call(cur, seg)) return undefined;
    cur = (cur as Record<PropertyKey, unknown>)[seg];
  }
  return cur;
}

/** Levenshtein distance with adjacent transpositions (optimal string alignment). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** The closest candidate within a small edit distance (case-insensitive, `-` read as `_`), or null. */
export function suggest(word: string, candidates: readonly string[]): string | null {
  const w = word.toLowerCase().replace(/-/g, '_');
  let best: string | null = null;
  let bestD = Infinity;
  for (const c of candidates) {
    const dist = editDistance(w, c.toLowerCase());
    if (dist < bestD) {
      bestD = dist;
      best = c;
    }
  }
  const limit = Math.max(1, Math.min(3, Math.floor(w.length / 3)));
  return best !== null && bestD <= limit ? best : null;
}

function allowedKeys(sectionPath: readonly PropertyKey[]): string[] | null {
  if (sectionPath.length === 0) return ['recipe', ...Object.keys(SECTION_SHAPES)];
  if (sectionPath.length === 1 && typeof sectionPath[0] === 'string' && Object.hasOwn(SECTION_SHAPES, sectionPath[0])) {
    return Object.keys(SECTION_SHAPES[sectionPath[0] as keyof typeof SECTION_SHAPES]);
  }
  return null;
}

function unknownKeyMessage(sectionPath: readonly PropertyKey[], key: string): string {
  const allowed = allowedKeys(sectionPath) ?? [];
  const near = suggest(key, allowed);
  if (near !== null) return `unknown key; did you mean ${near}?`;
  // The right key in the wrong place: `lr:` at the top level, `num_heads` under train, ...
  const elsewhere = CONFIG_KEYS.filter((k) => k.split('.').pop() === key || k === key);
  if (elsewhere.length > 0) return `unknown key here; did you mean ${elsewhere.join(' or ')}?`;
  const where = sectionPath.length === 0 ? 'the top level' : fmtPath(sectionPath);
  return `unknown key; the keys of ${where} are ${allowed.join(', ')}`;
}

function infoAt(p: readonly PropertyKey[]): FieldInfo | undefined {
  let schema: z.ZodType | undefined;
  if (p[0] === 'recipe') schema = recipeSchema;
  else if (p.length >= 2 && typeof p[0] === 'string' && Object.hasOwn(SECTION_SHAPES, p[0])) {
    const shape = SECTION_SHAPES[p[0] as keyof typeof SECTION_SHAPES] as Record<string, z.ZodType>;
    if (typeof p[1] === 'string' && Object.hasOwn(shape, p[1])) schema = shape[p[1]];
  }
  return schema === undefined ? undefined : fieldInfo.get(schema);
}

function fieldPathOf(p: readonly PropertyKey[]): PropertyKey[] {
  return p[0] === 'recipe' ? ['recipe'] : p.slice(0, 2);
}

/** The user-facing problem for one zod issue at a value. */
function issueMessage(issue: z.core.$ZodIssue, rawValue: unknown): string {
  const p = issue.path;
  // A missing list checked through its prefault ([]) has no raw value.
  const value = rawValue === undefined && issue.code === 'too_small' && issue.origin === 'array' ? [] : rawValue;
  const key = fmtPath(p);
  if (key === 'recipe' && value === 'medusa2') return 'medusa2 is not available yet (issue: MEDUSA-2); use medusa1';
  const info = infoAt(p);
  const isSection = p.length === 1 && typeof p[0] === 'string' && Object.hasOwn(SECTION_SHAPES, p[0]);
  if (isSection) return `must be a section (a mapping of keys), got ${kindOf(value)}`;
  if (info === undefined) return issue.message;
  const deeper = p.length > fieldPathOf(p).length;
  const expected = deeper ? `${fmtPath(fieldPathOf(p))} must be ${info.expects}` : `expected ${info.expects}`;
  switch (issue.code) {
    case 'invalid_type': {
      if (typeof value === 'number' && Number.isFinite(value) && issue.expected === 'int') return `${value} is not an integer; ${expected}`;
      const hint = typeof value === 'string' && info.expects.startsWith('a list') ? ` (write it as a list: [${value}])` : '';
      return `${expected}, got ${kindOf(value)}${hint}`;
    }
    case 'too_small':
    case 'too_big':
      if (Array.isArray(value)) {
        if (key === 'data.train' && value.length === 0) {
          return 'must list at least one dataset folder written by `medusa-train distill --out <dir>` (e.g. data.train: [runs/my-distill], or --set data.train=[runs/my-distill])';
        }
        return `has ${value.length} item(s); ${expected}`;
      }
      if (typeof value === 'string') return `${show(value)} has the wrong length; ${expected}`;
      return `${show(value)} is out of range; ${expected}`;
    case 'invalid_value': {
      const near = typeof value === 'string' ? suggest(value, issue.values.filter((v): v is string => typeof v === 'string')) : null;
      return `${show(value)} is not allowed; ${expected}${near !== null && near !== value ? ` (did you mean ${near}?)` : ''}`;
    }
    default:
      return `${show(value)} is not valid; ${expected}`;
  }
}

/** Where a problem came from: the YAML file's line, or the `--set` option. */
class Sources {
  constructor(
    private readonly doc: YAML.Document | null,
    private readonly lineCounter: YAML.LineCounter | null,
    private readonly overrides: Override[],
  ) {}

  /**
   * An override is the source when it set this value or a mapping above it, or (for an unknown key) when
   * it created the key on its way to a deeper one.
   */
  describe(p: readonly PropertyKey[], asKey: boolean): string {
    for (let i = this.overrides.length - 1; i >= 0; i--) {
      const o = this.overrides[i];
      const n = asKey ? Math.min(o.path.length, p.length) : o.path.length;
      if (n <= p.length && o.path.slice(0, n).every((seg, j) => seg === String(p[j]))) return ` (from --set ${o.arg})`;
    }
    const line = this.lineOf(p, asKey);
    return line === null ? '' : ` (line ${line})`;
  }

  private lineOf(p: readonly PropertyKey[], asKey: boolean): number | null {
    if (this.doc === null || this.lineCounter === null) return null;
    let node: unknown = this.doc.contents;
    let range: readonly number[] | null | undefined = (node as YamlNode | null)?.range;
    for (let i = 0; i < p.length; i++) {
      const seg = p[i];
      if (isMap(node)) {
        const pair = node.items.find((it) => (isScalar(it.key) ? String(it.key.value) : String(it.key)) === String(seg));
        if (pair === undefined) return null;
        if (i === p.length - 1 && asKey) {
          range = (pair.key as YamlNode | null)?.range;
          break;
        }
        node = pair.value;
        range = (node as YamlNode | null)?.range ?? (pair.key as YamlNode | null)?.range;
      } else if (isSeq(node) && typeof seg === 'number') {
        node = node.items[seg];
        range = (node as YamlNode | null)?.range;
      } else {
        return null;
      }
    }
    return range ? this.lineCounter.linePos(range[0]).line : null;
  }
}

function configError(where: string, problems: string[]): never {
  fail(
    'E_CONFIG',
    `${where} has ${problems.length} problem${problems.length === 1 ? '' : 's'}:\n${problems.map((p) => `  - ${p}`).join('\n')}\n` +
      'Fix these keys (every key is described in docs/CONFIG.md).',
  );
}

// ---------------------------------------------------------------------------------------------------
// Loading

const KEY_SEGMENT = /^[A-Za-z_][A-Za-z0-9_-]*$/;

/** Parse one `--set a.b.c=value`; the value is YAML (numbers, booleans, null, [lists], strings). */
function parseOverride(arg: string, problems: string[]): { path: string[]; value: unknown } | null {
  const eq = arg.indexOf('=');
  if (eq < 0) {
    problems.push(`--set ${arg}: expected key=value, e.g. --set train.lr=2e-3`);
    return null;
  }
  const keyText = arg.slice(0, eq).trim();
  const valueText = arg.slice(eq + 1);
  const segs = keyText.split('.');
  if (keyText === '' || !segs.every((s) => KEY_SEGMENT.test(s))) {
    problems.push(`--set ${arg}: ${JSON.stringify(keyText)} is not a key path; write section.key=value, e.g. --set train.lr=2e-3`);
    return null;
  }
  const doc = YAML.parseDocument(valueText, { uniqueKeys: true, prettyErrors: false });
  if (doc.errors.length > 0) {
    problems.push(`${keyText}: --set ${arg}: the value is not valid YAML (${doc.errors[0].message.split('\n')[0]}); quote strings with special characters, e.g. --set run.name='"a: b"'`);
    return null;
  }
  if (isMap(doc.contents)) {
    problems.push(`${keyText}: --set ${arg}: the value is a mapping; set one key at a time (--set ${keyText}.<key>=<value>), or quote it if it is a string`);
    return null;
  }
  let value: unknown;
  try {
    value = doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    problems.push(`${keyText}: --set ${arg}: ${describeError(e)}`);
    return null;
  }
  return { path: segs, value };
}

function setOwn(obj: Record<string, unknown>, key: string, value: unknown): void {
  // defineProperty so that a key like "__proto__" becomes a plain (unknown) key, never the prototype.
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

/** Apply an override to the raw config: missing sections are created; a path through a non-mapping is a problem. */
function applyOverride(root: Record<string, unknown>, o: Override, value: unknown, problems: string[]): boolean {
  let cur = root;
  for (let i = 0; i < o.path.length - 1; i++) {
    const seg = o.path[i];
    const next = Object.hasOwn(cur, seg) ? cur[seg] : undefined;
    const leaf = infoAt(o.path.slice(0, i + 1));
    if (next === undefined && leaf !== undefined && i < 2) {
      // A key that holds a value (its default is not in the raw config yet).
      const at = o.path.slice(0, i + 1).join('.');
      problems.push(`${at}: --set ${o.arg} goes through ${at}, which holds a value (${leaf.expects}), not a section; set ${at} itself instead`);
      return false;
    }
    if (next === undefined) {
      const created: Record<string, unknown> = {};
      setOwn(cur, seg, created);
      cur = created;
    } else if (next !== null && typeof next === 'object' && !Array.isArray(next)) {
      cur = next as Record<string, unknown>;
    } else {
      const at = o.path.slice(0, i + 1).join('.');
      problems.push(`${at}: --set ${o.arg} goes through ${at}, which is ${kindOf(next)}, not a section; set ${at} itself instead`);
      return false;
    }
  }
  setOwn(cur, o.path[o.path.length - 1], value);
  return true;
}

function readConfigFile(file: string): string {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    fail('E_IO', `config file ${file} cannot be read (${describeError(e)}); check the --config path`, e);
  }
  if (!st.isFile()) fail('E_IO', `config file ${file} is not a file; pass a YAML file to --config`);
  if (st.size > CONFIG_FILE_LIMIT) {
    fail('E_CONFIG', `config file ${file} is ${st.size} bytes, over the ${CONFIG_FILE_LIMIT}-byte limit; a training config is a few KiB — is this the right file?`);
  }
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    fail('E_IO', `config file ${file} cannot be read (${describeError(e)})`, e);
  }
}

/**
 * Load a training config: the YAML file (or only the defaults when `file` is null), then the
 * `--set a.b.c=value` overrides in order, validated all at once. Returns the resolved config and its YAML
 * text (with a header comment), which is what `saveResolvedConfig` writes.
 */
export function loadTrainConfig(file: string | null, overrides: string[]): { config: TrainConfig; yamlText: string } {
  let raw: Record<string, unknown> = {};
  let doc: YAML.Document | null = null;
  let lineCounter: YAML.LineCounter | null = null;
  const where = file ?? 'the config (defaults and --set options)';
  if (file !== null) {
    const text = readConfigFile(file);
    lineCounter = new YAML.LineCounter();
    doc = YAML.parseDocument(text, { lineCounter, uniqueKeys: true, prettyErrors: true });
    if (doc.errors.length > 0) {
      const lines = doc.errors.map((e) => {
        const pos = e.linePos?.[0];
        const msg = e.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, '');
        return `${file}${pos ? `:${pos.line}:${pos.col}` : ''}: ${msg}`;
      });
      fail('E_CONFIG', `${file} is not valid YAML:\n${lines.map((l) => `  - ${l}`).join('\n')}\nFix the YAML syntax at the line shown.`);
    }
    let value: unknown;
    try {
      value = doc.toJS({ maxAliasCount: 100 });
    } catch (e) {
      fail('E_CONFIG', `${file} cannot be read as YAML: ${describeError(e)}`, e);
    }
    if (value === null || value === undefined) value = {};
    if (typeof value !== 'object' || Array.isArray(value)) {
      fail('E_CONFIG', `${file}: the top level must be a mapping of sections (recipe, run, model, data, ...), got ${kindOf(value)}; see configs/tiny.yaml`);
    }
    raw = value as Record<string, unknown>;
    // An empty section (`heads:` with every key commented out) means "all defaults".
    for (const s of Object.keys(SECTION_SHAPES)) if (Object.hasOwn(raw, s) && raw[s] === null) delete raw[s];
  }

  const overrideProblems: string[] = [];
  const applied: Override[] = [];
  for (const arg of overrides) {
    const parsed = parseOverride(arg, overrideProblems);
    if (parsed === null) continue;
    const o = { arg, path: parsed.path };
    if (applyOverride(raw, o, parsed.value, overrideProblems)) applied.push(o);
  }

  const problems: string[] = [];
  const sources = new Sources(doc, lineCounter, applied);
  const result = TrainConfigSchema.safeParse(raw);
  if (!result.success) {
    for (const issue of result.error.issues) {
      if (issue.code === 'unrecognized_keys') {
        for (const key of issue.keys) {
          const p = [...issue.path, key];
          problems.push(`${fmtPath(p)}: ${unknownKeyMessage(issue.path, key)}${sources.describe(p, true)}`);
        }
      } else {
        problems.push(`${fmtPath(issue.path)}: ${issueMessage(issue, valueAt(raw, issue.path))}${sources.describe(issue.path, false)}`);
      }
    }
  }
  problems.push(...overrideProblems);
  if (problems.length > 0 || !result.success) configError(where, problems);
  const config = result.data;
  return { config, yamlText: renderConfigYaml(config, new Date()) };
}

// ---------------------------------------------------------------------------------------------------
// Saving

/** The resolved config as YAML: a header (version, date), every key with a comment saying what it does. */
export function renderConfigYaml(config: TrainConfig, date: Date): string {
  const doc = new YAML.Document(config);
  doc.commentBefore =
    ` medusa-train ${VERSION} resolved training config, written ${date.toISOString()}\n` +
    ' Every default is filled in; keys are described in docs/CONFIG.md.\n' +
    ' Run it again with: medusa-train train --config <this file>';
  const top = doc.contents;
  if (isMap(top)) {
    for (const pair of top.items) {
      const name = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
      if (isScalar(pair.key)) {
        pair.key.spaceBefore = pair !== top.items[0];
        if (name === 'recipe') pair.key.commentBefore = ` ${fieldInfo.get(recipeSchema)?.doc ?? ''}`;
        else if (Object.hasOwn(SECTION_DOCS, name)) pair.key.commentBefore = ` ${SECTION_DOCS[name as keyof typeof SECTION_DOCS]}`;
      }
      if (!isMap(pair.value)) continue;
      for (const item of pair.value.items) {
        const key = isScalar(item.key) ? String(item.key.value) : String(item.key);
        const info = infoAt([name, key]);
        if (info !== undefined && isScalar(item.key)) item.key.commentBefore = ` ${info.doc}; ${info.expects}`;
        if (name === 'train' && key === 'betas' && isSeq(item.value)) item.value.flow = true;
      }
    }
  }
  return doc.toString({ flowCollectionPadding: false, lineWidth: 0 });
}

/** Quote one argument for a POSIX shell (bare when it is safe). */
export function shellQuote(arg: string): string {
  if (arg !== '' && /^[A-Za-z0-9_\-+=.,/:@%]+$/.test(arg)) return arg;
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

function writeAtomic(file: string, text: string): void {
  try {
    writeFileAtomic(file, [Buffer.from(text, 'utf8')]);
  } catch (e) {
    fail('E_IO', `cannot write ${file} (${describeError(e)}); check that the run folder is writable`, e);
  }
}

/**
 * Write `<runDir>/config.yaml` (the resolved config with a version/date header; it loads back to the
 * same config) and `<runDir>/command.txt` (the command line, shell-quoted), each atomically.
 */
export function saveResolvedConfig(runDir: string, config: TrainConfig, commandLine: string[]): void {
  try {
    fs.mkdirSync(runDir, { recursive: true });
  } catch (e) {
    fail('E_IO', `cannot create the run folder ${runDir} (${describeError(e)})`, e);
  }
  writeAtomic(path.join(runDir, 'config.yaml'), renderConfigYaml(config, new Date()));
  writeAtomic(path.join(runDir, 'command.txt'), `${commandLine.map(shellQuote).join(' ')}\n`);
}

// ---------------------------------------------------------------------------------------------------
// Hash

/** Keys that do not change what training computes: where the run goes and how often it logs/checkpoints. */
export const HASH_EXCLUDED_KEYS: readonly string[] = ['run.name', 'run.dir', 'log.every', 'checkpoint.every', 'checkpoint.keep'];

function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    const obj = v as Record<string, unknown>;
    return `{${Object.keys(obj)
      .sort()
      .filter((k) => obj[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

/**
 * sha256 (hex) of the canonical JSON (sorted keys) of the settings that determine training results:
 * every key except `exclude` (YAML paths; default HASH_EXCLUDED_KEYS). A resumed run must have the same hash.
 */
export function configHash(config: TrainConfig, exclude: readonly string[] = HASH_EXCLUDED_KEYS): string {
  const copy = structuredClone(config) as Record<string, unknown>;
  for (const key of exclude) {
    const segs = key.split('.');
    let cur: unknown = copy;
    for (const seg of segs.slice(0, -1)) cur = cur !== null && typeof cur === 'object' ? (cur as Record<string, unknown>)[seg] : undefined;
    if (cur !== null && typeof cur === 'object') delete (cur as Record<string, unknown>)[segs[segs.length - 1]];
  }
  return createHash('sha256').update(canonicalJson(copy)).digest('hex');
}
