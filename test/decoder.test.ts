/**
 * Numerical parity of the TypeScript decoder with the independent PyTorch implementation
 * (scripts/golden_decoder.py -> test/fixtures/decoder), on every supported backend we can load
 * here, plus KV-cache and batching equivalences.
 */
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/backend.js';
import { loadDecoder } from '../src/model/load.js';
import { decoderForward, disposeCache, emptyCache, type Decoder } from '../src/model/decoder.js';
import { generate } from '../src/model/generate.js';
import { argmax } from '../src/model/sampling.js';
import { disposeWeights } from '../src/model/weights.js';
import { DECODER_FIXTURES, VARIANTS, readGolden, maxAbsDiff } from './helpers/golden.js';

const TOL = 1e-4;

/** Greedy decoding by repeated full forwards (no cache): the reference for cached decoding. */
function greedyFull(model: Decoder, prompt: number[], n: number): number[] {
  const seq = [...prompt];
  for (let i = 0; i < n; i++) {
    const { hidden, logits } = decoderForward(model, { ids: seq, batch: 1, seqLen: seq.length, logits: 'last' });
    const data = logits!.dataSync();
    hidden.dispose();
    logits!.dispose();
    seq.push(argmax(data));
  }
  return seq.slice(prompt.length);
}

describe.each(['wasm', 'cpu'] as const)('decoder on %s', (backend) => {
  beforeAll(async () => {
    await initBackend(backend);
  });

  describe.each(VARIANTS)('%s', (variant) => {
    let model: Decoder;
    const g = readGolden(variant);
    beforeAll(() => {
      model = loadDecoder(path.join(DECODER_FIXTURES, variant)).decoder;
    });
    afterAll(() => disposeWeights(model.weights));

    test('padded batch forward: hidden states and logits match PyTorch within 1e-4', () => {
      const [B, T] = g['input_ids'].shape;
      const mask = g['attention_mask'].data as number[];
      const { hidden, logits } = decoderForward(model, { ids: g['input_ids'].data, batch: B, seqLen: T, mask, logits: 'all' });
      const d = model.config.hiddenSize;
      const V = model.config.vocabSize;
      const realH: number[] = [];
      const realL: number[] = [];
      for (let p = 0; p < B * T; p++) {
        if (mask[p] === 0) continue;
        for (let i = 0; i < d; i++) realH.push(p * d + i);
        for (let i = 0; i < V; i++) realL.push(p * V + i);
      }
      expect(realH.length).toBeGreaterThan(0);
      expect(maxAbsDiff(hidden.dataSync(), g['hidden'].data, realH)).toBeLessThan(TOL);
      expect(maxAbsDiff(logits!.dataSync(), g['logits'].data, realL)).toBeLessThan(TOL);
      hidden.dispose();
      logits!.dispose();
    });

    test('unpadded single row matches PyTorch and the padded row', () => {
      const [B, T] = g['input_ids'].shape;
      const ids = (g['input_ids'].data as number[]).slice(T, 2 * T);
      const mask = (g['attention_mask'].data as number[]).slice(T, 2 * T);
      const real = ids.filter((_, i) => mask[i] === 1);
      expect(B).toBe(2);
      const { hidden, logits } = decoderForward(model, { ids: real, batch: 1, seqLen: real.length, logits: 'all' });
      expect(maxAbsDiff(hidden.dataSync(), g['single_hidden'].data)).toBeLessThan(TOL);
      expect(maxAbsDiff(logits!.dataSync(), g['single_logits'].data)).toBeLessThan(TOL);
      hidden.dispose();
      logits!.dispose();
    });

    test('KV-cached decoding: step logits match PyTorch, tokens equal greedy by full forwards', () => {
      const prompt = g['greedy_prompt'].data as number[];
      const expected = g['greedy_ids'].data as number[];
      const stepLogits = g['decode_logits'].data as Float32Array;
      const V = model.config.vocabSize;
      const cache = emptyCache(1);
      const got: number[] = [];
      let input = prompt;
      for (let s = 0; s < expected.length; s++) {
        const { hidden, logits } = decoderForward(model, { ids: input, batch: 1, seqLen: input.length, cache, logits: 'last' });
        const data = logits!.dataSync();
        expect(maxAbsDiff(data, stepLogits.subarray(s * V, (s + 1) * V))).toBeLessThan(TOL);
        hidden.dispose();
        logits!.dispose();
        const tok = argmax(data);
        got.push(tok);
        input = [tok];
      }
      disposeCache(cache);
      expect(got).toEqual(expected);
      expect(greedyFull(model, prompt, expected.length)).toEqual(expected);
      const viaGenerate = generate(model, [prompt], { maxNewTokens: expected.length, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 });
      expect(viaGenerate.tokens[0]).toEqual(expected);
    });

    test('batched generation with left padding gives the same tokens as one prompt at a time', () => {
      const prompts = [[5, 9, 17, 33, 40, 41, 7], [12], [60, 61, 62, 3]];
      const opts = { maxNewTokens: 9, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 };
      const batched = generate(model, prompts, opts).tokens;
      const single = prompts.map((p) => generate(model, [p], opts).tokens[0]);
      expect(batched).toEqual(single);
      expect(single[1]).toEqual(greedyFull(model, [12], 9));
    });
  });

  test('no tensors leak across forward and generate', () => {
    const model = loadDecoder(path.join(DECODER_FIXTURES, 'qwen3-qknorm')).decoder;
    const before = tf.memory().numTensors;
    generate(model, [[4, 5, 6], [7]], { maxNewTokens: 5, temperature: 0.7, topP: 0.9, topK: 20, seed: 1, eosIds: [2], padId: 0 });
    expect(tf.memory().numTensors).toBe(before);
    disposeWeights(model.weights);
  });
});

describe('per-row generation settings', () => {
  test('each row keeps its own max_new_tokens and sampling; rows match their single runs', async () => {
    await initBackend('wasm');
    const model = loadDecoder(path.join(DECODER_FIXTURES, 'llama-gqa')).decoder;
    const base = { maxNewTokens: 8, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 };
    const prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]];
    const perRow = [{ maxNewTokens: 3 }, { temperature: 0.9, topK: 5 }, {}];
    const seeds = [11, 22, 33];
    const batched = generate(model, prompts, { ...base, perRow, seeds });
    expect(batched.tokens.map((t) => t.length)).toEqual([3, 8, 8]);
    const single = prompts.map((p, i) => generate(model, [p], { ...base, perRow: [perRow[i]], seeds: [seeds[i]] }).tokens[0]);
    expect(batched.tokens).toEqual(single);
    disposeWeights(model.weights);
  });

  test('the context limit is per row: a short prompt may use the whole context beside a longer one (left padding takes no positions)', async () => {
    await initBackend('wasm');
    const model = loadDecoder(path.join(DECODER_FIXTURES, 'llama-gqa')).decoder;
    const ctx = model.config.maxPositionEmbeddings;
    const base = { maxNewTokens: 1, temperature: 0, topP: 1, topK: 0, seed: 0, eosIds: [], padId: 0 };
    const prompts = [[5, 6], [8, 9, 10, 11]];
    const perRow = prompts.map((p) => ({ maxNewTokens: ctx - p.length })); // each row exactly fills the context
    const batched = generate(model, prompts, { ...base, perRow });
    expect(batched.tokens.map((t) => t.length)).toEqual([ctx - 2, ctx - 4]);
    expect(batched.tokens).toEqual(prompts.map((p, i) => generate(model, [p], { ...base, perRow: [perRow[i]] }).tokens[0]));
    // one token more than the context is refused, naming that row's figures
    expect(() => generate(model, prompts, { ...base, perRow: [{ maxNewTokens: ctx - 2 }, { maxNewTokens: ctx - 3 }] })).toThrow(`prompt (4 tokens) + max_new_tokens (${ctx - 3})`);
    disposeWeights(model.weights);
  });
});
