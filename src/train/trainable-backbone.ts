/**
 * The trainable part of the backbone for MEDUSA-2: LoRA adapters on chosen linear layers, or full
 * fine-tuning of the last N decoder layers plus the final norm; optionally the token embeddings.
 *
 * The frozen base (decoder.weights) is never modified: LoRA adds a path beside it, and full mode trains
 * fresh Variables copied from it. Training reaches the decoder through its optional forward hook
 * (ForwardHook in src/model/decoder.ts), built inside the caller's gradient scope by `hook()`.
 *
 * Parameter names are the external ones (PEFT names for LoRA, Hugging Face names for full mode and the
 * embeddings); Variables and gradients hold the internal layout (linear weights [in, out], LoRA A as
 * A^T [in, r] and B as B^T [r, out]); exportTensors/importTensors use PyTorch's layout.
 *
 * Weight decay: off for biases and norms; on for linear weights, LoRA A and B (as the Hugging Face
 * Trainer's default decay set, which PEFT training uses) and the embedding table.
 */
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import type { Decoder, ForwardHook, LinearSite, MatMulSite } from '../model/decoder.js';
import type { DecoderWeights, LayerWeights } from '../model/weights.js';
import { trainableParams as headParams, type MedusaHeads } from '../model/heads.js';
import { Rng, streamSeed } from '../model/sampling.js';
import { initLoraA, loraModules, loraScale, type LoraModule } from './lora.js';
import { matMulConstB, matMulFast } from './fast-grad.js';

export type BackboneSpec =
  | { mode: 'lora'; rank: number; alpha: number; dropout: number; targets: string[]; trainEmbeddings: boolean }
  | { mode: 'full'; lastLayers: number; trainEmbeddings: boolean };

export interface TrainableParam {
  /** External name (PEFT / Hugging Face / Medusa reference). */
  name: string;
  /** Trainable float32 Variable, internal layout. */
  variable: tf.Variable;
  group: 'backbone' | 'heads';
  weightDecay: boolean;
}

export type HostTensors = Record<string, { shape: number[]; data: Float32Array }>;

export interface TrainableBackbone {
  spec: BackboneSpec;
  /** The backbone's trainable tensors only (group 'backbone'). */
  params: TrainableParam[];
  /**
   * The decoder hook for a forward with the trainable tensors. Call it inside the gradient scope (full
   * mode assembles the fused weights from the trainable pieces there). dropoutSeed null: no LoRA dropout
   * (evaluation, gate, heads warmup); a number: dropout masks seeded by it (one stream per module).
   */
  hook(dropoutSeed: number | null): ForwardHook;
  /** Trainable tensors in PyTorch layout by external name (PEFT adapter or Hugging Face tensors). */
  exportTensors(): HostTensors;
  /** Load tensors from exportTensors()'s layout; names, count and shapes are checked first (E_MODEL naming `where`). */
  importTensors(t: HostTensors, where: string): void;
  dispose(): void;
}

/** A trainable Variable from host data (the data is copied; the base tensors are never aliased). */
function variableOf(data: Float32Array, shape: number[]): tf.Variable {
  const t = tf.tensor(new Float32Array(data), shape, 'float32');
  const v = tf.variable(t, true);
  t.dispose();
  return v;
}

/** Host copy of columns [c0, c0+n) of a row-major [rows, cols] matrix: [rows, n]. */
function columns(m: tf.Tensor2D, c0: number, n: number): Float32Array {
  const [rows, cols] = m.shape;
  const src = m.dataSync() as Float32Array;
  const out = new Float32Array(rows * n);
  for (let r = 0; r < rows; r++) out.set(src.subarray(r * cols + c0, r * cols + c0 + n), r * n);
  return out;
}

function range1d(v: tf.Tensor1D, o: number, n: number): Float32Array {
  return Float32Array.from((v.dataSync() as Float32Array).subarray(o, o + n));
}

function transpose2d(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c];
  return out;
}

/**
 * Row gather table[idx] [n, d] whose gradient is a scatter-add into [N, d] (tf.scatterND sums duplicate
 * indexes). tf.gather's own gradient needs UnsortedSegmentSum, which tfjs-wasm does not have.
 */
export function gatherRows(table: tf.Tensor2D, idx: Int32Array): tf.Tensor2D {
  const n = idx.length;
  const f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const x = args[0] as tf.Tensor2D; // [N, d]
    const value = tf.gather(x, tf.tensor1d(idx, 'int32')) as tf.Tensor2D; // [n, d]
    const gradFunc = (dy: tf.Tensor): tf.Tensor => tf.scatterND(tf.tensor2d(idx, [n, 1], 'int32'), dy, x.shape); // [N, d]
    return { value, gradFunc };
  });
  return f(table) as tf.Tensor2D;
}

interface Piece {
  /** External name. */
  name: string;
  /** PyTorch shape. */
  shape: number[];
  /** Internal (Variable) shape; a 2-D PyTorch [out, in] weight is held transposed. */
  transposed: boolean;
  variable: tf.Variable;
  weightDecay: boolean;
}

export function createTrainableBackbone(decoder: Decoder, spec: BackboneSpec, seed: number): TrainableBackbone {
  const c = decoder.config;
  const base = decoder.weights;
  const d = c.hiddenSize;
  const pieces: Piece[] = [];
  const add = (name: string, shape: number[], transposed: boolean, internal: Float32Array, weightDecay: boolean): tf.Variable => {
    const ishape = transposed ? [shape[1], shape[0]] : shape;
    const variable = variableOf(internal, ishape);
    pieces.push({ name, shape, transposed, variable, weightDecay });
    return variable;
  };

  let embedVar: tf.Variable | null = null;
  if (spec.trainEmbeddings) embedVar = add('model.embed_tokens.weight', [c.vocabSize, d], false, base.embed.dataSync() as Float32Array, true);

  // --- LoRA ---
  const lora = new Map<string, { m: LoraModule; a: tf.Variable; b: tf.Variable; index: number }>();
  let scale = 0;
  let dropout = 0;
  // --- full mode: the trainable layers' pieces, by layer ---
  const full = new Map<number, Record<string, tf.Variable>>();
  let normVar: tf.Variable | null = null;

  if (spec.mode === 'lora') {
    const modules = loraModules(c, spec);
    scale = loraScale(spec);
    dropout = spec.dropout;
    const rng = new Rng(seed);
    modules.forEach((m, index) => {
      const a = initLoraA(rng, spec.rank, m.inDim); // [r, in]
      const av = add(m.nameA, [spec.rank, m.inDim], true, transpose2d(a, spec.rank, m.inDim), true); // [in, r]
      const bv = add(m.nameB, [m.outDim, spec.rank], true, new Float32Array(m.outDim * spec.rank), true); // [r, out]
      lora.set(`${m.site}:${m.layer}`, { m, a: av, b: bv, index });
    });
  } else {
    const N = spec.lastLayers;
    if (!Number.isInteger(N) || N < 1 || N > c.numLayers) {
      fail('E_CONFIG', `medusa2.backbone.full_last_layers must be an integer in [1, ${c.numLayers}] (the model has ${c.numLayers} layers), got ${String(N)}`);
    }
    const q = c.numHeads * c.headDim;
    const kv = c.numKvHeads * c.headDim;
    const ff = c.intermediateSize;
    for (let i = c.numLayers - N; i < c.numLayers; i++) {
      const lw = base.layers[i];
      const p = `model.layers.${i}.`;
      const v: Record<string, tf.Variable> = {};
      v.attnNorm = add(`${p}input_layernorm.weight`, [d], false, lw.attnNorm.dataSync() as Float32Array, false);
      v.wq = add(`${p}self_attn.q_proj.weight`, [q, d], true, columns(lw.wqkv, 0, q), true);
      v.wk = add(`${p}self_attn.k_proj.weight`, [kv, d], true, columns(lw.wqkv, q, kv), true);
      v.wv = add(`${p}self_attn.v_proj.weight`, [kv, d], true, columns(lw.wqkv, q + kv, kv), true);
      v.wo = add(`${p}self_attn.o_proj.weight`, [d, q], true, lw.wo.dataSync() as Float32Array, true);
      if (lw.bqkv) {
        v.bq = add(`${p}self_attn.q_proj.bias`, [q], false, range1d(lw.bqkv, 0, q), false);
        v.bk = add(`${p}self_attn.k_proj.bias`, [kv], false, range1d(lw.bqkv, q, kv), false);
        v.bv = add(`${p}self_attn.v_proj.bias`, [kv], false, range1d(lw.bqkv, q + kv, kv), false);
      }
      if (lw.bo) v.bo = add(`${p}self_attn.o_proj.bias`, [d], false, lw.bo.dataSync() as Float32Array, false);
      if (lw.qNorm && lw.kNorm) {
        v.qNorm = add(`${p}self_attn.q_norm.weight`, [c.headDim], false, lw.qNorm.dataSync() as Float32Array, false);
        v.kNorm = add(`${p}self_attn.k_norm.weight`, [c.headDim], false, lw.kNorm.dataSync() as Float32Array, false);
      }
      v.mlpNorm = add(`${p}post_attention_layernorm.weight`, [d], false, lw.mlpNorm.dataSync() as Float32Array, false);
      v.wg = add(`${p}mlp.gate_proj.weight`, [ff, d], true, columns(lw.wgu, 0, ff), true);
      v.wu = add(`${p}mlp.up_proj.weight`, [ff, d], true, columns(lw.wgu, ff, ff), true);
      v.wdown = add(`${p}mlp.down_proj.weight`, [d, ff], true, lw.wdown.dataSync() as Float32Array, true);
      full.set(i, v);
    }
    normVar = add('model.norm.weight', [d], false, base.finalNorm.dataSync() as Float32Array, false);
  }

  const params: TrainableParam[] = pieces.map((p) => ({ name: p.name, variable: p.variable, group: 'backbone', weightDecay: p.weightDecay }));

  // Whether the weight a product reads is trained (so it needs a gradient): full-mode layers, and a tied
  // lm_head when the embeddings train. Frozen weights take matMulConstB (no weight gradient computed).
  const tiedTrainedHead = embedVar !== null && c.tieWordEmbeddings;
  const trainedWeight = (site: MatMulSite, layer: number): boolean =>
    site === 'attention' || (site === 'lm_head' ? tiedTrainedHead : full.has(layer));

  const hook = (dropoutSeed: number | null): ForwardHook => {
    // Every product with explicit-transpose gradients (tfjs-wasm runs transposed matmuls in a scalar loop).
    const h: ForwardHook = {
      matMul: (a, b, site, layer) => (trainedWeight(site, layer) ? matMulFast(a, b) : matMulConstB(a, b)), // [m, n]
    };
    if (embedVar) {
      const ev = embedVar as tf.Variable<tf.Rank.R2>;
      h.embed = (ids) => gatherRows(ev, ids); // [B*T, d]
    }
    if (full.size > 0 || (embedVar && c.tieWordEmbeddings)) {
      const layers: LayerWeights[] = base.layers.map((lw, i) => {
        const v = full.get(i);
        if (!v) return lw;
        return {
          attnNorm: v.attnNorm as tf.Tensor1D,
          wqkv: tf.concat([v.wq, v.wk, v.wv], 1) as tf.Tensor2D, // [d, q+2kv]
          bqkv: v.bq ? (tf.concat([v.bq, v.bk, v.bv], 0) as tf.Tensor1D) : null, // [q+2kv]
          wo: v.wo as tf.Tensor2D,
          bo: (v.bo ?? null) as tf.Tensor1D | null,
          qNorm: (v.qNorm ?? null) as tf.Tensor1D | null,
          kNorm: (v.kNorm ?? null) as tf.Tensor1D | null,
          mlpNorm: v.mlpNorm as tf.Tensor1D,
          wgu: tf.concat([v.wg, v.wu], 1) as tf.Tensor2D, // [d, 2ff]
          wdown: v.wdown as tf.Tensor2D,
        };
      });
      const w: DecoderWeights = {
        embed: (embedVar ?? base.embed) as tf.Tensor2D,
        layers,
        finalNorm: (normVar ?? base.finalNorm) as tf.Tensor1D,
        // Tied embeddings: HF's lm_head is the same parameter as the embedding, so it trains with it.
        lmHead: embedVar && c.tieWordEmbeddings ? (tf.transpose(embedVar) as tf.Tensor2D) : base.lmHead, // [d, V]
      };
      h.weights = w;
    }
    if (lora.size > 0) {
      h.linear = (site: LinearSite, layer: number, input: tf.Tensor2D, output: tf.Tensor2D): tf.Tensor2D => {
        const ad = lora.get(`${site}:${layer}`);
        if (!ad) return output;
        const x = dropoutSeed !== null && dropout > 0 ? tf.dropout(input, dropout, undefined, streamSeed(dropoutSeed, ad.index)) : input; // [n, in]
        const delta = tf.mul(matMulFast(matMulFast(x as tf.Tensor2D, ad.a as tf.Tensor2D), ad.b as tf.Tensor2D), scale); // [n, out]
        return tf.add(output, delta) as tf.Tensor2D; // [n, out]
      };
    }
    return h;
  };

  const exportTensors = (): HostTensors => {
    const out: HostTensors = {};
    for (const p of pieces) {
      const data = new Float32Array(p.variable.dataSync() as Float32Array);
      out[p.name] = { shape: p.shape.slice(), data: p.transposed ? transpose2d(data, p.shape[1], p.shape[0]) : data };
    }
    return out;
  };

  const importTensors = (t: HostTensors, where: string): void => {
    const problems: string[] = [];
    for (const p of pieces) {
      const x = t[p.name];
      if (!x) problems.push(`missing ${p.name} [${p.shape.join(', ')}]`);
      else if (x.shape.length !== p.shape.length || x.shape.some((s, i) => s !== p.shape[i])) problems.push(`${p.name} is [${x.shape.join(', ')}], expected [${p.shape.join(', ')}]`);
      else if (!(x.data instanceof Float32Array) || x.data.length !== p.variable.size) problems.push(`${p.name} must hold ${p.variable.size} float32 values`);
    }
    const known = new Set(pieces.map((p) => p.name));
    for (const name of Object.keys(t)) if (!known.has(name)) problems.push(`unexpected tensor ${name}`);
    if (problems.length > 0) {
      fail('E_MODEL', `${where} does not hold the trainable backbone tensors of this run (${describe(spec)}):\n  - ${problems.slice(0, 20).join('\n  - ')}` +
        (problems.length > 20 ? `\n  - … and ${problems.length - 20} more` : '') + '\nResume with the same medusa2.backbone settings and base model the checkpoint was made with.');
    }
    for (const p of pieces) {
      const x = t[p.name];
      tf.tidy(() => p.variable.assign(tf.tensor(p.transposed ? transpose2d(x.data, p.shape[0], p.shape[1]) : new Float32Array(x.data), p.variable.shape, 'float32')));
    }
  };

  let disposed = false;
  return {
    spec,
    params,
    hook,
    exportTensors,
    importTensors,
    dispose: () => {
      if (disposed) return;
      disposed = true;
      for (const p of pieces) p.variable.dispose();
    },
  };
}

function describe(s: BackboneSpec): string {
  const emb = s.trainEmbeddings ? ', embeddings trained' : '';
  return s.mode === 'lora' ? `LoRA rank ${s.rank} on ${s.targets.join(', ')}${emb}` : `full fine-tuning of the last ${s.lastLayers} layers${emb}`;
}

/** The heads' trainable parameters as TrainableParams (group 'heads'; no weight decay on biases). */
export function headsParams(heads: MedusaHeads): TrainableParam[] {
  return headParams(heads).map((p) => ({ name: p.name, variable: p.value, group: 'heads', weightDecay: p.weightDecay }));
}
