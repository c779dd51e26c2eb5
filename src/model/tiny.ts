/**
 * Tiny model folders for tests and demos, written in the exact Hugging Face layout (config.json,
 * model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json with a chat
 * template), with seeded random weights. Nothing is downloaded.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { fail } from '../errors.js';
import { writeSafetensors, type DType, type WriteTensor } from '../io/safetensors.js';
import { SUPPORTED_ARCHITECTURES, parseDecoderConfig, type Architecture } from './config.js';
import { expectedTensors } from './weights.js';
import { Rng } from './sampling.js';
import { buildTinyTokenizer } from './tiny-tokenizer.js';

export const TINY_ARCH_ALIASES: Record<string, Architecture> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
};

export interface TinyModelOptions {
  architecture: Architecture;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  intermediateSize: number;
  /** Defaults to the tiny tokenizer's vocabulary size; larger values pad the vocabulary with unused rows. */
  vocabSize?: number;
  tieWordEmbeddings: boolean;
  dtype: 'F32' | 'BF16' | 'F16';
  seed: number;
  /** Standard deviation of the random weights (transformers uses 0.02). */
  initStd: number;
  maxPositionEmbeddings: number;
}

export const TINY_DEFAULTS: TinyModelOptions = {
  architecture: 'LlamaForCausalLM',
  hiddenSize: 64,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  intermediateSize: 128,
  tieWordEmbeddings: true,
  dtype: 'F32',
  seed: 0,
  initStd: 0.02,
  maxPositionEmbeddings: 2048,
};

/** A ~20M-parameter Llama-shaped model for benchmarks. */
export const BENCH_20M: Partial<TinyModelOptions> = {
  hiddenSize: 512, numLayers: 4, numHeads: 8, numKvHeads: 4, intermediateSize: 1536, vocabSize: 8192, tieWordEmbeddings: false,
};

function gaussian(rng: Rng): number {
  // Box–Muller; u1 in (0, 1].
  const u1 = 1 - rng.next();
  const u2 = rng.next();
  return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
}

/** The config.json a tiny model of these options carries. */
export function tinyConfigJson(o: TinyModelOptions, vocabSize: number, eosIds: number[], bosId: number, padId: number): Record<string, unknown> {
  const modelType = { LlamaForCausalLM: 'llama', MistralForCausalLM: 'mistral', Qwen2ForCausalLM: 'qwen2', Qwen3ForCausalLM: 'qwen3' }[o.architecture];
  const torchDtype = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' }[o.dtype];
  const cfg: Record<string, unknown> = {
    architectures: [o.architecture],
    model_type: modelType,
    vocab_size: vocabSize,
    hidden_size: o.hiddenSize,
    intermediate_size: o.intermediateSize,
    num_hidden_layers: o.numLayers,
    num_attention_heads: o.numHeads,
    num_key_value_heads: o.numKvHeads,
    hidden_act: 'silu',
    max_position_embeddings: o.maxPositionEmbeddings,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    tie_word_embeddings: o.tieWordEmbeddings,
    bos_token_id: bosId,
    eos_token_id: eosIds,
    pad_token_id: padId,
    torch_dtype: torchDtype,
  };
  if (o.architecture === 'Qwen3ForCausalLM') cfg['head_dim'] = o.hiddenSize / o.numHeads;
  if (o.architecture === 'MistralForCausalLM') cfg['sliding_window'] = null;
  return cfg;
}

/** Write a complete tiny model folder. Returns the parameter count. Refuses to overwrite a non-empty folder. */
export function writeTinyModel(out: string, options: Partial<TinyModelOptions> = {}): { parameters: number; vocabSize: number } {
  const o: TinyModelOptions = { ...TINY_DEFAULTS, ...options };
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(o.architecture)) {
    fail('E_UNSUPPORTED', `Unknown architecture ${o.architecture}; use one of ${SUPPORTED_ARCHITECTURES.join(', ')}.`);
  }
  if (fs.existsSync(out) && fs.readdirSync(out).length > 0) fail('E_IO', `${out} exists and is not empty; choose another --out or remove it.`);
  const tok = buildTinyTokenizer();
  const tokVocab = tok.vocabSize;
  const ids = tok.specialTokens;
  const vocabSize = o.vocabSize ?? tokVocab;
  if (vocabSize < tokVocab) fail('E_USAGE', `vocab size ${vocabSize} is smaller than the tiny tokenizer's ${tokVocab}.`);
  const config = tinyConfigJson(o, vocabSize, tok.eosTokenIds, ids.bos.id, ids.pad.id);
  const parsed = parseDecoderConfig(config, `${out}/config.json`);
  const rng = new Rng(o.seed);
  const tensors: Record<string, WriteTensor> = {};
  let parameters = 0;
  for (const e of expectedTensors(parsed)) {
    const n = e.shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    const isNorm = e.name.endsWith('norm.weight');
    const isBias = e.name.endsWith('.bias');
    for (let i = 0; i < n; i++) data[i] = isNorm ? 1 + 0.1 * gaussian(rng) : isBias ? 0.02 * gaussian(rng) : o.initStd * gaussian(rng);
    tensors[e.name] = { dtype: o.dtype as DType, shape: e.shape, data };
    parameters += n;
  }
  fs.mkdirSync(out, { recursive: true });
  writeSafetensors(path.join(out, 'model.safetensors'), tensors, { format: 'pt' });
  const json = (name: string, v: unknown): void => fs.writeFileSync(path.join(out, name), `${JSON.stringify(v, null, 2)}\n`);
  json('config.json', config);
  json('generation_config.json', tok.generationConfig);
  json('special_tokens_map.json', tok.specialTokensMap);
  json('tokenizer.json', tok.tokenizerJson);
  json('tokenizer_config.json', tok.tokenizerConfig);
  return { parameters, vocabSize };
}

/** The embedded default model: what commands use when no --model is given. Built on first use, never downloaded. */
export const EMBEDDED_MODEL = { name: 'embedded-tiny-llama-v1', options: { ...TINY_DEFAULTS } as TinyModelOptions } as const;

/** Cache folder for built-in models: $MEDUSA_TRAIN_CACHE, else $XDG_CACHE_HOME/medusa-train, else ~/.cache/medusa-train. */
export function cacheDir(): string {
  const env = process.env['MEDUSA_TRAIN_CACHE'];
  if (env) return env;
  const xdg = process.env['XDG_CACHE_HOME'];
  return path.join(xdg && xdg.length > 0 ? xdg : path.join(os.homedir(), '.cache'), 'medusa-train');
}

/** Path of the embedded model, writing it first if needed (atomically: a half-written folder is never used). */
export function ensureEmbeddedModel(): string {
  const dir = path.join(cacheDir(), 'models', EMBEDDED_MODEL.name);
  if (fs.existsSync(path.join(dir, 'config.json'))) return dir;
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    writeTinyModel(tmp, EMBEDDED_MODEL.options);
    fs.mkdirSync(path.dirname(dir), { recursive: true });
    fs.renameSync(tmp, dir);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    if (fs.existsSync(path.join(dir, 'config.json'))) return dir; // another process won the race
    throw e;
  }
  return dir;
}
