/**
 * Where Medusa decoding (`generate --medusa`, `serve --medusa`) gets its heads and tree from: a
 * training run folder (its latest checkpoint), a checkpoint folder (checkpoints/step-N), or an export
 * folder in the medusa / medusa-v2 / vllm layout (ours or published by others).
 *
 * The folders are read by the export recipe's readers (`openSource`, `findChoices` in
 * src/recipes/export.ts, which use src/io/medusa-layouts.ts), so a folder `export` accepts is a folder
 * decoding accepts, checked the same way. Then the heads must belong to the base model being
 * decoded: the base model's config.json sha256 when the source records one (checkpoints always; our
 * exports in their safetensors metadata), else the hidden and vocabulary sizes. The tree is the
 * source's medusa_choices.json (beside the run, or inside the export folder), validated against the
 * number of heads; without one, a chain (each head's top token), and the caller is told so.
 */
import * as path from 'node:path';
import { fail } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import { disposeHeads, importHeads, initHeads, type MedusaHeads } from '../model/heads.js';
import { CONFIG_FILE, type HostF32, type RefShape } from '../io/medusa-layouts.js';
import { CHOICES_FILE, findChoices, openSource, type SourceKind } from '../recipes/export.js';
import type { MedusaChoices } from './tree.js';

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
