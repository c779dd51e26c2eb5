import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expectMedusa } from './helpers/errors.js';
import {
  DEFAULT_LIMITS,
  DTYPE_BYTES,
  type DType,
  type SafetensorsLimits,
  type WriteTensor,
  bf16BitsToF32,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  openSafetensorsFolder,
  readHeader,
  readTensor,
  readTensorF32,
  readTensorRaw,
  writeSafetensors,
} from '../src/io/safetensors.js';

let tmpRoot: string;
beforeAll(() => {
  tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-st-'));
});
afterAll(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true });
});

let counter = 0;
/** A fresh path (or folder) under the test's temp root. */
function tmpPath(name = 'x.safetensors'): string {
  const dir = path.join(tmpRoot, `t${counter++}`);
  fs.mkdirSync(dir);
  return path.join(dir, name);
}

/** Bits of an f32 given as a number. */
function f32FromBits(bits: number): number {
  return new Float32Array(new Uint32Array([bits]).buffer)[0];
}

/** Build a safetensors file by hand: header JSON (object or raw string), optional padding, then data. */
function buildFile(header: unknown, data: Uint8Array = new Uint8Array(0), pad = 0): Buffer {
  const json = Buffer.from((typeof header === 'string' ? header : JSON.stringify(header)) + ' '.repeat(pad), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, Buffer.from(data)]);
}

function writeRaw(bytes: Uint8Array, name?: string): string {
  const p = tmpPath(name);
  fs.writeFileSync(p, bytes);
  return p;
}


function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** One sample tensor of every dtype, plus zero-size, scalar and 3-D shapes. */
function sampleTensors(): Record<string, WriteTensor> {
  return {
    f64: { dtype: 'F64', shape: [3], data: new Float64Array([1.5, -2.25, Math.PI]) },
    f32_3d: { dtype: 'F32', shape: [2, 3, 2], data: Float32Array.from({ length: 12 }, (_, i) => i * 0.5 - 3) },
    f32_scalar: { dtype: 'F32', shape: [], data: new Float32Array([42.125]) },
    f32_empty: { dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
    f16_bits: { dtype: 'F16', shape: [5], data: new Uint16Array([0x3c00, 0x7bff, 0x0001, 0x8000, 0x7c00]) },
    f16_from_f32: { dtype: 'F16', shape: [2, 2], data: new Float32Array([1, -2, 0.5, 65504]) },
    bf16_bits: { dtype: 'BF16', shape: [4], data: new Uint16Array([0x3f80, 0xc000, 0x0001, 0x7f80]) },
    bf16_from_f32: { dtype: 'BF16', shape: [3], data: new Float32Array([1, -2, 0.15625]) },
    i64: { dtype: 'I64', shape: [2], data: new BigInt64Array([-(2n ** 62n), 7n]) },
    i32: { dtype: 'I32', shape: [3], data: new Int32Array([-1, 0, 2147483647]) },
    i16: { dtype: 'I16', shape: [2], data: new Int16Array([-32768, 5]) },
    i8: { dtype: 'I8', shape: [3], data: new Int8Array([-128, 0, 127]) },
    u8: { dtype: 'U8', shape: [1, 3, 1], data: new Uint8Array([0, 128, 255]) },
    bool: { dtype: 'BOOL', shape: [3], data: new Uint8Array([1, 0, 1]) },
    bool_empty: { dtype: 'BOOL', shape: [0], data: new Uint8Array(0) },
  };
}

/** Expected little-endian bytes of a WriteTensor as the file should store it. */
function expectedBytes(t: WriteTensor): Uint8Array {
  if ((t.dtype === 'F16' || t.dtype === 'BF16') && t.data instanceof Float32Array) {
    const enc = t.dtype === 'F16' ? f32ToF16Bits : f32ToBf16Bits;
    return bytesOf(Uint16Array.from(t.data, (x) => enc(x)));
  }
  return bytesOf(t.data);
}

describe('round trip', () => {
  test('every dtype round-trips bit for bit, and writes are deterministic', () => {
    const file = tmpPath('model.safetensors');
    const tensors = sampleTensors();
    const covered = new Set<DType>(Object.values(tensors).map((t) => t.dtype));
    expect([...covered].sort()).toEqual((Object.keys(DTYPE_BYTES) as DType[]).sort());
    writeSafetensors(file, tensors, { format: 'pt', note: 'ünïcode' });
    const h = readHeader(file);
    expect(h.metadata).toEqual({ format: 'pt', note: 'ünïcode' });
    expect([...h.tensors.keys()].sort()).toEqual(Object.keys(tensors).sort());
    expect(fs.statSync(file).size).toBe(h.fileSize);

    for (const [name, t] of Object.entries(tensors)) {
      const info = h.tensors.get(name)!;
      expect(info.dtype).toBe(t.dtype);
      expect(info.shape).toEqual(t.shape);
      expect(info.file).toBe(file);
      expect(info.byteLength).toBe(t.data.length * DTYPE_BYTES[t.dtype]);
      expect(info.offset % DTYPE_BYTES[t.dtype]).toBe(0); // aligned to element size
      expect(Buffer.from(readTensorRaw(info)).equals(Buffer.from(expectedBytes(t)))).toBe(true);
      const decoded = readTensor(info);
      expect(decoded.dtype).toBe(t.dtype);
      expect(decoded.shape).toEqual(t.shape);
      if (t.dtype === 'F16' || t.dtype === 'BF16') {
        expect(decoded.data).toBeInstanceOf(Float32Array);
        const dec = t.dtype === 'F16' ? f16BitsToF32 : bf16BitsToF32;
        const bits = new Uint16Array(readTensorRaw(info).buffer);
        expect(Array.from(decoded.data as Float32Array)).toEqual(Array.from(bits, dec));
        if (t.data instanceof Float32Array) expect(Array.from(decoded.data as Float32Array)).toEqual(Array.from(t.data));
      } else {
        expect(Buffer.from(bytesOf(decoded.data)).equals(Buffer.from(bytesOf(t.data)))).toBe(true);
        expect(Object.prototype.toString.call(decoded.data)).toBe(Object.prototype.toString.call(t.data));
      }
    }

    // Second write (from a Map with another insertion order) gives identical bytes.
    const file2 = tmpPath('model.safetensors');
    writeSafetensors(file2, new Map(Object.entries(tensors).reverse()), { note: 'ünïcode', format: 'pt' });
    expect(fs.readFileSync(file2).equals(fs.readFileSync(file))).toBe(true);
    // No temp files are left behind.
    expect(fs.readdirSync(path.dirname(file))).toEqual(['model.safetensors']);
  });

  test('data starts at a multiple of 8 and tensors are contiguous (no gaps)', () => {
    const file = tmpPath();
    writeSafetensors(file, sampleTensors());
    const h = readHeader(file);
    const buf = fs.readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    expect((8 + n) % 8).toBe(0);
    const ranges = [...h.tensors.values()].map((t) => [t.offset, t.offset + t.byteLength]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let pos = 8 + n;
    for (const [b, e] of ranges) {
      expect(b).toBe(pos);
      pos = e;
    }
    expect(pos).toBe(buf.length);
  });

  test('readTensorF32 widens halves, rounds F64 and rejects integer dtypes', () => {
    const file = tmpPath();
    writeSafetensors(file, {
      a: { dtype: 'F64', shape: [2], data: new Float64Array([0.1, 1 + 2 ** -30]) },
      b: { dtype: 'BF16', shape: [1], data: new Uint16Array([0x3dcd]) },
      c: { dtype: 'F32', shape: [1], data: new Float32Array([3.5]) },
      d: { dtype: 'I32', shape: [1], data: new Int32Array([1]) },
    });
    const h = readHeader(file);
    expect(Array.from(readTensorF32(h.tensors.get('a')!))).toEqual([Math.fround(0.1), 1]);
    expect(Array.from(readTensorF32(h.tensors.get('b')!))).toEqual([0.10009765625]);
    expect(Array.from(readTensorF32(h.tensors.get('c')!))).toEqual([3.5]);
    expectMedusa(() => readTensorF32(h.tensors.get('d')!), 'E_SAFETENSORS', file, '"d"', 'I32');
  });

  test('readTensorRaw returns exactly the bytes of a tensor in the middle', () => {
    const file = tmpPath();
    const mid = Float32Array.from({ length: 100 }, (_, i) => i + 0.25);
    writeSafetensors(file, {
      a: { dtype: 'F32', shape: [10], data: new Float32Array(10).fill(-1) },
      b: { dtype: 'F32', shape: [10, 10], data: mid },
      c: { dtype: 'F32', shape: [10], data: new Float32Array(10).fill(-2) },
    });
    const info = readHeader(file).tensors.get('b')!;
    const raw = readTensorRaw(info);
    expect(raw.byteLength).toBe(400);
    expect(Buffer.from(raw).equals(Buffer.from(bytesOf(mid)))).toBe(true);
    expect(Array.from(new Float32Array(raw.buffer))).toEqual(Array.from(mid));
  });
});

describe('byte layout compatibility', () => {
  test('reads a file built by hand by an independent writer (padding, gap, key order)', () => {
    const w = new Float32Array([1, 2, 3, 4, 5, 6]);
    const ids = new BigInt64Array([10n, -20n]);
    const half = new Uint16Array([0x3c00, 0xc000, 0x3555]);
    // Layout: ids at 0..16, 8-byte gap, w at 24..48, half at 48..54, empty at 54..54.
    const data = new Uint8Array(54);
    data.set(bytesOf(ids), 0);
    data.set(bytesOf(w), 24);
    data.set(bytesOf(half), 48);
    const header = {
      'model.w': { dtype: 'F32', shape: [2, 3], data_offsets: [24, 48] },
      __metadata__: { format: 'pt' },
      empty: { shape: [0], dtype: 'F16', data_offsets: [54, 54] },
      ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] },
      h: { data_offsets: [48, 54], dtype: 'F16', shape: [3] },
    };
    const file = writeRaw(buildFile(header, data, 5));
    const h = readHeader(file);
    expect(h.metadata).toEqual({ format: 'pt' });
    expect(h.tensors.size).toBe(4);
    const dataStart = 8 + JSON.stringify(header).length + 5;
    expect(h.tensors.get('model.w')!.offset).toBe(dataStart + 24);
    expect(Array.from(readTensor(h.tensors.get('model.w')!).data as Float32Array)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(readTensor(h.tensors.get('ids')!).data as BigInt64Array)).toEqual([10n, -20n]);
    expect(Array.from(readTensor(h.tensors.get('h')!).data as Float32Array)).toEqual([1, -2, 0.333251953125]);
    const empty = readTensor(h.tensors.get('empty')!);
    expect(empty.data.length).toBe(0);
    expect(empty.shape).toEqual([0]);
  });

  test('a file we write has exactly the expected bytes', () => {
    const file = tmpPath();
    writeSafetensors(
      file,
      {
        b: { dtype: 'F16', shape: [1], data: new Uint16Array([0x3c00]) },
        a: { dtype: 'F32', shape: [2], data: new Float32Array([1, -2]) },
      },
      { format: 'pt' },
    );
    const json =
      '{"__metadata__":{"format":"pt"},' +
      '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' +
      '"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}}';
    const padded = json + ' '.repeat((8 - (json.length % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(padded.length));
    const expected = Buffer.concat([
      len,
      Buffer.from(padded, 'utf8'),
      Buffer.from([0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0]), // 1.0f, -2.0f little-endian
      Buffer.from([0x00, 0x3c]), // f16 1.0 little-endian
    ]);
    expect(fs.readFileSync(file).equals(expected)).toBe(true);
  });
});

describe('F16 / BF16 conversion', () => {
  test('bf16 decodes hand-checked bit patterns exactly', () => {
    expect(bf16BitsToF32(0x3f80)).toBe(1);
    expect(bf16BitsToF32(0xc000)).toBe(-2);
    expect(bf16BitsToF32(0x7f80)).toBe(Infinity);
    expect(bf16BitsToF32(0xff80)).toBe(-Infinity);
    expect(bf16BitsToF32(0x7fc0)).toBeNaN();
    expect(Object.is(bf16BitsToF32(0x8000), -0)).toBe(true);
    expect(Object.is(bf16BitsToF32(0x0000), 0)).toBe(true);
    expect(bf16BitsToF32(0x0001)).toBe(2 ** -133);
    expect(bf16BitsToF32(0x3dcd)).toBe(0.10009765625);
  });

  test('f16 decodes hand-checked bit patterns exactly', () => {
    expect(f16BitsToF32(0x3c00)).toBe(1);
    expect(f16BitsToF32(0x7bff)).toBe(65504);
    expect(f16BitsToF32(0x0001)).toBe(2 ** -24);
    expect(f16BitsToF32(0x03ff)).toBe(1023 * 2 ** -24);
    expect(f16BitsToF32(0x0400)).toBe(2 ** -14);
    expect(Object.is(f16BitsToF32(0x8000), -0)).toBe(true);
    expect(f16BitsToF32(0x7c00)).toBe(Infinity);
    expect(f16BitsToF32(0xfc00)).toBe(-Infinity);
    expect(f16BitsToF32(0x7e00)).toBeNaN();
    expect(f16BitsToF32(0x3555)).toBe(0.333251953125);
    expect(f16BitsToF32(0xc000)).toBe(-2);
  });

  test('bf16 encoding rounds to nearest even', () => {
    expect(f32ToBf16Bits(f32FromBits(0x3f808000))).toBe(0x3f80); // tie -> even (down)
    expect(f32ToBf16Bits(f32FromBits(0x3f818000))).toBe(0x3f82); // tie -> even (up)
    expect(f32ToBf16Bits(f32FromBits(0x3f808001))).toBe(0x3f81); // above tie -> up
    expect(f32ToBf16Bits(f32FromBits(0x3f807fff))).toBe(0x3f80); // below tie -> down
    expect(f32ToBf16Bits(f32FromBits(0x7f7fffff))).toBe(0x7f80); // max f32 rounds to Inf
    expect(f32ToBf16Bits(-0)).toBe(0x8000);
    expect(f32ToBf16Bits(Infinity)).toBe(0x7f80);
    expect(f32ToBf16Bits(-Infinity)).toBe(0xff80);
    expect(Number.isNaN(bf16BitsToF32(f32ToBf16Bits(NaN)))).toBe(true);
    // A NaN whose payload lives only in the low 16 bits must not become Inf.
    expect(Number.isNaN(bf16BitsToF32(f32ToBf16Bits(f32FromBits(0x7f800001))))).toBe(true);
  });

  test('f16 encoding rounds to nearest even, overflows to Inf, handles subnormals', () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // halfway between max and 2^16 -> Inf
    expect(f32ToF16Bits(65519)).toBe(0x7bff);
    expect(f32ToF16Bits(-65520)).toBe(0xfc00);
    expect(f32ToF16Bits(1e10)).toBe(0x7c00);
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000); // tie between 0 and smallest subnormal -> even (0)
    expect(f32ToF16Bits(-(2 ** -25))).toBe(0x8000);
    expect(f32ToF16Bits(3 * 2 ** -26)).toBe(0x0001);
    expect(f32ToF16Bits(3 * 2 ** -25)).toBe(0x0002); // 1.5 units -> tie -> even (2)
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001);
    expect(f32ToF16Bits(2 ** -30)).toBe(0x0000);
    expect(f32ToF16Bits(2 ** -14 - 2 ** -25)).toBe(0x0400); // rounds up into the smallest normal
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie -> even (down)
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie -> even (up)
    expect(f32ToF16Bits(-0)).toBe(0x8000);
    expect(f32ToF16Bits(-Infinity)).toBe(0xfc00);
    expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN)))).toBe(true);
    expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(f32FromBits(0x7f800001))))).toBe(true);
  });

  test.each([
    ['bf16', bf16BitsToF32, f32ToBf16Bits],
    ['f16', f16BitsToF32, f32ToF16Bits],
  ] as const)('%s: encode(decode(b)) == b for all 65536 patterns (NaNs stay NaN)', (_n, dec, enc) => {
    let nans = 0;
    for (let b = 0; b < 65536; b++) {
      const x = dec(b);
      const back = enc(x);
      if (Number.isNaN(x)) {
        nans++;
        expect(Number.isNaN(dec(back))).toBe(true);
      } else if (back !== b) {
        throw new Error(`pattern 0x${b.toString(16)} decoded to ${x} re-encoded to 0x${back.toString(16)}`);
      }
    }
    expect(nans).toBe(_n === 'f16' ? 2 * 1023 : 2 * 127);
  });

  test('writer encodes Float32Array to F16/BF16 and reader restores it', () => {
    const vals = new Float32Array([0, -0, 1, -1.5, 65504, 1e-7, 3.0e38, NaN, Infinity, 0.1]);
    const file = tmpPath();
    writeSafetensors(file, {
      h: { dtype: 'F16', shape: [vals.length], data: vals },
      b: { dtype: 'BF16', shape: [vals.length], data: vals },
    });
    const h = readHeader(file);
    const hf = readTensor(h.tensors.get('h')!).data as Float32Array;
    const bf = readTensor(h.tensors.get('b')!).data as Float32Array;
    for (let i = 0; i < vals.length; i++) {
      const eh = f16BitsToF32(f32ToF16Bits(vals[i]));
      const eb = bf16BitsToF32(f32ToBf16Bits(vals[i]));
      expect(Object.is(hf[i], Math.fround(eh)) || (Number.isNaN(hf[i]) && Number.isNaN(eh))).toBe(true);
      expect(Object.is(bf[i], eb) || (Number.isNaN(bf[i]) && Number.isNaN(eb))).toBe(true);
    }
    expect(hf[6]).toBe(Infinity); // 3e38 overflows F16
  });
});

describe('malformed files', () => {
  const okData = bytesOf(new Float32Array([1, 2, 3, 4]));
  const okEntry = { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] };

  function headerCase(header: unknown, data: Uint8Array = okData, limits?: Partial<SafetensorsLimits>) {
    const file = writeRaw(buildFile(header, data));
    return { file, run: () => readHeader(file, limits) };
  }

  test('missing file -> E_IO naming the path', () => {
    const file = path.join(tmpRoot, 'does-not-exist.safetensors');
    expectMedusa(() => readHeader(file), 'E_IO', file);
  });

  test('a directory -> E_IO naming the path', () => {
    const dir = path.dirname(tmpPath());
    expectMedusa(() => readHeader(dir), 'E_IO', dir);
  });

  test('file shorter than 8 bytes', () => {
    const file = writeRaw(new Uint8Array([1, 2, 3]));
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, '8');
  });

  test('header length 0', () => {
    const file = writeRaw(new Uint8Array(16));
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, 'header length is 0');
  });

  test('header length larger than the file', () => {
    const bytes = buildFile({ a: okEntry }, okData);
    bytes.writeBigUInt64LE(BigInt(bytes.length), 0);
    const file = writeRaw(bytes);
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, 'truncated');
  });

  test('huge header length (u64 beyond 2^53) is rejected by the limit', () => {
    const bytes = buildFile({ a: okEntry }, okData);
    bytes.writeBigUInt64LE(0xffffffffffffffffn, 0);
    const file = writeRaw(bytes);
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, 'maxHeaderBytes');
  });

  test('header larger than maxHeaderBytes', () => {
    const { file, run } = headerCase({ a: okEntry }, okData, { maxHeaderBytes: 16 });
    expectMedusa(run, 'E_SAFETENSORS', file, 'maxHeaderBytes=16');
  });

  test('header not valid UTF-8', () => {
    const bytes = buildFile('{"a":1}');
    bytes[9] = 0xff;
    const file = writeRaw(bytes);
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, 'UTF-8');
  });

  test('header not JSON', () => {
    const { file, run } = headerCase('{"a": {"dtype": "F32",');
    const err = expectMedusa(run, 'E_SAFETENSORS', file, 'not valid JSON');
    expect(err.cause).toBeInstanceOf(Error);
  });

  test.each([
    ['an array', '[1,2]'],
    ['null', 'null'],
    ['a number', '42'],
  ])('header is %s, not an object', (kind, text) => {
    const { file, run } = headerCase(text);
    expectMedusa(run, 'E_SAFETENSORS', file, 'JSON object', kind);
  });

  test('entry is not an object', () => {
    const { file, run } = headerCase({ weird: [1, 2] });
    expectMedusa(run, 'E_SAFETENSORS', file, '"weird"', 'object');
  });

  test.each(['dtype', 'shape', 'data_offsets'])('entry missing %s', (field) => {
    const entry: Record<string, unknown> = { ...okEntry };
    delete entry[field];
    const { file, run } = headerCase({ 'layer.0.w': entry });
    expectMedusa(run, 'E_SAFETENSORS', file, '"layer.0.w"', `missing "${field}"`);
  });

  test('unknown dtype lists supported ones', () => {
    const { file, run } = headerCase({ a: { ...okEntry, dtype: 'F8_E4M3' } });
    expectMedusa(run, 'E_SAFETENSORS', file, '"a"', 'F8_E4M3', 'F32', 'BF16', 'BOOL');
  });

  test.each([
    ['negative dim', [-2, -2]],
    ['fractional dim', [1.5, 2]],
    ['string dim', ['2', 2]],
    ['not an array', 4],
    ['unsafe integer', [2 ** 60, 1]],
  ])('bad shape: %s', (_k, shape) => {
    const { file, run } = headerCase({ bad: { ...okEntry, shape } });
    expectMedusa(run, 'E_SAFETENSORS', file, '"bad"', 'shape');
  });

  test('too many dims', () => {
    const { file, run } = headerCase({ deep: { dtype: 'F32', shape: [1, 1, 1, 1, 4], data_offsets: [0, 16] } }, okData, { maxDims: 4 });
    expectMedusa(run, 'E_SAFETENSORS', file, '"deep"', 'maxDims=4');
    // the default limit of 8 accepts it
    expect(readHeader(file).tensors.get('deep')!.shape).toEqual([1, 1, 1, 1, 4]);
  });

  test.each([
    ['one number', [0]],
    ['three numbers', [0, 8, 16]],
    ['negative', [-4, 12]],
    ['fractional', [0.5, 16.5]],
    ['begin > end', [16, 0]],
    ['not an array', '0-16'],
  ])('bad data_offsets: %s', (_k, offs) => {
    const { file, run } = headerCase({ bad: { ...okEntry, data_offsets: offs } });
    expectMedusa(run, 'E_SAFETENSORS', file, '"bad"', 'data_offsets');
  });

  test('byte length does not match shape x dtype', () => {
    const { file, run } = headerCase({ w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 16] } });
    expectMedusa(run, 'E_SAFETENSORS', file, '"w"', '16 bytes', 'needs 24 bytes');
  });

  test('offsets beyond the data buffer', () => {
    const { file, run } = headerCase({ w: { dtype: 'F32', shape: [8], data_offsets: [0, 32] } });
    const size = fs.statSync(file).size;
    expectMedusa(run, 'E_SAFETENSORS', file, 'truncated', '"w"', `but file has ${size}`);
  });

  test('a valid file cut in the middle of the data', () => {
    const good = tmpPath();
    writeSafetensors(good, {
      a: { dtype: 'F32', shape: [64], data: new Float32Array(64) },
      b: { dtype: 'F32', shape: [64], data: new Float32Array(64) },
    });
    const whole = fs.readFileSync(good);
    const file = writeRaw(whole.subarray(0, whole.length - 100));
    expectMedusa(() => readHeader(file), 'E_SAFETENSORS', file, 'file truncated', '"b"');
  });

  test('overlapping tensors name both', () => {
    const data = new Uint8Array(32);
    const { file, run } = headerCase(
      {
        first: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
        second: { dtype: 'F32', shape: [4], data_offsets: [12, 28] },
      },
      data,
    );
    expectMedusa(run, 'E_SAFETENSORS', file, '"first"', '"second"', 'overlap');
  });

  test('a tensor nested inside another overlaps', () => {
    const { file, run } = headerCase(
      {
        big: { dtype: 'U8', shape: [32], data_offsets: [0, 32] },
        small: { dtype: 'U8', shape: [2], data_offsets: [20, 22] },
        after: { dtype: 'U8', shape: [0], data_offsets: [22, 22] },
      },
      new Uint8Array(32),
    );
    expectMedusa(run, 'E_SAFETENSORS', file, '"big"', '"small"', 'overlap');
  });

  test('zero-size tensors and gaps are allowed', () => {
    const { file, run } = headerCase(
      {
        z1: { dtype: 'F32', shape: [0], data_offsets: [0, 0] },
        z2: { dtype: 'I64', shape: [3, 0], data_offsets: [4, 4] },
        a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
        b: { dtype: 'F32', shape: [1], data_offsets: [12, 16] },
      },
      okData,
    );
    const h = run();
    expect(h.tensors.size).toBe(4);
    expect(Array.from(readTensor(h.tensors.get('b')!).data as Float32Array)).toEqual([4]);
    expect(readTensor(h.tensors.get('z2')!).data.length).toBe(0);
    expect(h.tensors.get('a')!.file).toBe(file);
  });

  test('__metadata__ must be a string -> string map', () => {
    const a = headerCase({ __metadata__: { format: 'pt', step: 3 }, a: okEntry });
    expectMedusa(a.run, 'E_SAFETENSORS', a.file, '__metadata__', '"step"');
    const b = headerCase({ __metadata__: ['pt'], a: okEntry });
    expectMedusa(b.run, 'E_SAFETENSORS', b.file, '__metadata__');
  });

  test('too many tensors', () => {
    const { file, run } = headerCase(
      {
        a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
        b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] },
      },
      okData,
      { maxTensors: 1 },
    );
    expectMedusa(run, 'E_SAFETENSORS', file, 'maxTensors=1');
  });

  test('tensor name too long', () => {
    const { file, run } = headerCase({ very_long_name: okEntry }, okData, { maxNameLength: 4 });
    expectMedusa(run, 'E_SAFETENSORS', file, 'very_long_name', 'maxNameLength=4');
  });

  test('a file truncated after its header was read -> E_SAFETENSORS from readTensorRaw', () => {
    const file = tmpPath();
    writeSafetensors(file, { w: { dtype: 'F32', shape: [16], data: new Float32Array(16) } });
    const info = readHeader(file).tensors.get('w')!;
    fs.truncateSync(file, info.offset + 10);
    expectMedusa(() => readTensorRaw(info), 'E_SAFETENSORS', file, '"w"', 'truncated');
    fs.rmSync(file);
    expectMedusa(() => readTensor(info), 'E_IO', file);
  });

  test('DEFAULT_LIMITS are as documented', () => {
    expect(DEFAULT_LIMITS).toEqual({ maxHeaderBytes: 100 * 1024 * 1024, maxTensors: 1_000_000, maxDims: 8, maxNameLength: 1024 });
  });
});

describe('writer validation and atomicity', () => {
  test.each([
    ['length mismatch', { dtype: 'F32', shape: [2, 2], data: new Float32Array(3) }, '3'],
    ['wrong array type', { dtype: 'F32', shape: [2], data: new Float64Array(2) }, 'Float64Array'],
    ['uint16 for F32', { dtype: 'F32', shape: [2], data: new Uint16Array(2) }, 'Uint16Array'],
    ['int32 for I64', { dtype: 'I64', shape: [2], data: new Int32Array(2) }, 'BigInt64Array'],
    ['negative dim', { dtype: 'F32', shape: [-1], data: new Float32Array(0) }, 'shape'],
    ['unknown dtype', { dtype: 'F8', shape: [1], data: new Uint8Array(1) }, 'F8'],
  ])('rejects %s, naming the tensor, and leaves the old file untouched', (_k, bad, part) => {
    const file = tmpPath();
    writeSafetensors(file, { ok: { dtype: 'U8', shape: [1], data: new Uint8Array([7]) } });
    const before = fs.readFileSync(file);
    expectMedusa(
      () => writeSafetensors(file, { ok: { dtype: 'U8', shape: [1], data: new Uint8Array([8]) }, 'bad.tensor': bad as unknown as WriteTensor }),
      'E_SAFETENSORS',
      file,
      '"bad.tensor"',
      part,
    );
    expect(fs.readFileSync(file).equals(before)).toBe(true);
    expect(fs.readdirSync(path.dirname(file))).toEqual([path.basename(file)]);
  });

  test('accepts a Buffer for U8', () => {
    const file = tmpPath();
    writeSafetensors(file, { b: { dtype: 'U8', shape: [3], data: Buffer.from([1, 2, 3]) } });
    expect(Array.from(readTensor(readHeader(file).tensors.get('b')!).data as Uint8Array)).toEqual([1, 2, 3]);
  });

  test('a failing rename leaves no temp file and no file under the final name', () => {
    const target = tmpPath('target.safetensors');
    fs.mkdirSync(target); // renaming a file over a non-empty directory fails
    fs.writeFileSync(path.join(target, 'keep'), 'x');
    expectMedusa(() => writeSafetensors(target, { a: { dtype: 'F32', shape: [1], data: new Float32Array(1) } }), 'E_IO', target);
    expect(fs.readdirSync(path.dirname(target))).toEqual(['target.safetensors']);
    expect(fs.statSync(target).isDirectory()).toBe(true);
  });

  test('writing into a missing folder -> E_IO', () => {
    const target = path.join(tmpRoot, 'no-such-dir', 'x.safetensors');
    expectMedusa(() => writeSafetensors(target, {}), 'E_IO', target);
  });

  test('an empty tensor set is a valid file', () => {
    const file = tmpPath();
    writeSafetensors(file, {});
    const h = readHeader(file);
    expect(h.tensors.size).toBe(0);
    expect(h.metadata).toEqual({});
  });
});

describe('model folders', () => {
  /** Two shards + index in a fresh folder; returns the folder. */
  function shardedFolder(mutateIndex?: (wm: Record<string, string>) => void): string {
    const dir = path.dirname(tmpPath());
    writeSafetensors(path.join(dir, 'model-00001-of-00002.safetensors'), {
      'embed.weight': { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
      'layer.0.w': { dtype: 'BF16', shape: [2], data: new Uint16Array([0x3f80, 0xc000]) },
    });
    writeSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), {
      'lm_head.weight': { dtype: 'F16', shape: [3], data: new Uint16Array([0x3c00, 0x7bff, 0x8000]) },
    });
    const weightMap: Record<string, string> = {
      'embed.weight': 'model-00001-of-00002.safetensors',
      'layer.0.w': 'model-00001-of-00002.safetensors',
      'lm_head.weight': 'model-00002-of-00002.safetensors',
    };
    mutateIndex?.(weightMap);
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 26 }, weight_map: weightMap }));
    return dir;
  }

  test('opens two shards through the index and reads tensors from both', () => {
    const dir = shardedFolder();
    const m = openSafetensorsFolder(dir);
    expect(m.dir).toBe(dir);
    expect(m.files).toEqual([
      path.join(dir, 'model-00001-of-00002.safetensors'),
      path.join(dir, 'model-00002-of-00002.safetensors'),
    ]);
    expect([...m.tensors.keys()].sort()).toEqual(['embed.weight', 'layer.0.w', 'lm_head.weight']);
    expect(Array.from(readTensorF32(m.tensors.get('embed.weight')!))).toEqual([1, 2, 3, 4]);
    expect(Array.from(readTensorF32(m.tensors.get('layer.0.w')!))).toEqual([1, -2]);
    const head = readTensor(m.tensors.get('lm_head.weight')!);
    expect(head.dtype).toBe('F16');
    expect(Array.from(head.data as Float32Array)).toEqual([1, 65504, -0]);
    expect(m.tensors.get('lm_head.weight')!.file).toBe(path.join(dir, 'model-00002-of-00002.safetensors'));
  });

  test('a single model.safetensors', () => {
    const file = tmpPath('model.safetensors');
    writeSafetensors(file, { w: { dtype: 'I8', shape: [2], data: new Int8Array([-1, 1]) } });
    const m = openSafetensorsFolder(path.dirname(file));
    expect(m.files).toEqual([file]);
    expect(Array.from(readTensor(m.tensors.get('w')!).data as Int8Array)).toEqual([-1, 1]);
  });

  test('index pointing at a tensor the shard lacks', () => {
    const dir = shardedFolder((wm) => {
      wm['ghost.weight'] = 'model-00002-of-00002.safetensors';
    });
    expectMedusa(() => openSafetensorsFolder(dir), 'E_SAFETENSORS', '"ghost.weight"', 'model.safetensors.index.json', 'model-00002-of-00002.safetensors');
  });

  test('missing shard file -> E_IO naming it', () => {
    const dir = shardedFolder((wm) => {
      wm['extra'] = 'model-00003-of-00002.safetensors';
    });
    expectMedusa(() => openSafetensorsFolder(dir), 'E_IO', path.join(dir, 'model-00003-of-00002.safetensors'));
  });

  test.each(['../x.safetensors', 'sub/x.safetensors', '..', '/abs/x.safetensors', 'a\\b.safetensors'])(
    'weight_map file %s is rejected',
    (bad) => {
      const dir = shardedFolder((wm) => {
        wm['lm_head.weight'] = bad;
      });
      expectMedusa(() => openSafetensorsFolder(dir), 'E_SAFETENSORS', '"lm_head.weight"', 'model.safetensors.index.json');
    },
  );

  test('shard tensor not listed in the index -> error naming both', () => {
    const dir = shardedFolder((wm) => {
      delete wm['layer.0.w'];
    });
    expectMedusa(() => openSafetensorsFolder(dir), 'E_SAFETENSORS', '"layer.0.w"', 'model-00001-of-00002.safetensors', 'index');
  });

  test('the same tensor in two shards -> error', () => {
    const dir = shardedFolder();
    writeSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), {
      'lm_head.weight': { dtype: 'F16', shape: [3], data: new Uint16Array(3) },
      'embed.weight': { dtype: 'F32', shape: [2, 2], data: new Float32Array(4) },
    });
    expectMedusa(() => openSafetensorsFolder(dir), 'E_SAFETENSORS', '"embed.weight"', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors');
  });

  test('index that is not JSON', () => {
    const dir = path.dirname(tmpPath());
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), '{"weight_map": ');
    expectMedusa(() => openSafetensorsFolder(dir), 'E_SAFETENSORS', path.join(dir, 'model.safetensors.index.json'), 'JSON');
  });

  test('empty folder -> E_IO listing what was looked for', () => {
    const dir = path.dirname(tmpPath());
    fs.writeFileSync(path.join(dir, 'adapter.safetensors'), '');
    expectMedusa(() => openSafetensorsFolder(dir), 'E_IO', dir, 'model.safetensors.index.json', 'model.safetensors', 'adapter.safetensors');
  });

  test('missing folder -> E_IO', () => {
    const dir = path.join(tmpRoot, 'nope');
    expectMedusa(() => openSafetensorsFolder(dir), 'E_IO', dir);
  });
});
