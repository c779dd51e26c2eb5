/**
 * LoRA adapters in PEFT's tensor layout, so adapters trained here load in PEFT and back.
 *
 * For target module `m` of decoder layer i (m in q/k/v/o_proj: `self_attn.m`, gate/up/down_proj: `mlp.m`):
 *   base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A.weight  [r, in]
 *   base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_B.weight  [out, r]
 * and for lm_head: base_model.model.lm_head.lora_{A,B}.weight. All float32.
 * Effective weight (PyTorch [out, in]): W' = W + (alpha / r) * B @ A; the adapter's output for input x is
 * (alpha / r) * dropout(x) @ A^T @ B^T, added to the base projection's output (bias included).
 * Init as PEFT: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's default), B = 0,
 * so an untrained adapter leaves the model exactly as it was.
 *
 * Internal layout (tfjs): A is held as A^T [in, r] and B as B^T [r, out], so the adapter path is two
 * untransposed 2-D matmuls (the XNNPACK fast path on wasm).
 */
import { fail } from '../errors.js';
import type { DecoderConfig } from '../model/config.js';
import type { LinearSite } from '../model/decoder.js';
import { Rng } from '../model/sampling.js';

export const LORA_TARGETS: readonly LinearSite[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'];

export interface LoraSpec {
  rank: number;
  alpha: number;
  /** Dropout probability on the adapter's input, in [0, 1). */
  dropout: number;
  targets: string[];
}

/** One adapted linear: where it sits, its PEFT tensor names and its dimensions. */
export interface LoraModule {
  site: LinearSite;
  /** Decoder layer, -1 for lm_head. */
  layer: number;
  nameA: string;
  nameB: string;
  inDim: number;
  outDim: number;
}

/** Check a LoRA spec; errors name the config key and the fix. */
export function checkLoraSpec(s: LoraSpec): void {
  const bad: string[] = [];
  if (!Number.isInteger(s.rank) || s.rank < 1) bad.push(`medusa2.backbone.lora.rank must be an integer >= 1, got ${String(s.rank)}`);
  if (!(Number.isFinite(s.alpha) && s.alpha > 0)) bad.push(`medusa2.backbone.lora.alpha must be a number > 0, got ${String(s.alpha)}`);
  if (!(Number.isFinite(s.dropout) && s.dropout >= 0 && s.dropout < 1)) bad.push(`medusa2.backbone.lora.dropout must be in [0, 1), got ${String(s.dropout)}`);
  if (!Array.isArray(s.targets) || s.targets.length === 0) bad.push(`medusa2.backbone.lora.targets must list at least one of ${LORA_TARGETS.join(', ')}`);
  else {
    const seen = new Set<string>();
    for (const t of s.targets) {
      if (!(LORA_TARGETS as readonly string[]).includes(t)) bad.push(`medusa2.backbone.lora.targets: unknown module ${JSON.stringify(t)}; use ${LORA_TARGETS.join(', ')}`);
      if (seen.has(t)) bad.push(`medusa2.backbone.lora.targets lists ${JSON.stringify(t)} twice`);
      seen.add(t);
    }
  }
  if (bad.length > 0) fail('E_CONFIG', bad.join('\n'));
}

function dims(c: DecoderConfig, site: LinearSite): { inDim: number; outDim: number } {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  switch (site) {
    case 'q_proj': return { inDim: c.hiddenSize, outDim: q };
    case 'k_proj': case 'v_proj': return { inDim: c.hiddenSize, outDim: kv };
    case 'o_proj': return { inDim: q, outDim: c.hiddenSize };
    case 'gate_proj': case 'up_proj': return { inDim: c.hiddenSize, outDim: c.intermediateSize };
    case 'down_proj': return { inDim: c.intermediateSize, outDim: c.hiddenSize };
    case 'lm_head': return { inDim: c.hiddenSize, outDim: c.vocabSize };
  }
}

/** The PEFT module path of a site (without `.lora_A.weight`). */
export function loraModulePath(site: LinearSite, layer: number): string {
  if (site === 'lm_head') return 'base_model.model.lm_head';
  const block = site === 'gate_proj' || site === 'up_proj' || site === 'down_proj' ? 'mlp' : 'self_attn';
  return `base_model.model.model.layers.${layer}.${block}.${site}`;
}

/** The adapted modules in a fixed order: layer by layer, targets in LORA_TARGETS order, then lm_head. */
export function loraModules(c: DecoderConfig, s: LoraSpec): LoraModule[] {
  checkLoraSpec(s);
  const targets = LORA_TARGETS.filter((t) => s.targets.includes(t));
  const out: LoraModule[] = [];
  const make = (site: LinearSite, layer: number): LoraModule => {
    const p = loraModulePath(site, layer);
    return { site, layer, nameA: `${p}.lora_A.weight`, nameB: `${p}.lora_B.weight`, ...dims(c, site) };
  };
  for (let i = 0; i < c.numLayers; i++) for (const t of targets) if (t !== 'lm_head') out.push(make(t, i));
  if (targets.includes('lm_head')) out.push(make('lm_head', -1));
  return out;
}

/** PEFT's init of A in PyTorch layout [r, in]: U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)). */
export function initLoraA(rng: Rng, rank: number, inDim: number): Float32Array {
  const bound = 1 / Math.sqrt(inDim);
  const a = new Float32Array(rank * inDim);
  for (let i = 0; i < a.length; i++) a[i] = (2 * rng.next() - 1) * bound;
  return a;
}

/** The adapter's scale alpha / r. */
export function loraScale(s: LoraSpec): number {
  return s.alpha / s.rank;
}
