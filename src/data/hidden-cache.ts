/**
 * The frozen backbone's final hidden states per training example, computed once (first epoch) and
 * reused afterwards: MEDUSA-1 never updates the backbone, so its hidden states are a fixed function
 * of the example.
 *
 * - memory: one Float32Array (f32) or Uint16Array (f16 bit patterns) arena for all examples.
 * - disk: one preallocated file `<dir>/hidden-<h>.bin` (h = first 16 hex digits of the SHA-256 of
 *   the fingerprint), example i at offset sum_{j<i} len_j * d * bytes, written with positional
 *   writes; plus the sidecar `<dir>/hidden-<h>.json`
 *   {format, version, fingerprint, hiddenSize, dtype, count, lengthsHash, bytes, byteOrder, complete}, written
 *   atomically. `finalize()` fsyncs the data file and only then writes the sidecar with
 *   complete=true, so a sidecar saying complete always describes a fully written file. Opening
 *   reuses a complete cache whose sidecar matches exactly (full fingerprint, hidden size, dtype,
 *   count, lengths hash, file size); anything else (missing, unreadable, incomplete, mismatched) is
 *   discarded and rebuilt from scratch (an incomplete cache is not resumed: which examples reached
 *   the disk is not recorded).
 *
 * f16 storage rounds to nearest even (f32ToF16Bits); a value beyond the f16 range (|x| that would
 * round to Inf, i.e. >= 65520) is an E_CONFIG error naming the example, never a silent Inf. Non-finite
 * hidden states (NaN/Inf from the backbone) are refused in both dtypes (E_ENGINE).
 *
 * One process per cache file: the run folder's own lock is expected to guarantee that.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { MedusaError, describe } from '../errors.js';
import { writeFileAtomic } from '../io/atomic.js';
import { f16BitsToF32, f32ToF16Bits } from '../io/safetensors.js';

export type CacheKind = 'memory' | 'disk';
export type CacheDtype = 'f16' | 'f32';

export const HIDDEN_CACHE_FORMAT = 'medusa-train-hidden-cache';
export const HIDDEN_CACHE_VERSION = 1;

const DTYPE_BYTES: Record<CacheDtype, number> = { f16: 2, f32: 4 };
/** Largest single read or write (fs lengths must stay below 2 GiB). */
const IO_CHUNK = 1 << 30;

/** Bytes needed to cache examples of these lengths. */
export function hiddenCacheBytes(lengths: number[], hiddenSize: number, dtype: CacheDtype): number {
  let tokens = 0;
  for (const l of lengths) tokens += l;
  return tokens * hiddenSize * DTYPE_BYTES[dtype];
}

export interface HiddenCache {
  readonly kind: CacheKind;
  readonly dtype: CacheDtype;
  readonly hiddenSize: number;
  /** Every example is present (a reused complete disk cache, or after finalize()). */
  readonly complete: boolean;
  /** Disk: why an existing cache file was not reused (null when none existed or it was reused). */
  readonly discarded: string | null;
  /** Disk: the data file. */
  readonly file: string | null;
  has(i: number): boolean;
  /** Store example i's hidden states [len_i, d] (f16: rounded). Refused once the cache is complete. */
  put(i: number, hidden: Float32Array): void;
  /** A fresh Float32Array [len_i, d]: exactly what was put (f32) or its f16 rounding (f16). */
  get(i: number): Float32Array;
  /** Check that every example is present and mark the cache complete (disk: durable sidecar). */
  finalize(): void;
  /** Release the arena / close the file. Further use is an error. */
  close(): void;
}

export interface HiddenCacheOptions {
  kind: CacheKind;
  dtype: CacheDtype;
  hiddenSize: number;
  /** Tokens of each example. */
  lengths: number[];
  /** disk: folder of the cache files (created if missing), e.g. <run>/cache. */
  dir?: string;
  /** Identifies what the hidden states are a function of (model config hash, dataset shard hashes, max_seq_len...). */
  fingerprint: string;
}

function internal(message: string): MedusaError {
  return new MedusaError('E_INTERNAL', message);
}

function ioError(message: string, e: unknown): MedusaError {
  return new MedusaError('E_IO', `${message}: ${describe(e)}. Check that the folder exists, is writable and has free space.`, { cause: e });
}

/** SHA-256 (hex) of the lengths as little-endian u32s. */
export function lengthsHash(lengths: number[]): string {
  const bytes = Buffer.alloc(lengths.length * 4);
  lengths.forEach((l, i) => bytes.writeUInt32LE(l, i * 4));
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

/** The file-name tag of a fingerprint: first 16 hex digits of its SHA-256. */
export function fingerprintTag(fingerprint: string): string {
  return crypto.createHash('sha256').update(fingerprint, 'utf8').digest('hex').slice(0, 16);
}

let f16Table: Float32Array | undefined;
function f16Decode(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let b = 0; b < 65536; b++) f16Table[b] = f16BitsToF32(b);
  }
  return f16Table;
}

interface Sidecar {
  format: string;
  version: number;
  fingerprint: string;
  hiddenSize: number;
  dtype: CacheDtype;
  count: number;
  lengthsHash: string;
  bytes: number;
  /** The data file holds values in this byte order (the writing host's). */
  byteOrder: string;
  complete: boolean;
}

export function openHiddenCache(o: HiddenCacheOptions): HiddenCache {
  if (o.kind !== 'memory' && o.kind !== 'disk') throw internal(`hidden cache kind must be memory or disk, got ${String(o.kind)}`);
  if (o.dtype !== 'f16' && o.dtype !== 'f32') throw internal(`hidden cache dtype must be f16 or f32, got ${String(o.dtype)}`);
  if (!Number.isSafeInteger(o.hiddenSize) || o.hiddenSize < 1) throw internal(`hiddenSize must be a positive integer, got ${String(o.hiddenSize)}`);
  if (typeof o.fingerprint !== 'string' || o.fingerprint.length === 0) throw internal('hidden cache fingerprint must be a non-empty string');
  o.lengths.forEach((l, i) => {
    if (!Number.isSafeInteger(l) || l < 0 || l > 0xffffffff) throw internal(`hidden cache lengths[${i}] must be a non-negative integer, got ${String(l)}`);
  });
  return o.kind === 'memory' ? new MemoryCache(o) : DiskCache.open(o);
}

abstract class BaseCache implements HiddenCache {
  abstract readonly kind: CacheKind;
  readonly dtype: CacheDtype;
  readonly hiddenSize: number;
  complete = false;
  discarded: string | null = null;
  file: string | null = null;
  protected readonly lengths: number[];
  /** Element offset of each example (prefix sums of len*d), plus the total at the end. */
  protected readonly offsets: Float64Array;
  protected filled: Uint8Array;
  protected closed = false;

  constructor(o: HiddenCacheOptions) {
    this.dtype = o.dtype;
    this.hiddenSize = o.hiddenSize;
    this.lengths = o.lengths.slice();
    this.offsets = new Float64Array(this.lengths.length + 1);
    for (let i = 0; i < this.lengths.length; i++) this.offsets[i + 1] = this.offsets[i] + this.lengths[i] * o.hiddenSize;
    this.filled = new Uint8Array(this.lengths.length);
  }

  protected get totalElements(): number {
    return this.offsets[this.lengths.length];
  }

  protected check(i: number, op: string): void {
    if (this.closed) throw internal(`hidden cache: ${op} after close()`);
    if (!Number.isSafeInteger(i) || i < 0 || i >= this.lengths.length) throw internal(`hidden cache: ${op}: example ${i} out of range [0, ${this.lengths.length})`);
  }

  has(i: number): boolean {
    this.check(i, 'has');
    return this.complete || this.filled[i] === 1;
  }

  put(i: number, hidden: Float32Array): void {
    this.check(i, 'put');
    if (this.complete) throw internal(`hidden cache: put(${i}) on a complete cache`);
    const n = this.lengths[i] * this.hiddenSize;
    if (Object.prototype.toString.call(hidden) !== '[object Float32Array]' || hidden.length !== n) {
      throw internal(`hidden cache: put(${i}): expected a Float32Array of ${this.lengths[i]} x ${this.hiddenSize} = ${n} values, got ${hidden?.length}`);
    }
    for (let j = 0; j < n; j++) {
      if (!Number.isFinite(hidden[j])) {
        throw new MedusaError(
          'E_ENGINE',
          `The backbone produced a non-finite hidden state (${hidden[j]}) for example ${i} at token ${Math.floor(j / this.hiddenSize)}, ` +
            `dimension ${j % this.hiddenSize}; training on it would give garbage. Check the model weights and the backend.`,
        );
      }
    }
    this.store(i, hidden);
    this.filled[i] = 1;
  }

  /** f16 bit patterns of `hidden` (validated finite), refusing values beyond the f16 range. */
  protected encodeF16(i: number, hidden: Float32Array, out: Uint16Array): void {
    for (let j = 0; j < hidden.length; j++) {
      const bits = f32ToF16Bits(hidden[j]);
      if ((bits & 0x7c00) === 0x7c00) {
        throw new MedusaError(
          'E_CONFIG',
          `Hidden state ${hidden[j]} of example ${i} (token ${Math.floor(j / this.hiddenSize)}, dimension ${j % this.hiddenSize}) is beyond the f16 range ` +
            `(largest finite value 65504) and cannot be cached as f16; use an f32 hidden-state cache for this model.`,
        );
      }
      out[j] = bits;
    }
  }

  get(i: number): Float32Array {
    this.check(i, 'get');
    if (!this.has(i)) throw internal(`hidden cache: get(${i}) before put(${i})`);
    return this.load(i);
  }

  finalize(): void {
    if (this.closed) throw internal('hidden cache: finalize() after close()');
    if (this.complete) return;
    const missing = this.filled.indexOf(0);
    if (missing >= 0) throw internal(`hidden cache: finalize() with example ${missing} not stored`);
    this.markComplete();
    this.complete = true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.release();
  }

  protected abstract store(i: number, hidden: Float32Array): void;
  protected abstract load(i: number): Float32Array;
  protected abstract markComplete(): void;
  protected abstract release(): void;
}

class MemoryCache extends BaseCache {
  readonly kind = 'memory' as const;
  private arena: Float32Array | Uint16Array;

  constructor(o: HiddenCacheOptions) {
    super(o);
    const n = this.totalElements;
    try {
      this.arena = o.dtype === 'f32' ? new Float32Array(n) : new Uint16Array(n);
    } catch (e) {
      throw new MedusaError(
        'E_CONFIG',
        `Cannot allocate ${hiddenCacheBytes(this.lengths, o.hiddenSize, o.dtype)} bytes for the in-memory hidden-state cache (${describe(e)}); ` +
          'use the disk cache, an f16 cache, no cache, or a shorter max sequence length.',
        { cause: e },
      );
    }
  }

  protected store(i: number, hidden: Float32Array): void {
    const at = this.offsets[i];
    if (this.arena instanceof Float32Array) {
      this.arena.set(hidden, at);
    } else {
      const tmp = new Uint16Array(hidden.length);
      this.encodeF16(i, hidden, tmp); // validate before touching the arena
      this.arena.set(tmp, at);
    }
  }

  protected load(i: number): Float32Array {
    const a = this.offsets[i];
    const b = this.offsets[i + 1];
    if (this.arena instanceof Float32Array) return this.arena.slice(a, b);
    const table = f16Decode();
    const out = new Float32Array(b - a);
    for (let j = 0; j < out.length; j++) out[j] = table[this.arena[a + j]];
    return out;
  }

  protected markComplete(): void {
    /* nothing to persist */
  }

  protected release(): void {
    this.arena = new Float32Array(0);
  }
}

class DiskCache extends BaseCache {
  readonly kind = 'disk' as const;
  private fd: number | undefined;
  private readonly bytesPer: number;
  private readonly sidecarPath: string;
  private readonly fingerprint: string;
  private readonly lengthsHashHex: string;

  private constructor(o: HiddenCacheOptions, dir: string) {
    super(o);
    const tag = fingerprintTag(o.fingerprint);
    this.file = path.join(dir, `hidden-${tag}.bin`);
    this.sidecarPath = path.join(dir, `hidden-${tag}.json`);
    this.bytesPer = DTYPE_BYTES[o.dtype];
    this.fingerprint = o.fingerprint;
    this.lengthsHashHex = lengthsHash(this.lengths);
  }

  static open(o: HiddenCacheOptions): DiskCache {
    if (typeof o.dir !== 'string' || o.dir.length === 0) throw internal('a disk hidden cache needs a dir');
    const dir = path.resolve(o.dir);
    try {
      fs.mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw ioError(`Cannot create the hidden-state cache folder ${dir}`, e);
    }
    const c = new DiskCache(o, dir);
    const why = c.reuseProblem();
    if (why === null) {
      c.fd = c.openFile('r');
      c.complete = true;
      return c;
    }
    c.discarded = why === 'none' ? null : why;
    c.create();
    return c;
  }

  private get expectedBytes(): number {
    return this.totalElements * this.bytesPer;
  }

  private sidecar(complete: boolean): Sidecar {
    return {
      format: HIDDEN_CACHE_FORMAT,
      version: HIDDEN_CACHE_VERSION,
      fingerprint: this.fingerprint,
      hiddenSize: this.hiddenSize,
      dtype: this.dtype,
      count: this.lengths.length,
      lengthsHash: this.lengthsHashHex,
      bytes: this.expectedBytes,
      byteOrder: os.endianness(),
      complete,
    };
  }

  /** null when the existing cache can be reused; 'none' when there is none; else why not. */
  private reuseProblem(): string | null {
    let text: string;
    try {
      const st = fs.statSync(this.sidecarPath);
      if (st.size > 1 << 20) return `${this.sidecarPath} is ${st.size} bytes, not a cache sidecar`;
      text = fs.readFileSync(this.sidecarPath, 'utf8');
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return fs.existsSync(this.file!) ? `${this.sidecarPath} is missing` : 'none';
      return `cannot read ${this.sidecarPath}: ${describe(e)}`;
    }
    let got: unknown;
    try {
      got = JSON.parse(text);
    } catch (e) {
      return `${this.sidecarPath} is not valid JSON (${describe(e)})`;
    }
    if (typeof got !== 'object' || got === null || Array.isArray(got)) return `${this.sidecarPath} is not a JSON object`;
    const want = this.sidecar(true) as unknown as Record<string, unknown>;
    const rec = got as Record<string, unknown>;
    for (const k of Object.keys(want)) {
      if (rec[k] !== want[k]) {
        return k === 'complete'
          ? `${this.sidecarPath} says the cache is incomplete`
          : `${this.sidecarPath}: ${k} is ${JSON.stringify(rec[k]) ?? '(missing)'}, expected ${JSON.stringify(want[k])}`;
      }
    }
    let size: number;
    try {
      size = fs.statSync(this.file!).size;
    } catch (e) {
      return `cannot stat ${this.file}: ${describe(e)}`;
    }
    if (size !== this.expectedBytes) return `${this.file} is ${size} bytes, expected ${this.expectedBytes}`;
    return null;
  }

  private openFile(flags: string): number {
    try {
      return fs.openSync(this.file!, flags);
    } catch (e) {
      throw ioError(`Cannot open the hidden-state cache ${this.file}`, e);
    }
  }

  /** Discard any existing files and start an empty, preallocated cache. */
  private create(): void {
    try {
      // The sidecar goes first: without it nothing is ever reused, whatever happens next.
      fs.rmSync(this.sidecarPath, { force: true });
      fs.rmSync(this.file!, { force: true });
    } catch (e) {
      throw ioError(`Cannot remove the old hidden-state cache ${this.file}`, e);
    }
    this.fd = this.openFile('w+');
    try {
      fs.ftruncateSync(this.fd, this.expectedBytes);
      writeFileAtomic(this.sidecarPath, [Buffer.from(`${JSON.stringify(this.sidecar(false), null, 2)}\n`)]);
    } catch (e) {
      this.release();
      throw ioError(`Cannot create the hidden-state cache ${this.file} (${this.expectedBytes} bytes)`, e);
    }
  }

  protected store(i: number, hidden: Float32Array): void {
    let bytes: Uint8Array;
    if (this.dtype === 'f32') {
      bytes = new Uint8Array(hidden.buffer, hidden.byteOffset, hidden.byteLength);
    } else {
      const bits = new Uint16Array(hidden.length);
      this.encodeF16(i, hidden, bits);
      bytes = new Uint8Array(bits.buffer);
    }
    const pos = this.offsets[i] * this.bytesPer;
    try {
      let done = 0;
      while (done < bytes.length) done += fs.writeSync(this.fd!, bytes, done, Math.min(IO_CHUNK, bytes.length - done), pos + done);
    } catch (e) {
      throw ioError(`Cannot write example ${i} to the hidden-state cache ${this.file}`, e);
    }
  }

  protected load(i: number): Float32Array {
    const n = this.lengths[i] * this.hiddenSize;
    const bytes = new Uint8Array(n * this.bytesPer);
    const pos = this.offsets[i] * this.bytesPer;
    try {
      let done = 0;
      while (done < bytes.length) {
        const got = fs.readSync(this.fd!, bytes, done, Math.min(IO_CHUNK, bytes.length - done), pos + done);
        if (got === 0) throw new Error(`file ended at byte ${pos + done}`);
        done += got;
      }
    } catch (e) {
      throw ioError(`Cannot read example ${i} from the hidden-state cache ${this.file}`, e);
    }
    if (this.dtype === 'f32') return new Float32Array(bytes.buffer);
    const bits = new Uint16Array(bytes.buffer);
    const table = f16Decode();
    const out = new Float32Array(n);
    for (let j = 0; j < n; j++) out[j] = table[bits[j]];
    return out;
  }

  protected markComplete(): void {
    try {
      fs.fsyncSync(this.fd!);
      writeFileAtomic(this.sidecarPath, [Buffer.from(`${JSON.stringify(this.sidecar(true), null, 2)}\n`)]);
    } catch (e) {
      throw ioError(`Cannot finish the hidden-state cache ${this.file}`, e);
    }
  }

  protected release(): void {
    if (this.fd !== undefined) {
      try {
        fs.closeSync(this.fd);
      } catch {
        /* nothing to lose: data was fsynced on finalize, an unfinished cache is rebuilt anyway */
      }
      this.fd = undefined;
    }
  }
}
