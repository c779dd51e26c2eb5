import * as path from 'node:path';
import { readHeader, readTensor } from '../../src/io/safetensors.js';

export const DECODER_FIXTURES = path.resolve('test/fixtures/decoder');
export const VARIANTS = ['llama-gqa', 'llama3-tied-bf16', 'llama-linear-f16-bias', 'mistral-window', 'qwen2-bias-tied', 'qwen3-qknorm'] as const;

export interface Golden {
  [name: string]: { shape: number[]; data: Float32Array | number[] };
}

/** Read golden.safetensors of a fixture: floats as Float32Array, ints as number[]. */
export function readGolden(variant: string): Golden {
  const h = readHeader(path.join(DECODER_FIXTURES, variant, 'golden.safetensors'));
  const out: Golden = {};
  for (const [name, info] of h.tensors) {
    const t = readTensor(info);
    out[name] = { shape: t.shape, data: t.data instanceof BigInt64Array ? Array.from(t.data, Number) : (t.data as Float32Array) };
  }
  return out;
}

/** Max |a-b| over the given flat index set (or all). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>, indices?: number[]): number {
  if (!indices && a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  const idx = indices ?? Array.from({ length: a.length }, (_, i) => i);
  for (const i of idx) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** max |a - b| / max |b| (a length mismatch throws). */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  let s = 0;
  for (let i = 0; i < b.length; i++) {
    m = Math.max(m, Math.abs(a[i] - b[i]));
    s = Math.max(s, Math.abs(b[i]));
  }
  return m / Math.max(s, 1e-30);
}
