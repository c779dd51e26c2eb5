/**
 * Medusa heads. Head k (0-based) reads the backbone's final hidden state at position t and guesses
 * the token at t+k+2: L residual blocks h <- h + SiLU(h W1 + b1), then a vocabulary projection W2
 * (`per_head`, the reference "v1") or the frozen base lm_head (`shared`, "v2").
 *
 * Internal layout (float32, tfjs): W1 [in, out] = PyTorch weight transposed, b1 [d], W2 [d, V].
 * External names and layout are the Medusa reference's (PyTorch [out, in]): `{k}.{l}.linear.weight`
 * [d, d], `{k}.{l}.linear.bias` [d], `{k}.{L}.weight` [V, d]; the mapping is the literal table in
 * `headTensorTable`, checked by count and shape in both directions.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { Rng } from './sampling.js';

export type LmHeadMode = 'per_head' | 'shared';

export interface HeadsShape {
  numHeads: number;
  numLayers: number;
  hiddenSize: number;
  vocabSize: number;
  lmHead: LmHeadMode;
}

export interface HeadBlock {
  w: tf.Variable<tf.Rank.R2>; // [d, d] (in, out)
  b: tf.Variable<tf.Rank.R1>; // [d]
}

export interface MedusaHeads {
  shape: HeadsShape;
  /** blocks[k][l] */
  blocks: HeadBlock[][];
  /** Per-head projection [d, V] (per_head), or null (shared). */
  proj: (tf.Variable<tf.Rank.R2> | null)[];
  /** The frozen base lm_head [d, V], used by shared heads (and as the per-head initialisation). */
  baseLmHead: tf.Tensor2D;
}

/** One row of the external layout table. */
export interface HeadTensorRow {
  name: string;
  shape: number[];
  /** Where it lives internally. */
  head: number;
  kind: 'w1' | 'b1' | 'w2';
  layer: number;
}

/** The literal mapping between Medusa reference names and internal tensors, for a heads shape. */
export function headTensorTable(s: HeadsShape): HeadTensorRow[] {
  const rows: HeadTensorRow[] = [];
  const d = s.hiddenSize;
  for (let k = 0; k < s.numHeads; k++) {
    for (let l = 0; l < s.numLayers; l++) {
      rows.push({ name: `${k}.${l}.linear.weight`, shape: [d, d], head: k, kind: 'w1', layer: l });
      rows.push({ name: `${k}.${l}.linear.bias`, shape: [d], head: k, kind: 'b1', layer: l });
    }
    if (s.lmHead === 'per_head') rows.push({ name: `${k}.${s.numLayers}.weight`, shape: [s.vocabSize, d], head: k, kind: 'w2', layer: s.numLayers });
  }
  const expected = s.numHeads * (2 * s.numLayers + (s.lmHead === 'per_head' ? 1 : 0));
  if (rows.length !== expected) fail('E_INTERNAL', `head table has ${rows.length} rows, expected ${expected}`);
  return rows;
}

/**
 * Fresh heads as the reference initialises them: W1 = 0 (each block starts as the identity), b1 ~
 * U(-1/sqrt(d), 1/sqrt(d)) (PyTorch Linear's default bias init), W2 = a copy of the base lm_head.
 * `baseLmHead` is [d, V] (internal layout); it is kept (not copied) as the shared projection.
 */
export function initHeads(s: HeadsShape, baseLmHead: tf.Tensor2D, seed: number): MedusaHeads {
  const d = s.hiddenSize;
  if (baseLmHead.shape[0] !== d || baseLmHead.shape[1] !== s.vocabSize) {
    fail('E_INTERNAL', `base lm_head is [${baseLmHead.shape}] but heads expect [${d}, ${s.vocabSize}]`);
  }
  const rng = new Rng(seed);
  const bound = 1 / Math.sqrt(d);
  const blocks: HeadBlock[][] = [];
  const proj: (tf.Variable<tf.Rank.R2> | null)[] = [];
  for (let k = 0; k < s.numHeads; k++) {
    const layers: HeadBlock[] = [];
    for (let l = 0; l < s.numLayers; l++) {
      const b = new Float32Array(d);
      for (let i = 0; i < d; i++) b[i] = (2 * rng.next() - 1) * bound;
      layers.push({ w: ownedVariable(tf.zeros([d, d])) as tf.Variable<tf.Rank.R2>, b: ownedVariable(tf.tensor1d(b)) as tf.Variable<tf.Rank.R1> });
    }
    blocks.push(layers);
    proj.push(s.lmHead === 'per_head' ? (ownedVariable(baseLmHead.clone()) as tf.Variable<tf.Rank.R2>) : null);
  }
  return { shape: s, blocks, proj, baseLmHead };
}

/** A trainable variable initialised from `t`; `t` (a temporary) is released. */
function ownedVariable(t: tf.Tensor): tf.Variable {
  const v = tf.variable(t, true);
  t.dispose();
  return v;
}

function transpose2d(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c];
  return out;
}

/** The internal tensor a table row refers to. */
export function headTensor(h: MedusaHeads, row: HeadTensorRow): tf.Variable {
  if (row.kind === 'w1') return h.blocks[row.head][row.layer].w;
  if (row.kind === 'b1') return h.blocks[row.head][row.layer].b;
  const p = h.proj[row.head];
  if (!p) fail('E_INTERNAL', `head ${row.head} has no projection (shared lm_head)`);
  return p;
}

/** Export in the Medusa reference layout (PyTorch [out, in]), float32 on the host. */
export function exportHeads(h: MedusaHeads): Record<string, { shape: number[]; data: Float32Array }> {
  const out: Record<string, { shape: number[]; data: Float32Array }> = {};
  for (const row of headTensorTable(h.shape)) {
    const t = headTensor(h, row);
    const data = t.dataSync() as Float32Array;
    // internal [in, out] -> external [out, in]; biases as they are
    out[row.name] = { shape: row.shape, data: row.kind === 'b1' ? Float32Array.from(data) : transpose2d(data, t.shape[0] as number, t.shape[1] as number) };
  }
  return out;
}

/** Load reference-layout tensors into existing heads, checking names, count and shapes. */
export function importHeads(h: MedusaHeads, tensors: Record<string, { shape: number[]; data: Float32Array }>, where: string): void {
  const table = headTensorTable(h.shape);
  const problems: string[] = [];
  for (const row of table) {
    const t = tensors[row.name];
    if (!t) problems.push(`missing ${row.name} [${row.shape}]`);
    else if (t.shape.join(',') !== row.shape.join(',')) problems.push(`${row.name} is [${t.shape}], expected [${row.shape}]`);
  }
  const known = new Set(table.map((r) => r.name));
  for (const name of Object.keys(tensors)) if (!known.has(name)) problems.push(`unexpected tensor ${name}`);
  if (problems.length > 0) fail('E_MODEL', `${where} does not hold heads of this shape (${h.shape.numHeads} heads x ${h.shape.numLayers} layers, lm_head ${h.shape.lmHead}):\n  - ${problems.join('\n  - ')}`);
  for (const row of table) {
    const t = tensors[row.name];
    const v = headTensor(h, row);
    const internal = row.kind === 'b1' ? t.data : transpose2d(t.data, row.shape[0], row.shape[1]);
    const value = tf.tensor(internal, v.shape);
    v.assign(value);
    value.dispose();
  }
}

/** Trainable parameters by external name, with whether weight decay applies (not to biases). */
export function trainableParams(h: MedusaHeads): { name: string; value: tf.Variable; weightDecay: boolean }[] {
  return headTensorTable(h.shape).map((row) => ({ name: row.name, value: headTensor(h, row), weightDecay: row.kind !== 'b1' }));
}

export function disposeHeads(h: MedusaHeads): void {
  for (const layers of h.blocks) for (const b of layers) {
    b.w.dispose();
    b.b.dispose();
  }
  for (const p of h.proj) p?.dispose();
}
