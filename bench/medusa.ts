/**
 * Medusa greedy decoding against plain greedy decoding on the ~20M-parameter benchmark model
 * (BENCH_20M: Llama, d 512, 4 layers, V 8192, random weights) with MEDUSA-1 heads trained on the
 * model's own greedy continuations.
 *
 *   npm run bench:medusa -- [--out docs/bench/medusa.json] [--tfjs] [--prompts 6] [--new-tokens 64] [--heads 4]
 *                           [--reps 2 (best of)] [--proposer-threads N (onnx proposer; default its own)]
 *                           [--conversations 48] [--distill-tokens 128]
 *
 * Pipeline in a temp folder with the project's own functions: greedy continuations of random prompts
 * (`generateOn`, onnx backbone) stored as a distilled dataset (`DatasetWriter`) -> `runMedusa1`
 * (configs/tiny.yaml with the model, data and heads overridden) -> `runEval` (per-head accuracy on
 * the held-out conversations) -> trees from `budgetCurve` on that accuracy for budgets
 * 4/8/16/32/64, plus chains of 1..heads nodes.
 *
 * Measured through the public `medusaGenerateGreedyOn` on held-out prompts, per backbone engine
 * (onnx; tfjs with --tfjs, fewer trees), per heads proposer (tfjs | onnx) and per verification mode:
 * - `argmax`: the backbone as it is (greedy decoding asks for each node's argmax only when
 *   medusa-decode.ts does so; the `asked` column says which mode the decoder actually asked for);
 * - `all`: the same backbone forced to return the [nodes, V] logits to JS and take the argmax there
 *   (what verification cost before `logits: 'argmax'`).
 * Per-step time is split by timing wrappers around the backbone (tree forwards = verify) and the
 * proposer (propose); host = the rest of the decoding steps (prefill excluded). tok/s and speedup are
 * wall-clock including each prompt's prefill, for plain decoding too.
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
import { argmax, Rng } from '../src/model/sampling.js';
import { formatDistillSummary, runDistill } from '../src/recipes/distill.js';
import { disposeHeads, importHeads, initHeads } from '../src/model/heads.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { loadExamples, splitEval } from '../src/data/batches.js';
import { loadTrainConfig } from '../src/config.js';
import { latestCheckpoint, loadCheckpoint } from '../src/train/checkpoint.js';
import { TOPK_REPORTED } from '../src/train/heads-loss.js';
import { runMedusa1 } from '../src/recipes/medusa1.js';
import { runEval } from '../src/recipes/eval.js';
import { budgetCurve, treeBuffers, type MedusaChoices } from '../src/eval/tree.js';
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
  tokensPerStep: number; steps: number; proposeMs: number; verifyMs: number; hostMs: number; tokPerS: number; plainTokPerS: number; speedup: number; sameTokens: boolean;
}

/** Mean ms of `fn` over `n` calls after 3 warm-up calls. */
async function meanMs(fn: () => Promise<unknown>, n: number): Promise<number> {
  for (let i = 0; i < 3; i++) await fn();
  const t = performance.now();
  for (let i = 0; i < n; i++) await fn();
  return (performance.now() - t) / n;
}

/**
 * Component costs at a realistic vocabulary: BENCH_20M exactly (V 8192, 21M parameters). One tree
 * verification forward on a 128-token cache ('all' + argmax in JS vs 'argmax'), one plain cached
 * decoding step, and one proposal of 4 heads (tfjs vs onnx), per_head and shared lm_head.
 */
async function componentCosts(dir: string, trees: { name: string; choices: MedusaChoices }[], n: number): Promise<Record<string, number>> {
  const modelDir = path.join(dir, 'bench20m');
  writeTinyModel(modelDir, { ...BENCH_20M, seed: 1 });
  const { decoder } = loadDecoder(modelDir);
  const c = decoder.config;
  const V = c.vocabSize;
  const out: Record<string, number> = {};
  const bb = await makeBackbone('onnx', decoder);
  const cache = bb.newCache(1);
  const prompt = Array.from({ length: 128 }, (_, i) => 5 + ((i * 7919) % 500));
  await bb.forward({ ids: prompt, batch: 1, seqLen: prompt.length, cache, logits: 'none' });
  const S = cache.length;
  const keep = Array.from({ length: S }, (_, i) => i);
  out['plain_step_ms'] = await meanMs(async () => {
    await bb.forward({ ids: [7], batch: 1, seqLen: 1, cache, logits: 'last' });
    cache.keepEntries(keep);
  }, n);
  for (const tree of trees) {
    const tb = treeBuffers(tree.choices, TOPK_REPORTED);
    const ids = Array.from({ length: tb.nodes }, (_, i) => 5 + i);
    const treeMask = { mask: tb.attentionMask, positions: Int32Array.from(tb.positionOffsets, (p) => S + p) };
    for (const mode of ['all', 'argmax'] as const) {
      out[`verify_${tb.nodes}_${mode}_ms`] = await meanMs(async () => {
        const r = await bb.forward({ ids, batch: 1, seqLen: tb.nodes, cache, logits: mode, treeMask });
        if (mode === 'all') for (let i = 0; i < tb.nodes; i++) argmax(r.logits!, i * V, V);
        cache.keepEntries(keep);
      }, n);
    }
  }
  cache.dispose();
  bb.dispose();
  const rng = new Rng(3);
  const hidden = Float32Array.from({ length: c.hiddenSize }, () => rng.next() - 0.5);
  for (const lmHead of ['per_head', 'shared'] as const) {
    const heads = initHeads({ numHeads: 4, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: V, lmHead }, decoder.weights.lmHead, 0);
    for (const [name, make] of [['tfjs', () => chooseProposer('tfjs', heads)], ['onnx', () => chooseProposer('onnx', heads)], ['onnx_2threads', () => chooseProposer('onnx', heads, { threads: 2 })]] as const) {
      const p = await make();
      out[`propose_${lmHead}_${name}_ms`] = await meanMs(() => p.propose(hidden, TOPK_REPORTED), n);
      p.dispose();
    }
    disposeHeads(heads);
  }
  return out;
}

async function main(): Promise<void> {
  const out = arg('out', '');
  const numPrompts = Number(arg('prompts', '6'));
  const newTokens = Number(arg('new-tokens', '64'));
  const numHeads = Number(arg('heads', '4'));
  const reps = Number(arg('reps', '2'));
  const distillTokens = Number(arg('distill-tokens', '96'));
  const proposerThreads = process.argv.includes('--proposer-threads') ? Number(arg('proposer-threads', '1')) : undefined;
  const log = (l: string): void => console.log(`  ${l}`);
  await initBackend('wasm');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-bench-medusa-'));
  const cleanups: (() => void)[] = [() => fs.rmSync(dir, { recursive: true, force: true })];
  try {
    // --- model, distilled data, trained heads, measured accuracy ---
    const modelDir = path.join(dir, 'm20');
    // BENCH_20M's shape with 6 layers and the tiny tokenizer's own 512-token vocabulary (~20M parameters):
    // `distill` decodes every generated id, and BENCH_20M's padded 8192-entry vocabulary produces ids the
    // tokenizer lacks. The cost of a large vocabulary is measured separately below (component costs).
    const { parameters } = writeTinyModel(modelDir, { ...BENCH_20M, vocabSize: undefined, numLayers: 6, seed: 1 });
    console.log(`model: BENCH_20M shape with 6 layers and V 512: ${(parameters / 1e6).toFixed(1)}M parameters (random weights)`);
    const { decoder } = loadDecoder(modelDir);
    const tokenizer = await loadTokenizer(modelDir);
    const eosIds = [...new Set([...decoder.config.eosTokenIds, ...tokenizer.eosIds])];
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const dataDir = path.join(dir, 'distill');
    let t = performance.now();
    const dist = await runDistill({
      inputs: [packagePath('data', 'prompts', 'demo.jsonl')], format: 'auto', out: dataDir, model: modelDir, engine: 'local', urls: [], inFlight: 1,
      timeoutMs: 60_000, retries: 0, backoffMs: 0, sampling: { temperature: 0, topP: 1, topK: 0 }, seed: 0, maxNewTokens: distillTokens, maxTotalTokens: 384,
      batchSize: 8, backboneEngine: 'onnx', shardSize: 64, topk: 0, overwrite: false, log: () => {},
    });
    if (dist.written === 0) throw new Error(formatDistillSummary(dist));
    console.log(`distill: ${dist.written} conversations (data/prompts/demo.jsonl), greedy, ${distillTokens} new tokens each, in ${((performance.now() - t) / 1000).toFixed(1)} s`);
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
    const loaded = loadExamples([dataDir], { maxSeqLen: config.data.max_seq_len });
    const held = splitEval(loaded.examples, { fraction: config.data.eval_fraction, max: config.data.eval_max, seed: config.run.seed }).eval;
    const prompts = held.slice(0, numPrompts).map((e) => Array.from(e.inputIds.subarray(0, Math.max(1, e.lossMask.indexOf(1)))));
    const ck = loadCheckpoint(latestCheckpoint(runDir)!);
    const heads = initHeads({ numHeads, numLayers: config.heads.num_layers, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize, lmHead: config.heads.lm_head }, decoder.weights.lmHead, 0);
    cleanups.push(() => disposeHeads(heads));
    importHeads(heads, ck.heads, 'checkpoint');
    const proposers: Record<HeadsProposerKind, HeadsProposer> = { tfjs: await chooseProposer('tfjs', heads), onnx: await chooseProposer('onnx', heads, { threads: proposerThreads }) };
    cleanups.push(() => proposers.onnx.dispose());
    const loadBefore = os.loadavg();
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
      let plain = await plainOnce();
      for (let rep = 1; rep < reps; rep++) {
        const x = await plainOnce();
        if (x.secs < plain.secs) plain = x;
      }
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
          // Best of `reps` runs (other processes share the 2 cores), with that run's time split; plain decoding
          // runs between them, so each speedup compares runs made under the same load.
          let r: Awaited<ReturnType<typeof run>> | null = null;
          let split = { verifyMs: 0, prefillMs: 0, proposeMs: 0 };
          let plainSecs = Infinity;
          for (let rep = 0; rep < reps; rep++) {
            plainSecs = Math.min(plainSecs, (await plainOnce()).secs);
            m.verifyMs = 0;
            m.prefillMs = 0;
            m.proposeMs = 0;
            const x = await run();
            if (!r || x.secs < r.secs) {
              r = x;
              split = { verifyMs: m.verifyMs, prefillMs: m.prefillMs, proposeMs: m.proposeMs };
            }
          }
          Object.assign(m, split);
          if (!r) throw new Error('no run');
          const tokens = r.tokens.reduce((a, x) => a + x.length, 0);
          const stepsMs = 1000 * r.secs - m.prefillMs; // the decoding steps (prefill excluded from the split, included in tok/s)
          const row: Row = {
            engine, proposer: pk, verify, asked: [...m.asked].join('+'), tree: tree.name, nodes: tree.choices.length + 1, expected: tree.expected,
            tokensPerStep: tokens / r.steps, steps: r.steps, proposeMs: m.proposeMs / r.steps, verifyMs: m.verifyMs / r.steps,
            hostMs: (stepsMs - m.proposeMs - m.verifyMs) / r.steps, tokPerS: tokens / r.secs, plainTokPerS: plainTokens / plainSecs, speedup: tokens / r.secs / (plainTokens / plainSecs),
            sameTokens: r.tokens.every((x, i) => x.join(',') === plain.tokens[i].join(',')),
          };
          rows.push(row);
          console.log(`${engine} ${row.tree.padEnd(10)} ${String(row.nodes).padStart(3)} nodes  proposer ${pk.padEnd(4)} verify ${verify.padEnd(6)}(asked ${row.asked.padEnd(6)})  ` +
            `tok/step ${row.tokensPerStep.toFixed(2)}${row.expected === null ? '' : ` (exp ${row.expected.toFixed(2)})`}  ms/step propose ${row.proposeMs.toFixed(2)} verify ${row.verifyMs.toFixed(2)} host ${row.hostMs.toFixed(2)}  ` +
            `${row.tokPerS.toFixed(1)} tok/s (plain ${row.plainTokPerS.toFixed(1)})  ${row.speedup.toFixed(2)}x${row.sameTokens ? '' : '  OUTPUT DIFFERS'}`);
        }
      }
      bb.dispose();
    }
    // --- component costs at V 8192 ---
    const costs = await componentCosts(dir, trees.filter((x) => ['chain 4', 'budget 16', 'budget 64'].includes(x.name)), 30);
    console.log(`\ncomponent costs on BENCH_20M (V 8192, 21.0M parameters, onnx backbone, 128 cached tokens; mean ms):`);
    for (const [k, v] of Object.entries(costs)) console.log(`  ${k.padEnd(36)} ${v.toFixed(3)}`);
    console.log(`load after: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
    if (out) {
      fs.writeFileSync(out, `${JSON.stringify({
        date: new Date().toISOString(), cpu: os.cpus()[0]?.model, cores: os.cpus().length, loadBefore, loadAfter: os.loadavg(), proposerThreads, reps, parameters: parameterCount(decoder.config),
        heads: { numHeads, layers: config.heads.num_layers, lmHead: config.heads.lm_head, top1: ev.heads.map((h) => h.topk[0]) }, prompts: prompts.length, newTokens, plainRate, rows, componentCosts: costs,
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
