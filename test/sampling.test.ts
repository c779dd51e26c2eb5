import { Rng, argmax, samplingCandidates, selectToken, streamSeed } from '../src/model/sampling.js';

describe('sampling', () => {
  const logits = Float32Array.from([1.0, 3.0, 2.0, 3.0, -1.0]);

  test('argmax takes the first maximum, like torch.argmax', () => {
    expect(argmax(logits)).toBe(1);
    expect(selectToken(logits, 0, 5, { temperature: 0, topP: 1, topK: 0 }, new Rng(1))).toBe(1);
  });

  test('the same seed gives the same stream; different streams differ', () => {
    const a = new Rng(streamSeed(7, 0));
    const b = new Rng(streamSeed(7, 0));
    const c = new Rng(streamSeed(7, 1));
    const xa = Array.from({ length: 5 }, () => a.next());
    expect(Array.from({ length: 5 }, () => b.next())).toEqual(xa);
    expect(Array.from({ length: 5 }, () => c.next())).not.toEqual(xa);
    for (const x of xa) expect(x >= 0 && x < 1).toBe(true);
  });

  test('sampling frequencies follow softmax(logits / T)', () => {
    const T = 0.7;
    const rng = new Rng(123);
    const n = 40000;
    const counts = new Array(5).fill(0);
    for (let i = 0; i < n; i++) counts[selectToken(logits, 0, 5, { temperature: T, topP: 1, topK: 0 }, rng)]++;
    const e = Array.from(logits, (l) => Math.exp(l / T));
    const z = e.reduce((a, b) => a + b, 0);
    for (let i = 0; i < 5; i++) {
      const p = e[i] / z;
      const sd = Math.sqrt((p * (1 - p)) / n);
      expect(Math.abs(counts[i] / n - p)).toBeLessThan(5 * sd + 1e-4);
    }
  });

  test('top-k keeps exactly the k most likely tokens', () => {
    const rng = new Rng(5);
    const seen = new Set<number>();
    for (let i = 0; i < 2000; i++) seen.add(selectToken(logits, 0, 5, { temperature: 1, topP: 1, topK: 2 }, rng));
    expect([...seen].sort()).toEqual([1, 3]);
  });

  test('top-p keeps the smallest set whose mass reaches p', () => {
    // probabilities at T=1: token 1 and 3 each ~0.387, token 2 ~0.142, token 0 ~0.052, token 4 ~0.007
    const rng = new Rng(9);
    const seen = new Set<number>();
    for (let i = 0; i < 3000; i++) seen.add(selectToken(logits, 0, 5, { temperature: 1, topP: 0.8, topK: 0 }, rng));
    expect([...seen].sort()).toEqual([1, 2, 3]);
    const only = new Set<number>();
    for (let i = 0; i < 500; i++) only.add(selectToken(logits, 0, 5, { temperature: 1, topP: 0.01, topK: 0 }, rng));
    expect([...only]).toEqual([1]);
  });

  test('reads the row at the given offset', () => {
    const two = Float32Array.from([0, 9, 0, 5, 0, 0]);
    expect(selectToken(two, 3, 3, { temperature: 0, topP: 1, topK: 0 }, new Rng(0))).toBe(0);
  });
});

describe('sampling candidates equal a brute-force reference', () => {
  /** Full sort of the vocabulary, as transformers' warpers do. */
  function reference(logits: Float32Array, p: { temperature: number; topP: number; topK: number }): Set<number> {
    const V = logits.length;
    const idx = Array.from({ length: V }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
    let keep = p.topK > 0 ? Math.min(p.topK, V) : V;
    const pr = idx.slice(0, keep).map((i) => Math.exp((logits[i] - logits[idx[0]]) / p.temperature));
    const z = pr.reduce((a, b) => a + b, 0);
    if (p.topP < 1) {
      let cum = 0;
      let k = 0;
      while (k < keep) {
        cum += pr[k] / z;
        k++;
        if (cum >= p.topP) break;
      }
      keep = k;
    }
    return new Set(idx.slice(0, keep));
  }

  test.each([
    { temperature: 1, topP: 1, topK: 50 },
    { temperature: 0.7, topP: 0.9, topK: 0 },
    { temperature: 0.3, topP: 0.5, topK: 100 },
    { temperature: 2, topP: 0.99, topK: 0 },
  ])('%o', (p) => {
    const rng = new Rng(3);
    for (let trial = 0; trial < 5; trial++) {
      const V = 5000;
      const logits = new Float32Array(V);
      for (let i = 0; i < V; i++) logits[i] = Math.round((rng.next() * 12 - 6) * 4) / 4; // many ties
      const got = samplingCandidates(logits, 0, V, p);
      expect(new Set(got.ids)).toEqual(reference(logits, p));
      expect(got.ids.length).toBe(new Set(got.ids).size);
    }
  });
});
