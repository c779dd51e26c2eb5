/**
 * `medusa-train generate`: load a model folder (or the embedded tiny model), tokenize the prompts
 * (optionally through the chat template), generate in one batch with the KV cache, and report speed.
 */
import { fail } from '../errors.js';
import { currentBackend } from '../backend.js';
import { loadDecoder } from '../model/load.js';
import { disposeWeights } from '../model/weights.js';
import type { FinishReason } from '../model/generate.js';
import { generateOn } from '../engines/backbone-generate.js';
import { chooseBackbone } from '../engines/decoder-engine.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer } from '../data/tokenizer.js';
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
  lines.push(`${r.promptTokens} prompt tokens at ${r.prefillTokensPerSecond.toFixed(1)} tok/s, ${r.newTokens} new tokens at ${r.decodeTokensPerSecond.toFixed(1)} tok/s on ${r.backend} (load ${r.loadMs.toFixed(0)} ms)`);
  return lines.join('\n');
}
