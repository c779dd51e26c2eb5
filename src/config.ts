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

// MEDUSA-2 only: the loss keys it adds, and its own section.

/** Linear layers LoRA can adapt (PEFT module names). */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];

const loss2Shape = {
  ...lossShape,
  heads_coefficient: field(
    z.number().gt(0).max(100).default(0.2),
    'a number in (0, 100]',
    'lambda_0: multiplier of the summed heads loss, times heads_schedule at each step (0.2 = the paper\'s two-stage value; about 0.01 with self-distillation from scratch)',
  ),
  lm_loss: enumOf(['kd', 'ce'], 'kd', "the backbone's LM term: kd = KL(teacher || student) at each assistant position (self-distillation); ce = hard-label cross-entropy"),
  teacher: enumOf(
    ['topk', 'frozen'],
    'topk',
    "kd teacher: topk = the teacher's top-k log-probabilities stored by `distill --teacher-topk`; frozen = a frozen copy of the original model run during training",
  ),
  heads_schedule: enumOf(['constant', 'linear', 'sine', 'sine_warmup'], 'sine', 'ramp of the heads term over training: lambda_0 x schedule(step) (sine_warmup rises over the first heads_schedule_fraction of the steps; with medusa2.heads_warmup_steps, over the joint steps only)'),
  heads_schedule_fraction: field(z.number().gt(0).max(1).default(0.3), 'a number in (0, 1]', 'r: for sine_warmup, the fraction of the steps over which the heads term rises'),
};

/** A named sub-section (its keys, documented like a top-level section's). */
interface SectionInfo {
  shape: Record<string, z.ZodType>;
  doc: string;
}
const sectionInfo = new Map<z.ZodType, SectionInfo>();

function section<S extends Record<string, z.ZodType>>(shape: S, doc: string) {
  const s = z.strictObject(shape).prefault({} as never);
  sectionInfo.set(s, { shape, doc });
  return s;
}

const loraShape = {
  rank: field(int(1, 4096).default(8), 'an integer in [1, 4096]', 'LoRA rank r'),
  alpha: field(z.number().gt(0).max(1_000_000).default(16), 'a number in (0, 1000000]', 'LoRA alpha: the adapter is scaled by alpha / rank'),
  dropout: field(z.number().min(0).lt(1).default(0), 'a number in [0, 1)', "dropout on the adapter's input (training only)"),
  targets: field(
    z
      .array(z.enum(LORA_TARGETS))
      .min(1)
      .prefault(['q_proj', 'k_proj', 'v_proj', 'o_proj'])
      .refine((t) => new Set(t).size === t.length, { message: 'duplicate' }),
    `a non-empty list of distinct names from ${LORA_TARGETS.join(', ')}`,
    'linear layers that get an adapter (in every decoder layer; lm_head once)',
  ),
};

const backboneShape = {
  mode: enumOf(['lora', 'full'], 'lora', 'lora = train low-rank adapters on the targets (saved apart, merged on export); full = train the last full_last_layers decoder layers and the final norm'),
  lora: section(loraShape, 'mode lora: the adapters (PEFT layout)'),
  full_last_layers: field(int(1, 1024).default(1), 'an integer in [1, 1024]', 'mode full: train the last N decoder layers and the final norm'),
  train_embeddings: bool(false, 'also train the token embeddings (both modes; costs vocabulary x hidden parameters of optimizer state)'),
};

const gateShape = {
  action: enumOf(['fail', 'warn'], 'fail', 'when a threshold is crossed: fail = the run ends with E_GATE; warn = a warning in the log and the summary'),
  max_kl: field(z.number().gt(0).default(0.05), 'a number > 0', 'largest mean KL(original || tuned) per assistant token, in nats'),
  min_agreement: field(z.number().min(0).max(1).default(0.9), 'a number in [0, 1]', "smallest greedy next-token agreement with the original model"),
  max_ppl_ratio: field(z.number().min(1).default(1.1), 'a number >= 1', 'largest tuned / original perplexity on the assistant tokens of the eval split'),
  max_positions: field(int(1).default(4096), 'an integer >= 1', 'assistant positions evaluated per gate check'),
};

const medusa2Shape = {
  init_heads: field(
    z.string().min(1).nullable().default(null),
    'a folder path or null',
    'start the heads from a MEDUSA-1 run folder, checkpoint or medusa/medusa-v2/vllm export; null = fresh heads',
  ),
  heads_warmup_steps: field(int(0).default(0), 'an integer >= 0', 'heads-only steps (backbone frozen) before the backbone unfreezes'),
  backbone: section(backboneShape, 'how the backbone is trained'),
  heads_lr_multiplier: field(z.number().gt(0).max(1000).default(4), 'a number in (0, 1000]', 'the heads learn at train.lr times this; the backbone at train.lr'),
  gate: section(gateShape, 'base-quality gate: the tuned backbone against the original on the eval split'),
};

const recipeExpects = 'one of medusa1 | medusa2';
const recipeDoc = 'training recipe: medusa1 = frozen backbone, train only the heads; medusa2 = train the backbone (LoRA or last layers) and the heads jointly';
const recipeSchema = field(z.literal('medusa1').default('medusa1'), recipeExpects, recipeDoc);
const recipe2Schema = field(z.literal('medusa2'), recipeExpects, recipeDoc);

const SECTION_DOCS = {
  run: 'where the run is written',
  model: 'the base model',
  data: 'training data',
  heads: 'Medusa heads',
  loss: 'training loss',
  medusa2: 'MEDUSA-2: joint training of the backbone and the heads',
  train: 'optimizer and schedule',
  checkpoint: 'checkpoints in <run>/checkpoints',
  eval: 'evaluation on the held-out conversations',
  log: 'metrics in <run>/metrics.jsonl and on the terminal',
} as const;

const common = {
  run: section(runShape, SECTION_DOCS.run),
  model: section(modelShape, SECTION_DOCS.model),
  data: section(dataShape, SECTION_DOCS.data),
  heads: section(headsShape, SECTION_DOCS.heads),
};
const tail = {
  train: section(trainShape, SECTION_DOCS.train),
  checkpoint: section(checkpointShape, SECTION_DOCS.checkpoint),
  eval: section(evalShape, SECTION_DOCS.eval),
  log: section(logShape, SECTION_DOCS.log),
};

/** The top-level keys of each recipe, in the order they are written. */
const MEDUSA1_SHAPE = { recipe: recipeSchema, ...common, loss: section(lossShape, SECTION_DOCS.loss), ...tail };
const MEDUSA2_SHAPE = { recipe: recipe2Schema, ...common, loss: section(loss2Shape, SECTION_DOCS.loss), medusa2: section(medusa2Shape, SECTION_DOCS.medusa2), ...tail };
type Recipe = 'medusa1' | 'medusa2';
const SHAPES: Record<Recipe, Record<string, z.ZodType>> = { medusa1: MEDUSA1_SHAPE, medusa2: MEDUSA2_SHAPE };

/** The default run name: `<recipe>-<model folder basename>` (`<recipe>-tiny` for the embedded model). */
export function defaultRunName(recipe: string, modelPath: string | null): string {
  const base = modelPath === null ? 'tiny' : path.basename(path.resolve(modelPath));
  return `${recipe}-${base || 'model'}`;
}

const withRunName = <C extends { recipe: string; run: { name: string | null }; model: { path: string | null } }>(c: C) => ({
  ...c,
  run: { ...c.run, name: c.run.name ?? defaultRunName(c.recipe, c.model.path) },
});

/** The strict schema of a MEDUSA-1 config (snake_case YAML keys) into a fully resolved config. */
export const Medusa1ConfigSchema = z.strictObject(MEDUSA1_SHAPE).transform(withRunName);
/** The strict schema of a MEDUSA-2 config: MEDUSA-1's keys, the loss keys of joint training, and the `medusa2` section. */
export const Medusa2ConfigSchema = z.strictObject(MEDUSA2_SHAPE).transform(withRunName);
/** Either recipe (loadTrainConfig picks the schema from the `recipe` key). */
export const TrainConfigSchema = z.union([Medusa1ConfigSchema, Medusa2ConfigSchema]);

/** A fully resolved MEDUSA-1 config: every default applied, `run.name` filled in, YAML key names. */
export type Medusa1Config = z.output<typeof Medusa1ConfigSchema>;
/** A fully resolved MEDUSA-2 config (`recipe: medusa2`). */
export type Medusa2Config = z.output<typeof Medusa2ConfigSchema>;
/** A fully resolved training config, narrowed by `config.recipe`. */
export type TrainConfig = Medusa1Config | Medusa2Config;

function keysOf(shape: Record<string, z.ZodType>, prefix: string): string[] {
  return Object.entries(shape).flatMap(([k, s]) => {
    const sub = sectionInfo.get(s);
    return sub === undefined ? [`${prefix}${k}`] : keysOf(sub.shape, `${prefix}${k}.`);
  });
}

/** Every key of a recipe's config as a YAML path (`recipe`, `run.name`, `medusa2.backbone.lora.rank`, ...), in file order. */
export function configKeys(recipe: Recipe): readonly string[] {
  return keysOf(SHAPES[recipe], '');
}

/** Every key of a MEDUSA-1 config (the keys every recipe has, except MEDUSA-2's additions) as a YAML path, in file order. */
export const CONFIG_KEYS: readonly string[] = configKeys('medusa1');
/** The keys only a MEDUSA-2 config has. */
export const MEDUSA2_ONLY_KEYS: readonly string[] = configKeys('medusa2').filter((k) => !CONFIG_KEYS.includes(k));

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

/** The recipe a raw config asks for (anything but medusa2 is validated as medusa1, which reports a bad value). */
function recipeOf(raw: Record<string, unknown>): Recipe {
  return Object.hasOwn(raw, 'recipe') && raw['recipe'] === 'medusa2' ? 'medusa2' : 'medusa1';
}

/** What a path leads to in a recipe's keys: a section, a key holding a value (depth = its path length), or nothing. */
type Resolved = { kind: 'section'; shape: Record<string, z.ZodType> } | { kind: 'leaf'; info: FieldInfo; depth: number } | null;

function resolve(recipe: Recipe, p: readonly PropertyKey[]): Resolved {
  let shape = SHAPES[recipe];
  for (let i = 0; i < p.length; i++) {
    const seg = p[i];
    if (typeof seg !== 'string' || !Object.hasOwn(shape, seg)) return null;
    const sub = sectionInfo.get(shape[seg]);
    if (sub === undefined) {
      const info = fieldInfo.get(shape[seg]);
      return info === undefined ? null : { kind: 'leaf', info, depth: i + 1 };
    }
    shape = sub.shape;
  }
  return { kind: 'section', shape };
}

function allowedKeys(recipe: Recipe, sectionPath: readonly PropertyKey[]): string[] | null {
  const r = resolve(recipe, sectionPath);
  return r?.kind === 'section' ? Object.keys(r.shape) : null;
}

function unknownKeyMessage(recipe: Recipe, sectionPath: readonly PropertyKey[], key: string): string {
  if (recipe === 'medusa1' && resolve('medusa2', [...sectionPath, key]) !== null) {
    return 'only a recipe: medusa2 config has this key (MEDUSA-2 joint training); set recipe: medusa2, or remove it';
  }
  const allowed = allowedKeys(recipe, sectionPath) ?? [];
  const near = suggest(key, allowed);
  if (near !== null) return `unknown key; did you mean ${near}?`;
  // The right key in the wrong place: `lr:` at the top level, `num_heads` under train, ...
  const elsewhere = configKeys(recipe).filter((k) => k.split('.').pop() === key || k === key);
  if (elsewhere.length > 0) return `unknown key here; did you mean ${elsewhere.join(' or ')}?`;
  const where = sectionPath.length === 0 ? 'the top level' : fmtPath(sectionPath);
  return `unknown key; the keys of ${where} are ${allowed.join(', ')}`;
}

function infoAt(recipe: Recipe, p: readonly PropertyKey[]): FieldInfo | undefined {
  const r = resolve(recipe, p);
  return r?.kind === 'leaf' ? r.info : undefined;
}

function fieldPathOf(recipe: Recipe, p: readonly PropertyKey[]): PropertyKey[] {
  const r = resolve(recipe, p);
  return r?.kind === 'leaf' ? p.slice(0, r.depth) : [...p];
}

/** The user-facing problem for one zod issue at a value. */
function issueMessage(recipe: Recipe, issue: z.core.$ZodIssue, rawValue: unknown): string {
  const p = issue.path;
  // A missing list checked through its prefault ([]) has no raw value.
  const value = rawValue === undefined && issue.code === 'too_small' && issue.origin === 'array' ? [] : rawValue;
  const key = fmtPath(p);
  const info = infoAt(recipe, p);
  const isSection = p.length > 0 && resolve(recipe, p)?.kind === 'section';
  if (isSection) return `must be a section (a mapping of keys), got ${kindOf(value)}`;
  if (info === undefined) return issue.message;
  const fieldPath = fieldPathOf(recipe, p);
  const deeper = p.length > fieldPath.length;
  const expected = deeper ? `${fmtPath(fieldPath)} must be ${info.expects}` : `expected ${info.expects}`;
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
      const values = key === 'recipe' ? ['medusa1', 'medusa2'] : issue.values.filter((v): v is string => typeof v === 'string');
      const near = typeof value === 'string' ? suggest(value, values) : null;
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

/** Values a MEDUSA-2 config refuses: [YAML path, value, why and the fix]. */
const MEDUSA2_REFUSED: readonly [string[], unknown, string][] = [
  [
    ['model', 'engine'],
    'onnx',
    'cannot train MEDUSA-2: it trains the backbone with autograd, which runs on the tfjs engine (onnxruntime runs frozen forwards only, for MEDUSA-1); set model.engine: tfjs or auto (auto trains on tfjs)',
  ],
  [['train', 'cache_hidden_states'], 'memory', 'cannot be used with MEDUSA-2: the backbone changes every step, so its hidden states cannot be reused; set train.cache_hidden_states: none'],
  [['train', 'cache_hidden_states'], 'disk', 'cannot be used with MEDUSA-2: the backbone changes every step, so its hidden states cannot be reused; set train.cache_hidden_states: none'],
];

/** Delete the sections written empty (`heads:` with every key commented out), at every depth: they take their defaults. */
function dropEmptySections(obj: Record<string, unknown>, shape: Record<string, z.ZodType>): void {
  for (const [k, s] of Object.entries(shape)) {
    const sub = sectionInfo.get(s);
    if (sub === undefined || !Object.hasOwn(obj, k)) continue;
    const v = obj[k];
    if (v === null) delete obj[k];
    else if (typeof v === 'object' && !Array.isArray(v)) dropEmptySections(v as Record<string, unknown>, sub.shape);
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
    const leaf = resolve(recipeOf(root), o.path.slice(0, i + 1));
    if (next === undefined && leaf?.kind === 'leaf' && leaf.depth === i + 1) {
      // A key that holds a value (its default is not in the raw config yet).
      const at = o.path.slice(0, i + 1).join('.');
      problems.push(`${at}: --set ${o.arg} goes through ${at}, which holds a value (${leaf.info.expects}), not a section; set ${at} itself instead`);
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
    dropEmptySections(raw, SHAPES[recipeOf(raw)]);
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
  const recipe = recipeOf(raw);
  const result = recipe === 'medusa2' ? Medusa2ConfigSchema.safeParse(raw) : Medusa1ConfigSchema.safeParse(raw);
  if (!result.success) {
    for (const issue of result.error.issues) {
      if (issue.code === 'unrecognized_keys') {
        for (const key of issue.keys) {
          const p = [...issue.path, key];
          problems.push(`${fmtPath(p)}: ${unknownKeyMessage(recipe, issue.path, key)}${sources.describe(p, true)}`);
        }
      } else {
        problems.push(`${fmtPath(issue.path)}: ${issueMessage(recipe, issue, valueAt(raw, issue.path))}${sources.describe(issue.path, false)}`);
      }
    }
  }
  if (recipe === 'medusa2') {
    // Keys that are valid alone but not for joint training (checked on the raw values, so reported with the rest).
    for (const [p, bad, why] of MEDUSA2_REFUSED) {
      if (valueAt(raw, p) === bad) problems.push(`${fmtPath(p)}: ${show(bad)} ${why}${sources.describe(p, false)}`);
    }
  }
  problems.push(...overrideProblems);
  if (problems.length > 0 || !result.success) configError(where, problems);
  const config = result.data;
  return { config, yamlText: renderConfigYaml(config, new Date()) };
}

// ---------------------------------------------------------------------------------------------------
// Saving

/** Put each key's doc (and each section's) above it in the saved YAML, at every depth. */
function commentKeys(map: YAML.YAMLMap, shape: Record<string, z.ZodType>, at: string[]): void {
  for (const pair of map.items) {
    if (!isScalar(pair.key)) continue;
    const name = String(pair.key.value);
    const schema = Object.hasOwn(shape, name) ? shape[name] : undefined;
    if (schema === undefined) continue;
    const sub = sectionInfo.get(schema);
    if (at.length === 0) pair.key.spaceBefore = pair !== map.items[0];
    if (sub !== undefined) {
      pair.key.commentBefore = ` ${sub.doc}`;
      if (isMap(pair.value)) commentKeys(pair.value, sub.shape, [...at, name]);
      continue;
    }
    const info = fieldInfo.get(schema);
    if (info !== undefined) pair.key.commentBefore = at.length === 0 ? ` ${info.doc}` : ` ${info.doc}; ${info.expects}`;
    if (isSeq(pair.value) && (name === 'betas' || name === 'targets')) pair.value.flow = true;
  }
}

/** The resolved config as YAML: a header (version, date), every key with a comment saying what it does. */
export function renderConfigYaml(config: TrainConfig, date: Date): string {
  const doc = new YAML.Document(config);
  doc.commentBefore =
    ` medusa-train ${VERSION} resolved training config, written ${date.toISOString()}\n` +
    ' Every default is filled in; keys are described in docs/CONFIG.md.\n' +
    ' Run it again with: medusa-train train --config <this file>';
  const top = doc.contents;
  if (isMap(top)) commentKeys(top, SHAPES[config.recipe], []);
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

/**
 * MEDUSA-2's trainable-backbone spec (src/train/trainable-backbone.ts `BackboneSpec`, matched structurally) from the
 * config's flat `medusa2.backbone` section; shared by the recipe and `plan`.
 */
export function backboneSpecOf(c: Medusa2Config):
  | { mode: 'lora'; rank: number; alpha: number; dropout: number; targets: string[]; trainEmbeddings: boolean }
  | { mode: 'full'; lastLayers: number; trainEmbeddings: boolean } {
  const b = c.medusa2.backbone;
  return b.mode === 'lora'
    ? { mode: 'lora', rank: b.lora.rank, alpha: b.lora.alpha, dropout: b.lora.dropout, targets: [...b.lora.targets], trainEmbeddings: b.train_embeddings }
    : { mode: 'full', lastLayers: b.full_last_layers, trainEmbeddings: b.train_embeddings };
}
