/** The PyTorch goldens of the heads' loss and gradients (scripts/golden_heads.py -> test/fixtures/heads). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readHeader, readTensor, readTensorF32 } from '../../src/io/safetensors.js';

export const HEADS_FIXTURES = path.resolve('test/fixtures/heads');

export interface HeadsCase {
  name: string;
  file: string;
  mode: 'per_head' | 'shared';
  num_heads: number;
  num_layers: number;
  hidden_size: number;
  vocab_size: number;
  batch: number;
  seq_len: number;
  decay: number;
  heads_coefficient: number;
  trainable: string[];
}

export const HEADS_CASES = (JSON.parse(fs.readFileSync(path.join(HEADS_FIXTURES, 'index.json'), 'utf8')) as { heads: HeadsCase[] }).heads;

/** Readers of one case's tensors: floats widened/rounded to f32, exact f64, and integers. */
export function loadHeadsCase(c: HeadsCase) {
  const h = readHeader(path.join(HEADS_FIXTURES, c.file));
  const f32 = (n: string): Float32Array => readTensorF32(h.tensors.get(n)!);
  const f64 = (n: string): Float64Array => readTensor(h.tensors.get(n)!).data as Float64Array;
  const ints = (n: string): number[] => Array.from(readTensor(h.tensors.get(n)!).data as BigInt64Array, Number);
  return { h, f32, f64, ints };
}
