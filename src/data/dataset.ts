/**
 * Self-distilled datasets: the on-disk format written by `medusa-train distill` and read by training.
 * The format is documented for users in docs/DATASET.md; keep the two in step.
 *
 * A dataset is a folder:
 *   manifest.json          what exists: meta, top-k, the list of complete shards, progress, failures
 *   shard-00000.arrow ...  Arrow IPC *file* format, one row per conversation, schema metadata = meta
 *   lock                   present while a writer has the folder open (pid, host, start time)
 *
 * Crash safety. A shard is written to `<name>.tmp`, fsynced and renamed; then manifest.json is replaced
 * the same way (temp, fsync, rename, fsync of the folder). Readers only look at shards listed in the
 * manifest, so at every instant the folder holds a readable dataset: the one described by the last
 * manifest that reached the disk. On resume, unlisted shard files and temp files (the leftovers of a
 * crash between two of those steps) are deleted and reported.
 *
 * Untrusted input. manifest.json is size-limited and validated key by key. A shard is read whole
 * (size-limited), its size and SHA-256 are checked against the manifest, and its Arrow structure is
 * verified *before* apache-arrow parses it: apache-arrow trusts the lengths in the flatbuffer metadata,
 * and a few flipped bytes make it loop for minutes or exhaust the heap. After parsing, every buffer
 * length, offset and value is checked, so no row is returned that would break training.
 */

import { fsyncDir, writeFileAtomic } from '../io/atomic.js';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  Bool,
  Field,
  Float32,
  Int32,
  List,
  RecordBatch,
  Schema,
  Struct,
  Table,
  Uint8,
  Utf8,
  makeData,
  tableFromIPC,
  tableToIPC,
  type Data,
  type DataType,
} from 'apache-arrow';
import { MedusaError, describe, type ErrorCode } from '../errors.js';

// ---------------------------------------------------------------------------------------------
// Constants, limits and types
// ---------------------------------------------------------------------------------------------

export const DATASET_FORMAT = 'medusa-train-distill';
export const DATASET_VERSION = 1;
export const MANIFEST_NAME = 'manifest.json';
export const LOCK_NAME = 'lock';

/**
 * Hard limits. The writer refuses to produce anything the reader would refuse, and the reader
 * refuses anything larger, so a hostile or corrupt file cannot exhaust memory.
 */
export const DATASET_LIMITS = Object.freeze({
  /** Largest manifest.json (it lists every failure and skipped input row). */
  maxManifestBytes: 256 * 1024 * 1024,
  /** Largest shard file; a shard is read whole into memory. Write more, smaller shards. */
  maxShardBytes: 1024 * 1024 * 1024,
  /** Most tokens in one conversation. */
  maxSeqLen: 1_048_576,
  /** Largest teacher top-k. */
  maxTopk: 1024,
  /** Most shards in one dataset (file names have at least 5 digits). */
  maxShards: 100_000,
  /** Longest conversation id, in UTF-16 code units. */
  maxIdLength: 4096,
  /** Most turn segments in one conversation. */
  maxTurns: 65_536,
  /** Longest turn role name. */
  maxRoleLength: 64,
  /** Failure / skip reasons longer than this are cut by the writer. */
  maxReasonLength: 4096,
  /** Most meta entries. */
  maxMetaEntries: 4096,
  /** Most Arrow record batches in one shard (the writer writes one). */
  maxBatchesPerShard: 65_536,
});

const INT32_MAX = 2147483647;
/** Logprobs computed in float32 can exceed 0 by rounding; anything above this is not a logprob. */
const LOGPROB_TOLERANCE = 1e-3;
const SHARD_RE = /^shard-\d{5,}\.arrow$/;
const TMP_RE = /^(shard-\d{5,}\.arrow|manifest\.json|lock\.\d+)\.tmp$/;
const SHA256_RE = /^[0-9a-f]{64}$/;
const LONE_SURROGATE_RE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

export function shardFileName(i: number): string {
  return `shard-${String(i).padStart(5, '0')}.arrow`;
}

/** One conversation. Token arrays may be any array-like of numbers when writing. */
export interface DistilledRecord {
  id: string;
  /** 0-based index of the conversation in the input order. */
  sourceIndex: number;
  inputIds: ArrayLike<number>;
  /** Same length as inputIds; 1 exactly on tokens the model generated in assistant turns. */
  lossMask: ArrayLike<number>;
  /** One entry per segment (system / user / assistant / ...), in order; spans [start, end) of tokens. */
  turnRoles: string[];
  turnStarts: number[];
  turnEnds: number[];
  /** Some assistant turn hit max_new_tokens or the total-length limit. */
  truncated: boolean;
  /** (number of loss_mask == 1 tokens) * topk ids: for the j-th masked token, the teacher's top-k next-token ids. */
  teacherTopkIds?: ArrayLike<number>;
  /** Same layout: natural-log probabilities, descending within each group of topk. Stored as float32. */
  teacherTopkLogprobs?: ArrayLike<number>;
}

/** A record as read back: numeric columns are typed arrays owned by the caller. */
export interface StoredRecord extends DistilledRecord {
  inputIds: Int32Array;
  lossMask: Uint8Array;
  teacherTopkIds?: Int32Array;
  teacherTopkLogprobs?: Float32Array;
}

export interface FailureRecord {
  index: number;
  id: string;
  reason: string;
}

export interface SkipRecord {
  file: string;
  row: number;
  reason: string;
}

export interface ShardEntry {
  file: string;
  rows: number;
  first_index: number;
  last_index: number;
  /** Sum of the rows' input_ids lengths. */
  tokens: number;
  /** File size in bytes. */
  bytes: number;
  /** Lowercase hex SHA-256 of the file. */
  sha256: string;
}

export interface Manifest {
  format: typeof DATASET_FORMAT;
  version: typeof DATASET_VERSION;
  meta: Record<string, string>;
  topk: number;
  shards: ShardEntry[];
  /** Every input index below this is written, failed or skipped. */
  next_index: number;
  failures: FailureRecord[];
  skipped: SkipRecord[];
  complete: boolean;
  summary: Record<string, unknown> | null;
}

export type WriterMode = 'new' | 'resume' | 'overwrite';

export interface WriterOptions {
  meta: Record<string, string>;
  /** Teacher top-k stored per masked token; 0 = no teacher columns. */
  topk: number;
  mode: WriterMode;
  /** Meta keys that may differ on resume (the stored value is kept). */
  ignoreOnResume?: string[];
}

export interface OpenedDataset {
  dir: string;
  meta: Record<string, string>;
  topk: number;
  manifest: Manifest;
  /** Rows in all listed shards. */
  rows: number;
}

export interface OpenDatasetOptions {
  /** Hash every shard now (readShard always checks the hash of the shard it reads). Default false. */
  verifyChecksums?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const DAMAGED =
  'The dataset is damaged or was not written by medusa-train: restore the file, or regenerate the dataset (medusa-train distill --overwrite).';

function err(code: ErrorCode, message: string, cause?: unknown): MedusaError {
  return new MedusaError(code, message, cause === undefined ? undefined : { cause });
}

const q = (s: string): string => JSON.stringify(s);

/** A value for an error message, cut to a readable length. */
function show(v: unknown, max = 120): string {
  if (v === undefined) return '(missing)';
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > max ? `${s.slice(0, max)}… (${s.length} characters)` : s;
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isIndex = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

function sha256Hex(bytes: Uint8Array): string {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

function hashFile(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** Write `bytes` to `file` atomically (temp file, fsync, rename, fsync the folder). */
function writeAtomic(file: string, bytes: Uint8Array): void {
  try {
    writeFileAtomic(file, [bytes], '.tmp');
  } catch (e) {
    throw err('E_IO', `Cannot write ${file}: ${describe(e)}. Check that the folder is writable and has free space.`, e);
  }
}

function listDir(dir: string): string[] {
  try {
    return fs.readdirSync(dir).sort();
  } catch (e) {
    throw err('E_IO', `Cannot list ${dir}: ${describe(e)}. Check the path and permissions.`, e);
  }
}

function isDatasetFile(name: string): boolean {
  return name === MANIFEST_NAME || name === LOCK_NAME || SHARD_RE.test(name) || TMP_RE.test(name);
}

// ---------------------------------------------------------------------------------------------
// Record validation (shared by the writer and the reader)
// ---------------------------------------------------------------------------------------------

function intRange(a: ArrayLike<number>, name: string, min: number, max: number): string | undefined {
  for (let i = 0; i < a.length; i++) {
    const v = a[i];
    if (!Number.isInteger(v) || v < min || v > max) return `${name}[${i}] is ${show(v)}, not an integer in [${min}, ${max}]`;
  }
  return undefined;
}

function isArrayLike(v: unknown): v is ArrayLike<number> {
  return Array.isArray(v) || (ArrayBuffer.isView(v) && !(v instanceof DataView));
}

/** The first problem of a record (as a phrase to put after its name), or undefined. */
function recordProblem(r: DistilledRecord, topk: number): string | undefined {
  if (typeof r !== 'object' || r === null) return 'is not an object';
  if (typeof r.id !== 'string') return `id is ${show(r.id)}, not a string`;
  if (r.id.length > DATASET_LIMITS.maxIdLength) return `id is ${r.id.length} characters long, over maxIdLength=${DATASET_LIMITS.maxIdLength}`;
  if (LONE_SURROGATE_RE.test(r.id)) return 'id contains a lone UTF-16 surrogate, which UTF-8 cannot store';
  if (!Number.isInteger(r.sourceIndex) || r.sourceIndex < 0 || r.sourceIndex > INT32_MAX) {
    return `sourceIndex is ${show(r.sourceIndex)}, not an integer in [0, ${INT32_MAX}]`;
  }
  if (!isArrayLike(r.inputIds)) return 'inputIds is not an array';
  if (!isArrayLike(r.lossMask)) return 'lossMask is not an array';
  const n = r.inputIds.length;
  if (n < 1 || n > DATASET_LIMITS.maxSeqLen) return `has ${n} tokens; a conversation has 1 to maxSeqLen=${DATASET_LIMITS.maxSeqLen} tokens`;
  if (r.lossMask.length !== n) return `loss_mask has ${r.lossMask.length} entries but input_ids has ${n}; they must be the same length`;
  const bad = intRange(r.inputIds, 'input_ids', 0, INT32_MAX);
  if (bad) return bad;
  let masked = 0;
  for (let i = 0; i < n; i++) {
    const m = r.lossMask[i];
    if (m !== 0 && m !== 1) return `loss_mask[${i}] is ${show(m)}; the mask holds only 0 and 1`;
    masked += m;
  }
  if (!Array.isArray(r.turnRoles) || !Array.isArray(r.turnStarts) || !Array.isArray(r.turnEnds)) {
    return 'turnRoles, turnStarts and turnEnds must be arrays';
  }
  const t = r.turnRoles.length;
  if (r.turnStarts.length !== t || r.turnEnds.length !== t) {
    return `turn_roles, turn_starts and turn_ends have ${t}, ${r.turnStarts.length} and ${r.turnEnds.length} entries; they must be the same length`;
  }
  if (t > DATASET_LIMITS.maxTurns) return `has ${t} turns, over maxTurns=${DATASET_LIMITS.maxTurns}`;
  let prevEnd = 0;
  let maskedInAssistant = 0;
  for (let j = 0; j < t; j++) {
    const role = r.turnRoles[j];
    if (typeof role !== 'string' || role.length === 0 || role.length > DATASET_LIMITS.maxRoleLength || LONE_SURROGATE_RE.test(role)) {
      return `turn_roles[${j}] is ${show(role)}; a role is a non-empty string of at most ${DATASET_LIMITS.maxRoleLength} characters`;
    }
    const s = r.turnStarts[j];
    const e = r.turnEnds[j];
    if (!Number.isInteger(s) || !Number.isInteger(e) || s < prevEnd || e < s || e > n) {
      return (
        `turn ${j} (${role}) spans [${show(s)}, ${show(e)}); spans must be integers with ` +
        `${j === 0 ? '0' : `the previous end ${prevEnd}`} <= start <= end <= ${n} (the sequence length)`
      );
    }
    if (role === 'assistant') for (let i = s; i < e; i++) maskedInAssistant += r.lossMask[i];
    prevEnd = e;
  }
  if (maskedInAssistant !== masked) {
    return `has ${masked - maskedInAssistant} loss_mask == 1 tokens outside every assistant turn; only generated assistant tokens are masked in`;
  }
  if (typeof r.truncated !== 'boolean') return `truncated is ${show(r.truncated)}, not a boolean`;
  if (topk === 0) {
    if (r.teacherTopkIds !== undefined || r.teacherTopkLogprobs !== undefined) {
      return 'has teacher top-k arrays but the dataset has topk 0';
    }
    return undefined;
  }
  if (!isArrayLike(r.teacherTopkIds) || !isArrayLike(r.teacherTopkLogprobs)) {
    return `has no teacherTopkIds / teacherTopkLogprobs but the dataset has topk ${topk}`;
  }
  const want = masked * topk;
  if (r.teacherTopkIds.length !== want || r.teacherTopkLogprobs.length !== want) {
    return (
      `teacher_topk_ids has ${r.teacherTopkIds.length} and teacher_topk_logprobs ${r.teacherTopkLogprobs.length} entries ` +
      `but ${masked} masked tokens x topk ${topk} = ${want} are needed`
    );
  }
  const badIds = intRange(r.teacherTopkIds, 'teacher_topk_ids', 0, INT32_MAX);
  if (badIds) return badIds;
  const lp = r.teacherTopkLogprobs;
  for (let i = 0; i < want; i++) {
    const v = lp[i];
    if (typeof v !== 'number' || Number.isNaN(v) || v > LOGPROB_TOLERANCE) {
      return `teacher_topk_logprobs[${i}] is ${show(v)}; a log-probability is a number <= 0 (or -Infinity)`;
    }
    if (i % topk !== 0 && Math.fround(v) > Math.fround(lp[i - 1])) {
      return `teacher_topk_logprobs[${i}] (${v}) is larger than the one before it (${lp[i - 1]}); each group of ${topk} is sorted by probability, descending`;
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Writing shards
// ---------------------------------------------------------------------------------------------

function listType<T extends DataType>(child: T): List<T> {
  return new List(new Field('item', child, false));
}

interface ColumnSpec {
  name: string;
  /** apache-arrow's name for the type, e.g. "List<Int32>". */
  type: string;
  make: () => DataType;
}

const BASE_COLUMNS: ColumnSpec[] = [
  { name: 'id', type: 'Utf8', make: () => new Utf8() },
  { name: 'source_index', type: 'Int32', make: () => new Int32() },
  { name: 'input_ids', type: 'List<Int32>', make: () => listType(new Int32()) },
  { name: 'loss_mask', type: 'List<Uint8>', make: () => listType(new Uint8()) },
  { name: 'turn_roles', type: 'List<Utf8>', make: () => listType(new Utf8()) },
  { name: 'turn_starts', type: 'List<Int32>', make: () => listType(new Int32()) },
  { name: 'turn_ends', type: 'List<Int32>', make: () => listType(new Int32()) },
  { name: 'truncated', type: 'Bool', make: () => new Bool() },
];
const TOPK_COLUMNS: ColumnSpec[] = [
  { name: 'teacher_topk_ids', type: 'List<Int32>', make: () => listType(new Int32()) },
  { name: 'teacher_topk_logprobs', type: 'List<Float32>', make: () => listType(new Float32()) },
];

function columnsFor(topk: number): ColumnSpec[] {
  return topk > 0 ? [...BASE_COLUMNS, ...TOPK_COLUMNS] : BASE_COLUMNS;
}

function sortedMeta(meta: Record<string, string>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of Object.keys(meta).sort()) out[k] = meta[k];
  return out;
}

function offsetsOf(lengths: ArrayLike<number>): Int32Array {
  const off = new Int32Array(lengths.length + 1);
  for (let i = 0; i < lengths.length; i++) off[i + 1] = off[i] + lengths[i];
  return off;
}

function utf8Data(strings: string[]): Data<Utf8> {
  const enc = new TextEncoder();
  const parts = strings.map((s) => enc.encode(s));
  const offs = offsetsOf(parts.map((p) => p.length));
  const bytes = new Uint8Array(offs[parts.length]);
  parts.forEach((p, i) => bytes.set(p, offs[i]));
  return makeData({ type: new Utf8(), length: strings.length, nullCount: 0, valueOffsets: offs, data: bytes });
}

function listData<T extends DataType>(type: List<T>, offs: Int32Array, child: Data<T>): Data<List<T>> {
  return makeData({ type, length: offs.length - 1, nullCount: 0, valueOffsets: offs, child });
}

/** Concatenate per-record arrays into one typed array plus list offsets. */
function concat<A extends Int32Array | Uint8Array | Float32Array>(
  Ctor: { new (n: number): A },
  parts: ArrayLike<number>[],
): { offs: Int32Array; values: A } {
  const offs = offsetsOf(parts.map((p) => p.length));
  const values = new Ctor(offs[parts.length]);
  parts.forEach((p, i) => values.set(p, offs[i]));
  return { offs, values };
}

/** Rough size of a shard before building it, to refuse one that would not fit the limits. */
function estimateBytes(records: DistilledRecord[]): number {
  let b = 0;
  for (const r of records) {
    b += 64 + r.id.length * 3 + r.inputIds.length * 5 + r.turnRoles.length * (16 + DATASET_LIMITS.maxRoleLength);
    b += (r.teacherTopkIds?.length ?? 0) * 8;
  }
  return b;
}

function buildShard(records: DistilledRecord[], meta: Record<string, string>, topk: number): Uint8Array {
  const n = records.length;
  const specs = columnsFor(topk);
  const types = specs.map((s) => s.make());
  const fields = specs.map((s, i) => new Field(s.name, types[i], false));
  const int32 = (a: Int32Array): Data<Int32> => makeData({ type: new Int32(), length: a.length, nullCount: 0, data: a });

  const ids = concat(Int32Array, records.map((r) => r.inputIds));
  const mask = concat(Uint8Array, records.map((r) => r.lossMask));
  const starts = concat(Int32Array, records.map((r) => r.turnStarts));
  const ends = concat(Int32Array, records.map((r) => r.turnEnds));
  const roles = records.flatMap((r) => r.turnRoles);
  const truncated = new Uint8Array(Math.ceil(n / 8));
  records.forEach((r, i) => {
    if (r.truncated) truncated[i >> 3] |= 1 << (i & 7);
  });

  const columns: Data[] = [
    utf8Data(records.map((r) => r.id)),
    int32(Int32Array.from(records, (r) => r.sourceIndex)),
    listData(types[2] as List<Int32>, ids.offs, int32(ids.values)),
    listData(types[3] as List<Uint8>, mask.offs, makeData({ type: new Uint8(), length: mask.values.length, nullCount: 0, data: mask.values })),
    listData(types[4] as List<Utf8>, starts.offs, utf8Data(roles)),
    listData(types[5] as List<Int32>, starts.offs, int32(starts.values)),
    listData(types[6] as List<Int32>, ends.offs, int32(ends.values)),
    makeData({ type: new Bool(), length: n, nullCount: 0, data: truncated }),
  ];
  if (topk > 0) {
    const tIds = concat(Int32Array, records.map((r) => r.teacherTopkIds!));
    const tLp = concat(Float32Array, records.map((r) => r.teacherTopkLogprobs!));
    columns.push(listData(types[8] as List<Int32>, tIds.offs, int32(tIds.values)));
    columns.push(
      listData(types[9] as List<Float32>, tLp.offs, makeData({ type: new Float32(), length: tLp.values.length, nullCount: 0, data: tLp.values })),
    );
  }
  const schema = new Schema(fields, new Map(Object.entries(sortedMeta(meta))));
  const struct = makeData({ type: new Struct(fields), length: n, nullCount: 0, children: columns });
  return tableToIPC(new Table(schema, [new RecordBatch(schema, struct)]), 'file');
}

// ---------------------------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------------------------

function manifestBytes(m: Manifest): Uint8Array {
  const text = JSON.stringify({ ...m, meta: sortedMeta(m.meta) }, null, 2) + '\n';
  return Buffer.from(text, 'utf8');
}

function emptyManifest(meta: Record<string, string>, topk: number): Manifest {
  return {
    format: DATASET_FORMAT,
    version: DATASET_VERSION,
    meta: sortedMeta(meta),
    topk,
    shards: [],
    next_index: 0,
    failures: [],
    skipped: [],
    complete: false,
    summary: null,
  };
}

/** Validate parsed manifest JSON; all problems at once, by key. */
function validateManifest(v: unknown, file: string): Manifest {
  const fix = `${DAMAGED}`;
  if (!isObject(v)) throw err('E_CONFIG', `${file} must hold a JSON object but holds ${show(v, 40)}. ${fix}`);
  if (v.format !== DATASET_FORMAT) {
    throw err('E_CONFIG', `${file}: "format" is ${show(v.format)}, not ${q(DATASET_FORMAT)}; this is not a medusa-train distilled dataset. Pass a folder written by medusa-train distill.`);
  }
  if (typeof v.version === 'number' && v.version > DATASET_VERSION) {
    throw err('E_UNSUPPORTED', `${file} has format version ${v.version}; this medusa-train reads version ${DATASET_VERSION}. Upgrade medusa-train.`);
  }
  const problems: string[] = [];
  const add = (key: string, msg: string): void => {
    problems.push(`${key}: ${msg}`);
  };
  if (v.version !== DATASET_VERSION) add('version', `must be ${DATASET_VERSION} but is ${show(v.version)}`);

  if (!isObject(v.meta)) add('meta', `must be an object mapping strings to strings but is ${show(v.meta, 40)}`);
  else {
    const keys = Object.keys(v.meta);
    if (keys.length > DATASET_LIMITS.maxMetaEntries) add('meta', `has ${keys.length} entries, over maxMetaEntries=${DATASET_LIMITS.maxMetaEntries}`);
    for (const k of keys) if (typeof v.meta[k] !== 'string') add(`meta.${k}`, `must be a string but is ${show(v.meta[k], 40)}`);
  }
  if (!Number.isInteger(v.topk) || (v.topk as number) < 0 || (v.topk as number) > DATASET_LIMITS.maxTopk) {
    add('topk', `must be an integer from 0 to maxTopk=${DATASET_LIMITS.maxTopk} but is ${show(v.topk)}`);
  }

  let lastIndex = -1;
  if (!Array.isArray(v.shards)) add('shards', `must be an array but is ${show(v.shards, 40)}`);
  else {
    if (v.shards.length > DATASET_LIMITS.maxShards) add('shards', `lists ${v.shards.length} shards, over maxShards=${DATASET_LIMITS.maxShards}`);
    else {
      v.shards.forEach((s: unknown, i: number) => {
        const key = `shards[${i}]`;
        if (!isObject(s)) return add(key, `must be an object but is ${show(s, 40)}`);
        const before = problems.length;
        if (s.file !== shardFileName(i)) add(`${key}.file`, `must be ${q(shardFileName(i))} (shards are numbered in order) but is ${show(s.file)}`);
        if (!isIndex(s.rows) || s.rows < 1) add(`${key}.rows`, `must be a positive integer but is ${show(s.rows)}`);
        for (const k of ['first_index', 'last_index'] as const) {
          if (!isIndex(s[k]) || (s[k] as number) > INT32_MAX) add(`${key}.${k}`, `must be an integer from 0 to ${INT32_MAX} but is ${show(s[k])}`);
        }
        if (!isIndex(s.tokens)) add(`${key}.tokens`, `must be a non-negative integer but is ${show(s.tokens)}`);
        if (!isIndex(s.bytes) || s.bytes < 1 || s.bytes > DATASET_LIMITS.maxShardBytes) {
          add(`${key}.bytes`, `must be an integer from 1 to maxShardBytes=${DATASET_LIMITS.maxShardBytes} but is ${show(s.bytes)}`);
        }
        if (typeof s.sha256 !== 'string' || !SHA256_RE.test(s.sha256)) add(`${key}.sha256`, `must be 64 lowercase hex digits but is ${show(s.sha256)}`);
        if (problems.length > before) return;
        const first = s.first_index as number;
        const last = s.last_index as number;
        if (first > last || (s.rows as number) > last - first + 1) {
          add(key, `first_index ${first}, last_index ${last} and rows ${String(s.rows)} are inconsistent (rows must fit in [first_index, last_index])`);
        } else if (first <= lastIndex) {
          add(`${key}.first_index`, `${first} is not after the previous shard's last_index ${lastIndex}; shards hold increasing, disjoint index ranges`);
        }
        if ((s.tokens as number) < (s.rows as number)) add(`${key}.tokens`, `${String(s.tokens)} is less than rows ${String(s.rows)} (every row has at least one token)`);
        lastIndex = Math.max(lastIndex, last);
      });
    }
  }
  if (!isIndex(v.next_index) || v.next_index > INT32_MAX + 1) add('next_index', `must be an integer from 0 to ${INT32_MAX + 1} but is ${show(v.next_index)}`);
  else if (v.next_index <= lastIndex) add('next_index', `${v.next_index} is not after the last shard's last_index ${lastIndex}`);

  if (!Array.isArray(v.failures)) add('failures', `must be an array but is ${show(v.failures, 40)}`);
  else {
    const seen = new Set<number>();
    v.failures.forEach((f: unknown, i: number) => {
      const key = `failures[${i}]`;
      if (!isObject(f)) return add(key, `must be an object {index, id, reason} but is ${show(f, 40)}`);
      if (!isIndex(f.index)) add(`${key}.index`, `must be a non-negative integer but is ${show(f.index)}`);
      else if (isIndex(v.next_index) && f.index >= v.next_index) add(`${key}.index`, `${f.index} is not below next_index ${v.next_index}`);
      else if (seen.has(f.index)) add(`${key}.index`, `${f.index} is listed twice`);
      else seen.add(f.index);
      if (typeof f.id !== 'string') add(`${key}.id`, `must be a string but is ${show(f.id)}`);
      if (typeof f.reason !== 'string') add(`${key}.reason`, `must be a string but is ${show(f.reason)}`);
    });
  }
  if (!Array.isArray(v.skipped)) add('skipped', `must be an array but is ${show(v.skipped, 40)}`);
  else {
    v.skipped.forEach((s: unknown, i: number) => {
      const key = `skipped[${i}]`;
      if (!isObject(s)) return add(key, `must be an object {file, row, reason} but is ${show(s, 40)}`);
      if (typeof s.file !== 'string') add(`${key}.file`, `must be a string but is ${show(s.file)}`);
      if (!isIndex(s.row)) add(`${key}.row`, `must be a non-negative integer but is ${show(s.row)}`);
      if (typeof s.reason !== 'string') add(`${key}.reason`, `must be a string but is ${show(s.reason)}`);
    });
  }
  if (typeof v.complete !== 'boolean') add('complete', `must be true or false but is ${show(v.complete)}`);
  if (v.summary !== null && !isObject(v.summary)) add('summary', `must be an object or null but is ${show(v.summary, 40)}`);

  if (problems.length > 0) {
    const shown = problems.slice(0, 20).map((p) => `  - ${p}`);
    if (problems.length > 20) shown.push(`  - ... and ${problems.length - 20} more`);
    throw err('E_CONFIG', `${file} is not a valid dataset manifest:\n${shown.join('\n')}\n${fix}`);
  }
  return {
    format: DATASET_FORMAT,
    version: DATASET_VERSION,
    meta: { ...(v.meta as Record<string, string>) },
    topk: v.topk as number,
    shards: (v.shards as ShardEntry[]).map((s) => ({
      file: s.file,
      rows: s.rows,
      first_index: s.first_index,
      last_index: s.last_index,
      tokens: s.tokens,
      bytes: s.bytes,
      sha256: s.sha256,
    })),
    next_index: v.next_index as number,
    failures: (v.failures as FailureRecord[]).map((f) => ({ index: f.index, id: f.id, reason: f.reason })),
    skipped: (v.skipped as SkipRecord[]).map((s) => ({ file: s.file, row: s.row, reason: s.reason })),
    complete: v.complete as boolean,
    summary: v.summary as Record<string, unknown> | null,
  };
}

function readManifest(dir: string): Manifest {
  const file = path.join(dir, MANIFEST_NAME);
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    const isDir = fs.existsSync(dir) && fs.statSync(dir).isDirectory();
    throw err(
      'E_IO',
      isDir
        ? `${file} does not exist: ${dir} is not a distilled dataset (or its writer crashed before the first manifest was written; rerun distill to resume).`
        : `Cannot read dataset ${dir}: ${describe(e)}. Check the path.`,
      e,
    );
  }
  if (!st.isFile()) throw err('E_IO', `${file} is not a file. ${DAMAGED}`);
  if (st.size > DATASET_LIMITS.maxManifestBytes) {
    throw err('E_CONFIG', `${file} is ${st.size} bytes, over maxManifestBytes=${DATASET_LIMITS.maxManifestBytes}; is it the right file?`);
  }
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw err('E_IO', `Cannot read ${file}: ${describe(e)}. Check permissions.`, e);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw err('E_CONFIG', `${file} is not valid JSON (${describe(e).replace(/[.\s]+$/, '')}). ${DAMAGED}`, e);
  }
  return validateManifest(json, file);
}

/** Check that each listed shard exists with the listed size (and, optionally, hash). */
function checkShardFiles(dir: string, m: Manifest, hashAll: boolean, hashLast: boolean): void {
  m.shards.forEach((s, i) => {
    const file = path.join(dir, s.file);
    let size: number;
    try {
      const st = fs.statSync(file);
      if (!st.isFile()) throw new Error('not a regular file');
      size = st.size;
    } catch (e) {
      throw err('E_IO', `${file} is listed in ${MANIFEST_NAME} (shards[${i}]) but cannot be read: ${describe(e)}. ${DAMAGED}`, e);
    }
    if (size !== s.bytes) {
      throw err('E_IO', `${file} is ${size} bytes but ${MANIFEST_NAME} (shards[${i}].bytes) says ${s.bytes}; the file was cut or replaced. ${DAMAGED}`);
    }
    if (hashAll || (hashLast && i === m.shards.length - 1)) {
      let h: string;
      try {
        h = hashFile(file);
      } catch (e) {
        throw err('E_IO', `Cannot read ${file}: ${describe(e)}. Check permissions.`, e);
      }
      if (h !== s.sha256) {
        throw err('E_IO', `${file} has SHA-256 ${h} but ${MANIFEST_NAME} (shards[${i}].sha256) says ${s.sha256}; the file is corrupt. ${DAMAGED}`);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Lock (one writer per folder)
// ---------------------------------------------------------------------------------------------

interface LockInfo {
  pid: number;
  host: string;
  boot?: string;
  start?: string;
  created: string;
}

/** Folders open by a DatasetWriter of this process (real paths). */
const OPEN_DIRS = new Set<string>();

function readProc(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** Start time of a process in clock ticks since boot (Linux), to tell a live holder from a reused pid. */
function processStart(pid: number): string | undefined {
  const s = readProc(`/proc/${pid}/stat`);
  if (s === undefined) return undefined;
  return s.slice(s.lastIndexOf(')') + 2).split(' ')[19];
}

function bootId(): string | undefined {
  return readProc('/proc/sys/kernel/random/boot_id')?.trim();
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Why the lock holder is still alive, or undefined if the lock is stale. */
function lockHolderAlive(info: LockInfo | undefined, realDir: string): string | undefined {
  if (info === undefined) return undefined; // unreadable: the holder died while writing it
  const who = `pid ${info.pid} on host ${q(info.host)} since ${info.created}`;
  if (info.host !== os.hostname()) return `${who} (another host: cannot check whether it still runs)`;
  if (info.pid === process.pid) {
    return OPEN_DIRS.has(realDir) ? `this process (another DatasetWriter is open on this folder; close() it first)` : undefined;
  }
  const boot = bootId();
  if (info.boot !== undefined && boot !== undefined && info.boot !== boot) return undefined;
  if (!pidAlive(info.pid)) return undefined;
  const start = processStart(info.pid);
  if (info.start !== undefined && start !== undefined && info.start !== start) return undefined;
  return who;
}

function readLock(file: string): LockInfo | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    if (isObject(v) && Number.isInteger(v.pid) && typeof v.host === 'string' && typeof v.created === 'string') return v as unknown as LockInfo;
  } catch {
    /* unreadable */
  }
  return undefined;
}

/** Take the folder's lock; returns the lock file's content and whether a stale lock was removed. */
function acquireLock(dir: string, realDir: string): { text: string; staleRemoved: boolean } {
  const file = path.join(dir, LOCK_NAME);
  const info: LockInfo = { pid: process.pid, host: os.hostname(), boot: bootId(), start: processStart(process.pid), created: new Date().toISOString() };
  const text = JSON.stringify(info) + '\n';
  let staleRemoved = false;
  // The content is written to a temp file and hard-linked into place: link() fails if the lock exists,
  // and a lock that exists is always complete (an empty lock would look stale to another writer).
  const tmp = path.join(dir, `${LOCK_NAME}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(tmp, text);
  } catch (e) {
    throw err('E_IO', `Cannot write in ${dir}: ${describe(e)}. Check that the folder is writable.`, e);
  }
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        try {
          fs.linkSync(tmp, file);
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'ENOSYS' && code !== 'EOPNOTSUPP') throw e;
          fs.writeFileSync(file, text, { flag: 'wx' }); // a filesystem without hard links
        }
        return { text, staleRemoved };
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw err('E_IO', `Cannot create ${file}: ${describe(e)}. Check that the folder is writable.`, e);
        }
      }
      const alive = lockHolderAlive(readLock(file), realDir);
      if (alive !== undefined) {
        throw err(
          'E_IO',
          `${dir} is being written by ${alive}. Wait for that run to finish or stop it; if it is not running any more, delete ${file}.`,
        );
      }
      try {
        fs.unlinkSync(file);
        staleRemoved = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw err('E_IO', `Cannot remove the stale lock ${file}: ${describe(e)}.`, e);
      }
    }
    throw err('E_IO', `Cannot take the lock ${file}: another process keeps creating it. Make sure only one distill writes to ${dir}.`);
  } finally {
    try {
      fs.unlinkSync(tmp);
    } catch {
      /* gone */
    }
  }
}

function releaseLock(dir: string, text: string): void {
  const file = path.join(dir, LOCK_NAME);
  try {
    if (fs.readFileSync(file, 'utf8') === text) fs.unlinkSync(file);
  } catch {
    /* already gone */
  }
}

// ---------------------------------------------------------------------------------------------
// DatasetWriter
// ---------------------------------------------------------------------------------------------

function internal(message: string): MedusaError {
  return err('E_INTERNAL', message);
}

function checkWriterOptions(opts: WriterOptions): void {
  if (!isObject(opts)) throw internal('DatasetWriter.open: options must be an object {meta, topk, mode}');
  if (!['new', 'resume', 'overwrite'].includes(opts.mode)) throw internal(`DatasetWriter.open: mode is ${show(opts.mode)}; use 'new', 'resume' or 'overwrite'`);
  if (!isObject(opts.meta)) throw internal('DatasetWriter.open: meta must be an object mapping strings to strings');
  const keys = Object.keys(opts.meta);
  if (keys.length > DATASET_LIMITS.maxMetaEntries) throw internal(`DatasetWriter.open: meta has ${keys.length} entries, over maxMetaEntries=${DATASET_LIMITS.maxMetaEntries}`);
  for (const k of keys) {
    if (typeof opts.meta[k] !== 'string') throw internal(`DatasetWriter.open: meta.${k} is ${show(opts.meta[k], 40)}; meta values are strings (JSON-encode structured values)`);
    if (k.length === 0 || LONE_SURROGATE_RE.test(k) || LONE_SURROGATE_RE.test(opts.meta[k])) {
      throw internal(`DatasetWriter.open: meta key ${q(k)} or its value is empty or not valid Unicode`);
    }
  }
  if (!Number.isInteger(opts.topk) || opts.topk < 0 || opts.topk > DATASET_LIMITS.maxTopk) {
    throw err('E_CONFIG', `topk is ${show(opts.topk)}; it must be an integer from 0 (no teacher distribution) to maxTopk=${DATASET_LIMITS.maxTopk}.`);
  }
  if (opts.ignoreOnResume !== undefined && !(Array.isArray(opts.ignoreOnResume) && opts.ignoreOnResume.every((k) => typeof k === 'string'))) {
    throw internal('DatasetWriter.open: ignoreOnResume must be an array of meta keys');
  }
}

/** Every meta key (and topk) whose stored value differs from the new one, except ignored keys. */
function metaDifferences(stored: Manifest, opts: WriterOptions): string[] {
  const ignore = new Set(opts.ignoreOnResume ?? []);
  const out: string[] = [];
  if (stored.topk !== opts.topk) out.push(`topk: stored ${stored.topk}, now ${opts.topk}`);
  const keys = [...new Set([...Object.keys(stored.meta), ...Object.keys(opts.meta)])].sort();
  for (const k of keys) {
    if (ignore.has(k)) continue;
    const a = Object.prototype.hasOwnProperty.call(stored.meta, k) ? stored.meta[k] : undefined;
    const b = Object.prototype.hasOwnProperty.call(opts.meta, k) ? opts.meta[k] : undefined;
    if (a !== b) out.push(`${k}: stored ${show(a)}, now ${show(b)}`);
  }
  return out;
}

/**
 * Appends shards to a dataset folder, keeping it readable at every instant.
 * Usage: `open` -> `appendShard`* -> `finish` (or `close` to stop without marking it complete).
 */
export class DatasetWriter {
  readonly dir: string;
  readonly topk: number;
  /** Files deleted on open: unlisted shards, temp files and a stale lock, left by a crashed run. */
  readonly orphansRemoved: string[];
  private manifest: Manifest;
  private readonly lockText: string;
  private readonly realDir: string;
  private closed = false;

  private constructor(dir: string, realDir: string, manifest: Manifest, lockText: string, orphans: string[]) {
    this.dir = dir;
    this.realDir = realDir;
    this.manifest = manifest;
    this.topk = manifest.topk;
    this.lockText = lockText;
    this.orphansRemoved = orphans;
  }

  /** Where to continue: every input index below it is written, failed or skipped. */
  get nextIndex(): number {
    return this.manifest.next_index;
  }
  /** Rows written so far. */
  get written(): number {
    return this.manifest.shards.reduce((a, s) => a + s.rows, 0);
  }
  get failures(): readonly FailureRecord[] {
    return this.manifest.failures;
  }
  get skipped(): readonly SkipRecord[] {
    return this.manifest.skipped;
  }
  get shards(): readonly ShardEntry[] {
    return this.manifest.shards;
  }
  /** The meta stored in the dataset (on resume: the stored values, including ignored keys). */
  get meta(): Readonly<Record<string, string>> {
    return this.manifest.meta;
  }
  /** Whether finish() has run (a resumed complete dataset stays complete until the next append). */
  get complete(): boolean {
    return this.manifest.complete;
  }

  /**
   * Open `dir` for writing.
   * - 'new': `dir` must not exist or be empty.
   * - 'resume': continue the dataset in `dir` (a missing or empty folder starts a new one). The
   *   caller's meta and topk must equal the stored ones, except keys in ignoreOnResume.
   * - 'overwrite': start again; refuses a folder holding files that are not part of a dataset.
   */
  static open(dir: string, opts: WriterOptions): DatasetWriter {
    checkWriterOptions(opts);
    const abs = path.resolve(dir);
    let exists = false;
    try {
      const st = fs.statSync(abs);
      if (!st.isDirectory()) throw err('E_IO', `${abs} exists and is not a folder. Choose another --out.`);
      exists = true;
    } catch (e) {
      if (e instanceof MedusaError) throw e;
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw err('E_IO', `Cannot access ${abs}: ${describe(e)}.`, e);
    }
    const before = exists ? listDir(abs) : [];
    if (opts.mode === 'new' && before.length > 0) {
      throw err(
        'E_IO',
        `${abs} already exists and is not empty (${before.slice(0, 5).join(', ')}${before.length > 5 ? ', ...' : ''}). ` +
          `Resume it, start again with --overwrite, or choose another --out.`,
      );
    }
    const foreign = before.filter((f) => !isDatasetFile(f));
    if (foreign.length > 0 && (opts.mode === 'overwrite' || !before.includes(MANIFEST_NAME))) {
      throw err(
        'E_IO',
        `${abs} holds files that are not part of a distilled dataset (${foreign.slice(0, 5).join(', ')}${foreign.length > 5 ? ', ...' : ''}); ` +
          `refusing to ${opts.mode === 'overwrite' ? 'overwrite' : 'write into'} it. Choose an empty or new --out.`,
      );
    }
    try {
      fs.mkdirSync(abs, { recursive: true });
    } catch (e) {
      throw err('E_IO', `Cannot create ${abs}: ${describe(e)}. Check the path and permissions.`, e);
    }
    const realDir = fs.realpathSync(abs);
    const lock = acquireLock(abs, realDir);
    try {
      const orphans: string[] = lock.staleRemoved ? [LOCK_NAME] : [];
      const remove = (name: string): void => {
        try {
          fs.unlinkSync(path.join(abs, name));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
          throw err('E_IO', `Cannot remove the leftover file ${path.join(abs, name)}: ${describe(e)}. Remove it by hand.`, e);
        }
        orphans.push(name);
      };
      let manifest: Manifest;
      if (opts.mode === 'resume' && fs.existsSync(path.join(abs, MANIFEST_NAME))) {
        // Check everything before touching anything.
        manifest = readManifest(abs);
        const diffs = metaDifferences(manifest, opts);
        if (diffs.length > 0) {
          throw err(
            'E_CONFIG',
            `Cannot resume ${abs}: it was written with different settings:\n${diffs.map((d) => `  - ${d}`).join('\n')}\n` +
              `Use a new --out folder, or --overwrite to start again with the new settings.`,
          );
        }
        // Sizes of every listed shard, and the hash of the last one written (the one a crash could touch).
        checkShardFiles(abs, manifest, false, true);
        for (const name of listDir(abs)) if (TMP_RE.test(name)) remove(name);
      } else {
        // Temp files first (the manifest's own temp name is among them), then a fresh manifest that
        // replaces any old one before old shards are deleted: a crash from here on leaves an empty
        // dataset plus orphans.
        for (const name of listDir(abs)) if (TMP_RE.test(name)) remove(name);
        manifest = emptyManifest(opts.meta, opts.topk);
        writeAtomic(path.join(abs, MANIFEST_NAME), manifestBytes(manifest));
      }
      // Shards the manifest does not list (renamed into place, but the manifest update was lost).
      const listed = new Set(manifest.shards.map((s) => s.file));
      for (const name of listDir(abs)) if (SHARD_RE.test(name) && !listed.has(name)) remove(name);
      if (orphans.length > 0) fsyncDir(abs);
      OPEN_DIRS.add(realDir);
      return new DatasetWriter(abs, realDir, manifest, lock.text, orphans);
    } catch (e) {
      releaseLock(abs, lock.text);
      throw e;
    }
  }

  private ensureOpen(what: string): void {
    if (this.closed) throw internal(`DatasetWriter.${what}: the writer for ${this.dir} is closed`);
  }

  /**
   * Append one shard holding `records` (sorted by sourceIndex, all in [nextIndex, upTo)), plus the
   * failures and skips of the same range; afterwards nextIndex = upTo. With no records only the
   * manifest is updated. Invalid input is an E_INTERNAL naming the record; nothing is written then.
   */
  appendShard(records: DistilledRecord[], failures: FailureRecord[], skipped: SkipRecord[], upTo: number): void {
    this.ensureOpen('appendShard');
    const m = this.manifest;
    const from = m.next_index;
    const where = `appendShard to ${this.dir}`;
    if (!Array.isArray(records) || !Array.isArray(failures) || !Array.isArray(skipped)) throw internal(`${where}: records, failures and skipped must be arrays`);
    if (!Number.isInteger(upTo) || upTo < from || upTo > INT32_MAX + 1) {
      throw internal(`${where}: upTo is ${show(upTo)}; it must be an integer from nextIndex ${from} to ${INT32_MAX + 1}`);
    }
    const taken = new Set<number>();
    let prev = -1;
    for (const r of records) {
      const name = isObject(r) && typeof r.id === 'string' ? `record ${q(r.id)}` : 'a record';
      const idx = isObject(r) ? r.sourceIndex : undefined;
      if (!Number.isInteger(idx) || (idx as number) < from || (idx as number) >= upTo) {
        throw internal(`${where}: ${name} has sourceIndex ${show(idx)}, outside [nextIndex ${from}, upTo ${upTo}); it was already written or is past this shard`);
      }
      if ((idx as number) <= prev) throw internal(`${where}: ${name} has sourceIndex ${String(idx)} after ${prev}; records must be sorted by sourceIndex without duplicates`);
      const problem = recordProblem(r, m.topk);
      if (problem !== undefined) throw internal(`${where}: ${name} (sourceIndex ${String(idx)}) ${problem}`);
      prev = idx as number;
      taken.add(prev);
    }
    const newFailures: FailureRecord[] = [];
    for (const f of failures) {
      if (!isObject(f) || !Number.isInteger(f.index) || f.index < from || f.index >= upTo || typeof f.id !== 'string' || typeof f.reason !== 'string') {
        throw internal(`${where}: failure ${show(f)} must be {index in [${from}, ${upTo}), id: string, reason: string}`);
      }
      if (taken.has(f.index)) throw internal(`${where}: failure index ${f.index} (${q(f.id)}) is also a written record or listed twice`);
      taken.add(f.index);
      newFailures.push({ index: f.index, id: f.id, reason: f.reason.slice(0, DATASET_LIMITS.maxReasonLength) });
    }
    newFailures.sort((a, b) => a.index - b.index);
    const newSkips: SkipRecord[] = skipped.map((s) => {
      if (!isObject(s) || typeof s.file !== 'string' || !isIndex(s.row) || typeof s.reason !== 'string') {
        throw internal(`${where}: skip ${show(s)} must be {file: string, row: non-negative integer, reason: string}`);
      }
      return { file: s.file, row: s.row, reason: s.reason.slice(0, DATASET_LIMITS.maxReasonLength) };
    });

    const shards = m.shards.slice();
    if (records.length > 0) {
      if (shards.length >= DATASET_LIMITS.maxShards) throw internal(`${where}: the dataset already has maxShards=${DATASET_LIMITS.maxShards} shards; write larger shards`);
      const estimate = estimateBytes(records);
      if (estimate > DATASET_LIMITS.maxShardBytes) {
        throw internal(`${where}: ${records.length} records need about ${estimate} bytes, over maxShardBytes=${DATASET_LIMITS.maxShardBytes}; append fewer records per shard`);
      }
      let bytes: Uint8Array;
      try {
        bytes = buildShard(records, m.meta, m.topk);
      } catch (e) {
        throw err('E_INTERNAL', `${where}: apache-arrow could not encode the shard: ${describe(e)}`, e);
      }
      if (bytes.length > DATASET_LIMITS.maxShardBytes) {
        throw internal(`${where}: the shard is ${bytes.length} bytes, over maxShardBytes=${DATASET_LIMITS.maxShardBytes}; append fewer records per shard`);
      }
      const file = shardFileName(shards.length);
      writeAtomic(path.join(this.dir, file), bytes);
      shards.push({
        file,
        rows: records.length,
        first_index: records[0].sourceIndex,
        last_index: records[records.length - 1].sourceIndex,
        tokens: records.reduce((a, r) => a + r.inputIds.length, 0),
        bytes: bytes.length,
        sha256: sha256Hex(bytes),
      });
    }
    const next: Manifest = {
      ...m,
      shards,
      next_index: upTo,
      failures: [...m.failures, ...newFailures],
      skipped: [...m.skipped, ...newSkips],
      complete: false,
      summary: null,
    };
    writeAtomic(path.join(this.dir, MANIFEST_NAME), manifestBytes(next));
    this.manifest = next;
  }

  /** Mark the dataset complete with a summary (any JSON object), and close the writer. */
  finish(summary: Record<string, unknown>): void {
    this.ensureOpen('finish');
    if (!isObject(summary)) throw internal(`DatasetWriter.finish: summary must be an object but is ${show(summary, 40)}`);
    let copy: Record<string, unknown>;
    try {
      copy = JSON.parse(JSON.stringify(summary)) as Record<string, unknown>;
    } catch (e) {
      throw err('E_INTERNAL', `DatasetWriter.finish: summary is not JSON-serializable: ${describe(e)}`, e);
    }
    const next: Manifest = { ...this.manifest, complete: true, summary: copy };
    writeAtomic(path.join(this.dir, MANIFEST_NAME), manifestBytes(next));
    this.manifest = next;
    this.close();
  }

  /** Release the folder without marking it complete (it can be resumed). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    OPEN_DIRS.delete(this.realDir);
    releaseLock(this.dir, this.lockText);
  }
}

// ---------------------------------------------------------------------------------------------
// Arrow IPC structure verification (before apache-arrow sees the bytes)
// ---------------------------------------------------------------------------------------------

type Bad = (msg: string) => never;

interface FbTable {
  pos: number;
  vt: number;
  vtSize: number;
  size: number;
}

/** Bounds-checked reading of one flatbuffer (a view of `bytes` starting at `base`). */
class Flatbuffer {
  private readonly view: DataView;
  readonly len: number;
  constructor(
    bytes: Uint8Array,
    private readonly what: string,
    readonly bad: Bad,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.len = bytes.byteLength;
  }
  private need(pos: number, size: number, what: string): void {
    if (!(Number.isSafeInteger(pos) && pos >= 0 && size >= 0 && pos + size <= this.len)) {
      this.bad(`${this.what}: ${what} (byte ${pos}, ${size} bytes) lies outside the ${this.len}-byte metadata`);
    }
  }
  u8(p: number): number {
    this.need(p, 1, 'a byte');
    return this.view.getUint8(p);
  }
  i16(p: number): number {
    this.need(p, 2, 'a 16-bit field');
    return this.view.getInt16(p, true);
  }
  u16(p: number): number {
    this.need(p, 2, 'a 16-bit field');
    return this.view.getUint16(p, true);
  }
  i32(p: number): number {
    this.need(p, 4, 'a 32-bit field');
    return this.view.getInt32(p, true);
  }
  u32(p: number): number {
    this.need(p, 4, 'an offset');
    return this.view.getUint32(p, true);
  }
  i64(p: number, what: string): number {
    this.need(p, 8, what);
    const v = this.view.getBigInt64(p, true);
    if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) this.bad(`${this.what}: ${what} is ${v}`);
    return Number(v);
  }
  root(): FbTable {
    return this.table(this.u32(0), 'the root table');
  }
  table(pos: number, what: string): FbTable {
    this.need(pos, 4, what);
    const vt = pos - this.i32(pos);
    this.need(vt, 4, `the vtable of ${what}`);
    const vtSize = this.u16(vt);
    const size = this.u16(vt + 2);
    // flatbuffers-js reads vtable entries as signed 16-bit numbers: refuse what it would read as negative.
    if (vtSize < 4 || vtSize % 2 !== 0 || vtSize > 0x7fff || size < 4 || size > 0x7fff) this.bad(`${this.what}: ${what} has a malformed vtable`);
    this.need(vt, vtSize, `the vtable of ${what}`);
    this.need(pos, size, what);
    return { pos, vt, vtSize, size };
  }
  /** Absolute position of field `i` (of `size` bytes), or undefined when absent. */
  field(t: FbTable, i: number, size: number): number | undefined {
    const e = 4 + 2 * i;
    if (e + 2 > t.vtSize) return undefined;
    const off = this.u16(t.vt + e);
    if (off === 0) return undefined;
    if (off < 4 || off + size > t.size) this.bad(`${this.what}: field ${i} lies outside its table`);
    return t.pos + off;
  }
  scalar(t: FbTable, i: number, kind: 'u8' | 'i16' | 'i32', dflt: number): number {
    const size = kind === 'u8' ? 1 : kind === 'i16' ? 2 : 4;
    const p = this.field(t, i, size);
    if (p === undefined) return dflt;
    return kind === 'u8' ? this.u8(p) : kind === 'i16' ? this.i16(p) : this.i32(p);
  }
  int64(t: FbTable, i: number, what: string): number {
    const p = this.field(t, i, 8);
    return p === undefined ? 0 : this.i64(p, what);
  }
  private ref(t: FbTable, i: number): number | undefined {
    const p = this.field(t, i, 4);
    if (p === undefined) return undefined;
    return p + this.u32(p);
  }
  sub(t: FbTable, i: number, what: string): FbTable | undefined {
    const p = this.ref(t, i);
    return p === undefined ? undefined : this.table(p, what);
  }
  /** Start and length of a vector of `elem`-byte elements, or undefined when absent. */
  vector(t: FbTable, i: number, elem: number, what: string, max: number): { start: number; n: number } | undefined {
    const p = this.ref(t, i);
    if (p === undefined) return undefined;
    const n = this.u32(p);
    if (n > max) this.bad(`${this.what}: ${what} has ${n} entries, more than the ${max} allowed`);
    this.need(p + 4, n * elem, what);
    return { start: p + 4, n };
  }
  string(t: FbTable, i: number, what: string): void {
    const v = this.vector(t, i, 1, what, this.len);
    if (v !== undefined && this.u8(v.start + v.n) !== 0) this.bad(`${this.what}: ${what} is not NUL-terminated`);
  }
  tables(t: FbTable, i: number, what: string, max: number): FbTable[] {
    const v = this.vector(t, i, 4, what, max);
    if (v === undefined) return [];
    const out: FbTable[] = [];
    for (let k = 0; k < v.n; k++) {
      const e = v.start + 4 * k;
      out.push(this.table(e + this.u32(e), `${what}[${k}]`));
    }
    return out;
  }
}

// Flatbuffer `Type` union ids (format/Schema.fbs) the reader accepts, and buffers per type.
const FB_TYPES: Record<number, { name: string; buffers: number; children: number }> = {
  2: { name: 'Int', buffers: 2, children: 0 },
  3: { name: 'FloatingPoint', buffers: 2, children: 0 },
  4: { name: 'Binary', buffers: 3, children: 0 },
  5: { name: 'Utf8', buffers: 3, children: 0 },
  6: { name: 'Bool', buffers: 2, children: 0 },
  12: { name: 'List', buffers: 2, children: 1 },
};
const MAX_FIELDS = 64;
const MAX_FIELD_DEPTH = 4;
const METADATA_V4 = 3;
const METADATA_V5 = 4;

interface SchemaShape {
  /** Flatbuffer fields in depth-first order (= the order of record batch nodes). */
  nodes: number;
  buffers: number;
  /** Node index of each top-level field. */
  topNodes: number[];
}

function verifyKeyValues(fb: Flatbuffer, t: FbTable, i: number, what: string): void {
  for (const kv of fb.tables(t, i, what, DATASET_LIMITS.maxMetaEntries)) {
    fb.string(kv, 0, `${what} key`);
    fb.string(kv, 1, `${what} value`);
    if (fb.field(kv, 0, 4) === undefined || fb.field(kv, 1, 4) === undefined) fb.bad(`${what}: an entry has no key or no value`);
  }
}
function verifySchema(fb: Flatbuffer, t: FbTable): SchemaShape {
  if (fb.scalar(t, 0, 'i16', 0) !== 0) fb.bad('the schema is big-endian; only little-endian files are read');
  const shape: SchemaShape = { nodes: 0, buffers: 0, topNodes: [] };
  const visit = (f: FbTable, depth: number, name: string): void => {
    if (shape.nodes >= MAX_FIELDS) fb.bad(`the schema has more than ${MAX_FIELDS} fields`);
    shape.nodes++;
    fb.string(f, 0, `${name}: name`);
    const typeType = fb.scalar(f, 2, 'u8', 0);
    const spec = FB_TYPES[typeType];
    if (spec === undefined) fb.bad(`${name} has Arrow type id ${typeType}, which no column of this format uses`);
    shape.buffers += spec.buffers;
    const typeTable = fb.sub(f, 3, `${name}: type`);
    if (typeTable === undefined && (typeType === 2 || typeType === 3)) fb.bad(`${name}: the ${spec.name} type has no parameters`);
    if (typeTable !== undefined && typeType === 2) {
      fb.scalar(typeTable, 0, 'i32', 0); // bitWidth
      fb.scalar(typeTable, 1, 'u8', 0); // is_signed
    }
    if (typeTable !== undefined && typeType === 3) fb.scalar(typeTable, 0, 'i16', 0); // precision
    if (fb.field(f, 4, 4) !== undefined) fb.bad(`${name} is dictionary-encoded, which this format does not use`);
    verifyKeyValues(fb, f, 6, `${name}: metadata`);
    const children = fb.tables(f, 5, `${name}: children`, MAX_FIELDS);
    if (children.length !== spec.children) fb.bad(`${name} (${spec.name}) has ${children.length} child fields, not ${spec.children}`);
    if (children.length > 0 && depth >= MAX_FIELD_DEPTH) fb.bad(`${name} nests deeper than ${MAX_FIELD_DEPTH} levels`);
    children.forEach((c, k) => visit(c, depth + 1, `${name}.child[${k}]`));
  };
  fb.tables(t, 1, 'schema fields', MAX_FIELDS).forEach((f, k) => {
    shape.topNodes.push(shape.nodes);
    visit(f, 1, `field ${k}`);
  });
  verifyKeyValues(fb, t, 2, 'schema metadata');
  fb.vector(t, 3, 8, 'schema features', 64);
  return shape;
}

/** Verify the record batch message at `off` as apache-arrow will read it; returns where its body ends. */
function verifyRecordBatchMessage(file: Uint8Array, view: DataView, off: number, end: number, shape: SchemaShape, bad: Bad, k: number): number {
  const where = `record batch ${k}`;
  if (off < 8 || off + 8 > end || off % 8 !== 0) bad(`${where} starts at byte ${off}, outside the data area [8, ${end})`);
  if (view.getInt32(off, true) !== -1) bad(`${where} does not start with the IPC continuation marker`);
  const metaLen = view.getInt32(off + 4, true);
  if (metaLen < 8 || off + 8 + metaLen > end) bad(`${where} has metadata length ${metaLen}, past the data area`);
  const fb = new Flatbuffer(file.subarray(off + 8, off + 8 + metaLen), where, bad);
  const msg = fb.root();
  const version = fb.scalar(msg, 0, 'i16', 0);
  if (version !== METADATA_V4 && version !== METADATA_V5) bad(`${where} has metadata version ${version}; only V4 and V5 are read`);
  const headerType = fb.scalar(msg, 1, 'u8', 0);
  if (headerType !== 3) bad(`${where} is a message of type ${headerType}, not a RecordBatch`);
  const rb = fb.sub(msg, 2, 'the RecordBatch header');
  if (rb === undefined) bad(`${where} has no RecordBatch header`);
  const bodyLength = fb.int64(msg, 3, 'the body length');
  const bodyStart = off + 8 + metaLen;
  if (bodyStart + bodyLength > end) bad(`${where} has a ${bodyLength}-byte body that runs past the data area`);
  verifyKeyValues(fb, msg, 4, `${where} metadata`);
  const length = fb.int64(rb, 0, 'the row count');
  if (length > INT32_MAX) bad(`${where} claims ${length} rows`);
  const maxNode = Math.min(INT32_MAX, 8 * bodyLength + 8);
  const nodes = fb.vector(rb, 1, 16, 'field nodes', MAX_FIELDS);
  if (nodes === undefined || nodes.n !== shape.nodes) bad(`${where} has ${nodes?.n ?? 0} field nodes but the schema has ${shape.nodes} fields`);
  const nodeLengths: number[] = [];
  for (let i = 0; i < nodes.n; i++) {
    const len = fb.i64(nodes.start + 16 * i, `field node ${i} length`);
    const nulls = fb.i64(nodes.start + 16 * i + 8, `field node ${i} null count`);
    if (len > maxNode || nulls > len) bad(`${where}: field node ${i} claims ${len} values (${nulls} null) in a ${bodyLength}-byte body`);
    nodeLengths.push(len);
  }
  for (const t of shape.topNodes) if (nodeLengths[t] !== length) bad(`${where}: a column has ${nodeLengths[t]} values but the batch has ${length} rows`);
  const buffers = fb.vector(rb, 2, 16, 'buffers', 3 * MAX_FIELDS);
  if (buffers === undefined || buffers.n !== shape.buffers) bad(`${where} has ${buffers?.n ?? 0} buffers but its schema needs ${shape.buffers}`);
  for (let i = 0; i < buffers.n; i++) {
    const o = fb.i64(buffers.start + 16 * i, `buffer ${i} offset`);
    const l = fb.i64(buffers.start + 16 * i + 8, `buffer ${i} length`);
    if (o + l > bodyLength) bad(`${where}: buffer ${i} [${o}, ${o + l}) lies outside the ${bodyLength}-byte body`);
  }
  if (fb.field(rb, 3, 4) !== undefined) bad(`${where} is compressed; shards are written uncompressed`);
  fb.vector(rb, 4, 8, 'variadic buffer counts', 0); // only view types have variadic buffers
  return bodyStart + bodyLength;
}

/** Verify the structure of an Arrow IPC file so that apache-arrow can parse it in bounded time and memory. */
function verifyIpcFile(bytes: Uint8Array, bad: Bad): void {
  const magic = [0x41, 0x52, 0x52, 0x4f, 0x57, 0x31]; // "ARROW1"
  const n = bytes.length;
  if (n < 8 + 10 + 8) bad(`it is ${n} bytes, too small for an Arrow IPC file`);
  for (let i = 0; i < 6; i++) {
    if (bytes[i] !== magic[i]) bad('it does not start with the Arrow IPC file magic "ARROW1"');
    if (bytes[n - 6 + i] !== magic[i]) bad('it does not end with the Arrow IPC file magic "ARROW1" (was the file cut short?)');
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const footerLen = view.getInt32(n - 10, true);
  const footerStart = n - 10 - footerLen;
  if (footerLen < 8 || footerStart < 8) bad(`its footer length ${footerLen} does not fit in the file`);
  const fb = new Flatbuffer(bytes.subarray(footerStart, n - 10), 'the footer', bad);
  const footer = fb.root();
  const version = fb.scalar(footer, 0, 'i16', 0);
  if (version !== METADATA_V4 && version !== METADATA_V5) bad(`its footer has metadata version ${version}; only V4 and V5 are read`);
  const schema = fb.sub(footer, 1, 'the schema');
  if (schema === undefined) bad('its footer has no schema');
  const shape = verifySchema(fb, schema);
  const dicts = fb.vector(footer, 2, 24, 'dictionary blocks', DATASET_LIMITS.maxBatchesPerShard);
  if (dicts !== undefined && dicts.n > 0) bad('it has dictionary batches, which this format does not use');
  const blocks = fb.vector(footer, 3, 24, 'record batch blocks', DATASET_LIMITS.maxBatchesPerShard);
  verifyKeyValues(fb, footer, 4, 'footer metadata');
  let prevEnd = 8;
  for (let k = 0; k < (blocks?.n ?? 0); k++) {
    const offset = fb.i64(blocks!.start + 24 * k, `record batch block ${k} offset`);
    if (offset < prevEnd) bad(`record batch ${k} starts at byte ${offset}, overlapping what comes before it`);
    prevEnd = verifyRecordBatchMessage(bytes, view, offset, footerStart, shape, bad, k);
  }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/** Open a dataset folder: validate manifest.json and check that every listed shard exists with its listed size. */
export function openDataset(dir: string, opts: OpenDatasetOptions = {}): OpenedDataset {
  const abs = path.resolve(dir);
  const manifest = readManifest(abs);
  checkShardFiles(abs, manifest, opts.verifyChecksums === true, false);
  return {
    dir: abs,
    meta: { ...manifest.meta },
    topk: manifest.topk,
    manifest,
    rows: manifest.shards.reduce((a, s) => a + s.rows, 0),
  };
}

type NumArray = Int32Array | Uint8Array | Float32Array;
type NumCtor = { readonly BYTES_PER_ELEMENT: number; readonly name: string };

/**
 * Checked access to the buffers apache-arrow built. Its IPC reader takes buffers as sub-arrays of the
 * file (silently shorter when a buffer is cut) and never looks at offsets, so every length and offset
 * is checked here before a value is used.
 */
class Columns {
  constructor(private readonly corrupt: Bad) {}

  private noNulls(d: Data, col: string): void {
    if (d.nullCount !== 0) this.corrupt(`column ${q(col)} has ${d.nullCount} null values; the format has no nulls`);
  }

  /** The logical values of a primitive chunk. */
  primitive<T extends NumArray>(d: Data, Ctor: NumCtor, col: string): T {
    this.noNulls(d, col);
    const v = d.values as unknown;
    if (!ArrayBuffer.isView(v) || (v as T).BYTES_PER_ELEMENT !== Ctor.BYTES_PER_ELEMENT || v.constructor.name !== Ctor.name) {
      this.corrupt(`column ${q(col)} does not hold ${Ctor.name.replace('Array', '')} values`);
    }
    const a = v as T;
    if (a.length < d.offset + d.length) this.corrupt(`column ${q(col)} declares ${d.length} values but its buffer holds ${Math.max(0, a.length - d.offset)}`);
    return a.subarray(d.offset, d.offset + d.length) as T;
  }

  /** Offsets of a List / Utf8 chunk (d.length + 1 of them), checked to be monotone and within `limit`. */
  offsets(d: Data, limit: number, col: string): Int32Array {
    this.noNulls(d, col);
    const o = d.valueOffsets as unknown;
    if (!ArrayBuffer.isView(o) || (o as Int32Array).BYTES_PER_ELEMENT !== 4 || (o as Int32Array).length < d.offset + d.length + 1) {
      this.corrupt(`column ${q(col)} has a missing or short offsets buffer`);
    }
    const view = (o as Int32Array).subarray(d.offset, d.offset + d.length + 1);
    if (view[0] < 0) this.corrupt(`column ${q(col)} has a negative offset`);
    for (let i = 1; i < view.length; i++) {
      if (view[i] < view[i - 1]) this.corrupt(`column ${q(col)} has decreasing offsets at row ${i - 1}`);
    }
    if (view[view.length - 1] > limit) this.corrupt(`column ${q(col)} has offsets up to ${view[view.length - 1]} but only ${limit} values`);
    return view;
  }

  /** A Utf8 chunk as strings. */
  strings(d: Data, col: string): string[] {
    const bytes = d.values as unknown;
    if (!ArrayBuffer.isView(bytes) || (bytes as Uint8Array).BYTES_PER_ELEMENT !== 1) this.corrupt(`column ${q(col)} has no string data`);
    const b = bytes as Uint8Array;
    const offs = this.offsets(d, b.length, col);
    const dec = new TextDecoder('utf-8', { fatal: true });
    const out = new Array<string>(d.length);
    for (let i = 0; i < d.length; i++) {
      try {
        out[i] = dec.decode(b.subarray(offs[i], offs[i + 1]));
      } catch {
        this.corrupt(`column ${q(col)} value ${i} is not valid UTF-8`);
      }
    }
    return out;
  }

  /** A Bool chunk as 0/1 bytes. */
  bools(d: Data, col: string): Uint8Array {
    this.noNulls(d, col);
    const bits = d.values as unknown;
    if (!ArrayBuffer.isView(bits) || (bits as Uint8Array).BYTES_PER_ELEMENT !== 1 || (bits as Uint8Array).length * 8 < d.offset + d.length) {
      this.corrupt(`column ${q(col)} has a missing or short bit buffer`);
    }
    const b = bits as Uint8Array;
    const out = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) out[i] = (b[(d.offset + i) >> 3] >> ((d.offset + i) & 7)) & 1;
    return out;
  }

  child(d: Data, col: string): Data {
    const c = d.children?.[0];
    if (c === undefined) this.corrupt(`column ${q(col)} has no child values`);
    return c;
  }

  /** A List<primitive> chunk: offsets into the child's logical values. */
  list<T extends NumArray>(d: Data, Ctor: NumCtor, col: string): { offs: Int32Array; values: T } {
    const values = this.primitive<T>(this.child(d, col), Ctor, col);
    return { offs: this.offsets(d, values.length, col), values };
  }
}

/** Read shard `i` of an opened dataset, validating its bytes, structure, schema and every row. */
export function readShard(ds: OpenedDataset, i: number): StoredRecord[] {
  const entry = Number.isInteger(i) ? ds.manifest.shards[i] : undefined;
  if (entry === undefined) throw internal(`readShard: shard ${show(i)} does not exist; ${ds.dir} has ${ds.manifest.shards.length} shards`);
  const file = path.join(ds.dir, entry.file);
  // Bytes that are not a well-formed Arrow file: E_IO. Well-formed but not this format: E_CONFIG.
  const corrupt: Bad = (msg: string): never => {
    throw err('E_IO', `${file} is not a valid shard: ${msg}. ${DAMAGED}`);
  };
  const invalid: Bad = (msg: string): never => {
    throw err('E_CONFIG', `${file}: ${msg}. ${DAMAGED}`);
  };

  let buf: Buffer;
  try {
    const size = fs.statSync(file).size;
    if (size !== entry.bytes) {
      throw err('E_IO', `${file} is ${size} bytes but ${MANIFEST_NAME} (shards[${i}].bytes) says ${entry.bytes}; the file was cut or replaced. ${DAMAGED}`);
    }
    buf = fs.readFileSync(file);
  } catch (e) {
    if (e instanceof MedusaError) throw e;
    throw err('E_IO', `Cannot read ${file} (listed in ${MANIFEST_NAME} as shards[${i}]): ${describe(e)}. ${DAMAGED}`, e);
  }
  if (buf.length !== entry.bytes) throw err('E_IO', `${file} changed size while being read. ${DAMAGED}`);
  const hash = sha256Hex(buf);
  if (hash !== entry.sha256) {
    throw err('E_IO', `${file} has SHA-256 ${hash} but ${MANIFEST_NAME} (shards[${i}].sha256) says ${entry.sha256}; the file is corrupt. ${DAMAGED}`);
  }
  // A Uint8Array of this realm over the same memory (apache-arrow tests `instanceof Uint8Array`).
  const bytes = new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  verifyIpcFile(bytes, corrupt);

  let table: Table;
  try {
    table = tableFromIPC(bytes);
  } catch (e) {
    return corrupt(`apache-arrow cannot parse it (${describe(e).replace(/[.\s]+$/, '')})`);
  }
  try {
    return extractRows(table, ds, entry, i, corrupt, invalid);
  } catch (e) {
    if (e instanceof MedusaError) throw e;
    return corrupt(`reading its columns failed (${describe(e).replace(/[.\s]+$/, '')})`);
  }
}

function checkSchema(table: Table, ds: OpenedDataset, invalid: Bad): Record<string, number> {
  const fields = table.schema.fields;
  const names = fields.map((f) => f.name);
  const dup = names.find((nm, k) => names.indexOf(nm) !== k);
  if (dup !== undefined) invalid(`column ${q(dup)} appears twice`);
  const colIndex: Record<string, number> = {};
  for (const s of columnsFor(ds.topk)) {
    const k = names.indexOf(s.name);
    if (k < 0) invalid(`column ${q(s.name)} (${s.type}) is missing${s.name.startsWith('teacher_') ? ` although ${MANIFEST_NAME} says topk ${ds.topk}` : ''}`);
    const t = String(fields[k].type);
    if (t !== s.type) invalid(`column ${q(s.name)} has Arrow type ${t} but must be ${s.type}`);
    colIndex[s.name] = k;
  }
  if (ds.topk === 0) {
    const extra = TOPK_COLUMNS.find((s) => names.includes(s.name));
    if (extra !== undefined) invalid(`it has column ${q(extra.name)} but ${MANIFEST_NAME} says topk 0`);
  }
  // The schema metadata is the dataset's meta: a shard from another dataset is refused.
  const meta = table.schema.metadata;
  const own = (k: string): string | undefined => (Object.prototype.hasOwnProperty.call(ds.meta, k) ? ds.meta[k] : undefined);
  const keys = [...new Set([...meta.keys(), ...Object.keys(ds.meta)])].sort();
  const diff = keys.filter((k) => meta.get(k) !== own(k));
  if (diff.length > 0) {
    const shown = diff.slice(0, 5).map((k) => `${k}: shard ${show(meta.get(k), 60)}, manifest ${show(own(k), 60)}`);
    invalid(`its Arrow schema metadata differs from the meta in ${MANIFEST_NAME} (${shown.join('; ')}); it belongs to another dataset`);
  }
  return colIndex;
}

function extractRows(table: Table, ds: OpenedDataset, entry: ShardEntry, shardIndex: number, corrupt: Bad, invalid: Bad): StoredRecord[] {
  const colIndex = checkSchema(table, ds, invalid);
  const cols = new Columns(corrupt);
  const out: StoredRecord[] = [];
  let tokens = 0;
  let prevIndex = entry.first_index - 1;
  for (const batch of table.batches) {
    const n = batch.numRows;
    if (out.length + n > entry.rows) invalid(`it holds more than the ${entry.rows} rows listed in ${MANIFEST_NAME} (shards[${shardIndex}].rows)`);
    const chunk = (name: string): Data => {
      const d = batch.data.children[colIndex[name]];
      if (d === undefined || d.length !== n) corrupt(`column ${q(name)} has ${d?.length ?? 0} values in a batch of ${n} rows`);
      return d;
    };
    const ids = cols.strings(chunk('id'), 'id');
    const srcIdx = cols.primitive<Int32Array>(chunk('source_index'), Int32Array, 'source_index');
    const inputIds = cols.list<Int32Array>(chunk('input_ids'), Int32Array, 'input_ids');
    const lossMask = cols.list<Uint8Array>(chunk('loss_mask'), Uint8Array, 'loss_mask');
    const starts = cols.list<Int32Array>(chunk('turn_starts'), Int32Array, 'turn_starts');
    const ends = cols.list<Int32Array>(chunk('turn_ends'), Int32Array, 'turn_ends');
    const rolesChunk = chunk('turn_roles');
    const roleStrings = cols.strings(cols.child(rolesChunk, 'turn_roles'), 'turn_roles');
    const roleOffs = cols.offsets(rolesChunk, roleStrings.length, 'turn_roles');
    const truncated = cols.bools(chunk('truncated'), 'truncated');
    const tIds = ds.topk > 0 ? cols.list<Int32Array>(chunk('teacher_topk_ids'), Int32Array, 'teacher_topk_ids') : undefined;
    const tLp = ds.topk > 0 ? cols.list<Float32Array>(chunk('teacher_topk_logprobs'), Float32Array, 'teacher_topk_logprobs') : undefined;

    for (let r = 0; r < n; r++) {
      const row = out.length;
      // slice() copies: nothing returned keeps the file's memory or apache-arrow objects alive.
      const take = <T extends NumArray>(c: { offs: Int32Array; values: T }): T => c.values.slice(c.offs[r], c.offs[r + 1]) as T;
      const rec: StoredRecord = {
        id: ids[r],
        sourceIndex: srcIdx[r],
        inputIds: take(inputIds),
        lossMask: take(lossMask),
        turnRoles: roleStrings.slice(roleOffs[r], roleOffs[r + 1]),
        turnStarts: Array.from(take(starts)),
        turnEnds: Array.from(take(ends)),
        truncated: truncated[r] === 1,
      };
      if (tIds !== undefined && tLp !== undefined) {
        rec.teacherTopkIds = take(tIds);
        rec.teacherTopkLogprobs = take(tLp);
      }
      const label = `row ${row} (id ${show(rec.id, 60)}, source_index ${rec.sourceIndex})`;
      const problem = recordProblem(rec, ds.topk);
      if (problem !== undefined) invalid(`${label} ${problem}`);
      if (rec.sourceIndex <= prevIndex || rec.sourceIndex > entry.last_index) {
        invalid(`${label}: source_index must increase within [first_index ${entry.first_index}, last_index ${entry.last_index}] of shards[${shardIndex}] (previous ${prevIndex})`);
      }
      if (row === 0 && rec.sourceIndex !== entry.first_index) invalid(`${label}: the first row's source_index must be first_index ${entry.first_index}`);
      prevIndex = rec.sourceIndex;
      tokens += rec.inputIds.length;
      out.push(rec);
    }
  }
  if (out.length !== entry.rows) invalid(`it holds ${out.length} rows but ${MANIFEST_NAME} (shards[${shardIndex}].rows) lists ${entry.rows}`);
  if (prevIndex !== entry.last_index) invalid(`the last row's source_index is ${prevIndex} but shards[${shardIndex}].last_index is ${entry.last_index}`);
  if (tokens !== entry.tokens) invalid(`the rows hold ${tokens} tokens but shards[${shardIndex}].tokens is ${entry.tokens}`);
  return out;
}

/** Every record of the dataset, shard by shard (one shard in memory at a time). */
export function* iterateRecords(ds: OpenedDataset): Generator<StoredRecord> {
  for (let i = 0; i < ds.manifest.shards.length; i++) yield* readShard(ds, i);
}
