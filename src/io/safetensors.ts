/**
 * Reader and writer for the Hugging Face safetensors format, plus sharded model folders.
 *
 * Layout: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON header, then the data buffer.
 * Header: {"__metadata__": {str: str} (optional), "<name>": {"dtype", "shape", "data_offsets"}}.
 * Offsets are relative to the start of the data buffer (byte 8+N), end exclusive; data is
 * little-endian, row-major.
 *
 * Every problem the user can cause becomes a MedusaError (E_SAFETENSORS for bad content, E_IO for
 * missing/unreadable files) whose message names the file, the tensor, the limit and the fix.
 * Leaf module: imports only node builtins, ./atomic.js and ../errors.js.
 */

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { writeFileAtomic } from './atomic.js';
import { MedusaError, describe } from '../errors.js';
import { isFile, isDir } from './paths.js';

export type DType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

/** Bytes per element of each supported dtype. */
export const DTYPE_BYTES: Record<DType, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

const SUPPORTED_DTYPES = Object.keys(DTYPE_BYTES) as DType[];

/** Hard limits applied while parsing a header, so a hostile or corrupt file cannot exhaust memory. */
export interface SafetensorsLimits {
  /** Largest accepted JSON header, in bytes (default 100 MiB, as in the Rust reader). */
  maxHeaderBytes: number;
  /** Most tensors accepted in one file. */
  maxTensors: number;
  /** Most dimensions accepted in one shape. */
  maxDims: number;
  /** Longest accepted tensor name, in UTF-16 code units. */
  maxNameLength: number;
}

export const DEFAULT_LIMITS: SafetensorsLimits = Object.freeze({
  maxHeaderBytes: 100 * 1024 * 1024,
  maxTensors: 1_000_000,
  maxDims: 8,
  maxNameLength: 1024,
});

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** absolute byte offset in the file */
  offset: number;
  byteLength: number;
  file: string;
}

export interface SafetensorsHeader {
  file: string;
  fileSize: number;
  metadata: Record<string, string>;
  /** Tensors in file order (ascending offset). */
  tensors: Map<string, TensorInfo>;
}

export type TensorData =
  | Float32Array
  | Float64Array
  | Int32Array
  | BigInt64Array
  | Int16Array
  | Int8Array
  | Uint8Array;

export interface HostTensor {
  /** The dtype stored in the file (F16/BF16 tensors are decoded to Float32Array but keep their dtype). */
  dtype: DType;
  shape: number[];
  data: TensorData;
}

export interface WriteTensor {
  dtype: DType;
  shape: number[];
  /**
   * Elements in row-major order. F16/BF16 accept a Float32Array (encoded with
   * round-to-nearest-even) or a Uint16Array of raw bit patterns.
   */
  data: TensorData | Uint16Array;
}

export interface ShardedModel {
  dir: string;
  /** Safetensors files of the model (absolute-or-as-given paths), sorted. */
  files: string[];
  tensors: Map<string, TensorInfo>;
}

const FIX_FILE = 're-download or re-export the file';
const HOST_LE = os.endianness() === 'LE';
/** Largest single read/write we issue; fs read/write lengths must stay below 2 GiB. */
const IO_CHUNK = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

function stErr(message: string, cause?: unknown): MedusaError {
  return new MedusaError('E_SAFETENSORS', message, cause === undefined ? undefined : { cause });
}

function ioErr(message: string, cause?: unknown): MedusaError {
  return new MedusaError('E_IO', message, cause === undefined ? undefined : { cause });
}

/** Quote a (possibly hostile) tensor name for an error message, shortening very long ones. */
function q(name: string): string {
  return JSON.stringify(name.length > 80 ? `${name.slice(0, 80)}...` : name);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isNonNegSafeInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/** Product of dims, or undefined when it is not a safe integer. */
function safeProduct(shape: readonly number[]): number | undefined {
  let n = 1;
  for (const d of shape) {
    n *= d;
    if (!Number.isSafeInteger(n)) return undefined;
  }
  return n;
}

function mergeLimits(limits?: Partial<SafetensorsLimits>): SafetensorsLimits {
  const merged = { ...DEFAULT_LIMITS, ...(limits ?? {}) };
  for (const [k, v] of Object.entries(merged)) {
    if (!(typeof v === 'number' && (Number.isSafeInteger(v) || v === Infinity) && v > 0)) {
      throw new MedusaError('E_INTERNAL', `safetensors limit ${k} must be a positive integer, got ${String(v)}`);
    }
  }
  return merged;
}

/** Wrap an fs failure on `file` as E_IO naming the path. */
function wrapFsError(e: unknown, what: string, file: string): MedusaError {
  if (e instanceof MedusaError) return e;
  const code = (e as { code?: string } | null)?.code;
  if (code === 'ENOENT') return ioErr(`${what}: ${file} does not exist; check the path`, e);
  if (code === 'EISDIR') return ioErr(`${what}: ${file} is a directory, expected a .safetensors file`, e);
  if (code === 'EACCES' || code === 'EPERM') return ioErr(`${what}: permission denied for ${file}; check the file permissions`, e);
  return ioErr(`${what}: ${file}: ${describe(e)}`, e);
}

/** Read exactly `length` bytes at `position` into `dst` (looping over short reads); returns bytes read. */
function readFully(fd: number, dst: Uint8Array, position: number): number {
  let done = 0;
  while (done < dst.length) {
    const n = fs.readSync(fd, dst, done, Math.min(IO_CHUNK, dst.length - done), position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Reverse the byte order of every `width`-byte element in place (only used on big-endian hosts). */
function swapBytes(bytes: Uint8Array, width: number): void {
  if (width === 1) return;
  for (let i = 0; i < bytes.length; i += width) {
    for (let a = i, b = i + width - 1; a < b; a++, b--) {
      const t = bytes[a];
      bytes[a] = bytes[b];
      bytes[b] = t;
    }
  }
}

/** Allocate a fresh, zero-offset byte buffer (so typed-array views over it are aligned). */
function allocBytes(n: number, what: string): Uint8Array {
  try {
    return new Uint8Array(n);
  } catch (e) {
    throw stErr(`cannot allocate ${n} bytes for ${what}: ${describe(e)}; the tensor is too large to load into memory`, e);
  }
}

// ---------------------------------------------------------------------------------------------
// F16 / BF16 conversion
// ---------------------------------------------------------------------------------------------

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** Bits of an f32 -> bf16 bits with round-to-nearest-even; NaN stays (quiet) NaN. */
function f32BitsToBf16(bits: number): number {
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x0040) & 0xffff;
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1); // may carry into the exponent: correct (incl. -> Inf)
  return Math.floor(rounded / 0x10000) & 0xffff;
}

/** Bits of an f32 -> f16 bits with round-to-nearest-even, subnormals, overflow to Inf, NaN stays NaN. */
function f32BitsToF16(bits: number): number {
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return mant !== 0 ? sign | 0x7e00 | (mant >>> 13) : sign | 0x7c00;
  const e = exp - 127 + 15; // biased f16 exponent
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> Inf
  if (e <= 0) {
    // f16 subnormal (or zero): value = m * 2^(exp-150); in units of 2^-24 that is m >> (14 - e).
    if (e < -10) return sign; // below half the smallest subnormal: rounds to (signed) zero
    const m = mant | 0x800000;
    const shift = 14 - e; // 14..24
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1) === 1)) half++; // may become 0x400: correct
    return sign | half;
  }
  let half = sign | (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1) === 1)) half++; // carry may reach 0x7c00 = Inf: correct
  return half;
}

/** Encode a number (first rounded to f32) as bf16 bits, round-to-nearest-even. */
export function f32ToBf16Bits(x: number): number {
  scratchF32[0] = x;
  return f32BitsToBf16(scratchU32[0]);
}

/** Decode bf16 bits to a number; exact (bf16 is the top half of an f32). */
export function bf16BitsToF32(b: number): number {
  scratchU32[0] = (b & 0xffff) << 16;
  return scratchF32[0];
}

/** Encode a number (first rounded to f32) as IEEE half bits, round-to-nearest-even. */
export function f32ToF16Bits(x: number): number {
  scratchF32[0] = x;
  return f32BitsToF16(scratchU32[0]);
}

/** Decode IEEE half bits to a number; exact, including subnormals, ±Inf, NaN and -0. */
export function f16BitsToF32(b: number): number {
  const sign = b & 0x8000 ? -1 : 1;
  const exp = (b >>> 10) & 0x1f;
  const mant = b & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant !== 0 ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

let f16Table: Float32Array | undefined;
/** All 65536 half values widened to f32, built on first use. */
function f16ToF32Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) f16Table[i] = f16BitsToF32(i);
  }
  return f16Table;
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/**
 * Read and validate the header of a safetensors file. Reads only the first 8+N bytes.
 * Throws E_IO for a missing/unreadable file and E_SAFETENSORS for anything malformed.
 */
export function readHeader(file: string, limits?: Partial<SafetensorsLimits>): SafetensorsHeader {
  const lim = mergeLimits(limits);
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw wrapFsError(e, 'cannot open safetensors file', file);
  }
  let fileSize: number;
  let headerBytes: Uint8Array;
  try {
    try {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw Object.assign(new Error('is a directory'), { code: 'EISDIR' });
      fileSize = st.size;
    } catch (e) {
      throw wrapFsError(e, 'cannot read safetensors file', file);
    }
    if (fileSize < 8) {
      throw stErr(
        `${file}: not a safetensors file: it is ${fileSize} bytes long, shorter than the 8-byte header length prefix; ${FIX_FILE}`,
      );
    }
    const prefix = new Uint8Array(8);
    let n: number;
    try {
      n = readFully(fd, prefix, 0);
    } catch (e) {
      throw wrapFsError(e, 'cannot read safetensors file', file);
    }
    if (n < 8) throw stErr(`${file}: file shrank while reading the header length prefix; ${FIX_FILE}`);
    const big = Buffer.from(prefix.buffer, prefix.byteOffset, 8).readBigUInt64LE(0);
    if (big === 0n) {
      throw stErr(`${file}: header length is 0, so this is not a valid safetensors file; ${FIX_FILE}`);
    }
    if (big > BigInt(lim.maxHeaderBytes === Infinity ? Number.MAX_SAFE_INTEGER : lim.maxHeaderBytes)) {
      throw stErr(
        `${file}: header length ${big} bytes exceeds the limit maxHeaderBytes=${lim.maxHeaderBytes}; ` +
          `the file is corrupt or not a safetensors file (${FIX_FILE}), or raise maxHeaderBytes if the header is legitimately this large`,
      );
    }
    const headerLen = Number(big);
    if (headerLen > fileSize - 8) {
      throw stErr(
        `${file}: file truncated: header length is ${headerLen} bytes but only ${fileSize - 8} bytes follow the length prefix; ${FIX_FILE}`,
      );
    }
    headerBytes = allocBytes(headerLen, `the header of ${file}`);
    try {
      n = readFully(fd, headerBytes, 8);
    } catch (e) {
      throw wrapFsError(e, 'cannot read safetensors header', file);
    }
    if (n < headerLen) throw stErr(`${file}: file truncated while reading the ${headerLen}-byte header; ${FIX_FILE}`);
  } finally {
    try {
      fs.closeSync(fd);
    } catch {
      /* closing a read-only descriptor cannot lose data */
    }
  }
  return parseHeader(file, fileSize, headerBytes, lim);
}

/** Validate the JSON header bytes of `file` (whose total size is fileSize). */
function parseHeader(file: string, fileSize: number, headerBytes: Uint8Array, lim: SafetensorsLimits): SafetensorsHeader {
  const headerLen = headerBytes.length;
  const dataStart = 8 + headerLen;
  const dataSize = fileSize - dataStart;

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch (e) {
    throw stErr(`${file}: header is not valid UTF-8 (${describe(e)}); ${FIX_FILE}`, e);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw stErr(`${file}: header is not valid JSON (${describe(e)}); ${FIX_FILE}`, e);
  }
  if (!isPlainObject(json)) {
    const kind = json === null ? 'null' : Array.isArray(json) ? 'an array' : `a ${typeof json}`;
    throw stErr(`${file}: header must be a JSON object but is ${kind}; ${FIX_FILE}`);
  }

  const keys = Object.keys(json);
  const tensorCount = keys.length - (Object.prototype.hasOwnProperty.call(json, '__metadata__') ? 1 : 0);
  if (tensorCount > lim.maxTensors) {
    throw stErr(
      `${file}: header lists ${tensorCount} tensors, more than the limit maxTensors=${lim.maxTensors}; ` +
        `the file is corrupt (${FIX_FILE}) or raise maxTensors if it is legitimate`,
    );
  }

  // __metadata__: optional string -> string map (null is treated as absent, as the Rust reader does).
  const metadata: Record<string, string> = {};
  const rawMeta = json['__metadata__'];
  if (rawMeta !== undefined && rawMeta !== null) {
    if (!isPlainObject(rawMeta)) {
      throw stErr(`${file}: "__metadata__" must be an object mapping strings to strings; ${FIX_FILE}`);
    }
    for (const [k, v] of Object.entries(rawMeta)) {
      if (typeof v !== 'string') {
        throw stErr(
          `${file}: "__metadata__" entry ${q(k)} must be a string but is ${v === null ? 'null' : typeof v}; ` +
            `safetensors metadata is a string -> string map; ${FIX_FILE}`,
        );
      }
      metadata[k] = v;
    }
  }

  const infos: Array<TensorInfo & { begin: number; end: number }> = [];
  for (const name of keys) {
    if (name === '__metadata__') continue;
    if (name.length > lim.maxNameLength) {
      throw stErr(
        `${file}: tensor name ${q(name)} is ${name.length} characters long, more than the limit maxNameLength=${lim.maxNameLength}; ` +
          `${FIX_FILE} or raise maxNameLength`,
      );
    }
    const entry = json[name];
    const where = `${file}: tensor ${q(name)}`;
    if (!isPlainObject(entry)) {
      throw stErr(`${where}: header entry must be an object with dtype, shape and data_offsets; ${FIX_FILE}`);
    }
    for (const field of ['dtype', 'shape', 'data_offsets']) {
      if (!(field in entry)) throw stErr(`${where}: header entry is missing "${field}"; ${FIX_FILE}`);
    }

    const dtype = entry['dtype'];
    if (typeof dtype !== 'string' || !Object.prototype.hasOwnProperty.call(DTYPE_BYTES, dtype)) {
      throw stErr(
        `${where}: unsupported dtype ${JSON.stringify(dtype)}; supported dtypes are ${SUPPORTED_DTYPES.join(', ')}; ` +
          `convert the checkpoint to one of them (e.g. re-export in F32, F16 or BF16)`,
      );
    }

    const shape = entry['shape'];
    if (!Array.isArray(shape) || !shape.every(isNonNegSafeInt)) {
      throw stErr(`${where}: shape must be an array of non-negative integers but is ${JSON.stringify(shape)}; ${FIX_FILE}`);
    }
    if (shape.length > lim.maxDims) {
      throw stErr(
        `${where}: shape has ${shape.length} dimensions, more than the limit maxDims=${lim.maxDims}; ${FIX_FILE} or raise maxDims`,
      );
    }

    const offs = entry['data_offsets'];
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every(isNonNegSafeInt) || offs[0] > offs[1]) {
      throw stErr(
        `${where}: data_offsets must be [begin, end] with 0 <= begin <= end (integers) but is ${JSON.stringify(offs)}; ${FIX_FILE}`,
      );
    }
    const [begin, end] = offs as [number, number];

    const bytes = DTYPE_BYTES[dtype as DType];
    const numel = safeProduct(shape as number[]);
    const expected = numel === undefined ? undefined : safeProduct([numel, bytes]);
    if (expected === undefined) {
      throw stErr(`${where}: shape ${JSON.stringify(shape)} has too many elements to address; ${FIX_FILE}`);
    }
    if (end - begin !== expected) {
      throw stErr(
        `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape ${JSON.stringify(shape)} of ${dtype} ` +
          `needs ${expected} bytes (${numel} elements x ${bytes} bytes); ${FIX_FILE}`,
      );
    }
    if (end > dataSize) {
      throw stErr(
        `${file}: file truncated: tensor ${q(name)} needs bytes up to ${dataStart + end} but file has ${fileSize}; ${FIX_FILE}`,
      );
    }

    infos.push({
      name,
      dtype: dtype as DType,
      shape: (shape as number[]).slice(),
      offset: dataStart + begin,
      byteLength: expected,
      file,
      begin,
      end,
    });
  }

  // Overlap check: sort by begin; an empty range cannot overlap anything. Gaps are allowed.
  infos.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let last: (typeof infos)[number] | undefined;
  for (const t of infos) {
    if (t.begin === t.end) continue;
    if (last && t.begin < last.end) {
      throw stErr(
        `${file}: tensors ${q(last.name)} (bytes [${last.begin}, ${last.end})) and ${q(t.name)} (bytes [${t.begin}, ${t.end})) ` +
          `overlap in the data buffer; ${FIX_FILE}`,
      );
    }
    if (!last || t.end > last.end) last = t;
  }

  const tensors = new Map<string, TensorInfo>();
  for (const { begin: _b, end: _e, ...info } of infos) tensors.set(info.name, info);
  return { file, fileSize, metadata, tensors };
}

/** Exactly the tensor's bytes (a fresh copy, zero byteOffset); reads only that byte range of the file. */
export function readTensorRaw(info: TensorInfo): Uint8Array {
  const out = allocBytes(info.byteLength, `tensor ${q(info.name)} of ${info.file}`);
  if (info.byteLength === 0) return out;
  let fd: number;
  try {
    fd = fs.openSync(info.file, 'r');
  } catch (e) {
    throw wrapFsError(e, `cannot open safetensors file to read tensor ${q(info.name)}`, info.file);
  }
  try {
    let n: number;
    try {
      n = readFully(fd, out, info.offset);
    } catch (e) {
      throw wrapFsError(e, `cannot read tensor ${q(info.name)}`, info.file);
    }
    if (n < info.byteLength) {
      throw stErr(
        `${info.file}: file truncated: tensor ${q(info.name)} needs bytes up to ${info.offset + info.byteLength} ` +
          `but only ${info.offset + n} could be read (the file changed after its header was read?); ${FIX_FILE}`,
      );
    }
  } finally {
    try {
      fs.closeSync(fd);
    } catch {
      /* read-only descriptor */
    }
  }
  return out;
}

/** Number of elements implied by info, after checking that it matches byteLength. */
function checkedNumel(info: TensorInfo): number {
  const bytes = DTYPE_BYTES[info.dtype];
  const numel = safeProduct(info.shape);
  if (bytes === undefined || numel === undefined || numel * bytes !== info.byteLength) {
    throw stErr(
      `${info.file}: tensor ${q(info.name)}: dtype ${String(info.dtype)} and shape ${JSON.stringify(info.shape)} ` +
        `do not match its byte length ${info.byteLength}; read the TensorInfo with readHeader`,
    );
  }
  return numel;
}

/** Widen raw little-endian F16/BF16 bytes to a Float32Array. */
function halfBytesToF32(raw: Uint8Array, dtype: 'F16' | 'BF16', numel: number): Float32Array {
  const bits = new Uint16Array(raw.buffer, raw.byteOffset, numel);
  const out = new Float32Array(numel);
  if (dtype === 'BF16') {
    const u32 = new Uint32Array(out.buffer);
    for (let i = 0; i < numel; i++) u32[i] = bits[i] << 16; // exact, keeps NaN payloads
  } else {
    const table = f16ToF32Table();
    for (let i = 0; i < numel; i++) out[i] = table[bits[i]];
  }
  return out;
}

/**
 * Read and decode a tensor. F16/BF16 are widened exactly to Float32Array; U8/BOOL give Uint8Array;
 * the result keeps the file dtype in `dtype`.
 */
export function readTensor(info: TensorInfo): HostTensor {
  const numel = checkedNumel(info);
  const raw = readTensorRaw(info);
  if (!HOST_LE) swapBytes(raw, DTYPE_BYTES[info.dtype]);
  const shape = info.shape.slice();
  const buf = raw.buffer;
  let data: TensorData;
  switch (info.dtype) {
    case 'F64':
      data = new Float64Array(buf, 0, numel);
      break;
    case 'F32':
      data = new Float32Array(buf, 0, numel);
      break;
    case 'F16':
    case 'BF16':
      data = halfBytesToF32(raw, info.dtype, numel);
      break;
    case 'I64':
      data = new BigInt64Array(buf, 0, numel);
      break;
    case 'I32':
      data = new Int32Array(buf, 0, numel);
      break;
    case 'I16':
      data = new Int16Array(buf, 0, numel);
      break;
    case 'I8':
      data = new Int8Array(buf, 0, numel);
      break;
    case 'U8':
    case 'BOOL':
      data = raw;
      break;
  }
  return { dtype: info.dtype, shape, data };
}

/** Read a floating-point tensor as Float32Array (F64 is rounded to nearest f32). Integer dtypes are an error. */
export function readTensorF32(info: TensorInfo): Float32Array {
  if (info.dtype !== 'F32' && info.dtype !== 'F16' && info.dtype !== 'BF16' && info.dtype !== 'F64') {
    throw stErr(
      `${info.file}: tensor ${q(info.name)} has integer dtype ${info.dtype} but a floating-point tensor ` +
        `(F32, F16, BF16 or F64) was expected; check that the file holds the weights you meant to load`,
    );
  }
  const t = readTensor(info);
  return t.data instanceof Float32Array ? t.data : Float32Array.from(t.data as Float64Array);
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/** Typed-array kind by its internal name (works across realms, e.g. Buffer inside Jest). */
function arrayKind(data: unknown): string | undefined {
  if (!ArrayBuffer.isView(data) || data instanceof DataView) return undefined;
  return Object.prototype.toString.call(data).slice(8, -1);
}

const ACCEPTED_ARRAYS: Record<DType, string[]> = {
  F64: ['Float64Array'],
  F32: ['Float32Array'],
  F16: ['Float32Array', 'Uint16Array'],
  BF16: ['Float32Array', 'Uint16Array'],
  I64: ['BigInt64Array'],
  I32: ['Int32Array'],
  I16: ['Int16Array'],
  I8: ['Int8Array'],
  U8: ['Uint8Array'],
  BOOL: ['Uint8Array'],
};

/** Little-endian bytes of one validated tensor (a view of the caller's memory when no conversion is needed). */
function tensorBytes(t: WriteTensor, kind: string): Uint8Array {
  const d = t.data as ArrayBufferView & { length: number };
  if ((t.dtype === 'F16' || t.dtype === 'BF16') && kind === 'Float32Array') {
    const src = t.data as Float32Array;
    const bits32 = new Uint32Array(src.length);
    new Float32Array(bits32.buffer).set(src);
    const out = new Uint16Array(src.length);
    const enc = t.dtype === 'F16' ? f32BitsToF16 : f32BitsToBf16;
    for (let i = 0; i < src.length; i++) out[i] = enc(bits32[i]);
    const bytes = new Uint8Array(out.buffer);
    if (!HOST_LE) swapBytes(bytes, 2);
    return bytes;
  }
  const view = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
  if (HOST_LE) return view;
  const copy = view.slice();
  swapBytes(copy, DTYPE_BYTES[t.dtype]);
  return copy;
}

/** Compare strings by their UTF-8 bytes, as the Rust writer orders names. */
function compareUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/**
 * Write a safetensors file atomically and deterministically.
 *
 * Data order: by element size (largest first) then by name (UTF-8 byte order), contiguous with no
 * gaps — the order the Rust/Python writers use, which keeps every tensor aligned to its element
 * size and is accepted by strict readers that reject gaps. Header keys: "__metadata__" first, then
 * names sorted. The header is padded with spaces so the data starts at a multiple of 8.
 * The file is written to `${file}.tmp-${pid}`, fsynced and renamed over the target.
 */
export function writeSafetensors(
  file: string,
  tensors: Record<string, WriteTensor> | Map<string, WriteTensor>,
  metadata?: Record<string, string>,
): void {
  const entries: Array<[string, WriteTensor]> =
    tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);

  // Validate everything before touching the disk.
  if (metadata !== undefined) {
    if (!isPlainObject(metadata)) throw stErr(`cannot write ${file}: metadata must be an object mapping strings to strings`);
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') {
        throw stErr(`cannot write ${file}: metadata entry ${q(k)} must be a string but is ${typeof v}; safetensors metadata is string -> string`);
      }
    }
  }
  const kinds = new Map<string, string>();
  for (const [name, t] of entries) {
    const where = `cannot write ${file}: tensor ${q(name)}`;
    if (name === '__metadata__') throw stErr(`${where}: the name "__metadata__" is reserved by the format; rename the tensor`);
    if (name.length === 0) throw stErr(`cannot write ${file}: a tensor has an empty name; give every tensor a name`);
    if (name.length > DEFAULT_LIMITS.maxNameLength) {
      throw stErr(`${where}: name is ${name.length} characters long, more than maxNameLength=${DEFAULT_LIMITS.maxNameLength}; use a shorter name`);
    }
    if (!isPlainObject(t)) throw stErr(`${where}: expected {dtype, shape, data}`);
    if (typeof t.dtype !== 'string' || !Object.prototype.hasOwnProperty.call(DTYPE_BYTES, t.dtype)) {
      throw stErr(`${where}: unsupported dtype ${JSON.stringify(t.dtype)}; supported dtypes are ${SUPPORTED_DTYPES.join(', ')}`);
    }
    if (!Array.isArray(t.shape) || !t.shape.every(isNonNegSafeInt)) {
      throw stErr(`${where}: shape must be an array of non-negative integers but is ${JSON.stringify(t.shape)}`);
    }
    if (t.shape.length > DEFAULT_LIMITS.maxDims) {
      throw stErr(`${where}: shape has ${t.shape.length} dimensions, more than maxDims=${DEFAULT_LIMITS.maxDims}`);
    }
    const kind = arrayKind(t.data);
    const accepted = ACCEPTED_ARRAYS[t.dtype];
    if (kind === undefined || !accepted.includes(kind)) {
      throw stErr(`${where}: dtype ${t.dtype} needs data as ${accepted.join(' or ')} but got ${kind ?? typeof t.data}; convert the data first`);
    }
    const numel = safeProduct(t.shape);
    const length = (t.data as { length: number }).length;
    if (numel !== length) {
      throw stErr(
        `${where}: shape ${JSON.stringify(t.shape)} has ${numel ?? 'too many'} elements but data has ${length}; fix the shape or the data`,
      );
    }
    kinds.set(name, kind);
  }

  // Layout: contiguous, largest element size first, then by name.
  const order = entries
    .slice()
    .sort(([an, at], [bn, bt]) => DTYPE_BYTES[bt.dtype] - DTYPE_BYTES[at.dtype] || compareUtf8(an, bn));
  const offsets = new Map<string, [number, number]>();
  let pos = 0;
  for (const [name, t] of order) {
    const len = (t.data as { length: number }).length * DTYPE_BYTES[t.dtype];
    offsets.set(name, [pos, pos + len]);
    pos += len;
  }

  const header: Record<string, unknown> = {};
  if (metadata !== undefined) {
    const meta: Record<string, string> = {};
    for (const k of Object.keys(metadata).sort(compareUtf8)) meta[k] = metadata[k];
    header['__metadata__'] = meta;
  }
  for (const [name, t] of entries.slice().sort(([a], [b]) => compareUtf8(a, b))) {
    header[name] = { dtype: t.dtype, shape: t.shape.slice(), data_offsets: offsets.get(name) };
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  const headerBytes = Buffer.alloc(8 + padded, 0x20);
  headerBytes.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(headerBytes, 8);

  try {
    writeFileAtomic(file, (function* () {
      yield headerBytes;
      for (const [name, t] of order) yield tensorBytes(t, kinds.get(name)!);
    })());
  } catch (e) {
    if (e instanceof MedusaError) throw e;
    throw ioErr(`cannot write safetensors file ${file}: ${describe(e)}; check that the folder exists, is writable and has free space`, e);
  }
}

// ---------------------------------------------------------------------------------------------
// Model folders
// ---------------------------------------------------------------------------------------------

const INDEX_NAME = 'model.safetensors.index.json';
const SINGLE_NAME = 'model.safetensors';

/**
 * Open a model folder: `model.safetensors.index.json` plus its shards if present, else
 * `model.safetensors`. Reads only headers. Checks that the index and the shards agree exactly.
 */
export function openSafetensorsFolder(dir: string, limits?: Partial<SafetensorsLimits>): ShardedModel {
  if (!isDir(dir)) throw ioErr(`model folder ${dir} does not exist or is not a directory; check the path`);
  const indexPath = path.join(dir, INDEX_NAME);
  const singlePath = path.join(dir, SINGLE_NAME);

  if (fs.existsSync(indexPath)) return openIndexed(dir, indexPath, limits);

  if (isFile(singlePath)) {
    const h = readHeader(singlePath, limits);
    return { dir, files: [singlePath], tensors: h.tensors };
  }

  let others: string[] = [];
  try {
    others = fs.readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort();
  } catch {
    /* listing is only a hint */
  }
  const hint = others.length > 0 ? ` (found other safetensors files: ${others.slice(0, 10).join(', ')}${others.length > 10 ? ', ...' : ''})` : '';
  throw ioErr(
    `no model weights in ${dir}: looked for ${INDEX_NAME} and ${SINGLE_NAME}${hint}; point to a folder with a Hugging Face safetensors checkpoint`,
  );
}

function openIndexed(dir: string, indexPath: string, limits?: Partial<SafetensorsLimits>): ShardedModel {
  let text: string;
  try {
    text = fs.readFileSync(indexPath, 'utf8');
  } catch (e) {
    throw wrapFsError(e, 'cannot read safetensors index', indexPath);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw stErr(`${indexPath}: index is not valid JSON (${describe(e)}); re-download the model's index file`, e);
  }
  if (!isPlainObject(json) || !isPlainObject(json['weight_map'])) {
    throw stErr(`${indexPath}: index must be a JSON object with a "weight_map" object {tensor: file}; re-download the model's index file`);
  }
  const weightMap = json['weight_map'];
  const names = Object.keys(weightMap);
  if (names.length === 0) throw stErr(`${indexPath}: "weight_map" lists no tensors; re-download the model's index file`);

  // Validate shard names and group tensors by shard.
  const byShard = new Map<string, string[]>();
  for (const name of names) {
    const shard = weightMap[name];
    if (typeof shard !== 'string' || shard.length === 0) {
      throw stErr(`${indexPath}: weight_map entry for tensor ${q(name)} must be a file name but is ${JSON.stringify(shard)}; re-download the model's index file`);
    }
    if (shard.includes('/') || shard.includes('\\') || shard.includes('\0') || shard === '.' || shard === '..' || path.isAbsolute(shard)) {
      throw stErr(
        `${indexPath}: weight_map entry for tensor ${q(name)} points at ${JSON.stringify(shard)}; shard names must be plain file names ` +
          `inside the model folder (no path separators or '..'); fix or re-download the index`,
      );
    }
    const list = byShard.get(shard);
    if (list) list.push(name);
    else byShard.set(shard, [name]);
  }

  const shards = [...byShard.keys()].sort();
  const files: string[] = [];
  const tensors = new Map<string, TensorInfo>();
  const owner = new Map<string, string>(); // tensor -> shard it was found in
  for (const shard of shards) {
    const shardPath = path.join(dir, shard);
    const listed = byShard.get(shard)!;
    if (!fs.existsSync(shardPath)) {
      throw ioErr(
        `shard ${shardPath} does not exist but ${indexPath} maps ${listed.length} tensor(s) to it (e.g. ${q(listed[0])}); ` +
          `download the missing shard`,
      );
    }
    const header = readHeader(shardPath, limits);
    files.push(shardPath);
    for (const name of listed) {
      if (!header.tensors.has(name)) {
        throw stErr(
          `${indexPath}: index maps tensor ${q(name)} to shard ${shardPath}, but that shard has no such tensor; ` +
            `the index and the shards do not match, re-download the model`,
        );
      }
    }
    for (const [name, info] of header.tensors) {
      const prev = owner.get(name);
      if (prev !== undefined) {
        throw stErr(
          `tensor ${q(name)} appears in both shard ${path.join(dir, prev)} and shard ${shardPath}; ` +
            `the checkpoint is inconsistent, re-download or re-export the model`,
        );
      }
      const expected = weightMap[name];
      if (expected === undefined) {
        throw stErr(
          `shard ${shardPath} holds tensor ${q(name)} that ${indexPath} does not list; ` +
            `the index and the shards do not match, re-download the model`,
        );
      }
      if (expected !== shard) {
        throw stErr(
          `shard ${shardPath} holds tensor ${q(name)} but ${indexPath} maps it to ${JSON.stringify(expected)}; ` +
            `the index and the shards do not match, re-download the model`,
        );
      }
      owner.set(name, shard);
      tensors.set(name, info);
    }
  }
  return { dir, files, tensors };
}
