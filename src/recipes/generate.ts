/**
 * `medusa-train generate`: load a model folder (or the embedded tiny model), tokenize the prompts
 * (optionally through the chat template), generate in one batch with the KV cache, and report speed.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { readJsonFile } from '../io/json.js';
import { openModelFolder } from '../model/load.js';
import type { Decoder } from '../model/decoder.js';
import { disposeHeads, importHeads, initHeads } from '../model/heads.js';
import { medusaGenerateGreedyOn } from '../eval/medusa-decode.js';
import { tfjsProposer } from '../engines/heads-proposer.js';
import { latestCheckpoint, loadCheckpoint } from '../train/checkpoint.js';
import { currentBackend } from '../backend.js';
import { loadDecoder } from '../model/load.js';
import { disposeWeights } from '../model/weights.js';
import type { FinishReason } from '../model/generate.js';
import { generateOn } from '../engines/backbone-generate.js';
import { chooseBackbone, type Backbone } from '../engines/decoder-engine.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer, type Tokenizer } from '../data/tokenizer.js';
import { encodeChat, type ChatMessage } from '../data/chat.js';

export interface GenerateArgs {
  model?: string;
  prompts: string[];
  chat: boolean;
  system?: string;
  maxNewTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed: number;
  stopAtEos: boolean;
  /** Who runs the model: auto = onnxruntime when it loads, else tfjs. */
  backboneEngine?: 'auto' | 'tfjs' | 'onnx';
  /** A training run folder: decode with its Medusa heads (greedy, tfjs engine, one prompt at a time). */
  medusa?: string;
  log: (line: string) => void;
}

export interface GenerateReport {
  model: string;
  backend: string;
  outputs: { prompt: string; promptTokens: number[]; tokens: number[]; text: string; finish: FinishReason }[];
  promptTokens: number;
  newTokens: number;
  prefillTokensPerSecond: number;
  decodeTokensPerSecond: number;
  loadMs: number;
  /** With --medusa: decoding steps and tokens per step. */
  medusa?: { run: string; checkpoint: string; nodes: number; steps: number; tokensPerStep: number };
}

export async function runGenerate(a: GenerateArgs): Promise<GenerateReport> {
  // --- setup: model and tokenizer ---
  const dir = a.model ?? ensureEmbeddedModel();
  if (!a.model) a.log(`model: the embedded tiny model (random weights) at ${dir}`);
  const prompts = a.prompts.length > 0 ? a.prompts : ['Hello! Tell me about Medusa heads.'];
  const t0 = performance.now();
  const { decoder, report } = loadDecoder(dir);
  if (report.unexpected.length > 0) a.log(`warning: ${report.unexpected.length} tensor(s) in ${dir} are not used: ${report.unexpected.slice(0, 5).join(', ')}`);
  const tokenizer = await loadTokenizer(dir);
  const backbone = await chooseBackbone(a.backboneEngine ?? 'auto', decoder, a.log);
  const loadMs = performance.now() - t0;
  try {
    // --- tokenize ---
    const promptIds = prompts.map((p) => {
      if (!a.chat) return tokenizer.encode(p, { addSpecialTokens: true });
      const template = tokenizer.chatTemplate;
      if (!template) fail('E_TOKENIZER', `${dir}/tokenizer_config.json has no chat_template; drop --chat or add a template.`);
      const messages: ChatMessage[] = [...(a.system ? [{ role: 'system' as const, content: a.system }] : []), { role: 'user', content: p }];
      // Segment-wise, exactly as distill builds its prompts, so both give the same tokens.
      return encodeChat(tokenizer, template, messages, { addGenerationPrompt: true }).ids;
    });
    if (a.medusa) return await medusaReport(a, dir, decoder, backbone, tokenizer, prompts, promptIds, loadMs);
    // --- generate ---
    const eosIds = a.stopAtEos ? [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])] : [];
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? eosIds[0] ?? 0;
    const r = await generateOn(backbone, promptIds, {
      maxNewTokens: a.maxNewTokens, temperature: a.temperature, topP: a.topP, topK: a.topK, seed: a.seed, eosIds, padId,
    });
    return {
      model: dir,
      backend: backbone.kind === 'onnx' ? 'onnx' : currentBackend().name,
      outputs: prompts.map((p, i) => ({
        prompt: p, promptTokens: promptIds[i], tokens: r.tokens[i], text: tokenizer.decode(r.tokens[i], { skipSpecialTokens: true }), finish: r.finish[i],
      })),
      promptTokens: r.promptTokens,
      newTokens: r.newTokens,
      prefillTokensPerSecond: r.promptTokens / (r.prefillMs / 1000),
      decodeTokensPerSecond: r.newTokens / (Math.max(r.decodeMs, 1e-3) / 1000),
      loadMs,
    };
  } finally {
    backbone.dispose();
    disposeWeights(decoder.weights);
  }
}

export function formatGenerate(r: GenerateReport): string {
  const lines: string[] = [];
  for (const o of r.outputs) {
    lines.push(`>>> ${o.prompt}`);
    lines.push(o.text);
    lines.push(`[${o.tokens.length} tokens, finished by ${o.finish}]`);
  }
  if (r.medusa) {
    lines.push(`Medusa: ${r.medusa.steps} steps, ${r.medusa.tokensPerStep.toFixed(2)} tokens/step with a ${r.medusa.nodes}-node tree (${r.medusa.checkpoint}); ${r.newTokens} tokens at ${r.decodeTokensPerSecond.toFixed(1)} tok/s`);
    return lines.join('\n');
  }
  lines.push(`${r.promptTokens} prompt tokens at ${r.prefillTokensPerSecond.toFixed(1)} tok/s, ${r.newTokens} new tokens at ${r.decodeTokensPerSecond.toFixed(1)} tok/s on ${r.backend} (load ${r.loadMs.toFixed(0)} ms)`);
  return lines.join('\n');
}

/** `generate --medusa <run>`: Medusa greedy decoding with a run's latest heads and its medusa_choices.json. */
async function medusaReport(a: GenerateArgs, dir: string, decoder: Decoder, backbone: Backbone, tokenizer: Tokenizer, prompts: string[], promptIds: number[][], loadMs: number): Promise<GenerateReport> {
  const run = a.medusa!;
  if (a.temperature !== 0) fail('E_USAGE', '--medusa decodes greedily for now: pass --temperature 0 (typical acceptance is not wired into generate yet).');
  const ckDir = latestCheckpoint(run);
  if (!ckDir) fail('E_IO', `${run} has no checkpoint (checkpoints/step-N); pass a training run folder to --medusa.`);
  const ck = loadCheckpoint(ckDir);
  const folder = openModelFolder(dir);
  if (ck.state['base_model_config_sha256'] !== folder.configHash) {
    fail('E_CONFIG', `the heads in ${ckDir} were trained on another base model (config sha256 differs from ${dir}/config.json); use --model with the run's base model.`);
  }
  const shape = ck.state['heads_shape'] as { num_heads: number; num_layers: number; lm_head: 'per_head' | 'shared' };
  const heads = initHeads({ numHeads: shape.num_heads, numLayers: shape.num_layers, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize, lmHead: shape.lm_head }, decoder.weights.lmHead, 0);
  try {
    importHeads(heads, ck.heads, ckDir);
    const proposer = tfjsProposer(heads);
    const choicesFile = path.join(run, 'medusa_choices.json');
    // without a calibrated tree: a chain (each head's top token)
    const choices: number[][] = fs.existsSync(choicesFile) ? (readJsonFile(choicesFile) as number[][]) : Array.from({ length: shape.num_heads }, (_, k) => new Array<number>(k + 1).fill(0));
    if (!fs.existsSync(choicesFile)) a.log(`no ${choicesFile} (run \`medusa-train eval\` to fit a tree): using a chain of ${shape.num_heads} nodes`);
    const topk = Math.max(...choices.flat()) + 1;
    const eosIds = a.stopAtEos ? [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])] : [];
    const t0 = performance.now();
    let steps = 0;
    const outputs: GenerateReport['outputs'] = [];
    for (const [i, p] of prompts.entries()) {
      const r = await medusaGenerateGreedyOn(backbone, proposer, promptIds[i], { choices, topk, maxNewTokens: a.maxNewTokens, eosIds });
      steps += r.steps;
      const last = r.tokens[r.tokens.length - 1];
      outputs.push({ prompt: p, promptTokens: promptIds[i], tokens: r.tokens, text: tokenizer.decode(r.tokens, { skipSpecialTokens: true }), finish: eosIds.includes(last) ? 'eos' : 'length' });
    }
    const secs = (performance.now() - t0) / 1000;
    const newTokens = outputs.reduce((x, o) => x + o.tokens.length, 0);
    return {
      model: dir, backend: `${backbone.kind === 'onnx' ? 'onnx' : currentBackend().name} (Medusa)`, outputs,
      promptTokens: promptIds.reduce((x, p) => x + p.length, 0), newTokens,
      prefillTokensPerSecond: NaN, decodeTokensPerSecond: newTokens / Math.max(secs, 1e-9), loadMs,
      medusa: { run, checkpoint: ckDir, nodes: choices.length, steps, tokensPerStep: newTokens / Math.max(steps, 1) },
    };
  } finally {
    disposeHeads(heads);
  }
}
