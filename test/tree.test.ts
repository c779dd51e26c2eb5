import { describe, expect, test } from '@jest/globals';
import { MedusaError } from '../src/errors.js';
import {
  budgetCurve,
  searchTree,
  sortChoices,
  TREE_LIMITS,
  treeBuffers,
  validateChoices,
  type AccuracyTable,
  type MedusaChoices,
} from '../src/eval/tree.js';
import { greedyAccept, typicalAccept, typicalThreshold, TYPICAL_DEFAULTS } from '../src/eval/acceptance.js';

/** FasterDecoding/Medusa medusa/model/medusa_choices.py, copied as data. */
const mc_sim_7b_63: MedusaChoices = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]];

/**
 * A line-by-line transcription of the reference's generate_medusa_buffers (list.index lookups,
 * depth_counts, pad with -2 then +1), used only to cross-check treeBuffers.
 */
function referenceBuffers(choices: MedusaChoices, TOPK: number) {
  const eq = (a: number[], b: number[]) => a.length === b.length && a.every((x, i) => x === b[i]);
  const sorted = [...choices].sort((a, b) => {
    if (a.length !== b.length) return a.length - b.length;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] - b[i];
    return 0;
  });
  const indexOf = (p: number[]) => {
    const i = sorted.findIndex((q) => eq(q, p));
    if (i < 0) throw new Error('ValueError');
    return i;
  };
  const len = sorted.length + 1;
  const depthCounts: number[] = [];
  let prev = 0;
  for (const p of sorted) {
    if (p.length !== prev) depthCounts.push(0);
    depthCounts[p.length - 1] += 1;
    prev = p.length;
  }
  const mask: number[][] = Array.from({ length: len }, (_, i) => Array.from({ length: len }, (_, j) => (i === j || j === 0 ? 1 : 0)));
  let start = 0;
  for (let i = 0; i < depthCounts.length; i++) {
    for (let j = 0; j < depthCounts[i]; j++) {
      const cur = sorted[start + j];
      if (cur.length === 1) continue;
      for (let c = 0; c < cur.length - 1; c++) mask[j + start + 1][indexOf(cur.slice(0, c + 1)) + 1] = 1;
    }
    start += depthCounts[i];
  }
  const tree = new Array(len).fill(0);
  start = 0;
  for (let i = 0; i < depthCounts.length; i++) {
    for (let j = 0; j < depthCounts[i]; j++) tree[start + j + 1] = sorted[start + j][sorted[start + j].length - 1] + TOPK * i + 1;
    start += depthCounts[i];
  }
  const pos = new Array(len).fill(0);
  start = 0;
  for (let i = 0; i < depthCounts.length; i++) {
    for (let k = start + 1; k < start + depthCounts[i] + 1; k++) pos[k] = i + 1;
    start += depthCounts[i];
  }
  const nest: number[][] = [];
  const paths: number[][] = [];
  for (let i = 0; i < sorted.length; i++) {
    const cur = sorted[sorted.length - 1 - i];
    if (paths.some((q) => eq(q, cur))) continue;
    const r: number[] = [];
    for (let c = 0; c < cur.length; c++) {
      r.push(indexOf(cur.slice(0, c + 1)));
      paths.push(cur.slice(0, c + 1));
    }
    nest.push(r);
  }
  const maxLength = Math.max(...nest.map((x) => x.length));
  const retrieve = nest.map((p) => [0, ...[...p, ...new Array(maxLength - p.length).fill(-2)].map((x) => x + 1)]);
  return { mask, tree, pos, retrieve };
}

function rows(a: ArrayLike<number>, width: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < a.length; i += width) out.push(Array.from(a).slice(i, i + width));
  return out;
}

function expectConfigError(fn: () => void, ...parts: string[]): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(MedusaError);
  expect((err as MedusaError).code).toBe('E_CONFIG');
  for (const p of parts) expect((err as MedusaError).message).toContain(p);
}

describe('validateChoices', () => {
  const o = { numHeads: 3, topk: 4, where: 'configs/tree.json' };
  test('accepts a well-formed tree in any order', () => {
    expect(() => validateChoices([[0, 0], [1], [0], [0, 0, 3]], o)).not.toThrow();
    expect(() => validateChoices(mc_sim_7b_63, { numHeads: 4, topk: 10, where: 'mc_sim_7b_63' })).not.toThrow();
  });
  test('tree deeper than the number of heads', () => {
    expectConfigError(() => validateChoices([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], o), 'configs/tree.json', '[0,0,0,0]', 'tree deeper than the number of heads');
  });
  test('rank >= topk', () => {
    expectConfigError(() => validateChoices([[0], [0, 4]], o), '[0,4]', 'rank 4', 'topk');
  });
  test('parent path missing', () => {
    expectConfigError(() => validateChoices([[0], [1, 0]], o), '[1,0]', 'parent path [1] is missing');
  });
  test('duplicate path', () => {
    expectConfigError(() => validateChoices([[0], [1], [0]], o), '[0] (index 2)', 'duplicate', 'index 0');
  });
  test('empty path', () => {
    expectConfigError(() => validateChoices([[0], []], o), '[] (index 1)', 'empty');
  });
  test('empty tree', () => {
    expectConfigError(() => validateChoices([], o), 'empty');
  });
  test('non-integer, negative and non-number ranks', () => {
    expectConfigError(() => validateChoices([[0], [0.5]], o), '[0.5]', 'non-negative integers');
    expectConfigError(() => validateChoices([[-1]], o), '[-1]', 'non-negative integers');
    expectConfigError(() => validateChoices([[0], ['1' as unknown as number]], o), 'non-negative integers');
    expectConfigError(() => validateChoices([[0], [NaN]], o), 'non-negative integers');
  });
  test('over the limits', () => {
    const many: MedusaChoices = Array.from({ length: TREE_LIMITS.maxNodes + 1 }, (_, i) => [i]);
    expectConfigError(() => validateChoices(many, { numHeads: 1, topk: TREE_LIMITS.maxRank, where: 'w' }), 'over the limit', `${TREE_LIMITS.maxNodes}`);
    expectConfigError(() => validateChoices([[0]], { numHeads: TREE_LIMITS.maxDepth + 1, topk: 4, where: 'w' }), 'numHeads');
    expectConfigError(() => validateChoices([[0]], { numHeads: 2, topk: TREE_LIMITS.maxRank + 1, where: 'w' }), 'topk');
    const deep = Array.from({ length: TREE_LIMITS.maxDepth + 1 }, (_, d) => new Array(d + 1).fill(0));
    expectConfigError(() => treeBuffers(deep, 4), 'over the limit of 16');
  });
  test('treeBuffers validates too', () => {
    expectConfigError(() => treeBuffers([[0], [2, 0]], 4), 'parent path [2] is missing');
    expectConfigError(() => treeBuffers([[0], [0, 4]], 4), 'rank >= topk');
  });
});

describe('treeBuffers', () => {
  // Sorted (by depth, then lexicographic): node 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0].
  const small: MedusaChoices = [[0, 0, 0], [1, 0], [0], [0, 1], [1], [0, 0]];
  test('hand-checked small tree (topk 4)', () => {
    const b = treeBuffers(small, 4);
    expect(b.nodes).toBe(7);
    expect(b.maxDepth).toBe(3);
    expect(b.numPaths).toBe(3);
    expect(rows(b.attentionMask, 7)).toEqual([
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0],
      [1, 1, 0, 0, 1, 0, 0],
      [1, 0, 1, 0, 0, 1, 0],
      [1, 1, 0, 1, 0, 0, 1],
    ]);
    expect(Array.from(b.positionOffsets)).toEqual([0, 1, 1, 2, 2, 2, 3]);
    // root 0; depth 1 rank r -> 1 + r; depth 2 -> 5 + r; depth 3 -> 9 + r
    expect(Array.from(b.treeIndices)).toEqual([0, 1, 2, 5, 6, 5, 9]);
    // leaves in reverse sorted order: [0,0,0], [1,0], [0,1]
    expect(rows(b.retrieveIndices, 4)).toEqual([
      [0, 1, 3, 6],
      [0, 2, 5, -1],
      [0, 1, 4, -1],
    ]);
  });
  test('matches a transcription of the reference on the small tree and mc_sim_7b_63', () => {
    for (const [choices, topk] of [[small, 4], [small, 10], [mc_sim_7b_63, 10]] as const) {
      const b = treeBuffers(choices as MedusaChoices, topk);
      const r = referenceBuffers(choices as MedusaChoices, topk);
      expect(rows(b.attentionMask, b.nodes)).toEqual(r.mask);
      expect(Array.from(b.treeIndices)).toEqual(r.tree);
      expect(Array.from(b.positionOffsets)).toEqual(r.pos);
      expect(rows(b.retrieveIndices, b.maxDepth + 1)).toEqual(r.retrieve);
    }
  });
  test('mc_sim_7b_63: 64 nodes, depth 4, tree attention = ancestors and self, positions = depth', () => {
    const b = treeBuffers(mc_sim_7b_63, 10);
    expect(b.nodes).toBe(64);
    expect(b.maxDepth).toBe(4);
    const sorted = sortChoices(mc_sim_7b_63);
    const paths = [[], ...sorted];
    const isPrefix = (a: number[], c: number[]) => a.length <= c.length && a.every((x, i) => x === c[i]);
    for (let i = 0; i < 64; i++) {
      expect(b.positionOffsets[i]).toBe(paths[i].length);
      let count = 0;
      for (let j = 0; j < 64; j++) {
        const m = b.attentionMask[i * 64 + j];
        expect(m).toBe(isPrefix(paths[j], paths[i]) ? 1 : 0);
        count += m;
      }
      expect(count).toBe(paths[i].length + 1);
      if (i > 0) expect(b.treeIndices[i]).toBe(1 + (paths[i].length - 1) * 10 + paths[i][paths[i].length - 1]);
    }
    // every retrieve row is a root-to-leaf chain; every leaf appears exactly once
    const isLeaf = (p: number[]) => !sorted.some((q) => q.length === p.length + 1 && isPrefix(p, q));
    const leaves = sorted.filter(isLeaf);
    expect(b.numPaths).toBe(leaves.length);
    const seenLeaves = new Set<number>();
    for (const row of rows(b.retrieveIndices, b.maxDepth + 1)) {
      const ids = row.filter((x) => x >= 0);
      expect(row.slice(ids.length).every((x) => x === -1)).toBe(true);
      expect(ids[0]).toBe(0);
      ids.forEach((id, d) => expect(paths[id].length).toBe(d));
      for (let d = 1; d < ids.length; d++) expect(isPrefix(paths[ids[d - 1]], paths[ids[d]])).toBe(true);
      expect(isLeaf(paths[ids[ids.length - 1]])).toBe(true);
      seenLeaves.add(ids[ids.length - 1]);
    }
    expect(seenLeaves.size).toBe(leaves.length);
  });
  test('does not mutate its input', () => {
    const copy = JSON.parse(JSON.stringify(small));
    treeBuffers(small, 4);
    expect(small).toEqual(copy);
  });
});

/** Eager search: scan every possible child of the current tree each step; same tie order. */
function bruteSearch(acc: number[][], budget: number, numHeads: number, topk: number) {
  const value = (p: number[]) => p.reduce((v, r, d) => v * acc[d][r], 1);
  const better = (a: number[], va: number, b: number[], vb: number) => {
    if (va !== vb) return va > vb;
    if (a.length !== b.length) return a.length < b.length;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i];
    return false;
  };
  const tree: number[][] = [];
  const has = new Set<string>();
  while (tree.length < budget) {
    let best: number[] | null = null;
    let bv = -1;
    for (const parent of [[], ...tree]) {
      if (parent.length >= numHeads) continue;
      for (let r = 0; r < topk; r++) {
        const c = [...parent, r];
        if (has.has(c.join(','))) continue;
        const v = value(c);
        if (best === null || better(c, v, best, bv)) {
          best = c;
          bv = v;
        }
      }
    }
    if (best === null || !(bv > 0)) break;
    tree.push(best);
    has.add(best.join(','));
  }
  return tree;
}

function lcg(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

describe('searchTree', () => {
  const t: AccuracyTable = {
    acc: [
      [0.6, 0.2, 0.1],
      [0.4, 0.15, 0.05],
      [0.3, 0.1, 0.05],
    ],
  };
  test('picks nodes in order of path product', () => {
    const r = searchTree(t, { budget: 8, numHeads: 3, topk: 3 });
    // 0.6, 0.24, 0.2, 0.1, 0.09, 0.08, 0.072, 0.04
    expect(r.choices).toEqual([[0], [0, 0], [1], [2], [0, 1], [1, 0], [0, 0, 0], [2, 0]]);
    const expected = 0.6 + 0.6 * 0.4 + 0.2 + 0.1 + 0.6 * 0.15 + 0.2 * 0.4 + 0.6 * 0.4 * 0.3 + 0.1 * 0.4;
    expect(r.expectedAcceptLength).toBeCloseTo(expected, 12);
    expect(r.expectedTokensPerStep).toBeCloseTo(1 + expected, 12);
    expect(() => validateChoices(r.choices, { numHeads: 3, topk: 3, where: 'search' })).not.toThrow();
  });
  test('expected length = sum of path products; parents always present; matches an eager search', () => {
    const rand = lcg(7);
    for (let trial = 0; trial < 30; trial++) {
      const numHeads = 1 + Math.floor(rand() * 4);
      const topk = 1 + Math.floor(rand() * 6);
      const acc = Array.from({ length: numHeads }, () => Array.from({ length: topk }, () => (rand() < 0.2 ? 0.25 : Math.round(rand() * 100) / 100)));
      const budget = 1 + Math.floor(rand() * 40);
      const r = searchTree({ acc }, { budget, numHeads, topk });
      expect(r.choices).toEqual(bruteSearch(acc, budget, numHeads, topk));
      expect(r.choices.length).toBeLessThanOrEqual(budget);
      const have = new Set<string>();
      let sum = 0;
      for (const p of r.choices) {
        if (p.length > 1) expect(have.has(p.slice(0, -1).join(','))).toBe(true);
        have.add(p.join(','));
        let v = 1;
        p.forEach((rank, d) => (v *= acc[d][rank]));
        sum += v;
      }
      expect(r.expectedAcceptLength).toBeCloseTo(sum, 10);
      if (r.choices.length > 0) treeBuffers(r.choices, topk);
    }
  });
  test('stops at the full tree and skips zero-probability nodes', () => {
    expect(searchTree({ acc: [[0.5, 0.5]] }, { budget: 10, numHeads: 1, topk: 2 }).choices).toEqual([[0], [1]]);
    expect(searchTree({ acc: [[0.5, 0], [0, 0]] }, { budget: 10, numHeads: 2, topk: 2 }).choices).toEqual([[0]]);
  });
  test('rejects bad tables and budgets', () => {
    expectConfigError(() => searchTree({ acc: [[0.5]] }, { budget: 4, numHeads: 2, topk: 1 }), 'numHeads is 2');
    expectConfigError(() => searchTree({ acc: [[0.5]] }, { budget: 4, numHeads: 1, topk: 2 }), 'topk is 2');
    expectConfigError(() => searchTree({ acc: [[1.5]] }, { budget: 4, numHeads: 1, topk: 1 }), 'acc[0][0]');
    expectConfigError(() => searchTree({ acc: [[0.5]] }, { budget: 0, numHeads: 1, topk: 1 }), 'budget');
    expectConfigError(() => searchTree({ acc: [[0.5]] }, { budget: TREE_LIMITS.maxNodes + 1, numHeads: 1, topk: 1 }), 'budget');
  });
});

describe('budgetCurve', () => {
  test('monotone in the budget and consistent with searchTree', () => {
    const acc = [
      [0.56, 0.12, 0.05, 0.03, 0.02],
      [0.32, 0.1, 0.06, 0.04, 0.03],
      [0.2, 0.08, 0.05, 0.03, 0.02],
      [0.15, 0.06, 0.04, 0.03, 0.02],
    ];
    const budgets = [1, 4, 8, 16, 32, 63, 128];
    const curve = budgetCurve({ acc }, { budgets, numHeads: 4, topk: 5 });
    expect(curve.map((c) => c.budget)).toEqual(budgets);
    for (let i = 1; i < curve.length; i++) expect(curve[i].expectedTokensPerStep).toBeGreaterThanOrEqual(curve[i - 1].expectedTokensPerStep);
    for (const c of curve) {
      const s = searchTree({ acc }, { budget: c.budget, numHeads: 4, topk: 5 });
      expect(c.choices).toEqual(s.choices);
      expect(c.expectedTokensPerStep).toBeCloseTo(s.expectedTokensPerStep, 12);
    }
    expect(curve[0].expectedTokensPerStep).toBeCloseTo(1.56, 12);
  });
});

describe('greedyAccept', () => {
  // three paths of width 4 (root + depth 3); -1 padding
  const candidates = Int32Array.from([
    5, 10, 11, 12,
    5, 10, 13, -1,
    5, 20, 21, -1,
  ]);
  test('nothing accepted -> path 0, length 0', () => {
    const argmax = Int32Array.from([9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
    expect(greedyAccept(candidates, argmax, 3, 4)).toEqual({ bestPath: 0, acceptLength: 0 });
  });
  test('everything accepted -> full depth', () => {
    const argmax = Int32Array.from([10, 11, 12, 7, 10, 13, 0, 0, 20, 21, 0, 0]);
    expect(greedyAccept(candidates, argmax, 3, 4)).toEqual({ bestPath: 0, acceptLength: 3 });
  });
  test('middle case: the second path goes further', () => {
    // path 0: 10 ok, 11 != 99 -> 1; path 1: 10 ok, 13 ok -> 2; path 2: 20 != 10 -> 0
    const argmax = Int32Array.from([10, 99, 0, 0, 10, 13, 0, 0, 10, 0, 0, 0]);
    expect(greedyAccept(candidates, argmax, 3, 4)).toEqual({ bestPath: 1, acceptLength: 2 });
  });
  test('a mismatch stops the run even if later tokens match', () => {
    const argmax = Int32Array.from([99, 11, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    expect(greedyAccept(candidates, argmax, 3, 4)).toEqual({ bestPath: 0, acceptLength: 0 });
  });
  test('ties -> first path', () => {
    const argmax = Int32Array.from([10, 99, 0, 0, 10, 99, 0, 0, 20, 21, 0, 0]);
    // path 0: 1, path 1: 1, path 2: 2
    expect(greedyAccept(candidates, argmax, 3, 4)).toEqual({ bestPath: 2, acceptLength: 2 });
    const tie = Int32Array.from([10, 11, 0, 0, 10, 13, 0, 0, 20, 21, 0, 0]);
    // paths 0, 1 and 2 all reach 2
    expect(greedyAccept(candidates, tie, 3, 4)).toEqual({ bestPath: 0, acceptLength: 2 });
  });
  test('padding is never accepted, even when the argmax is token 0', () => {
    const c = Int32Array.from([5, 10, -1, -1]);
    const a = Int32Array.from([10, -1, 0, 0]);
    expect(greedyAccept(c, a, 1, 4)).toEqual({ bestPath: 0, acceptLength: 1 });
  });
  test('shape mismatch is an internal error', () => {
    expect(() => greedyAccept(candidates, new Int32Array(5), 3, 4)).toThrow(MedusaError);
  });
});

/** Independent entropy with the reference's +1e-5 inside the log. */
function refThreshold(p: number[], eps: number, delta: number): number {
  const h = -p.reduce((s, x) => s + x * Math.log(x + 1e-5), 0);
  return Math.min(eps, delta * Math.exp(-h));
}

describe('typicalAccept', () => {
  const eps = TYPICAL_DEFAULTS.posteriorThreshold;
  const delta = TYPICAL_DEFAULTS.posteriorAlpha;
  test('defaults are the reference medusa_generate defaults', () => {
    expect(eps).toBe(0.09);
    expect(delta).toBe(0.3);
  });
  test('typicalThreshold follows the formula', () => {
    const p = [0.7, 0.2, 0.1];
    expect(typicalThreshold(p, eps, delta)).toBeCloseTo(refThreshold(p, eps, delta), 14);
    const flat = new Array(50).fill(1 / 50);
    expect(typicalThreshold(flat, eps, delta)).toBeCloseTo(refThreshold(flat, eps, delta), 14);
    expect(typicalThreshold(flat, eps, delta)).toBeLessThan(eps); // entropy branch
    expect(typicalThreshold([1, 0, 0], eps, delta)).toBe(eps); // eps branch
  });

  /** logits such that softmax(logits / T) = p. */
  function logitsFor(dists: number[][], T: number): Float32Array {
    return Float32Array.from(dists.flat().map((x) => Math.log(x) * T));
  }

  /** One token with probability q, the other V-1 sharing the rest equally. */
  const oneVsRest = (q: number, V: number) => [q, ...new Array(V - 1).fill((1 - q) / (V - 1))];

  test('eps branch: p just above / just below eps', () => {
    const V = 3;
    const T = 0.7;
    const above = [0.9, 0.0905, 0.0095];
    const below = [0.9, 0.0895, 0.0105];
    expect(refThreshold(above, eps, delta)).toBe(eps);
    expect(refThreshold(below, eps, delta)).toBe(eps);
    // one path of depth 1 accepting token 1
    const cand = Int32Array.from([7, 1]);
    const o = { temperature: T, posteriorThreshold: eps, posteriorAlpha: delta };
    expect(typicalAccept(cand, logitsFor([above, [1 / 3, 1 / 3, 1 / 3]], T), 1, 2, V, o)).toEqual({ bestPath: 0, acceptLength: 1 });
    expect(typicalAccept(cand, logitsFor([below, [1 / 3, 1 / 3, 1 / 3]], T), 1, 2, V, o)).toEqual({ bestPath: 0, acceptLength: 0 });
  });

  test('entropy branch: p just above / just below delta * exp(-H)', () => {
    const V = 40;
    // f(q) = q - delta * exp(-H(q)) crosses 0 once on (0, 1/V]; bisect independently of the code
    const f = (q: number) => q - refThreshold(oneVsRest(q, V), 1, delta);
    let lo = 1e-6;
    let hi = 1 / V;
    expect(f(lo)).toBeLessThan(0);
    expect(f(hi)).toBeGreaterThan(0);
    for (let i = 0; i < 200; i++) {
      const mid = (lo + hi) / 2;
      if (f(mid) < 0) lo = mid;
      else hi = mid;
    }
    const qStar = (lo + hi) / 2;
    const above = oneVsRest(qStar + 1e-4, V);
    const below = oneVsRest(qStar - 1e-4, V);
    expect(refThreshold(above, eps, delta)).toBeLessThan(eps);
    expect(above[0]).toBeGreaterThan(refThreshold(above, eps, delta));
    expect(below[0]).toBeLessThan(refThreshold(below, eps, delta));
    const T = 1.3;
    const o = { temperature: T, posteriorThreshold: eps, posteriorAlpha: delta };
    const pad = new Array(V).fill(1 / V);
    // path 0: token 0 at depth 1 (below), path 1: token 0 at depth 1 (above) then token 5 (flat: 1/40 > threshold)
    const cand = Int32Array.from([3, 0, -1, 3, 0, 5]);
    const logits = logitsFor([below, pad, pad, above, pad, pad], T);
    expect(typicalAccept(cand, logits, 2, 3, V, o)).toEqual({ bestPath: 1, acceptLength: 2 });
    // typicalThreshold agrees with the independent formula on these distributions
    expect(typicalThreshold(above, eps, delta)).toBeCloseTo(refThreshold(above, eps, delta), 14);
  });

  test('ties: likelihood as the reference, first path on exact ties or with tieBreak first', () => {
    const V = 4;
    const T = 1;
    const pA = [0.5, 0.3, 0.15, 0.05]; // threshold = eps = 0.09: tokens 0-2 pass, token 3 fails
    const pad = [0.25, 0.25, 0.25, 0.25];
    const o = { temperature: T, posteriorThreshold: eps, posteriorAlpha: delta };
    // both paths accept one token: path 0 takes token 1 (p 0.3), path 1 takes token 0 (p 0.5)
    const cand = Int32Array.from([2, 1, 2, 0]);
    const logits = logitsFor([pA, pad, pA, pad], T);
    expect(typicalAccept(cand, logits, 2, 2, V, o)).toEqual({ bestPath: 1, acceptLength: 1 });
    expect(typicalAccept(cand, logits, 2, 2, V, { ...o, tieBreak: 'first' })).toEqual({ bestPath: 0, acceptLength: 1 });
    // identical likelihoods -> first path
    const same = Int32Array.from([2, 0, 2, 0]);
    expect(typicalAccept(same, logits, 2, 2, V, o)).toEqual({ bestPath: 0, acceptLength: 1 });
    // nothing accepted -> path 0
    const none = Int32Array.from([2, 3, 2, 3]);
    expect(typicalAccept(none, logits, 2, 2, V, o)).toEqual({ bestPath: 0, acceptLength: 0 });
  });

  test('temperature 0 falls back to greedy on the argmax', () => {
    const logits = Float32Array.from([0, 5, 1, 9, 0, 0]);
    const cand = Int32Array.from([0, 1, 0]);
    expect(typicalAccept(cand, logits, 1, 3, 2, { temperature: 0, posteriorThreshold: eps, posteriorAlpha: delta })).toEqual({ bestPath: 0, acceptLength: 1 });
  });
});
