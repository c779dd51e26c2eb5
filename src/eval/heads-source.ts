/**
 * Where Medusa decoding (`generate --medusa`, `serve --medusa`) gets its heads and tree from: a
 * training run folder (its latest checkpoint), a checkpoint folder (checkpoints/step-N), or an export
 * folder in the medusa / medusa-v2 / vllm layout (ours or published by others).
 *
 * The folders are read by `openSource` / `findChoices` below (over src/io/medusa-layouts.ts), which the
 * export recipe uses too, so a folder `export` accepts is a folder decoding accepts, checked the same way. Then the heads must belong to the base model being
 * decoded: the base model's config.json sha256 when the source records one (checkpoints always; our
 * exports in their safetensors metadata), else the hidden and vocabulary sizes. The tree is the
 * source's medusa_choices.json (beside the run, or inside the export folder), validated against the
 * number of heads; without one, a chain (each head's top token), and the caller is told so.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import { disposeHeads, importHeads, initHeads, type MedusaHeads } from '../model/heads.js';
import { readJsonFile } from '../io/json.js';
import { isDir, isFile } from '../io/paths.js';
import type { DType } from '../io/safetensors.js';
import {
  CONFIG_FILE,
  LAYOUT_WEIGHTS_FILE,
  readHeadsFolder as readLayoutFolder,
  referenceTable,
  type HeadsLayout,
  type HostF32,
  type LmHeadMode,
  type RefShape,
} from '../io/medusa-layouts.js';
import { HEADS_FILE, STATE_FILE, latestCheckpoint, loadCheckpoint } from '../train/checkpoint.js';
import { TREE_LIMITS, validateChoices, type MedusaChoices } from './tree.js';

export type SourceKind = 'checkpoint' | HeadsLayout;

/** Where `export --format hf` puts the heads (medusa layout) inside the exported model folder. */
export const HF_HEADS_SUBDIR = 'medusa';

export function shapeText(s: RefShape): string {
  return `${s.numHeads} heads x ${s.numLayers} layer(s), hidden ${s.hiddenSize}, vocabulary ${s.vocabSize}, lm_head ${s.lmHead}`;
}

// ---------------------------------------------------------------------------------------------
// Heads folders: runs, checkpoints, medusa / medusa-v2 / vllm exports (also what `export` reads)
// ---------------------------------------------------------------------------------------------

export interface Source {
  kind: SourceKind;
  /** The folder read (a checkpoint folder or a heads folder). */
  dir: string;
  /** What `out` must not contain (the run folder, or the heads folder). */
  protect: string;
  heads: Record<string, HostF32>;
  shape: RefShape;
  /** The lm_head mode the heads were trained with, when known. */
  trainedLmHead: LmHeadMode | null;
  recipe: string;
  /** Base model folder candidate, and the name the export records. */
  basePath: string | null;
  baseName: string | null;
  baseSha: string | null;
  /** The source tensors' dtype (heads folders), when they share one. */
  dtype: DType | null;
  warnings: string[];
  describe: string;
}

function stateInt(hs: Record<string, unknown>, key: string, file: string): number {
  const v = hs[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) fail('E_CONFIG', `${file}: state.heads_shape.${key} must be a positive integer, got ${JSON.stringify(v) ?? 'nothing'}; the checkpoint was not written by this medusa-train`);
  return v;
}

/** The recipe of a checkpoint: state.recipe, else the run folder's config.yaml, else medusa1 (the only recipe that writes heads-only checkpoints). */
function checkpointRecipe(state: Record<string, unknown>, ckDir: string): string {
  if (typeof state['recipe'] === 'string') return state['recipe'];
  const yaml = path.join(path.dirname(path.dirname(ckDir)), 'config.yaml');
  try {
    const m = /^recipe:\s*["']?([A-Za-z0-9_-]+)/m.exec(fs.readFileSync(yaml, 'utf8'));
    if (m) return m[1];
  } catch {
    /* no run config beside the checkpoint */
  }
  return 'medusa1';
}

/** The calibrated candidate tree written by `medusa-train eval`, shipped beside the heads (runtimes take it as medusa_choices). */
export const CHOICES_FILE = 'medusa_choices.json';

/** The tree of the run a checkpoint belongs to (<run>/medusa_choices.json), or of an imported heads folder. */
export function findChoices(src: Source): { file: string; choices: MedusaChoices } | null {
  const candidates = src.kind === 'checkpoint'
    ? [path.join(src.protect, CHOICES_FILE), path.join(src.dir, '..', '..', CHOICES_FILE)]
    : [path.join(src.dir, CHOICES_FILE)];
  for (const file of candidates) {
    if (!fs.existsSync(file)) continue;
    const choices = readJsonFile(file) as MedusaChoices;
    validateChoices(choices, { numHeads: src.shape.numHeads, topk: TREE_LIMITS.maxRank, where: file });
    return { file, choices };
  }
  return null;
}

export function checkChoicesFile(dir: string, files: string[], numHeads: number): void {
  if (!files.includes(CHOICES_FILE)) return;
  const file = path.join(dir, CHOICES_FILE);
  validateChoices(readJsonFile(file) as MedusaChoices, { numHeads, topk: TREE_LIMITS.maxRank, where: file });
}

function openCheckpoint(ckDir: string, runDir: string | null): Source {
  const c = loadCheckpoint(ckDir);
  const stateFile = path.join(ckDir, STATE_FILE);
  const st = c.state;
  const hs = st['heads_shape'];
  if (typeof hs !== 'object' || hs === null || Array.isArray(hs)) fail('E_CONFIG', `${stateFile}: state.heads_shape is missing; the checkpoint was not written by a medusa-train that can export it`);
  const h = hs as Record<string, unknown>;
  const lm = h['lm_head'];
  if (lm !== 'per_head' && lm !== 'shared') fail('E_CONFIG', `${stateFile}: state.heads_shape.lm_head must be "per_head" or "shared", got ${JSON.stringify(lm) ?? 'nothing'}`);
  const shape: RefShape = {
    numHeads: stateInt(h, 'num_heads', stateFile),
    numLayers: stateInt(h, 'num_layers', stateFile),
    hiddenSize: stateInt(h, 'hidden_size', stateFile),
    vocabSize: stateInt(h, 'vocab_size', stateFile),
    lmHead: lm,
  };
  const sha = st['base_model_config_sha256'];
  if (typeof sha !== 'string' || !/^[0-9a-f]{64}$/.test(sha)) fail('E_CONFIG', `${stateFile}: state.base_model_config_sha256 must be a sha256 hex string, got ${JSON.stringify(sha) ?? 'nothing'}`);
  const bp = st['base_model_path'];
  if (bp !== undefined && (typeof bp !== 'string' || bp === '')) fail('E_CONFIG', `${stateFile}: state.base_model_path must be a folder path, got ${JSON.stringify(bp)}`);

  // The heads file against the reference table, by count and shape.
  const table = referenceTable(shape);
  const problems: string[] = [];
  for (const row of table) {
    const t = c.heads[row.name];
    if (!t) problems.push(`tensor "${row.name}" [${row.shape.join(', ')}] is missing`);
    else if (t.shape.join(',') !== row.shape.join(',')) problems.push(`tensor "${row.name}" is [${t.shape.join(', ')}], expected [${row.shape.join(', ')}]`);
  }
  const known = new Set(table.map((r) => r.name));
  for (const name of Object.keys(c.heads)) if (!known.has(name)) problems.push(`unexpected tensor "${name}"`);
  if (problems.length > 0) fail('E_MODEL', `${path.join(ckDir, HEADS_FILE)} does not hold the heads state.json describes (${shapeText(shape)}):\n  - ${problems.join('\n  - ')}`);

  return {
    kind: 'checkpoint',
    dir: ckDir,
    protect: runDir ?? ckDir,
    heads: c.heads,
    shape,
    trainedLmHead: shape.lmHead,
    recipe: checkpointRecipe(st, ckDir),
    basePath: typeof bp === 'string' ? bp : null,
    baseName: typeof bp === 'string' ? bp : null,
    baseSha: sha,
    dtype: null,
    warnings: [],
    describe: `checkpoint ${ckDir} (step ${c.step})`,
  };
}

export function openSource(run: string): Source {
  const abs = path.resolve(run);
  if (!isDir(abs)) fail('E_IO', `${abs} does not exist or is not a folder; pass a run folder, a checkpoint folder (checkpoints/step-N) or a heads folder`);
  if (isFile(path.join(abs, STATE_FILE))) {
    const parent = path.dirname(abs);
    return openCheckpoint(abs, path.basename(parent) === 'checkpoints' ? path.dirname(parent) : null);
  }
  if (isDir(path.join(abs, 'checkpoints'))) {
    const latest = latestCheckpoint(abs);
    if (latest === null) fail('E_IO', `${path.join(abs, 'checkpoints')} holds no complete checkpoint (step-N with heads.safetensors, optimizer.safetensors and state.json); train first`);
    return openCheckpoint(latest, abs);
  }
  // an `export --format hf` folder: the tuned model at the top level, its heads in medusa/
  const inner = path.join(abs, HF_HEADS_SUBDIR);
  if (isFile(path.join(abs, CONFIG_FILE)) && (isFile(path.join(inner, LAYOUT_WEIGHTS_FILE.medusa)) || isFile(path.join(inner, LAYOUT_WEIGHTS_FILE.vllm)))) return openSource(inner);
  if (isFile(path.join(abs, LAYOUT_WEIGHTS_FILE.medusa)) || isFile(path.join(abs, LAYOUT_WEIGHTS_FILE.vllm)) || isFile(path.join(abs, 'medusa_lm_head.pt'))) {
    const f = readLayoutFolder(abs);
    const baseIsLocal = f.baseModel !== null && isFile(path.join(path.resolve(f.baseModel), CONFIG_FILE));
    return {
      kind: f.kind,
      dir: abs,
      protect: abs,
      heads: f.heads,
      shape: f.shape,
      trainedLmHead: f.trainedLmHead,
      recipe: 'medusa1',
      basePath: baseIsLocal ? path.resolve(f.baseModel!) : null,
      baseName: f.baseModel,
      baseSha: f.baseModelConfigSha256,
      dtype: f.dtype,
      warnings: f.warnings,
      describe: `${f.kind} folder ${abs}`,
    };
  }
  fail(
    'E_IO',
    `${abs} is not a run folder (no checkpoints/), not a checkpoint folder (no state.json) and not a heads folder (no ${LAYOUT_WEIGHTS_FILE.medusa} or ${LAYOUT_WEIGHTS_FILE.vllm}); check the path`,
  );
}


export interface HeadsSource {
  /** 'checkpoint' (run or checkpoint folder) or the export layout. */
  kind: SourceKind;
  /** The folder the heads were read from (the checkpoint folder for runs). */
  dir: string;
  /** e.g. "checkpoint runs/x/checkpoints/step-00000100 (step 100)" or "vllm folder exports/x". */
  describe: string;
  /** Reference layout, float32. */
  heads: Record<string, HostF32>;
  shape: RefShape;
  choices: MedusaChoices;
  /** The medusa_choices.json read, or null when the tree is the default chain. */
  choicesFile: string | null;
  /** Candidates per head the tree needs (largest rank + 1). */
  topk: number;
  /** How the heads were matched to the base model. */
  baseCheck: 'config-sha256' | 'shape';
  /** Things worth a log line (layout warnings, the default chain). */
  notes: string[];
}

/** The base model being decoded. */
export interface BaseModelId {
  dir: string;
  /** sha256 of its config.json (ModelFolder.configHash). */
  configHash: string;
  hiddenSize: number;
  vocabSize: number;
}

/** The default tree when a source has no medusa_choices.json: each head's top token, one after the other. */
export function chainChoices(numHeads: number): MedusaChoices {
  return Array.from({ length: numHeads }, (_, k) => new Array<number>(k + 1).fill(0));
}

/**
 * Open a run folder, checkpoint folder or medusa / medusa-v2 / vllm export folder, check that its
 * heads belong to `base`, and read its tree. Errors name the file and the fix.
 */
export function openHeadsSource(folder: string, base: BaseModelId): HeadsSource {
  const src = openSource(folder);
  const s = src.shape;
  const recorded = src.kind === 'checkpoint' ? path.join(src.dir, 'state.json') : path.join(src.dir, CONFIG_FILE);
  const fix = `pass the heads' base model with --model${src.baseName ? ` (recorded: ${src.baseName})` : ''}, or heads trained on ${base.dir}`;
  if (src.baseSha !== null && src.baseSha !== base.configHash) {
    fail('E_CONFIG', `the heads of ${src.describe} were trained on another base model: ${recorded} records a base config.json with sha256 ${src.baseSha}, but ${path.join(base.dir, 'config.json')} has sha256 ${base.configHash}; ${fix}.`);
  }
  if (s.hiddenSize !== base.hiddenSize || s.vocabSize !== base.vocabSize) {
    fail('E_CONFIG', `the heads of ${src.describe} do not fit another base model: ${recorded} gives hidden size ${s.hiddenSize} and vocabulary ${s.vocabSize}, ${path.join(base.dir, 'config.json')} has ${base.hiddenSize} and ${base.vocabSize}; ${fix}.`);
  }
  const notes = [...src.warnings];
  const found = findChoices(src);
  const choices = found?.choices ?? chainChoices(s.numHeads);
  if (!found) {
    const where = src.kind === 'checkpoint' ? 'the run folder' : src.dir;
    notes.push(`no ${CHOICES_FILE} in ${where} (\`medusa-train eval\` calibrates one): using a chain of ${s.numHeads} nodes (each head's top token)`);
  }
  return {
    kind: src.kind,
    dir: src.dir,
    describe: src.describe,
    heads: src.heads,
    shape: s,
    choices,
    choicesFile: found?.file ?? null,
    topk: Math.max(...choices.flat()) + 1,
    baseCheck: src.baseSha !== null ? 'config-sha256' : 'shape',
    notes,
  };
}

/** The source's heads on the current tfjs backend (shared heads use the decoder's lm_head). Free with disposeHeads. */
export function headsOnTfjs(src: HeadsSource, decoder: Decoder): MedusaHeads {
  const heads = initHeads({ ...src.shape }, decoder.weights.lmHead, 0);
  try {
    importHeads(heads, src.heads, src.describe);
  } catch (e) {
    disposeHeads(heads);
    throw e;
  }
  return heads;
}
