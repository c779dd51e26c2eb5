/**
 * Atomic training checkpoints that make a resume bit-exact.
 *
 * Layout: `<run>/checkpoints/step-<step, 8+ digits>/`
 *   heads.safetensors      the heads' F32 tensors (Medusa reference names `{k}.{l}.linear.weight`, ...)
 *   optimizer.safetensors  the optimizer's F32 tensors (moments, ...)
 *   backbone.safetensors   MEDUSA-2 only: the trained backbone tensors (LoRA adapters in PEFT names, or the
 *                          tuned layers in Hugging Face names); optional, not part of completeness
 *   state.json             {"format": "medusa-train-checkpoint", "version": 1, "step": N, "state": {...}}
 *
 * Saving writes everything into `checkpoints/.tmp-step-<8 digits>-<pid>/` (each file fsynced, then the
 * folder), renames it to `step-<8 digits>` and fsyncs `checkpoints/`. Old checkpoints beyond `keep`
 * (and a complete checkpoint of the same step being replaced) are first renamed to
 * `.tmp-delete-step-...-<pid>` and only then removed, so a crash at any moment leaves only complete
 * `step-*` folders under their final names. Anything named `.tmp-*` is ignored by readers and removed
 * by the next save or list when the process named by its pid is gone (or is this process, which
 * saves synchronously). A `step-*` folder missing one of the three files was not written by this
 * code; it is ignored (never listed, never pruned).
 *
 * F32 tensors are stored as their raw bytes (NaN payloads included) and state.json holds only JSON
 * values that round-trip exactly (finite numbers, strings, booleans, null, arrays, plain objects), so a
 * loaded checkpoint equals the saved one bit for bit.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MedusaError, describe } from '../errors.js';
import { fsyncDir, writeFileAtomic } from '../io/atomic.js';
import { readHeader, readTensor, writeSafetensors, type WriteTensor } from '../io/safetensors.js';
import { isFile } from '../io/paths.js';

export interface CheckpointTensor {
  shape: number[];
  data: Float32Array;
}

export interface CheckpointData {
  step: number;
  /** Medusa reference names: `{k}.{l}.linear.weight` [d, d] (out, in), `{k}.{l}.linear.bias` [d], `{k}.{L}.weight` [V, d]. */
  heads: Record<string, CheckpointTensor>;
  optimizer: Record<string, CheckpointTensor>;
  /** MEDUSA-2: the trained backbone tensors (backbone.safetensors); absent for MEDUSA-1. */
  backbone?: Record<string, CheckpointTensor>;
  /** JSON state: step, epoch, batch position, rng states, config hash, metrics so far... */
  state: Record<string, unknown>;
}

export const CHECKPOINT_FORMAT = 'medusa-train-checkpoint';
export const CHECKPOINT_VERSION = 1;
export const CHECKPOINTS_DIR = 'checkpoints';
export const HEADS_FILE = 'heads.safetensors';
export const OPTIMIZER_FILE = 'optimizer.safetensors';
export const BACKBONE_FILE = 'backbone.safetensors';
export const STATE_FILE = 'state.json';
/** state.json is small; anything bigger is not ours. */
const MAX_STATE_BYTES = 64 * 1024 * 1024;

const STEP_RE = /^step-(\d{8,})$/;
const TMP_RE = /^\.tmp-.*-(\d+)$/;

function stepName(step: number): string {
  return `step-${String(step).padStart(8, '0')}`;
}

function internal(message: string): MedusaError {
  return new MedusaError('E_INTERNAL', message);
}

function ioError(message: string, e: unknown): MedusaError {
  return new MedusaError('E_IO', `${message}: ${describe(e)}. Check that the folder exists, is writable and has free space.`, { cause: e });
}

/** Refuse state values JSON would not round-trip exactly (NaN, Infinity, undefined, bigint, typed arrays, class instances...). */
function checkJson(v: unknown, where: string): void {
  if (v === null || typeof v === 'string' || typeof v === 'boolean') return;
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw internal(`checkpoint state ${where} is ${v}, which JSON cannot store; store null or a string instead`);
    return;
  }
  if (Array.isArray(v)) {
    v.forEach((x, i) => checkJson(x, `${where}[${i}]`));
    return;
  }
  if (typeof v === 'object') {
    const proto = Object.getPrototypeOf(v) as unknown;
    if (proto !== Object.prototype && proto !== null) {
      throw internal(`checkpoint state ${where} is a ${(v as object).constructor?.name ?? 'non-plain object'}; only plain JSON values can be stored (put tensors in heads/optimizer)`);
    }
    for (const [k, x] of Object.entries(v)) checkJson(x, `${where}.${k}`);
    return;
  }
  throw internal(`checkpoint state ${where} is a ${typeof v}, which JSON cannot store`);
}

function toWrite(tensors: Record<string, CheckpointTensor>, what: string): Record<string, WriteTensor> {
  const out: Record<string, WriteTensor> = {};
  for (const [name, t] of Object.entries(tensors)) {
    if (Object.prototype.toString.call(t?.data) !== '[object Float32Array]') throw internal(`checkpoint ${what} tensor ${JSON.stringify(name)}: data must be a Float32Array`);
    out[name] = { dtype: 'F32', shape: t.shape, data: t.data };
  }
  return out;
}

function processAlive(pid: number): boolean {
  if (pid === process.pid) return false; // our own leftovers: saves are synchronous, none is in progress
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === 'EPERM';
  }
}

/** Remove `.tmp-*` leftovers of dead processes (best effort: a failure here must not stop training). */
function cleanTemps(ckDir: string, names: string[]): void {
  for (const name of names) {
    const m = TMP_RE.exec(name);
    if (!m || processAlive(Number(m[1]))) continue;
    try {
      fs.rmSync(path.join(ckDir, name), { recursive: true, force: true });
    } catch {
      /* try again next time */
    }
  }
}

function isComplete(dir: string): boolean {
  return isFile(path.join(dir, STATE_FILE)) && isFile(path.join(dir, HEADS_FILE)) && isFile(path.join(dir, OPTIMIZER_FILE));
}

function readNames(ckDir: string): string[] | null {
  try {
    return fs.readdirSync(ckDir);
  } catch (e) {
    if ((e as { code?: string }).code === 'ENOENT') return null;
    throw ioError(`Cannot list the checkpoints in ${ckDir}`, e);
  }
}

function completeIn(ckDir: string, names: string[]): { step: number; path: string }[] {
  const out: { step: number; path: string }[] = [];
  for (const name of names) {
    const m = STEP_RE.exec(name);
    if (!m) continue;
    const step = Number(m[1]);
    if (!Number.isSafeInteger(step) || name !== stepName(step)) continue; // e.g. step-000000001 (9 digits for a small step)
    const p = path.join(ckDir, name);
    if (isComplete(p)) out.push({ step, path: p });
  }
  return out.sort((a, b) => a.step - b.step);
}

/** Complete checkpoints of a run, ascending by step. Removes leftovers of dead processes' saves. */
export function listCheckpoints(runDir: string): { step: number; path: string }[] {
  const ckDir = path.join(path.resolve(runDir), CHECKPOINTS_DIR);
  const names = readNames(ckDir);
  if (names === null) return [];
  cleanTemps(ckDir, names);
  return completeIn(ckDir, names);
}

/** Path of the latest complete checkpoint, or null. */
export function latestCheckpoint(runDir: string): string | null {
  const all = listCheckpoints(runDir);
  return all.length > 0 ? all[all.length - 1].path : null;
}

/** Move `dir` out of the way atomically, then delete it. */
function removeAtomically(ckDir: string, name: string): void {
  const doomed = path.join(ckDir, `.tmp-delete-${name}-${process.pid}`);
  fs.renameSync(path.join(ckDir, name), doomed);
  fsyncDir(ckDir);
  fs.rmSync(doomed, { recursive: true, force: true });
}

/**
 * Write a checkpoint atomically and keep only the newest `keep` complete ones. Returns the
 * checkpoint's folder. A complete checkpoint of the same step is replaced.
 */
export function saveCheckpoint(runDir: string, c: CheckpointData, o: { keep: number }): string {
  if (!Number.isSafeInteger(o.keep) || o.keep < 1) throw internal(`checkpoint keep must be an integer >= 1, got ${String(o.keep)}`);
  if (!Number.isSafeInteger(c.step) || c.step < 0) throw internal(`checkpoint step must be a non-negative integer, got ${String(c.step)}`);
  if (typeof c.state !== 'object' || c.state === null || Array.isArray(c.state)) throw internal('checkpoint state must be a plain object');
  checkJson(c.state, 'state');
  if (c.state['step'] !== undefined && c.state['step'] !== c.step) throw internal(`checkpoint state.step ${String(c.state['step'])} differs from step ${c.step}`);
  const heads = toWrite(c.heads, 'heads');
  const optimizer = toWrite(c.optimizer, 'optimizer');
  const backbone = c.backbone ? toWrite(c.backbone, 'backbone') : null;
  const stateText = `${JSON.stringify({ format: CHECKPOINT_FORMAT, version: CHECKPOINT_VERSION, step: c.step, state: c.state }, null, 2)}\n`;

  const ckDir = path.join(path.resolve(runDir), CHECKPOINTS_DIR);
  try {
    fs.mkdirSync(ckDir, { recursive: true });
  } catch (e) {
    throw ioError(`Cannot create ${ckDir}`, e);
  }
  cleanTemps(ckDir, readNames(ckDir) ?? []);

  const name = stepName(c.step);
  const tmp = path.join(ckDir, `.tmp-${name}-${process.pid}`);
  const final = path.join(ckDir, name);
  try {
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp);
    writeSafetensors(path.join(tmp, HEADS_FILE), heads, { format: 'pt' });
    writeSafetensors(path.join(tmp, OPTIMIZER_FILE), optimizer, { format: 'pt' });
    if (backbone) writeSafetensors(path.join(tmp, BACKBONE_FILE), backbone, { format: 'pt' });
    writeFileAtomic(path.join(tmp, STATE_FILE), [Buffer.from(stateText, 'utf8')]);
    fsyncDir(tmp);
    if (fs.existsSync(final)) removeAtomically(ckDir, name);
    fs.renameSync(tmp, final);
    fsyncDir(ckDir);
  } catch (e) {
    try {
      fs.rmSync(tmp, { recursive: true, force: true });
    } catch {
      /* cleaned by the next save */
    }
    if (e instanceof MedusaError) throw e;
    throw ioError(`Cannot write checkpoint ${final}`, e);
  }

  // Prune: the oldest complete checkpoints beyond `keep` (never the one just written).
  const all = completeIn(ckDir, readNames(ckDir) ?? []).filter((x) => x.path !== final);
  const excess = all.length + 1 - o.keep;
  for (let i = 0; i < excess && i < all.length; i++) {
    try {
      removeAtomically(ckDir, path.basename(all[i].path));
    } catch {
      /* an old checkpoint left behind is harmless; pruned next time */
    }
  }
  return final;
}

function configErr(message: string): MedusaError {
  return new MedusaError('E_CONFIG', message);
}

function loadTensors(file: string): Record<string, CheckpointTensor> {
  const header = readHeader(file);
  const out: Record<string, CheckpointTensor> = {};
  for (const [name, info] of header.tensors) {
    if (info.dtype !== 'F32') {
      throw configErr(`${file}: tensor ${JSON.stringify(name)} is ${info.dtype}, but checkpoints hold F32 tensors only; the file was not written by medusa-train. Use another checkpoint.`);
    }
    out[name] = { shape: info.shape.slice(), data: readTensor(info).data as Float32Array };
  }
  return out;
}

/**
 * Read and validate a checkpoint folder: the three files present (E_IO), state.json a JSON object
 * with this format, version 1, a `step` equal to the folder's and a `state` object (E_CONFIG), and
 * F32 tensors only (E_CONFIG; a malformed safetensors file is E_SAFETENSORS).
 */
export function loadCheckpoint(dir: string): CheckpointData {
  const abs = path.resolve(dir);
  const fix = 'Resume from another checkpoint (delete this folder), or start a new run.';
  let st: fs.Stats;
  try {
    st = fs.statSync(abs);
  } catch (e) {
    throw new MedusaError('E_IO', `Checkpoint ${abs} does not exist or cannot be read (${describe(e)}).`, { cause: e });
  }
  if (!st.isDirectory()) throw new MedusaError('E_IO', `Checkpoint ${abs} is not a folder.`);
  const m = STEP_RE.exec(path.basename(abs));
  if (!m) throw configErr(`Checkpoint folder ${abs} is not named step-<8 digits>, so its step cannot be checked. ${fix}`);
  const folderStep = Number(m[1]);
  for (const f of [STATE_FILE, HEADS_FILE, OPTIMIZER_FILE]) {
    if (!isFile(path.join(abs, f))) throw new MedusaError('E_IO', `Checkpoint ${abs} is incomplete: ${path.join(abs, f)} is missing. ${fix}`);
  }

  const stateFile = path.join(abs, STATE_FILE);
  let text: string;
  try {
    const size = fs.statSync(stateFile).size;
    if (size > MAX_STATE_BYTES) throw configErr(`${stateFile} is ${size} bytes, over the ${MAX_STATE_BYTES}-byte limit for a checkpoint state. ${fix}`);
    text = fs.readFileSync(stateFile, 'utf8');
  } catch (e) {
    if (e instanceof MedusaError) throw e;
    throw new MedusaError('E_IO', `Cannot read ${stateFile}: ${describe(e)}.`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw configErr(`${stateFile} is not valid JSON (${describe(e)}); the checkpoint is damaged. ${fix}`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw configErr(`${stateFile} must hold a JSON object; the checkpoint is damaged. ${fix}`);
  const doc = json as Record<string, unknown>;
  if (doc['format'] !== CHECKPOINT_FORMAT) throw configErr(`${stateFile}: format is ${JSON.stringify(doc['format']) ?? '(missing)'}, expected ${JSON.stringify(CHECKPOINT_FORMAT)}. ${fix}`);
  if (typeof doc['version'] === 'number' && doc['version'] > CHECKPOINT_VERSION) {
    throw new MedusaError('E_UNSUPPORTED', `${stateFile} is checkpoint version ${doc['version']}, newer than this medusa-train understands (${CHECKPOINT_VERSION}); upgrade medusa-train.`);
  }
  if (doc['version'] !== CHECKPOINT_VERSION) throw configErr(`${stateFile}: version is ${JSON.stringify(doc['version']) ?? '(missing)'}, expected ${CHECKPOINT_VERSION}. ${fix}`);
  const step = doc['step'];
  if (typeof step !== 'number' || !Number.isSafeInteger(step) || step < 0) throw configErr(`${stateFile}: step must be a non-negative integer, got ${JSON.stringify(step) ?? '(missing)'}. ${fix}`);
  if (step !== folderStep) throw configErr(`${stateFile}: step is ${step} but the folder is ${path.basename(abs)}; the checkpoint was renamed or damaged. ${fix}`);
  const state = doc['state'];
  if (typeof state !== 'object' || state === null || Array.isArray(state)) throw configErr(`${stateFile}: "state" must be a JSON object. ${fix}`);

  return {
    step,
    heads: loadTensors(path.join(abs, HEADS_FILE)),
    optimizer: loadTensors(path.join(abs, OPTIMIZER_FILE)),
    ...(isFile(path.join(abs, BACKBONE_FILE)) ? { backbone: loadTensors(path.join(abs, BACKBONE_FILE)) } : {}),
    state: state as Record<string, unknown>,
  };
}
