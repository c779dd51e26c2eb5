/**
 * Hugging Face config.json -> a typed, validated decoder configuration.
 *
 * Supported: LlamaForCausalLM (rope_scaling linear / llama3, attention_bias), MistralForCausalLM
 * (sliding_window), Qwen2ForCausalLM (q/k/v bias), Qwen3ForCausalLM (q/k RMSNorm, explicit head_dim).
 * Every value read from the file is checked against a named limit; a problem names config.json's key.
 */
import { fail } from '../errors.js';

export const SUPPORTED_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

/** Limits on config values: far above any real model, low enough to reject corrupt files early. */
export const CONFIG_LIMITS = {
  maxVocabSize: 1_048_576,
  maxHiddenSize: 65_536,
  maxIntermediateSize: 262_144,
  maxLayers: 1_024,
  maxHeads: 1_024,
  maxHeadDim: 1_024,
  maxPositionEmbeddings: 16_777_216,
} as const;

export type RopeScaling =
  | { type: 'none' }
  | { type: 'linear'; factor: number }
  | { type: 'llama3'; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositionEmbeddings: number };

export interface DecoderConfig {
  architecture: Architecture;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** Bias on q/k/v projections (Qwen2; Llama with attention_bias). */
  qkvBias: boolean;
  /** Bias on o_proj (Llama with attention_bias only). */
  oBias: boolean;
  /** RMSNorm over head_dim on q and k before RoPE (Qwen3). */
  qkNorm: boolean;
  /** Keys further than this many positions back are masked (Mistral); null = full causal. */
  slidingWindow: number | null;
  bosTokenId: number | null;
  eosTokenIds: number[];
  padTokenId: number | null;
  /** The checkpoint's declared dtype (torch_dtype / dtype), informational. */
  torchDtype: string | null;
}

type Json = Record<string, unknown>;

class Problems {
  constructor(readonly file: string, readonly list: string[] = [], readonly prefix = '') {}
  add(key: string, msg: string): void {
    this.list.push(`${this.prefix}${key}: ${msg}`);
  }
  /** Problems of a nested object, reported with `prefix.` before their keys. */
  child(prefix: string): Problems {
    return new Problems(this.file, this.list, `${this.prefix}${prefix}.`);
  }
  throwIfAny(): void {
    if (this.list.length > 0) {
      fail('E_CONFIG', `${this.file} has ${this.list.length} problem(s):\n  - ${this.list.join('\n  - ')}\nFix these keys or re-download the model's config.json.`);
    }
  }
}

function int(cfg: Json, key: string, p: Problems, min: number, max: number, fallback?: number): number {
  const v = cfg[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    p.add(key, 'is required');
    return min;
  }
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    p.add(key, `must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
    return min;
  }
  return v;
}

function num(cfg: Json, key: string, p: Problems, min: number, max: number, fallback?: number): number {
  const v = cfg[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    p.add(key, 'is required');
    return min;
  }
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
    p.add(key, `must be a number in [${min}, ${max}], got ${JSON.stringify(v)}`);
    return min;
  }
  return v;
}

function bool(cfg: Json, key: string, p: Problems, fallback: boolean): boolean {
  const v = cfg[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') {
    p.add(key, `must be true or false, got ${JSON.stringify(v)}`);
    return fallback;
  }
  return v;
}

function tokenIds(v: unknown, key: string, p: Problems, vocab: number): number[] {
  if (v === undefined || v === null) return [];
  const arr = Array.isArray(v) ? v : [v];
  const out: number[] = [];
  for (const x of arr) {
    if (typeof x !== 'number' || !Number.isInteger(x) || x < 0 || x >= vocab) {
      p.add(key, `must be a token id in [0, ${vocab}) or a list of them, got ${JSON.stringify(v)}`);
      return [];
    }
    out.push(x);
  }
  return out;
}

function parseRopeScaling(cfg: Json, p: Problems): RopeScaling {
  const rs = cfg['rope_scaling'];
  if (rs === undefined || rs === null) return { type: 'none' };
  if (typeof rs !== 'object' || Array.isArray(rs)) {
    p.add('rope_scaling', `must be an object or null, got ${JSON.stringify(rs)}`);
    return { type: 'none' };
  }
  const r = rs as Json;
  const type = (r['rope_type'] ?? r['type']) as unknown;
  if (type === 'default') return { type: 'none' };
  if (type === 'linear') return { type: 'linear', factor: num(r, 'factor', p.child('rope_scaling'), 1e-6, 1e6) };
  if (type === 'llama3') {
    const sp = p.child('rope_scaling');
    const s = {
      type: 'llama3' as const,
      factor: num(r, 'factor', sp, 1e-6, 1e6),
      lowFreqFactor: num(r, 'low_freq_factor', sp, 1e-6, 1e6),
      highFreqFactor: num(r, 'high_freq_factor', sp, 1e-6, 1e6),
      originalMaxPositionEmbeddings: int(r, 'original_max_position_embeddings', sp, 1, CONFIG_LIMITS.maxPositionEmbeddings),
    };
    if (s.highFreqFactor <= s.lowFreqFactor) sp.add('high_freq_factor', 'must be greater than low_freq_factor');
    return s;
  }
  p.add('rope_scaling.rope_type', `${JSON.stringify(type)} is not supported; supported: default, linear, llama3`);
  return { type: 'none' };
}


/**
 * Validate a parsed config.json. `file` is used in messages; `generationConfig` (generation_config.json)
 * supplies eos/bos ids when present, as Hugging Face's generate() does.
 */
export function parseDecoderConfig(cfg: unknown, file: string, generationConfig?: unknown): DecoderConfig {
  if (typeof cfg !== 'object' || cfg === null || Array.isArray(cfg)) fail('E_CONFIG', `${file} must hold a JSON object.`);
  const c = cfg as Json;
  const p = new Problems(file);
  const archs = c['architectures'];
  const arch = Array.isArray(archs) && archs.length === 1 ? archs[0] : archs;
  if (typeof arch !== 'string' || !(SUPPORTED_ARCHITECTURES as readonly string[]).includes(arch)) {
    fail('E_UNSUPPORTED', `${file}: architectures ${JSON.stringify(archs)} is not supported. Supported architectures: ${SUPPORTED_ARCHITECTURES.join(', ')}.`);
  }
  const architecture = arch as Architecture;

  const vocabSize = int(c, 'vocab_size', p, 1, CONFIG_LIMITS.maxVocabSize);
  const hiddenSize = int(c, 'hidden_size', p, 1, CONFIG_LIMITS.maxHiddenSize);
  const intermediateSize = int(c, 'intermediate_size', p, 1, CONFIG_LIMITS.maxIntermediateSize);
  const numLayers = int(c, 'num_hidden_layers', p, 1, CONFIG_LIMITS.maxLayers);
  const numHeads = int(c, 'num_attention_heads', p, 1, CONFIG_LIMITS.maxHeads);
  const numKvHeads = int(c, 'num_key_value_heads', p, 1, CONFIG_LIMITS.maxHeads, numHeads);
  const defaultHeadDim = numHeads > 0 && hiddenSize % numHeads === 0 ? hiddenSize / numHeads : undefined;
  const headDim = int(c, 'head_dim', p, 2, CONFIG_LIMITS.maxHeadDim, defaultHeadDim);
  if (headDim % 2 !== 0) p.add('head_dim', `must be even for rotary embeddings, got ${headDim}`);
  if (numHeads % numKvHeads !== 0) p.add('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  const rmsNormEps = num(c, 'rms_norm_eps', p, 0, 1, 1e-6);
  const ropeTheta = num(c, 'rope_theta', p, 1, 1e12, 10000);
  const ropeScaling = parseRopeScaling(c, p);
  const maxPositionEmbeddings = int(c, 'max_position_embeddings', p, 1, CONFIG_LIMITS.maxPositionEmbeddings, 2048);
  const tieWordEmbeddings = bool(c, 'tie_word_embeddings', p, false);
  const act = c['hidden_act'];
  if (act !== undefined && act !== 'silu') p.add('hidden_act', `only "silu" is supported, got ${JSON.stringify(act)}`);
  if (bool(c, 'mlp_bias', p, false)) p.add('mlp_bias', 'true is not supported (no released model of these families uses it)');

  let qkvBias = false;
  let oBias = false;
  let qkNorm = false;
  let slidingWindow: number | null = null;
  if (architecture === 'LlamaForCausalLM') {
    qkvBias = oBias = bool(c, 'attention_bias', p, false);
  } else if (architecture === 'MistralForCausalLM') {
    const w = c['sliding_window'];
    slidingWindow = w === null || w === undefined ? null : int(c, 'sliding_window', p, 1, CONFIG_LIMITS.maxPositionEmbeddings);
  } else if (architecture === 'Qwen2ForCausalLM') {
    qkvBias = true;
    if (bool(c, 'use_sliding_window', p, false)) p.add('use_sliding_window', 'true is not supported (per-layer windows); released Qwen2 models set it false');
  } else {
    qkNorm = true;
    qkvBias = oBias = bool(c, 'attention_bias', p, false);
    if (bool(c, 'use_sliding_window', p, false)) p.add('use_sliding_window', 'true is not supported (per-layer windows); released Qwen3 models set it false');
  }

  const gen = typeof generationConfig === 'object' && generationConfig !== null ? (generationConfig as Json) : {};
  const bosTokenId = tokenIds(gen['bos_token_id'] ?? c['bos_token_id'], 'bos_token_id', p, vocabSize)[0] ?? null;
  const eosTokenIds = [...new Set([...tokenIds(gen['eos_token_id'], 'generation_config.eos_token_id', p, vocabSize), ...tokenIds(c['eos_token_id'], 'eos_token_id', p, vocabSize)])];
  const padTokenId = tokenIds(gen['pad_token_id'] ?? c['pad_token_id'], 'pad_token_id', p, vocabSize)[0] ?? null;
  const dt = c['torch_dtype'] ?? c['dtype'];
  p.throwIfAny();
  return {
    architecture, vocabSize, hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, rmsNormEps,
    ropeTheta, ropeScaling, maxPositionEmbeddings, tieWordEmbeddings, qkvBias, oBias, qkNorm, slidingWindow,
    bosTokenId, eosTokenIds, padTokenId, torchDtype: typeof dt === 'string' ? dt : null,
  };
}

/** Parameter count of the model as stored (a tied lm_head counted once). */
export function parameterCount(c: DecoderConfig): number {
  const d = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const perLayer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * c.intermediateSize +
    (c.qkvBias ? q + 2 * kv : 0) + (c.oBias ? d : 0) + (c.qkNorm ? 2 * c.headDim : 0);
  return c.vocabSize * d * (c.tieWordEmbeddings ? 1 : 2) + c.numLayers * perLayer + d;
}

/**
 * Rotary inverse frequencies [headDim/2], computed in float32 steps as transformers does
 * (modeling_rope_utils: default, linear, llama3).
 */
export function ropeInvFreq(c: DecoderConfig): Float32Array {
  const half = c.headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const exponent = Math.fround((2 * i) / c.headDim);
    inv[i] = Math.fround(1 / Math.fround(Math.pow(c.ropeTheta, exponent)));
  }
  const s = c.ropeScaling;
  if (s.type === 'linear') {
    for (let i = 0; i < half; i++) inv[i] = Math.fround(inv[i] / s.factor);
  } else if (s.type === 'llama3') {
    const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const f = inv[i];
      const wavelen = Math.fround((2 * Math.PI) / f);
      let scaled = wavelen > lowFreqWavelen ? Math.fround(f / s.factor) : f;
      const isMedium = !(wavelen < highFreqWavelen) && !(wavelen > lowFreqWavelen);
      if (isMedium) {
        const smooth = Math.fround((Math.fround(s.originalMaxPositionEmbeddings / wavelen) - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor));
        scaled = Math.fround(Math.fround(Math.fround(1 - smooth) * Math.fround(scaled / s.factor)) + Math.fround(smooth * scaled));
      }
      inv[i] = scaled;
    }
  }
  return inv;
}
