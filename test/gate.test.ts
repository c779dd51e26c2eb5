/**
 * The base-quality gate (src/train/gate.ts): figures against an independent host computation (on small
 * logits, and on a tiny model's full logits with the positions picked here), identical backbones give
 * KL 0 / agreement 1 / ratio 1, the gate fires on a damaged backbone (noise in one layer's weights) and
 * passes on a gently tuned one, and the verdict names every crossed threshold.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { padBatch, type PaddedBatch, type TrainExample } from '../src/data/batches.js';
import { tfjsBackbone } from '../src/engines/decoder-engine.js';
import { decoderForward, type Decoder, type ForwardHook } from '../src/model/decoder.js';
import { loadDecoder } from '../src/model/load.js';
import { Rng } from '../src/model/sampling.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { disposeWeights, type DecoderWeights } from '../src/model/weights.js';
import { gateMetrics, gateMetricsFromLogits, gateMetricsSync, gateVerdict, runGate, type GateMetrics } from '../src/train/gate.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-gate-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** The textbook formulas, written out independently of gate.ts. */
function naive(lo: number[][], lt: number[][], targets: number[]): GateMetrics {
  const softmax = (x: number[]) => {
    const e = x.map((v) => Math.exp(v));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  };
  const firstArgmax = (x: number[]) => x.indexOf(Math.max(...x));
  let kl = 0;
  let agree = 0;
  let nllO = 0;
  let nllT = 0;
  lo.forEach((row, i) => {
    const p = softmax(row);
    const q = softmax(lt[i]);
    kl += p.reduce((a, pv, v) => a + pv * Math.log(pv / q[v]), 0);
    if (firstArgmax(row) === firstArgmax(lt[i])) agree++;
    nllO -= Math.log(p[targets[i]]);
    nllT -= Math.log(q[targets[i]]);
  });
  const n = lo.length;
  return { positions: n, meanKl: kl / n, agreement: agree / n, pplOriginal: Math.exp(nllO / n), pplTuned: Math.exp(nllT / n), pplRatio: Math.exp(nllT / n) / Math.exp(nllO / n) };
}

function expectClose(got: GateMetrics, want: GateMetrics, rel: number): void {
  expect(got.positions).toBe(want.positions);
  expect(got.agreement).toBe(want.agreement);
  for (const k of ['meanKl', 'pplOriginal', 'pplTuned', 'pplRatio'] as const) {
    expect([k, Math.abs(got[k] - want[k]) <= rel * Math.max(1e-12, Math.abs(want[k]))]).toEqual([k, true]);
  }
}

test('figures from small logits equal the textbook formulas (ties: first maximum)', () => {
  const lo = [
    [1, 2, 3, 0.5],
    [0, 0, 0, 0],
    [-2, 4, 4, 1],
    [10, -10, 0, 3],
  ];
  const lt = [
    [1.1, 2.2, 2.9, 0.4],
    [-0.1, 0.3, 0, 0.2],
    [-2, 4, 3.9, 1],
    [-1, 5, 0, 3],
  ];
  const targets = [2, 1, 2, 0];
  const got = gateMetricsFromLogits(Float32Array.from(lo.flat()), Float32Array.from(lt.flat()), Int32Array.from(targets), 4);
  const f32 = (m: number[][]) => m.map((r) => r.map(Math.fround)); // the values gate.ts sees
  const want = naive(f32(lo), f32(lt), targets);
  expectClose(got, want, 1e-12);
  expect(want.agreement).toBe(0.5); // rows 0 and 2 agree (row 2: index 1 is the first maximum of both), rows 1 and 3 do not
  const same = gateMetricsFromLogits(Float32Array.from(lo.flat()), Float32Array.from(lo.flat()), Int32Array.from(targets), 4);
  expect([same.meanKl, same.agreement, same.pplRatio]).toEqual([0, 1, 1]);
});

describe('on a tiny model', () => {
  let decoder: Decoder;
  let batches: PaddedBatch[];
  let examples: TrainExample[];
  beforeAll(async () => {
    await initBackend('cpu');
    const dir = path.join(tmp, 'model');
    writeTinyModel(dir, { architecture: 'LlamaForCausalLM', tieWordEmbeddings: false, initStd: 0.3, seed: 7 });
    decoder = loadDecoder(dir).decoder;
    const rng = new Rng(3);
    const V = decoder.config.vocabSize;
    examples = [9, 14, 6, 11, 12].map((len, e) => {
      const prompt = 2 + (e % 3);
      return {
        key: `0:${e}`,
        inputIds: Int32Array.from({ length: len }, () => Math.floor(rng.next() * V)),
        lossMask: Uint8Array.from({ length: len }, (_, j) => (j >= prompt && j !== len - 3 ? 1 : 0)),
      };
    });
    batches = [padBatch(examples, [0, 1, 2], 0), padBatch(examples, [3, 4], 0)];
  });
  afterAll(() => disposeWeights(decoder.weights));

  /** Weights with Gaussian noise of `std` added to layer `layer`'s q/k/v and MLP matrices (the tuned model). */
  function perturbed(std: number, layer: number, seed: number): DecoderWeights {
    const w = decoder.weights;
    const rng = new Rng(seed);
    const noisy = (t: tf.Tensor2D): tf.Tensor2D => {
      const d = Float32Array.from(t.dataSync() as Float32Array, (x) => x + std * Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next()));
      return tf.tensor2d(d, t.shape);
    };
    const layers = w.layers.map((l, i) => (i === layer ? { ...l, wqkv: noisy(l.wqkv), wgu: noisy(l.wgu) } : l));
    return { ...w, layers };
  }

  /** The figures computed here: full logits of both models, positions picked by this loop. */
  function independent(tuned: ForwardHook): GateMetrics {
    const lo: number[][] = [];
    const lt: number[][] = [];
    const targets: number[] = [];
    const V = decoder.config.vocabSize;
    for (const b of batches) {
      const full = (hook?: ForwardHook) => {
        const r = decoderForward(decoder, { ids: b.ids, batch: b.B, seqLen: b.T, mask: b.attention, logits: 'all', hook });
        const data = Array.from(r.logits!.dataSync());
        r.hidden.dispose();
        r.logits!.dispose();
        return data;
      };
      const o = full();
      const t = full(tuned);
      for (let row = 0; row < b.B; row++) {
        for (let j = 1; j < b.lengths[row]; j++) {
          if (b.lossMask[row * b.T + j] !== 1) continue;
          const at = (row * b.T + j - 1) * V;
          lo.push(o.slice(at, at + V));
          lt.push(t.slice(at, at + V));
          targets.push(b.ids[row * b.T + j]);
        }
      }
    }
    return naive(lo, lt, targets);
  }

  const thresholds = { maxKl: 0.05, minAgreement: 0.9, maxPplRatio: 1.1, action: 'fail' as const };

  test('identical backbones: KL 0, agreement 1, ratio 1; a Backbone (tfjs engine) gives the same figures', async () => {
    const m = gateMetricsSync(decoder, decoder, batches, { maxPositions: 4096 });
    const expectedPositions = examples.reduce((a, e) => a + Array.from(e.lossMask).slice(1).filter((x) => x === 1).length, 0);
    expect(m.positions).toBe(expectedPositions);
    expect([m.meanKl, m.agreement, m.pplRatio]).toEqual([0, 1, 1]);
    expect(m.pplOriginal).toBeGreaterThan(1);
    const viaEngine = await gateMetrics(tfjsBackbone(decoder), decoder, batches, { maxPositions: 4096 });
    expect(viaEngine.positions).toBe(m.positions);
    expect(viaEngine.agreement).toBe(1);
    expect(viaEngine.meanKl).toBeLessThan(1e-9);
    expect(Math.abs(viaEngine.pplRatio - 1)).toBeLessThan(1e-5);
    expect(gateVerdict(m, thresholds)).toEqual({ status: 'pass', crossed: [], message: expect.stringMatching(/^passed: KL 0\.0000 nats, agreement 100\.0%/) });
  });

  test('max_positions takes the first positions in batch order', () => {
    const m = gateMetricsSync(decoder, decoder, batches, { maxPositions: 10 });
    expect(m.positions).toBe(10);
  });

  test('the gate fires on a damaged backbone, naming the crossed thresholds; figures match the independent computation', () => {
    const weights = perturbed(1.0, 0, 11);
    const hook: ForwardHook = { weights };
    const m = gateMetricsSync(decoder, { decoder, hook }, batches, { maxPositions: 4096 });
    expectClose(m, independent(hook), 1e-5);
    const v = gateVerdict(m, thresholds);
    expect(v.status).toBe('fail');
    expect(v.crossed.map((c) => c.key)).toEqual(expect.arrayContaining(['max_kl', 'min_agreement']));
    expect(v.message).toMatch(/mean KL [\d.]+ nats > medusa2\.gate\.max_kl 0\.05/);
    expect(v.message).toMatch(/greedy agreement [\d.]+ < medusa2\.gate\.min_agreement 0\.9/);
    expect(gateVerdict(m, { ...thresholds, action: 'warn' }).status).toBe('warn');
    weights.layers[0].wqkv.dispose();
    weights.layers[0].wgu.dispose();
  });

  test('the gate passes on a gently tuned backbone; figures match the independent computation', () => {
    const weights = perturbed(1e-3, 1, 12);
    const hook: ForwardHook = { weights };
    const m = gateMetricsSync(decoder, { decoder, hook: () => hook }, batches, { maxPositions: 4096 });
    expectClose(m, independent(hook), 1e-3); // tiny KL: relative error of float32 logits differences
    expect(m.meanKl).toBeGreaterThan(0);
    expect(m.meanKl).toBeLessThan(1e-3);
    expect(gateVerdict(m, thresholds).status).toBe('pass');
    weights.layers[1].wqkv.dispose();
    weights.layers[1].wgu.dispose();
  });

  test('runGate: examples padded in order, the tuned backbone given by its hook(null), config-shaped thresholds', () => {
    const weights = perturbed(1.0, 0, 11);
    let seeds: (number | null)[] = [];
    const tuned = { hook: (s: number | null): ForwardHook => (seeds.push(s), { weights }) };
    const r = runGate({ original: decoder, tuned, examples, padId: 0, batchSize: 3, thresholds: { action: 'warn', max_kl: 0.05, min_agreement: 0.9, max_ppl_ratio: 1.1, max_positions: 4096 } });
    expect(seeds.every((s) => s === null)).toBe(true);
    expect(seeds.length).toBeGreaterThan(0);
    const direct = gateMetricsSync(decoder, { decoder, hook: { weights } }, batches, { maxPositions: 4096 });
    expect(r.meanKl).toBe(direct.meanKl);
    expect([r.status, r.passed]).toEqual(['warn', false]);
    expect(r.failures[0]).toMatch(/^mean KL .* > medusa2\.gate\.max_kl 0\.05$/);
    seeds = [];
    const same = runGate({ original: decoder, tuned: decoder, examples, padId: 0, batchSize: 2, thresholds: { action: 'fail', max_kl: 0.05, min_agreement: 0.9, max_ppl_ratio: 1.1, max_positions: 4096 } });
    expect([same.status, same.passed, same.failures, same.meanKl]).toEqual(['pass', true, [], 0]);
    weights.layers[0].wqkv.dispose();
    weights.layers[0].wgu.dispose();
  });
});

test('verdict: NaN figures never pass; each threshold named with its config key', () => {
  const m: GateMetrics = { positions: 3, meanKl: NaN, agreement: 0.95, pplOriginal: 2, pplTuned: 2.4, pplRatio: 1.2 };
  const v = gateVerdict(m, { maxKl: 0.05, minAgreement: 0.9, maxPplRatio: 1.1, action: 'fail' });
  expect(v.status).toBe('fail');
  expect(v.crossed).toEqual([
    { key: 'max_kl', value: NaN, limit: 0.05 },
    { key: 'max_ppl_ratio', value: 1.2, limit: 1.1 },
  ]);
  expect(v.message).toMatch(/perplexity ratio 1\.2000 > medusa2\.gate\.max_ppl_ratio 1\.1/);
});
