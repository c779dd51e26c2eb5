/**
 * `medusa-train eval` (issue #7): per-head top-1..10 accuracy of a trained run on held-out
 * distilled data, the per-rank accuracy table, and sparse candidate trees fitted to it for several node
 * budgets (expected tokens per step, assuming independent heads), written beside the run as
 * `eval/accuracy.json`, `eval/trees.json` and `medusa_choices.json`.
 *
 * With --speed N it also runs real Medusa greedy decoding (the run's backbone engine, batch 1) against
 * plain greedy decoding on the same engine on N held-out prompts, per tree: measured tokens per step,
 * tokens/s, speedup, time per Medusa step and its overhead over a plain decode token, the best budget,
 * and a chart. With --live N, the heads' top-1..10 accuracy on the base model's own greedy decoding
 * (eval/live-accuracy.ts), written as `eval/live-accuracy.json`. Not here yet: typical acceptance.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { initBackend, type BackendChoice } from '../backend.js';
import { loadTrainConfig } from '../config.js';
import { loadDecoder } from '../model/load.js';
import { disposeWeights, lmHeadReference } from '../model/weights.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { loadExamples, padBatch, splitEval } from '../data/batches.js';
import { latestCheckpoint, loadCheckpoint } from '../train/checkpoint.js';
import { createHeadsTrainer } from '../engines/heads-trainer.js';
import { chooseBackbone } from '../engines/decoder-engine.js';
import { budgetCurve, type MedusaChoices } from '../eval/tree.js';
import { TOPK_REPORTED } from '../train/heads-loss.js';
import { disposeHeads, importHeads, initHeads } from '../model/heads.js';
import { generateOn } from '../engines/backbone-generate.js';
import { medusaGenerateGreedyOn } from '../eval/medusa-decode.js';
import { chooseProposer, type HeadsProposer } from '../engines/heads-proposer.js';
import type { Backbone } from '../engines/decoder-engine.js';
import { measureLiveAccuracy, type LiveAccuracy } from '../eval/live-accuracy.js';
import { encodeChat } from '../data/chat.js';
import { writeFileAtomic } from '../io/atomic.js';
import { lineChartSvg } from '../report/chart.js';

export interface EvalArgs {
  run: string;
  /** Datasets to evaluate on (all their conversations); default: the run's own held-out split. */
  data: string[];
  budgets: number[];
  /** Budget whose tree is written as medusa_choices.json (default: the largest). */
  choose?: number;
  /** Also measure real Medusa decoding (greedy, tfjs, batch 1) against plain greedy decoding on this many prompts. */
  speedPrompts?: number;
  /** Tokens generated per prompt for --speed and --live. */
  speedNewTokens?: number;
  /** Heads' accuracy on live greedy decoding on this many prompts (held-out prompts, or the first of livePromptTexts). */
  livePrompts?: number;
  /** Prompts for --live as text (a --prompt-file), rendered as a user turn with the model's chat template when it has one. */
  livePromptTexts?: string[];
  log: (line: string) => void;
}

export interface SpeedRow {
  budget: number;
  nodes: number;
  expectedTokensPerStep: number;
  measuredTokensPerStep: number;
  tokensPerSecond: number;
  speedup: number;
  /** Mean wall time of one Medusa step (propose + tree verification + acceptance), prefill excluded, ms. */
  msPerStep: number;
  /** msPerStep minus the plain decoder's mean time per decoded token (ms): what a step costs beyond a plain decode step. */
  overheadMsPerStep: number;
  /** Medusa greedy output equal to plain greedy output on every prompt. */
  sameTokens: boolean;
}

export interface EvalReport {
  run: string;
  checkpoint: string;
  conversations: number;
  heads: { valid: number; topk: number[]; loss: number }[];
  /** acc[k][r]: fraction of positions where head k's label has rank exactly r (r < 10). */
  perRank: number[][];
  trees: { budget: number; expectedTokensPerStep: number; nodes: number }[];
  chosen: { budget: number; expectedTokensPerStep: number; choices: MedusaChoices; file: string };
  speed: {
    engine: string; prompts: number; newTokens: number; plainTokensPerSecond: number;
    /** Plain greedy decoding's mean time per token after the prefill, ms. */
    plainMsPerToken: number;
    rows: SpeedRow[];
    /** The row with the highest measured speedup. */
    best: { budget: number; nodes: number; speedup: number; measuredTokensPerStep: number };
  } | null;
  /** Heads' accuracy on the base model's own greedy decoding (--live). */
  live: (LiveAccuracy & { engine: string; source: string; file: string }) | null;
}

export async function runEval(a: EvalArgs): Promise<EvalReport> {
  // --- setup: the run's config, checkpoint, model, data ---
  const ckDir = latestCheckpoint(a.run);
  if (!ckDir) fail('E_IO', `${a.run} has no checkpoint (checkpoints/step-N); train first or pass a run folder.`);
  const { config: c } = loadTrainConfig(path.join(a.run, 'config.yaml'), []);
  const ck = loadCheckpoint(ckDir);
  const modelDir = typeof ck.state['base_model_path'] === 'string' ? (ck.state['base_model_path'] as string) : c.model.path;
  if (!modelDir) fail('E_CONFIG', `${ckDir}/state.json records no base model folder; retrain with this version.`);
  await initBackend(c.model.backend as BackendChoice);
  const { decoder, folder } = loadDecoder(modelDir);
  const cleanup: (() => void)[] = [() => disposeWeights(decoder.weights)];
  try {
    if (ck.state['base_model_config_sha256'] !== folder.configHash) fail('E_CONFIG', `${modelDir}/config.json changed since ${ckDir} was trained (sha256 differs); evaluate against the base model the heads were trained on.`);
    const tokenizer = await loadTokenizer(modelDir);
    const loaded = loadExamples(a.data.length > 0 ? a.data : c.data.train, { maxSeqLen: c.data.max_seq_len });
    const examples = a.data.length > 0 ? loaded.examples : splitEval(loaded.examples, { fraction: c.data.eval_fraction, max: c.data.eval_max, seed: c.run.seed }).eval;
    if (examples.length === 0) fail('E_CONFIG', `no evaluation conversations: the run holds none out (data.eval_fraction ${c.data.eval_fraction}); pass --data <distilled dataset>.`);
    const K = c.heads.num_heads;
    const d = decoder.config.hiddenSize;
    const V = decoder.config.vocabSize;
    const backbone = await chooseBackbone(c.model.engine, decoder, a.log);
    cleanup.push(() => backbone.dispose());
    const baseLmHead = lmHeadReference(decoder.weights); // [V, d]
    const trainer = await createHeadsTrainer(c.model.engine, {
      shape: { numHeads: K, numLayers: c.heads.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.heads.lm_head }, baseLmHead, seed: 0,
      betas: c.train.betas as [number, number], eps: c.train.eps, weightDecay: 0, decay: c.loss.decay, headsCoefficient: c.loss.heads_coefficient, chunkRows: c.loss.chunk_rows, maxGradNorm: null,
    });
    cleanup.push(() => trainer.dispose());
    trainer.importHeads(ck.heads, ckDir);
    // --- run: accuracy over the evaluation conversations ---
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const ceSum = new Array<number>(K).fill(0);
    const valid = new Array<number>(K).fill(0);
    const correct = Array.from({ length: K }, () => new Array<number>(TOPK_REPORTED).fill(0));
    for (let s = 0; s < examples.length; s += c.data.batch_size) {
      const idx = Array.from({ length: Math.min(c.data.batch_size, examples.length - s) }, (_, i) => s + i);
      const pb = padBatch(examples, idx, padId);
      const { hidden } = await backbone.forward({ ids: pb.ids, batch: pb.B, seqLen: pb.T, mask: pb.attention, logits: 'none' });
      const m = await trainer.evaluate({ hidden, ids: pb.ids, lossMask: pb.lossMask, lengths: pb.lengths, T: pb.T });
      m.ceSum.forEach((v, k) => (ceSum[k] += v));
      m.valid.forEach((v, k) => (valid[k] += v));
      m.correct.forEach((row, k) => row.forEach((v, j) => (correct[k][j] += v)));
    }
    const heads = valid.map((n, k) => ({ valid: n, topk: correct[k].map((x) => (n > 0 ? x / n : 0)), loss: n > 0 ? ceSum[k] / n : NaN }));
    const perRank = heads.map((h) => h.topk.map((x, r) => Math.max(0, x - (r > 0 ? h.topk[r - 1] : 0))));
    // --- trees for each budget; the chosen one becomes medusa_choices.json ---
    const budgets = [...new Set(a.budgets)].sort((x, y) => x - y);
    const curve = budgetCurve({ acc: perRank }, { budgets, numHeads: K, topk: TOPK_REPORTED });
    const target = a.choose ?? budgets[budgets.length - 1];
    const chosen = curve.find((t) => t.budget === target) ?? curve[curve.length - 1];
    const evalDir = path.join(a.run, 'eval');
    fs.mkdirSync(evalDir, { recursive: true });
    const json = (file: string, v: unknown): void => writeFileAtomic(file, [Buffer.from(`${JSON.stringify(v, null, 2)}\n`)]);
    json(path.join(evalDir, 'accuracy.json'), { checkpoint: ckDir, conversations: examples.length, heads, per_rank: perRank });
    json(path.join(evalDir, 'trees.json'), curve);
    const choicesFile = path.join(a.run, 'medusa_choices.json');
    json(choicesFile, chosen.choices);
    // --- the heads at decoding time, for --speed and --live ---
    let proposerMade: HeadsProposer | null = null;
    const proposer = async (): Promise<HeadsProposer> => {
      if (proposerMade) return proposerMade;
      const heads = initHeads({ numHeads: K, numLayers: c.heads.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.heads.lm_head }, decoder.weights.lmHead, 0);
      cleanup.push(() => disposeHeads(heads));
      importHeads(heads, ck.heads, ckDir);
      // the heads run where the backbone runs (onnxruntime with the onnx backbone), as in generate/serve --medusa
      const made = await chooseProposer(backbone.kind === 'onnx' ? 'auto' : 'tfjs', heads, { log: a.log });
      cleanup.push(() => made.dispose());
      proposerMade = made;
      return made;
    };
    const eosIds = [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])];
    const newTokens = a.speedNewTokens ?? 64;
    // held-out prompts: each conversation up to its first generated token
    const heldOutPrompts = (n: number): number[][] => examples.slice(0, n).map((e) => Array.from(e.inputIds.subarray(0, Math.max(1, e.lossMask.indexOf(1)))));
    // --- optional: heads' accuracy on live greedy decoding ---
    let live: EvalReport['live'] = null;
    if ((a.livePrompts && a.livePrompts > 0) || a.livePromptTexts) {
      let prompts: number[][];
      let source: string;
      if (a.livePromptTexts) {
        const texts = a.livePromptTexts.slice(0, a.livePrompts ?? a.livePromptTexts.length);
        if (texts.length === 0) fail('E_USAGE', '--live: the prompt file holds no prompts (one per line).');
        const template = tokenizer.chatTemplate;
        prompts = texts.map((p) => (template ? encodeChat(tokenizer, template, [{ role: 'user', content: p }], { addGenerationPrompt: true }).ids : tokenizer.encode(p, { addSpecialTokens: true })));
        source = template ? 'prompt file (chat template)' : 'prompt file';
      } else {
        prompts = heldOutPrompts(a.livePrompts!);
        source = 'held-out conversations (up to the first generated token)';
      }
      const r = await measureLiveAccuracy(backbone, await proposer(), prompts, { newTokens, eosIds, padId, topk: TOPK_REPORTED });
      const file = path.join(evalDir, 'live-accuracy.json');
      live = { ...r, engine: backbone.kind, source, file };
      json(file, { checkpoint: ckDir, engine: backbone.kind, source, prompts: r.prompts, new_tokens_per_prompt: r.newTokensPerPrompt, generated_tokens: r.generatedTokens, base_agreement: r.baseAgreement, heads: r.heads, per_rank: r.perRank });
    }
    // --- optional: measured Medusa decoding against plain greedy decoding ---
    let speed: EvalReport['speed'] = null;
    if (a.speedPrompts && a.speedPrompts > 0) {
      const prompts = heldOutPrompts(a.speedPrompts);
      const fwdMs: number[] = [];
      const timed = timedBackbone(backbone, fwdMs);
      // warm-up (JIT, kernel caches) so the first timed configuration is not penalised
      await generateOn(backbone, [prompts[0]], { maxNewTokens: 4, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId });
      const t0 = performance.now();
      const plain: number[][] = [];
      let plainDecodeMs = 0;
      for (const p of prompts) {
        const g = await generateOn(backbone, [p], { maxNewTokens: newTokens, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId });
        plain.push(g.tokens[0]);
        plainDecodeMs += g.decodeMs;
      }
      const plainSeconds = (performance.now() - t0) / 1000;
      const plainTokens = plain.reduce((x, t) => x + t.length, 0);
      const plainMsPerToken = plainDecodeMs / plainTokens;
      const rows: SpeedRow[] = [];
      for (const t of curve) {
        const topk = Math.max(...t.choices.flat()) + 1; // the heads' top-k this tree needs (as generate --medusa)
        // warm-up of this tree's shapes (engine kernel caches) before timing it
        await medusaGenerateGreedyOn(backbone, await proposer(), prompts[0], { choices: t.choices, topk, maxNewTokens: 4, eosIds });
        const t1 = performance.now();
        let steps = 0;
        let tokens = 0;
        let same = true;
        let prefillMs = 0;
        for (const [i, p] of prompts.entries()) {
          fwdMs.length = 0;
          const r = await medusaGenerateGreedyOn(timed, await proposer(), p, { choices: t.choices, topk, maxNewTokens: newTokens, eosIds });
          prefillMs += fwdMs[0]; // the first forward of a Medusa run is the prompt's prefill
          steps += r.steps;
          tokens += r.tokens.length;
          if (r.tokens.join(',') !== plain[i].join(',')) same = false;
        }
        const secs = (performance.now() - t1) / 1000;
        const msPerStep = (secs * 1000 - prefillMs) / steps;
        rows.push({
          budget: t.budget, nodes: t.choices.length, expectedTokensPerStep: t.expectedTokensPerStep, measuredTokensPerStep: tokens / steps,
          tokensPerSecond: tokens / secs, speedup: tokens / secs / (plainTokens / plainSeconds), msPerStep, overheadMsPerStep: msPerStep - plainMsPerToken, sameTokens: same,
        });
      }
      const top = rows.reduce((x, y) => (y.speedup > x.speedup ? y : x));
      const best = { budget: top.budget, nodes: top.nodes, speedup: top.speedup, measuredTokensPerStep: top.measuredTokensPerStep };
      speed = { engine: backbone.kind, prompts: prompts.length, newTokens, plainTokensPerSecond: plainTokens / plainSeconds, plainMsPerToken, rows, best };
      json(path.join(evalDir, 'speed.json'), speed);
      // chart: tokens per step (expected and measured) and wall-clock speedup against the tree's size
      const svg = await lineChartSvg({
        title: `Medusa decoding against tree size (best: budget ${best.budget}, ${best.speedup.toFixed(2)}x)`, xTitle: 'tree nodes (budget)', yTitle: 'tokens per step / speedup', ordinalX: true,
        series: [
          { name: 'expected tokens/step', points: rows.map((r) => ({ x: r.budget, y: r.expectedTokensPerStep })) },
          { name: 'measured tokens/step', points: rows.map((r) => ({ x: r.budget, y: r.measuredTokensPerStep })) },
          { name: 'wall-clock speedup', points: rows.map((r) => ({ x: r.budget, y: r.speedup })) },
        ],
      });
      writeFileAtomic(path.join(evalDir, 'speed.svg'), [Buffer.from(svg)]);
    }
    return {
      run: a.run, checkpoint: ckDir, conversations: examples.length, heads, perRank,
      trees: curve.map((t) => ({ budget: t.budget, expectedTokensPerStep: t.expectedTokensPerStep, nodes: t.choices.length })),
      chosen: { budget: chosen.budget, expectedTokensPerStep: chosen.expectedTokensPerStep, choices: chosen.choices, file: choicesFile },
      speed, live,
    };
  } finally {
    for (const f of cleanup.reverse()) f();
  }
}

export function formatEval(r: EvalReport): string {
  const lines = [`${r.run} (${r.checkpoint}), ${r.conversations} evaluation conversations`, `head  positions  loss     ${topkHeader()}`];
  r.heads.forEach((h, k) => lines.push(`${String(k).padEnd(6)}${String(h.valid).padEnd(11)}${h.loss.toFixed(4).padEnd(9)}${h.topk.map((x) => `${(100 * x).toFixed(1)}%`.padEnd(8)).join('')}`));
  lines.push('tree budget -> expected tokens per step (independent heads):');
  for (const t of r.trees) lines.push(`  ${String(t.budget).padStart(4)} nodes requested, ${String(t.nodes).padStart(4)} used: ${t.expectedTokensPerStep.toFixed(3)}`);
  lines.push(`medusa_choices (${r.chosen.choices.length} nodes, expected ${r.chosen.expectedTokensPerStep.toFixed(3)} tokens/step): ${r.chosen.file}`);
  if (r.speed) {
    lines.push(`Medusa greedy decoding vs plain greedy (${r.speed.engine} backbone, batch 1, ${r.speed.prompts} prompts x ${r.speed.newTokens} tokens; plain ${r.speed.plainTokensPerSecond.toFixed(1)} tok/s; chart: ${path.join(r.run, 'eval', 'speed.svg')}):`);
    for (const x of r.speed.rows) {
      lines.push(`  budget ${String(x.budget).padStart(4)} (${x.nodes} nodes): tokens/step expected ${x.expectedTokensPerStep.toFixed(2)}, measured ${x.measuredTokensPerStep.toFixed(2)}; ${x.tokensPerSecond.toFixed(1)} tok/s, speedup ${x.speedup.toFixed(2)}x; ` +
        `${x.msPerStep.toFixed(2)} ms/step, overhead ${x.overheadMsPerStep >= 0 ? '+' : ''}${x.overheadMsPerStep.toFixed(2)} ms over a plain token (${r.speed.plainMsPerToken.toFixed(2)} ms)${x.sameTokens ? '' : '  (OUTPUT DIFFERS FROM PLAIN GREEDY)'}`);
    }
    lines.push(`  best: budget ${r.speed.best.budget} (${r.speed.best.nodes} nodes), speedup ${r.speed.best.speedup.toFixed(2)}x, ${r.speed.best.measuredTokensPerStep.toFixed(2)} tokens/step`);
  }
  if (r.live) {
    const l = r.live;
    lines.push(`heads on live greedy decoding (${l.engine} backbone, ${l.prompts} prompts from ${l.source}, ${l.generatedTokens} greedy tokens; base lm_head agreement ${(100 * l.baseAgreement).toFixed(1)}%; ${l.file}):`);
    lines.push(`head  positions  ${topkHeader()}`);
    l.heads.forEach((h, k) => lines.push(`${String(k).padEnd(6)}${String(h.valid).padEnd(11)}${h.topk.map((x) => `${(100 * x).toFixed(1)}%`.padEnd(8)).join('')}`.trimEnd()));
  }
  return lines.join('\n');
}

/** Column titles top-1 .. top-10, 8 characters each. */
function topkHeader(): string {
  return Array.from({ length: TOPK_REPORTED }, (_, j) => `top-${j + 1}`.padEnd(8)).join('').trimEnd();
}

/** The backbone with each forward's wall time appended to `ms` (takes Medusa's prefill out of its step time). */
function timedBackbone(b: Backbone, ms: number[]): Backbone {
  return {
    kind: b.kind,
    config: b.config,
    newCache: (batch) => b.newCache(batch),
    forward: async (args) => {
      const t = performance.now();
      try {
        return await b.forward(args);
      } finally {
        ms.push(performance.now() - t);
      }
    },
    dispose: () => {}, // the wrapped backbone is disposed by its owner
  };
}
