/**
 * Merge LoRA adapters in PEFT's tensor layout into a base model's Hugging Face tensors, on the host
 * (Float32Array, no tfjs): for every adapted module, W' = W + (alpha / r) * B @ A, with W [out, in]
 * (PyTorch layout), A [r, in] (`...lora_A.weight`) and B [out, r] (`...lora_B.weight`).
 *
 * The module table is literal (as model/weights.ts): each PEFT module path, the Hugging Face weight it
 * adapts and its shape in the config's dimensions. The adapters are checked against it by count, name,
 * shape and value (finite) before anything is merged; an unknown, missing or misshaped tensor is an
 * E_MODEL error that names it, the file and the fix.
 *
 * Tied embeddings: an adapter on lm_head changes the output projection only (the embedding lookup stays
 * as it was, as in training), so merging it unties the two: the merged `lm_head.weight` is the
 * embedding plus the adapter, and the caller must write it with tie_word_embeddings false.
 */
import { fail } from '../errors.js';
import type { DecoderConfig } from '../model/config.js';

export interface HostTensor {
  shape: number[];
  data: Float32Array;
}

export interface LoraMergeSpec {
  rank: number;
  alpha: number;
  /** Adapted modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head. */
  targets: readonly string[];
}

type Dim = 'V' | 'd' | 'ff' | 'q' | 'kv';

interface ModuleRow {
  target: string;
  /** The module path inside `model.layers.{i}.` (decoder layers) or at the top level (lm_head). */
  module: string;
  /** PyTorch weight shape [out, in]. */
  out: Dim;
  in: Dim;
}

/** Adaptable modules of a decoder layer, in the order adapters are listed. */
const LAYER_MODULES: readonly ModuleRow[] = [
  { target: 'q_proj', module: 'self_attn.q_proj', out: 'q', in: 'd' },
  { target: 'k_proj', module: 'self_attn.k_proj', out: 'kv', in: 'd' },
  { target: 'v_proj', module: 'self_attn.v_proj', out: 'kv', in: 'd' },
  { target: 'o_proj', module: 'self_attn.o_proj', out: 'd', in: 'q' },
  { target: 'gate_proj', module: 'mlp.gate_proj', out: 'ff', in: 'd' },
  { target: 'up_proj', module: 'mlp.up_proj', out: 'ff', in: 'd' },
  { target: 'down_proj', module: 'mlp.down_proj', out: 'd', in: 'ff' },
];
/** The output projection (once, after the layers). */
const LM_HEAD_MODULE: ModuleRow = { target: 'lm_head', module: 'lm_head', out: 'V', in: 'd' };

/** PEFT's prefix of every adapter tensor of a causal LM. */
export const PEFT_PREFIX = 'base_model.model.';

export const LORA_MERGE_TARGETS: readonly string[] = [...LAYER_MODULES.map((m) => m.target), LM_HEAD_MODULE.target];

export interface LoraMergeRow {
  /** PEFT names. */
  nameA: string;
  nameB: string;
  /** The Hugging Face weight it adapts ([out, in]). */
  base: string;
  outDim: number;
  inDim: number;
}

function dims(c: DecoderConfig): Record<Dim, number> {
  return { V: c.vocabSize, d: c.hiddenSize, ff: c.intermediateSize, q: c.numHeads * c.headDim, kv: c.numKvHeads * c.headDim };
}

function checkSpec(spec: LoraMergeSpec, where: string): void {
  const bad: string[] = [];
  if (!Number.isSafeInteger(spec.rank) || spec.rank < 1) bad.push(`rank must be an integer >= 1, got ${String(spec.rank)}`);
  if (!(typeof spec.alpha === 'number' && Number.isFinite(spec.alpha) && spec.alpha > 0)) bad.push(`alpha must be a number > 0, got ${String(spec.alpha)}`);
  if (!Array.isArray(spec.targets) || spec.targets.length === 0) bad.push('targets must list at least one module');
  else {
    for (const t of spec.targets) if (!LORA_MERGE_TARGETS.includes(t)) bad.push(`unknown target ${JSON.stringify(t)} (known: ${LORA_MERGE_TARGETS.join(', ')})`);
    if (new Set(spec.targets).size !== spec.targets.length) bad.push(`targets list a module twice: ${spec.targets.join(', ')}`);
  }
  if (bad.length > 0) fail('E_CONFIG', `${where}: the LoRA settings are not valid: ${bad.join('; ')}`);
}

/**
 * The adapters a config and spec must have: layer by layer (targets in table order), then lm_head.
 * Count = numLayers x (layer targets) + (lm_head ? 1 : 0); two tensors (A, B) each.
 */
export function loraMergeTable(c: DecoderConfig, spec: LoraMergeSpec, where = 'the LoRA spec'): LoraMergeRow[] {
  checkSpec(spec, where);
  const D = dims(c);
  const layerRows = LAYER_MODULES.filter((m) => spec.targets.includes(m.target));
  const rows: LoraMergeRow[] = [];
  const row = (m: ModuleRow, path: string): LoraMergeRow => ({
    nameA: `${PEFT_PREFIX}${path}.lora_A.weight`,
    nameB: `${PEFT_PREFIX}${path}.lora_B.weight`,
    base: `${path}.weight`,
    outDim: D[m.out],
    inDim: D[m.in],
  });
  for (let i = 0; i < c.numLayers; i++) for (const m of layerRows) rows.push(row(m, `model.layers.${i}.${m.module}`));
  if (spec.targets.includes('lm_head')) rows.push(row(LM_HEAD_MODULE, LM_HEAD_MODULE.module));
  const expected = c.numLayers * layerRows.length + (spec.targets.includes('lm_head') ? 1 : 0);
  if (rows.length !== expected) fail('E_INTERNAL', `LoRA table produced ${rows.length} modules, expected ${expected}`);
  return rows;
}

const fmt = (s: readonly number[]): string => `[${s.join(', ')}]`;

/**
 * Check adapter tensors against the table: every A [r, in] and B [out, r] present with its exact shape
 * and finite float32 values, nothing else. Fails E_MODEL naming `where`, each problem and the fix.
 */
export function checkAdapters(adapters: Record<string, HostTensor>, c: DecoderConfig, spec: LoraMergeSpec, where: string): LoraMergeRow[] {
  const rows = loraMergeTable(c, spec, where);
  const r = spec.rank;
  const problems: string[] = [];
  const check = (name: string, shape: number[]): void => {
    const t = Object.hasOwn(adapters, name) ? adapters[name] : undefined;
    if (t === undefined) {
      problems.push(`missing tensor ${name} (expected shape ${fmt(shape)})`);
      return;
    }
    if (!Array.isArray(t.shape) || t.shape.length !== shape.length || t.shape.some((s, i) => s !== shape[i])) {
      problems.push(`tensor ${name} has shape ${fmt(t.shape ?? [])}, expected ${fmt(shape)}`);
      return;
    }
    if (!(t.data instanceof Float32Array) || t.data.length !== shape[0] * shape[1]) {
      problems.push(`tensor ${name} must hold ${shape[0] * shape[1]} float32 values`);
      return;
    }
    for (let i = 0; i < t.data.length; i++) {
      if (!Number.isFinite(t.data[i])) {
        problems.push(`tensor ${name} element ${i} is ${t.data[i]}`);
        return;
      }
    }
  };
  for (const row of rows) {
    check(row.nameA, [r, row.inDim]);
    check(row.nameB, [row.outDim, r]);
  }
  const known = new Set(rows.flatMap((x) => [x.nameA, x.nameB]));
  for (const name of Object.keys(adapters)) {
    if (!known.has(name)) {
      const hint = name.startsWith(PEFT_PREFIX) ? 'not an adapter of the recorded targets/rank' : 'not a PEFT adapter name (base_model.model.…lora_A/B.weight)';
      problems.push(`unexpected tensor ${name} (${hint})`);
    }
  }
  if (problems.length > 0) {
    const shown = problems.slice(0, 20);
    fail(
      'E_MODEL',
      `${where} does not hold the LoRA adapters of rank ${r} on ${spec.targets.join(', ')} for this base model (${c.numLayers} layers, hidden ${c.hiddenSize}):\n  - ${shown.join('\n  - ')}` +
        (problems.length > shown.length ? `\n  - … and ${problems.length - shown.length} more` : '') +
        '\nUse the checkpoint with the base model and medusa2.backbone.lora settings it was trained with.',
    );
  }
  return rows;
}

/**
 * W + scale * B @ A for one module, accumulated in float64 and rounded once to float32.
 * W [out, in], A [r, in], B [out, r] row-major.
 */
export function mergeOne(W: Float32Array, A: Float32Array, B: Float32Array, out: number, inDim: number, r: number, scale: number): Float32Array {
  const merged = new Float32Array(out * inDim);
  const acc = new Float64Array(inDim);
  for (let o = 0; o < out; o++) {
    acc.fill(0);
    for (let k = 0; k < r; k++) {
      const b = B[o * r + k];
      if (b === 0) continue;
      const ao = k * inDim;
      for (let i = 0; i < inDim; i++) acc[i] += b * A[ao + i];
    }
    const wo = o * inDim;
    for (let i = 0; i < inDim; i++) merged[wo + i] = W[wo + i] + scale * acc[i];
  }
  return merged;
}

/**
 * Merge checked adapters into the base weights they adapt. `base(hfName)` returns the current Hugging
 * Face tensor [out, in] (asked for `lm_head.weight` of a tied model: return the embedding). Returns the
 * merged tensors by Hugging Face name (new arrays; the base is not modified), and whether lm_head was
 * adapted on a tied model (the merged model then needs its own lm_head.weight and tie_word_embeddings
 * false).
 */
export function mergeLora(
  base: (hfName: string) => HostTensor,
  adapters: Record<string, HostTensor>,
  c: DecoderConfig,
  spec: LoraMergeSpec,
  where: string,
): { merged: Map<string, HostTensor>; untiedLmHead: boolean } {
  const rows = checkAdapters(adapters, c, spec, where);
  const scale = spec.alpha / spec.rank;
  const merged = new Map<string, HostTensor>();
  for (const row of rows) {
    const W = base(row.base);
    if (W.shape.length !== 2 || W.shape[0] !== row.outDim || W.shape[1] !== row.inDim || W.data.length !== row.outDim * row.inDim) {
      fail('E_MODEL', `base tensor ${row.base} is ${fmt(W.shape)}, but the adapter ${row.nameA} needs ${fmt([row.outDim, row.inDim])}; is it the base model the adapters were trained on?`);
    }
    const data = mergeOne(W.data, adapters[row.nameA].data, adapters[row.nameB].data, row.outDim, row.inDim, spec.rank, scale);
    merged.set(row.base, { shape: [row.outDim, row.inDim], data });
  }
  return { merged, untiedLmHead: c.tieWordEmbeddings && spec.targets.includes('lm_head') };
}
