/**
 * `medusa-train generate`: load a model folder (or the embedded tiny model), tokenize the prompts
 * (optionally through the chat template), generate in one batch with the KV cache, and report speed.
 */
import { fail } from '../errors.js';
import type { Decoder } from '../model/decoder.js';
import { disposeHeads } from '../model/heads.js';
import { streamSeed } from '../model/sampling.js';
import { meanStepTiming, medusaGenerateOn, type MedusaDecodeResult, type MedusaStepTiming } from '../eval/medusa-decode.js';
import { TYPICAL_DEFAULTS } from '../eval/acceptance.js';
import { headsOnTfjs, openHeadsSource } from '../eval/heads-source.js';
import { chooseProposer, type HeadsProposer } from '../engines/heads-proposer.js';
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
  /**
   * A training run folder (latest checkpoint), checkpoint folder or medusa / medusa-v2 / vllm export
   * folder: decode with its Medusa heads and tree, one prompt at a time (greedy at temperature 0, else
   * typical acceptance; top-p / top-k are refused).
   */
  medusa?: string;
  /** Typical acceptance eps (default 0.09). */
  posteriorThreshold?: number;
  /** Typical acceptance delta (default 0.3). */
  posteriorAlpha?: number;
  /** With --medusa at temperature > 0: base token drawn from the typical set (default) or the argmax (the reference's fast path). */
  baseToken?: 'typical' | 'argmax';
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
  /** With --medusa: where the heads and tree came from, decoding steps, tokens per step, mean per-step milliseconds. */
  medusa?: {
    source: string; heads: string; tree: string; nodes: number; steps: number; tokensPerStep: number;
    acceptance: 'greedy' | 'typical'; posteriorThreshold?: number; posteriorAlpha?: number; baseToken?: 'typical' | 'argmax';
    meanStepMs: MedusaStepTiming;
  };
}

export async function runGenerate(a: GenerateArgs): Promise<GenerateReport> {
  // --- setup: model and tokenizer ---
  const dir = a.model ?? ensureEmbeddedModel();
  if (!a.model) a.log(`model: the embedded tiny model (random weights) at ${dir}`);
  const prompts = a.prompts.length > 0 ? a.prompts : ['Hello! Tell me about Medusa heads.'];
  const t0 = performance.now();
  const { decoder, report, folder } = loadDecoder(dir);
  const configHash = folder.configHash;
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
    if (a.medusa) return await medusaReport(a, dir, decoder, configHash, backbone, tokenizer, prompts, promptIds, loadMs);
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
    const m = r.medusa;
    const acc = m.acceptance === 'greedy' ? 'greedy' : `typical (eps ${m.posteriorThreshold}, delta ${m.posteriorAlpha}, ${m.baseToken} base token)`;
    const ms = m.meanStepMs;
    lines.push(`Medusa (${acc}): ${m.steps} steps, ${m.tokensPerStep.toFixed(2)} tokens/step with a ${m.nodes}-node tree (${m.heads}); ${r.newTokens} tokens at ${r.decodeTokensPerSecond.toFixed(1)} tok/s`);
    lines.push(`per step: propose ${ms.proposeMs.toFixed(2)} ms, verify ${ms.verifyMs.toFixed(2)} ms, host ${ms.hostMs.toFixed(2)} ms on ${r.backend}`);
    return lines.join('\n');
  }
  lines.push(`${r.promptTokens} prompt tokens at ${r.prefillTokensPerSecond.toFixed(1)} tok/s, ${r.newTokens} new tokens at ${r.decodeTokensPerSecond.toFixed(1)} tok/s on ${r.backend} (load ${r.loadMs.toFixed(0)} ms)`);
  return lines.join('\n');
}

/**
 * `generate --medusa <run or export>`: Medusa decoding, one prompt at a time, with the heads and tree
 * of a training run (latest checkpoint) or an export folder (src/eval/heads-source.ts). Greedy at
 * temperature 0 (equal to plain greedy), typical acceptance above (src/eval/medusa-decode.ts); prompt
 * i draws its base tokens from streamSeed(seed, i), as plain sampling seeds its rows.
 */
async function medusaReport(a: GenerateArgs, dir: string, decoder: Decoder, configHash: string, backbone: Backbone, tokenizer: Tokenizer, prompts: string[], promptIds: number[][], loadMs: number): Promise<GenerateReport> {
  if (a.temperature > 0 && (a.topP < 1 || a.topK > 0)) {
    fail('E_USAGE', `--medusa decodes with typical acceptance at temperature > 0, which has no top-p/top-k: drop --top-p ${a.topP} / --top-k ${a.topK} (use --posterior-threshold / --posterior-alpha to narrow what is accepted), or decode without --medusa.`);
  }
  const src = openHeadsSource(a.medusa!, { dir, configHash, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize });
  for (const n of src.notes) a.log(n);
  const heads = headsOnTfjs(src, decoder);
  let proposer: HeadsProposer | null = null;
  try {
    // The heads run where the backbone runs: onnxruntime with the onnx backbone (tfjs if it cannot load), else tfjs.
    proposer = await chooseProposer(backbone.kind === 'onnx' ? 'auto' : 'tfjs', heads, { log: a.log });
    const eosIds = a.stopAtEos ? [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])] : [];
    const t0 = performance.now();
    let steps = 0;
    const timings: MedusaDecodeResult['timing']['steps'] = [];
    const outputs: GenerateReport['outputs'] = [];
    for (const [i, p] of prompts.entries()) {
      const r = await medusaGenerateOn(backbone, proposer!, promptIds[i], {
        choices: src.choices, topk: src.topk, maxNewTokens: a.maxNewTokens, eosIds,
        sampling: { temperature: a.temperature, posteriorThreshold: a.posteriorThreshold, posteriorAlpha: a.posteriorAlpha, seed: streamSeed(a.seed, i), baseToken: a.baseToken },
      });
      steps += r.steps;
      timings.push(...r.timing.steps);
      const last = r.tokens[r.tokens.length - 1];
      outputs.push({ prompt: p, promptTokens: promptIds[i], tokens: r.tokens, text: tokenizer.decode(r.tokens, { skipSpecialTokens: true }), finish: eosIds.includes(last) ? 'eos' : 'length' });
    }
    const secs = (performance.now() - t0) / 1000;
    const newTokens = outputs.reduce((x, o) => x + o.tokens.length, 0);
    return {
      model: dir, backend: `${backbone.kind === 'onnx' ? 'onnx' : currentBackend().name} (Medusa, heads on ${proposer!.kind})`, outputs,
      promptTokens: promptIds.reduce((x, p) => x + p.length, 0), newTokens,
      prefillTokensPerSecond: NaN, decodeTokensPerSecond: newTokens / Math.max(secs, 1e-9), loadMs,
      medusa: {
        source: a.medusa!, heads: src.describe, tree: src.choicesFile ?? 'chain', nodes: src.choices.length, steps,
        tokensPerStep: newTokens / Math.max(steps, 1),
        acceptance: a.temperature === 0 ? 'greedy' : 'typical',
        ...(a.temperature > 0 ? { posteriorThreshold: a.posteriorThreshold ?? TYPICAL_DEFAULTS.posteriorThreshold, posteriorAlpha: a.posteriorAlpha ?? TYPICAL_DEFAULTS.posteriorAlpha, baseToken: a.baseToken ?? 'typical' } : {}),
        meanStepMs: meanStepTiming({ timing: { prefillMs: 0, steps: timings } }),
      },
    };
  } finally {
    proposer?.dispose();
    disposeHeads(heads);
  }
}
