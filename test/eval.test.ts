/**
 * `eval`'s accuracy figures: live-decoding accuracy counted exactly on constructed data; on real
 * backbones (tfjs, onnx) with oracle heads that know the greedy continuation (computed independently
 * with the tfjs generator and full forwards), every count is exact; real heads' live counts equal the
 * heads trainer's counts on the same positions (an independent route through headTargets); and the
 * CLI's JSON carries top-1..10, live accuracy and speed overheads with consistent values.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward, type Decoder } from '../src/model/decoder.js';
import { generate } from '../src/model/generate.js';
import { disposeHeads, exportHeads, initHeads, type MedusaHeads } from '../src/model/heads.js';
import { Rng } from '../src/model/sampling.js';
import { disposeWeights, lmHeadReference } from '../src/model/weights.js';
import { onnxBackbone, tfjsBackbone, type Backbone } from '../src/engines/decoder-engine.js';
import { tfjsProposer, type HeadsProposer } from '../src/engines/heads-proposer.js';
import { createHeadsTrainer } from '../src/engines/heads-trainer.js';
import { countLive, emptyLiveCounts, measureLiveAccuracy, summariseLive } from '../src/eval/live-accuracy.js';
import { validateChoices } from '../src/eval/tree.js';
import { TOPK_REPORTED } from '../src/train/heads-loss.js';
import { DECODER_FIXTURES } from './helpers/golden.js';
import { expectMedusa } from './helpers/errors.js';
import { run } from './helpers/cli.js';

test('top-1..top-10 are reported', () => {
  expect(TOPK_REPORTED).toBe(10);
});

describe('countLive (constructed data, hand-counted)', () => {
  test('head k at decoding position i is checked against continuation[i + k + 1]; ranks >= topk miss', () => {
    const c = emptyLiveCounts(2, 3);
    // continuation of 4 tokens: positions i = 0..2 have proposals; head 0 labels c[1..3], head 1 labels c[2..3]
    countLive(c, [10, 11, 12, 13], [
      [[11, 5, 6], [5, 12, 6]], // head 0: rank 0; head 1: rank 1
      [[5, 6, 7, 12], [5, 6, 13]], // head 0: rank 3 (beyond top-3: miss); head 1: rank 2
      [[5, 13, 6], [13, 12, 11]], // head 0: rank 1; head 1: no label (c[4] does not exist)
    ], 3);
    expect(c).toEqual({ valid: [3, 2], correct: [[1, 2, 2], [0, 1, 2]] });
    countLive(c, [30], [], 3); // one token: no position has a label
    countLive(c, [20, 21], [[[21, 1, 2], [0, 0, 0]]], 3); // head 0 labels c[1] = 21 at rank 0
    expect(c).toEqual({ valid: [4, 2], correct: [[2, 3, 3], [0, 1, 2]] });
    const s = summariseLive(c, { prompts: 3, generatedTokens: 7, newTokensPerPrompt: 4, baseAgree: 6, basePositions: 7 });
    expect(s.heads).toEqual([{ valid: 4, topk: [0.5, 0.75, 0.75] }, { valid: 2, topk: [0, 0.5, 1] }]);
    expect(s.perRank).toEqual([[0.5, 0.25, 0], [0, 0.5, 0.5]]);
    expect(s.baseAgreement).toBeCloseTo(6 / 7, 15);
  });

  test('a wrong number of positions or heads is an internal error', () => {
    const c = emptyLiveCounts(2, 3);
    expectMedusa(() => countLive(c, [1, 2, 3], [[[1], [2]]], 3), 'E_INTERNAL', '1 positions', 'expected 2');
    expectMedusa(() => countLive(c, [1, 2], [[[1]]], 3), 'E_INTERNAL', 'proposals of 1 heads');
  });
});

const VARIANT = 'llama-gqa';
const NEW = 16;

function randomPrompts(V: number, count: number, seed: number): number[][] {
  const rng = new Rng(seed);
  return Array.from({ length: count }, () => Array.from({ length: 2 + Math.floor(rng.next() * 10) }, () => Math.floor(rng.next() * V)));
}

/** The greedy continuation (tfjs generator) and the hidden state of every decoding position (tfjs full forward). */
function reference(model: Decoder, prompt: number[], eosIds: number[]): { cont: number[]; hidden: Float32Array[] } {
  const cont = generate(model, [prompt], { maxNewTokens: NEW, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds, padId: 0 }).tokens[0];
  const seq = [...prompt, ...cont];
  const d = model.config.hiddenSize;
  const r = decoderForward(model, { ids: seq, batch: 1, seqLen: seq.length, logits: 'none' });
  const all = r.hidden.dataSync() as Float32Array; // [1, P+N, d]
  r.hidden.dispose();
  const hidden = cont.map((_, i) => all.slice((prompt.length - 1 + i) * d, (prompt.length + i) * d));
  return { cont, hidden };
}

/**
 * Heads that know the continuation: the hidden state is matched to its decoding position (nearest
 * reference row, which must be within 1e-3), and head k puts the true token c[i+k+1] at rank
 * `ranks[k]` (>= topk: not proposed), distinct filler tokens elsewhere.
 */
function oracle(model: Decoder, refs: { cont: number[]; hidden: Float32Array[] }[], ranks: number[]): HeadsProposer {
  const c = model.config;
  const V = c.vocabSize;
  return {
    kind: 'tfjs', numHeads: ranks.length, hiddenSize: c.hiddenSize, vocabSize: V, dispose: () => {},
    propose: async (h, topk) => {
      let best = { dist: Infinity, p: -1, i: -1 };
      refs.forEach((r, p) => r.hidden.forEach((row, i) => {
        let m = 0;
        for (let x = 0; x < row.length; x++) m = Math.max(m, Math.abs(row[x] - h[x]));
        if (m < best.dist) best = { dist: m, p, i };
      }));
      if (best.dist > 1e-3) throw new Error(`the oracle does not know this hidden state (nearest differs by ${best.dist})`);
      const cont = refs[best.p].cont;
      return ranks.map((rank, k) => {
        const label = best.i + k + 1 < cont.length ? cont[best.i + k + 1] : -1;
        const fillers: number[] = [];
        for (let t = 0; fillers.length < topk; t++) if ((t * 7 + k) % V !== label && !fillers.includes((t * 7 + k) % V)) fillers.push((t * 7 + k) % V);
        if (label >= 0 && rank < topk) fillers[rank] = label;
        return fillers;
      });
    },
  };
}

describe.each(['tfjs', 'onnx'] as const)('live accuracy on the %s backbone', (engine) => {
  let model: Decoder;
  let bb: Backbone;
  beforeAll(async () => {
    await initBackend('wasm');
    model = loadDecoder(path.join(DECODER_FIXTURES, VARIANT)).decoder;
    bb = engine === 'tfjs' ? tfjsBackbone(model) : await onnxBackbone(model, { threads: 1 });
  });
  afterAll(() => {
    bb.dispose();
    disposeWeights(model.weights);
  });

  test('oracle heads: exact counts per head and rank (top-j = 1 from the planted rank on, 0 before), also with an eos stop', async () => {
    const V = model.config.vocabSize;
    const prompts = randomPrompts(V, 3, 11);
    // an eos id that ends the second prompt's continuation early (its 6th greedy token)
    const eos = [reference(model, prompts[1], []).cont[5]];
    const refs = prompts.map((p) => reference(model, p, eos));
    expect(refs[1].cont.length).toBeLessThanOrEqual(6);
    const ranks = [0, 4, 9, 10]; // head 3's true token is never proposed (rank 10 >= top-10)
    const r = await measureLiveAccuracy(bb, oracle(model, refs, ranks), prompts, { newTokens: NEW, eosIds: eos, padId: 0, topk: TOPK_REPORTED });
    expect(r.prompts).toBe(3);
    expect(r.generatedTokens).toBe(refs.reduce((a, x) => a + x.cont.length, 0));
    expect(r.baseAgreement).toBe(1);
    ranks.forEach((rank, k) => {
      expect(r.heads[k].valid).toBe(refs.reduce((a, x) => a + Math.max(0, x.cont.length - k - 1), 0));
      expect(r.heads[k].topk).toEqual(Array.from({ length: TOPK_REPORTED }, (_, j) => (j >= rank ? 1 : 0)));
      expect(r.perRank[k]).toEqual(Array.from({ length: TOPK_REPORTED }, (_, j) => (j === rank ? 1 : 0)));
    });
  });

  test('perfect heads give 100% top-1 on every head', async () => {
    const prompts = randomPrompts(model.config.vocabSize, 2, 12);
    const refs = prompts.map((p) => reference(model, p, []));
    const r = await measureLiveAccuracy(bb, oracle(model, refs, [0, 0, 0]), prompts, { newTokens: NEW, eosIds: [], padId: 0, topk: TOPK_REPORTED });
    expect(r.heads.map((h) => [h.valid, h.topk[0]])).toEqual([[2 * (NEW - 1), 1], [2 * (NEW - 2), 1], [2 * (NEW - 3), 1]]);
  });
});

/** Heads with random W1 and W2, so their guesses spread over the ranks. */
function randomHeads(model: Decoder, numHeads: number, seed: number): MedusaHeads {
  const c = model.config;
  const h = initHeads({ numHeads, numLayers: 1, hiddenSize: c.hiddenSize, vocabSize: c.vocabSize, lmHead: 'per_head' }, model.weights.lmHead, seed);
  tf.tidy(() => {
    for (let k = 0; k < numHeads; k++) {
      h.blocks[k][0].w.assign(tf.randomNormal([c.hiddenSize, c.hiddenSize], 0, 0.3, 'float32', seed + k));
      h.proj[k]!.assign(tf.randomNormal([c.hiddenSize, c.vocabSize], 0, 0.3, 'float32', seed + 100 + k));
    }
  });
  return h;
}

test('real heads: live counts (HeadsProposer top-10) equal the heads trainer\'s counts on the same positions and labels', async () => {
  await initBackend('wasm');
  const model = loadDecoder(path.join(DECODER_FIXTURES, VARIANT)).decoder;
  const heads = randomHeads(model, 3, 21);
  const c = model.config;
  const trainer = await createHeadsTrainer('tfjs', {
    shape: heads.shape, baseLmHead: lmHeadReference(model.weights), seed: 0, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0, decay: 0.8, headsCoefficient: 1, chunkRows: 64, maxGradNorm: null,
  });
  try {
    trainer.importHeads(exportHeads(heads), 'random heads');
    const prompts = randomPrompts(c.vocabSize, 4, 13);
    const live = await measureLiveAccuracy(tfjsBackbone(model), tfjsProposer(heads), prompts, { newTokens: NEW, eosIds: [], padId: 0, topk: TOPK_REPORTED });
    // the same positions through the trainer: from the last prompt token on, every continuation token a label
    const correct = [0, 1, 2].map(() => new Array<number>(TOPK_REPORTED).fill(0));
    const valid = [0, 0, 0];
    for (const p of prompts) {
      const { cont, hidden } = reference(model, p, []);
      const ids = [p[p.length - 1], ...cont];
      const rows = new Float32Array(ids.length * c.hiddenSize);
      hidden.forEach((h, i) => rows.set(h, i * c.hiddenSize)); // the last position's row stays 0: it is never read
      const m = await trainer.evaluate({ hidden: rows, ids, lossMask: new Array<number>(ids.length).fill(1), lengths: [ids.length], T: ids.length });
      m.valid.forEach((v, k) => (valid[k] += v));
      m.correct.forEach((row, k) => row.forEach((v, j) => (correct[k][j] += v)));
    }
    expect(live.heads.map((h) => h.valid)).toEqual(valid);
    expect(live.heads.map((h) => h.topk.map((x) => Math.round(x * h.valid)))).toEqual(correct);
    expect(Math.max(...correct.map((row) => row[TOPK_REPORTED - 1]))).toBeGreaterThan(0); // not a vacuous comparison
    expect(Math.min(...correct.map((row) => row[TOPK_REPORTED - 1] - row[0]))).toBeGreaterThan(0); // ranks beyond 0 are exercised
  } finally {
    trainer.dispose();
    disposeHeads(heads);
    disposeWeights(model.weights);
  }
});

describe('eval through the CLI', () => {
  let tmp: string;
  let runDir: string;
  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-eval-'));
    process.env['MEDUSA_TRAIN_CACHE'] = path.join(tmp, 'cache');
    // a small MEDUSA-1 run on the embedded tiny model (the pipeline `demo` ran before it moved to the structured model)
    const data = path.join(tmp, 'distill');
    const d = await run('distill', '--input', 'data/prompts/demo.jsonl', '--out', data, '--temperature', '0', '--max-new-tokens', '48', '--max-total-tokens', '256', '--no-progress');
    expect(d.code).toBe(0);
    const t = await run('train', '--config', 'configs/tiny.yaml', '--set', `data.train=${JSON.stringify([data])}`, '--set', `run.dir=${tmp}`, '--set', 'run.name=medusa1', '--no-progress');
    expect(t.code).toBe(0);
    runDir = path.join(tmp, 'medusa1');
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  const nonDecreasing = (xs: number[]): void => xs.forEach((x, j) => j > 0 && expect(x).toBeGreaterThanOrEqual(xs[j - 1]));

  test('--json: top-1..10 per head, per-rank sums, trees, live accuracy and speed overheads are consistent', async () => {
    const r = await run('eval', '--run', runDir, '--budgets', '2,8,32', '--speed', '2', '--live', '3', '--new-tokens', '12', '--json');
    expect(r.code).toBe(0);
    const rep = JSON.parse(r.out);
    const K = rep.heads.length;
    for (const [k, h] of rep.heads.entries()) {
      expect(h.topk).toHaveLength(10);
      nonDecreasing(h.topk);
      expect(rep.perRank[k]).toHaveLength(10);
      expect(rep.perRank[k].reduce((a: number, x: number) => a + x, 0)).toBeCloseTo(h.topk[9], 12);
    }
    validateChoices(rep.chosen.choices, { numHeads: K, topk: 10, where: 'chosen tree' });
    const acc = JSON.parse(fs.readFileSync(path.join(runDir, 'eval', 'accuracy.json'), 'utf8'));
    expect(acc.heads).toEqual(rep.heads);
    expect(acc.per_rank).toEqual(rep.perRank);
    // live accuracy: 3 prompts x at most 12 tokens; head k has at most 3 * (12 - k - 1) positions
    const live = rep.live;
    expect(live.prompts).toBe(3);
    expect(live.generatedTokens).toBeGreaterThan(0);
    expect(live.baseAgreement).toBeGreaterThan(0.9);
    for (const [k, h] of live.heads.entries()) {
      expect(h.valid).toBeLessThanOrEqual(3 * (12 - k - 1));
      expect(h.valid).toBeGreaterThan(0);
      expect(h.topk).toHaveLength(10);
      nonDecreasing(h.topk);
      expect(live.perRank[k].reduce((a: number, x: number) => a + x, 0)).toBeCloseTo(h.topk[9], 12);
    }
    // per prompt, head k+1 has the same or one position fewer than head k
    for (let k = 0; k + 1 < K; k++) expect(live.heads[k].valid - live.heads[k + 1].valid).toBeGreaterThanOrEqual(0);
    for (let k = 0; k + 1 < K; k++) expect(live.heads[k].valid - live.heads[k + 1].valid).toBeLessThanOrEqual(3);
    const file = JSON.parse(fs.readFileSync(path.join(runDir, 'eval', 'live-accuracy.json'), 'utf8'));
    expect(file.heads).toEqual(live.heads);
    expect(file.per_rank).toEqual(live.perRank);
    // speed: time per step, overhead = time per step - plain time per token, best = highest speedup
    const sp = rep.speed;
    expect(sp.plainMsPerToken).toBeGreaterThan(0);
    for (const row of sp.rows) {
      expect(row.msPerStep).toBeGreaterThan(0);
      expect(row.overheadMsPerStep).toBeCloseTo(row.msPerStep - sp.plainMsPerToken, 9);
    }
    const top = sp.rows.reduce((a: { speedup: number }, b: { speedup: number }) => (b.speedup > a.speedup ? b : a));
    expect(sp.best).toEqual({ budget: top.budget, nodes: top.nodes, speedup: top.speedup, measuredTokensPerStep: top.measuredTokensPerStep });
    // the text report shows the same figures
    const text = await run('eval', '--run', runDir, '--budgets', '2,8', '--speed', '1', '--live', '1', '--new-tokens', '8');
    expect(text.code).toBe(0);
    expect(text.out).toContain('top-10');
    expect(text.out).toMatch(/ms\/step, overhead [+-][\d.]+ ms over a plain token/);
    expect(text.out).toMatch(/best: budget \d+/);
    expect(text.out).toContain('heads on live greedy decoding');
  });

  test('--prompt-file: live accuracy on its prompts (all lines unless --live limits them); an empty file is refused', async () => {
    const file = path.join(tmp, 'prompts.txt');
    fs.writeFileSync(file, 'Tell me about bees.\n\nWhat is a tree?\nWhy is the sky blue?\n');
    const r = JSON.parse((await run('eval', '--run', runDir, '--budgets', '4', '--prompt-file', file, '--new-tokens', '6', '--json')).out);
    expect(r.live.prompts).toBe(3);
    expect(r.live.source).toContain('prompt file');
    expect(r.speed).toBeNull();
    const two = JSON.parse((await run('eval', '--run', runDir, '--budgets', '4', '--prompt-file', file, '--live', '2', '--new-tokens', '6', '--json')).out);
    expect(two.live.prompts).toBe(2);
    const empty = path.join(tmp, 'empty.txt');
    fs.writeFileSync(empty, '\n\n');
    const e = await run('eval', '--run', runDir, '--budgets', '4', '--prompt-file', empty);
    expect(e.code).toBe(2);
    expect(e.err).toContain('E_USAGE');
    expect(e.err).toContain('prompt file');
  });
});
