/**
 * Medusa greedy decoding against plain greedy decoding on a ~20M-parameter model (BENCH_20M's
 * shape with 6 layers and the tiny tokenizer's 512-token vocabulary, random weights) with MEDUSA-1 heads trained on the model's own greedy continuations.
 *
 *   npm run bench:medusa -- [--out docs/bench/medusa.json] [--tfjs] [--prompts 6] [--new-tokens 64] [--heads 4]
 *
 * Pipeline, all with the project's own recipes in a temp folder: `runDistill` (data/prompts/demo.jsonl,
 * greedy, local onnx engine) -> `runMedusa1` (configs/tiny.yaml with the model, data and heads
 * overridden) -> `runEval` (per-head accuracy on the held-out conversations) -> trees from
 * `budgetCurve` on that accuracy for budgets 4/8/16/32/64, plus chains of 1..heads nodes.
 *
 * Measured through the public `medusaGenerateGreedyOn` on the held-out prompts, per backbone engine
 * (onnx; tfjs with --tfjs), per heads proposer (tfjs | onnx) and per verification mode:
 * - `argmax`: the backbone as it is (greedy decoding asks it for each node's argmax when
 *   medusa-decode.ts does so; the table says which mode the decoder actually asked for);
 * - `all`: the same backbone forced to return the [nodes, V] logits to JS and take the argmax there
 *   (what verification cost before `logits: 'argmax'`).
 * Per-step time is split by timing wrappers around the backbone (tree forwards = verify) and the
 * proposer (propose); host = everything else in the step. Wall-clock includes each prompt's prefill,
 * for plain decoding too.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { reexecWithAllocatorSettings } from '../src/process.js';
import { packagePath } from '../src/paths.js';
import { BENCH_20M, writeTinyModel } from '../src/model/tiny.js';
import { loadDecoder } from '../src/model/load.js';
import { parameterCount } from '../src/model/config.js';
import { argmax } from '../src/model/sampling.js';
import { disposeHeads, importHeads, initHeads } from '../src/model/heads.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { loadExamples, splitEval } from '../src/data/batches.js';
import { loadTrainConfig } from '../src/config.js';
import { latestCheckpoint, loadCheckpoint } from '../src/train/checkpoint.js';
import { TOPK_REPORTED } from '../src/train/heads-loss.js';
import { formatDistillSummary, runDistill } from '../src/recipes/distill.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { runEval } from '../src/recipes/eval.js';
import { budgetCurve, type MedusaChoices } from '../src/eval/tree.js';
import { medusaGenerateGreedyOn } from '../src/eval/medusa-decode.js';
import { generateOn } from '../src/engines/backbone-generate.js';
import { makeBackbone, type Backbone, type BackboneForwardArgs, type BackboneLogits } from '../src/engines/decoder-engine.js';
import { chooseProposer, type HeadsProposer, type HeadsProposerKind } from '../src/engines/heads-proposer.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}
const flag = (name: string): boolean => process.argv.includes(`--${name}`);

type Verify = 'argmax' | 'all';

/** Time spent in tree forwards (verification), other forwards (prefill), proposals; the logits modes the decoder asked for. */
interface Meter { verifyMs: number; prefillMs: number; proposeMs: number; asked: Set<BackboneLogits> }

/**
 * The backbone with its tree forwards timed. verify 'all': a tree forward asked for 'argmax' runs as
 * 'all' instead, and the argmax is taken in JS over the returned [N, V] logits (the old cost).
 */
function metered(inner: Backbone, verify: Verify, m: Meter): Backbone {
  const V = inner.config.vocabSize;
  return {
    kind: inner.kind,
    config: inner.config,
    newCache: (b) => inner.newCache(b),
    dispose: () => {},
    forward: async (a: BackboneForwardArgs) => {
      if (!a.treeMask) {
        const t = performance.now();
        try {
          return await inner.forward(a);
        } finally {
          m.prefillMs += performance.now() - t;
        }
      }
      m.asked.add(a.logits);
      const t = performance.now();
      try {
        if (verify === 'all' && a.logits === 'argmax') {
          const r = await inner.forward({ ...a, logits: 'all' });
          const logits = r.logits!; // [N, V]
          const am = Int32Array.from({ length: logits.length / V }, (_, n) => argmax(logits, n * V, V)); // [N]
          return { hidden: r.hidden, logits: null, argmax: am };
        }
        return await inner.forward(a);
      } finally {
        m.verifyMs += performance.now() - t;
      }
    },
  };
}

function meteredProposer(inner: HeadsProposer, m: Meter): HeadsProposer {
  return {
    ...inner,
    propose: async (hidden, topk) => {
      const t = performance.now();
      try {
        return await inner.propose(hidden, topk);
      } finally {
        m.proposeMs += performance.now() - t;
      }
    },
    dispose: () => {},
  };
}

interface Row {
  engine: string; proposer: HeadsProposerKind; verify: Verify; asked: string; tree: string; nodes: number; expected: number | null;
  tokensPerStep: number; steps: number; proposeMs: number; verifyMs: number; hostMs: number; tokPerS: number; speedup: number; sameTokens: boolean;
}

async function main(): Promise<void> {
  const out = arg('out', '');
  const numPrompts = Number(arg('prompts', '6'));
  const newTokens = Number(arg('new-tokens', '64'));
  const numHeads = Number(arg('heads', '4'));
  const log = (l: string): void => console.log(`  ${l}`);
  await initBackend('wasm');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-medusa-'));
  const cleanups: (() => void)[] = [() => fs.rmSync(dir, { recursive: true, force: true })];
  try {
    // --- model, distilled data, trained heads, measured accuracy ---
    const modelDir = path.join(dir, 'm20');
    // BENCH_20M's shape with the tiny tokenizer's own vocabulary (distill decodes every generated id, and
    // BENCH_20M's padded 8192-entry vocabulary would produce ids the tokenizer lacks) and 6 layers (~20M).
    const { parameters } = writeTinyModel(modelDir, { ...BENCH_20M, vocabSize: undefined, numLayers: 6, seed: 1 });
    console.log(`model: BENCH_20M shape, 6 layers, tokenizer vocabulary: ${(parameters / 1e6).toFixed(1)}M parameters (random weights), ${modelDir}`);
    const dataDir = path.join(dir, 'distill');
    let t = performance.now();
    const d = await runDistill({
      inputs: [packagePath('data', 'prompts', 'demo.jsonl')], format: 'auto', out: dataDir, model: modelDir, engine: 'local', urls: [], inFlight: 1,
      timeoutMs: 60_000, retries: 0, backoffMs: 0, sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: 96, maxTotalTokens: 384,
      batchSize: 8, backboneEngine: 'onnx', shardSize: 64, topk: 0, overwrite: false, log,
    });
    console.log(`distill: ${d.written} conversations in ${((performance.now() - t) / 1000).toFixed(1)} s`);
    if (d.written === 0) throw new Error(formatDistillSummary(d));
    const { config } = loadTrainConfig(packagePath('configs', 'tiny.yaml'), [
      `model.path=${JSON.stringify(modelDir)}`, 'model.engine="onnx"', `data.train=${JSON.stringify([dataDir])}`, `run.dir=${JSON.stringify(dir)}`, 'run.name="heads"',
      `heads.num_heads=${numHeads}`, 'data.eval_fraction=0.2', 'train.epochs=4', 'train.lr=3e-3', 'checkpoint.every=1000', 'eval.every=1000',
    ]);
    t = performance.now();
    const s = await runMedusa1({ config, commandLine: ['bench/medusa.ts'], resume: false, log: () => {} });
    console.log(`train: MEDUSA-1, ${numHeads} heads x ${config.heads.num_layers} layer (${config.heads.lm_head}), ${s.steps} steps in ${((performance.now() - t) / 1000).toFixed(1)} s`);
    const runDir = path.join(dir, 'heads');
    const ev = await runEval({ run: runDir, data: [], budgets: [4, 64], log: () => {} });
    console.log(`held-out accuracy (${ev.conversations} conversations), top-1 per head: ${ev.heads.map((h) => `${(100 * h.topk[0]).toFixed(1)}%`).join(' ')}; top-5: ${ev.heads.map((h) => `${(100 * h.topk[4]).toFixed(1)}%`).join(' ')}`);
    const curve = budgetCurve({ acc: ev.perRank }, { budgets: [4, 8, 16, 32, 64], numHeads, topk: TOPK_REPORTED });
    const trees: { name: string; choices: MedusaChoices; expected: number | null }[] = [];
    for (let k = 1; k <= numHeads; k++) trees.push({ name: `chain ${k}`, choices: Array.from({ length: k }, (_, i) => new Array<number>(i + 1).fill(0)), expected: null });
    for (const c of curve) trees.push({ name: `budget ${c.budget}`, choices: c.choices, expected: c.expectedTokensPerStep });

    // --- decoding ---
    const { decoder } = loadDecoder(modelDir);
    const tokenizer = await loadTokenizer(modelDir);
    const eosIds = [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])];
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const loaded = loadExamples([dataDir], { maxSeqLen: config.data.max_seq_len });
    const held = splitEval(loaded.examples, { fraction: config.data.eval_fraction, max: config.data.eval_max, seed: config.run.seed }).eval;
    const prompts = held.slice(0, numPrompts).map((e) => Array.from(e.inputIds.subarray(0, Math.max(1, e.lossMask.indexOf(1)))));
    const ck = loadCheckpoint(latestCheckpoint(runDir)!);
    const heads = initHeads({ numHeads, numLayers: config.heads.num_layers, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize, lmHead: config.heads.lm_head }, decoder.weights.lmHead, 0);
    cleanups.push(() => disposeHeads(heads));
    importHeads(heads, ck.heads, 'checkpoint');
    const proposers: Record<HeadsProposerKind, HeadsProposer> = { tfjs: await chooseProposer('tfjs', heads), onnx: await chooseProposer('onnx', heads) };
    cleanups.push(() => proposers.onnx.dispose());
    console.log(`decoding: ${prompts.length} held-out prompts (${prompts.map((p) => p.length).join('/')} tokens) x ${newTokens} new tokens, batch 1, greedy; load ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
    const rows: Row[] = [];
    const plainRate: Record<string, number> = {};
    for (const engine of flag('tfjs') ? (['onnx', 'tfjs'] as const) : (['onnx'] as const)) {
      const bb = await makeBackbone(engine, decoder);
      const plainOnce = async (): Promise<{ secs: number; tokens: number[][] }> => {
        const t0 = performance.now();
        const tokens: number[][] = [];
        for (const p of prompts) tokens.push((await generateOn(bb, [p], { maxNewTokens: newTokens, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId })).tokens[0]);
        return { secs: (performance.now() - t0) / 1000, tokens };
      };
      await plainOnce(); // warm-up
      const plain = await plainOnce();
      const plainTokens = plain.tokens.reduce((a, x) => a + x.length, 0);
      plainRate[engine] = plainTokens / plain.secs;
      console.log(`\n${engine} backbone: plain greedy ${plainRate[engine].toFixed(1)} tok/s (${plainTokens} tokens, ${(1000 * plain.secs / plainTokens).toFixed(2)} ms/token incl. prefill)`);
      const combos: [HeadsProposerKind, Verify][] = [['tfjs', 'all'], ['tfjs', 'argmax'], ['onnx', 'all'], ['onnx', 'argmax']];
      const treeSet = engine === 'onnx' ? trees : trees.filter((x) => ['chain 2', `chain ${numHeads}`, 'budget 16', 'budget 64'].includes(x.name));
      for (const tree of treeSet) {
        for (const [pk, verify] of combos) {
          const m: Meter = { verifyMs: 0, prefillMs: 0, proposeMs: 0, asked: new Set() };
          const b = metered(bb, verify, m);
          const p = meteredProposer(proposers[pk], m);
          const run = async (): Promise<{ secs: number; steps: number; tokens: number[][] }> => {
            const t0 = performance.now();
            let steps = 0;
            const tokens: number[][] = [];
            for (const pr of prompts) {
              const r = await medusaGenerateGreedyOn(b, p, pr, { choices: tree.choices, topk: TOPK_REPORTED, maxNewTokens: newTokens, eosIds });
              steps += r.steps;
              tokens.push(r.tokens);
            }
            return { secs: (performance.now() - t0) / 1000, steps, tokens };
          };
          await run(); // warm-up (also fills the per-tree caches)
          m.verifyMs = 0;
          m.prefillMs = 0;
          m.proposeMs = 0;
          const r = await run();
          const tokens = r.tokens.reduce((a, x) => a + x.length, 0);
          const stepsMs = 1000 * r.secs - m.prefillMs; // the decoding steps (prefill excluded from the split, included in tok/s)
          const row: Row = {
            engine, proposer: pk, verify, asked: [...m.asked].join('+'), tree: tree.name, nodes: tree.choices.length + 1, expected: tree.expected,
            tokensPerStep: tokens / r.steps, steps: r.steps, proposeMs: m.proposeMs / r.steps, verifyMs: m.verifyMs / r.steps,
            hostMs: (stepsMs - m.proposeMs - m.verifyMs) / r.steps, tokPerS: tokens / r.secs, speedup: tokens / r.secs / plainRate[engine],
            sameTokens: r.tokens.every((x, i) => x.join(',') === plain.tokens[i].join(',')),
          };
          rows.push(row);
          console.log(`${engine} ${row.tree.padEnd(10)} ${String(row.nodes).padStart(3)} nodes  proposer ${pk.padEnd(4)} verify ${verify.padEnd(6)}(asked ${row.asked.padEnd(6)})  ` +
            `tok/step ${row.tokensPerStep.toFixed(2)}${row.expected === null ? '' : ` (exp ${row.expected.toFixed(2)})`}  ms/step propose ${row.proposeMs.toFixed(2)} verify ${row.verifyMs.toFixed(2)} host ${row.hostMs.toFixed(2)}  ` +
            `${row.tokPerS.toFixed(1)} tok/s  ${row.speedup.toFixed(2)}x${row.sameTokens ? '' : '  OUTPUT DIFFERS'}`);
        }
      }
      bb.dispose();
    }
    if (out) {
      fs.writeFileSync(out, `${JSON.stringify({
        date: new Date().toISOString(), cpu: os.cpus()[0]?.model, cores: os.cpus().length, load: os.loadavg(), parameters: parameterCount(decoder.config),
        heads: { numHeads, layers: config.heads.num_layers, lmHead: config.heads.lm_head, top1: ev.heads.map((h) => h.topk[0]) }, prompts: prompts.length, newTokens, plainRate, rows,
      }, null, 2)}\n`);
    }
  } finally {
    for (const f of cleanups.reverse()) f();
  }
}

if (!reexecWithAllocatorSettings()) {
  main().then(() => process.exit(0), (e) => {
    console.error(e);
    process.exit(1);
  });
}
