/**
 * Medusa candidate trees: validation of `medusa_choices`, the buffers the reference's
 * `generate_medusa_buffers` builds (tree attention mask, position offsets, tree indices, retrieve
 * indices), and the greedy sparse-tree search calibrated from per-head per-rank accuracies.
 *
 * Pure: no tensors, no I/O. Index conventions follow FasterDecoding/Medusa `medusa/model/utils.py`
 * exactly, except that the reference hard-codes TOPK = 10 in `tree_indices`; here `topk` is a
 * parameter (pass 10 to reproduce the reference's numbers bit for bit).
 */

import { fail } from '../errors.js';

/** Index paths: [a] = head 0's rank-a token, [a, b] = then head 1's rank-b token, ... */
export type MedusaChoices = number[][];

export const TREE_LIMITS = { maxNodes: 1024, maxDepth: 16, maxRank: 1000 };

function fmt(path: unknown): string {
  try {
    return JSON.stringify(path);
  } catch {
    return String(path);
  }
}

function checkPositiveInt(v: number, name: string, where: string, max: number): void {
  if (!Number.isInteger(v) || v < 1 || v > max) {
    fail('E_CONFIG', `${where}: ${name} must be an integer in [1, ${max}], got ${v}`);
  }
}

/** Key of a path for set lookups. Paths are validated integer arrays, so ',' joining is unambiguous. */
function key(path: readonly number[]): string {
  return path.join(',');
}

/**
 * Throws E_CONFIG naming the offending path (and its index in the list) when the tree is not a
 * well-formed Medusa tree for `numHeads` heads with `topk` candidates each.
 */
export function validateChoices(choices: MedusaChoices, o: { numHeads: number; topk: number; where: string }): void {
  const where = o.where;
  checkPositiveInt(o.numHeads, 'numHeads', where, TREE_LIMITS.maxDepth);
  checkPositiveInt(o.topk, 'topk', where, TREE_LIMITS.maxRank);
  if (!Array.isArray(choices)) fail('E_CONFIG', `${where}: medusa_choices must be a list of index paths, got ${fmt(choices)}`);
  if (choices.length === 0) {
    fail('E_CONFIG', `${where}: medusa_choices is empty; give at least one path such as [[0]]`);
  }
  if (choices.length > TREE_LIMITS.maxNodes) {
    fail(
      'E_CONFIG',
      `${where}: medusa_choices has ${choices.length} paths, over the limit of ${TREE_LIMITS.maxNodes} tree nodes; use a smaller tree`,
    );
  }
  const seen = new Map<string, number>();
  choices.forEach((path, i) => {
    const name = `path ${fmt(path)} (index ${i})`;
    if (!Array.isArray(path)) fail('E_CONFIG', `${where}: ${name} is not a list of ranks`);
    if (path.length === 0) fail('E_CONFIG', `${where}: ${name} is empty; every path names at least one rank`);
    for (const r of path) {
      if (typeof r !== 'number' || !Number.isInteger(r) || r < 0) {
        fail('E_CONFIG', `${where}: ${name} contains ${fmt(r)}; ranks must be non-negative integers`);
      }
    }
    if (path.length > TREE_LIMITS.maxDepth) {
      fail('E_CONFIG', `${where}: ${name} has depth ${path.length}, over the limit of ${TREE_LIMITS.maxDepth}`);
    }
    if (path.length > o.numHeads) {
      fail(
        'E_CONFIG',
        `${where}: ${name} has depth ${path.length}: tree deeper than the number of heads (${o.numHeads}); drop the path or train more heads`,
      );
    }
    for (const r of path) {
      if (r >= TREE_LIMITS.maxRank) {
        fail('E_CONFIG', `${where}: ${name} uses rank ${r}, over the limit of ${TREE_LIMITS.maxRank - 1}`);
      }
      if (r >= o.topk) {
        fail('E_CONFIG', `${where}: ${name} uses rank ${r} but only the top ${o.topk} tokens per head are taken (rank >= topk); raise topk or drop the path`);
      }
    }
    const k = key(path);
    const prev = seen.get(k);
    if (prev !== undefined) fail('E_CONFIG', `${where}: ${name} is a duplicate of the path at index ${prev}`);
    seen.set(k, i);
  });
  choices.forEach((path, i) => {
    if (path.length > 1 && !seen.has(key(path.slice(0, -1)))) {
      fail(
        'E_CONFIG',
        `${where}: path ${fmt(path)} (index ${i}) has no parent: its parent path ${fmt(path.slice(0, -1))} is missing; add it`,
      );
    }
  });
}

export interface TreeBuffers {
  /** Tree tokens including the root = choices.length + 1. */
  nodes: number;
  /** [nodes, nodes] row-major; 1 = row node may attend to column node (root, ancestors, itself). */
  attentionMask: Uint8Array;
  /** [nodes] depth of each node, root 0 (the reference's medusa_position_ids). */
  positionOffsets: Int32Array;
  /** [nodes] index into the flattened candidate list [1 + numHeads * topk]: root 0, depth-i rank-r node 1 + (i-1)*topk + r. */
  treeIndices: Int32Array;
  /** [numPaths, maxDepth + 1] row-major, node indices of each leaf path, root (0) first, padded with -1. */
  retrieveIndices: Int32Array;
  numPaths: number;
  maxDepth: number;
}

/** Python's `sorted(choices, key=lambda x: (len(x), x))`: by depth, then lexicographically. */
export function sortChoices(choices: MedusaChoices): MedusaChoices {
  return choices
    .map((p) => p.slice())
    .sort((a, b) => {
      if (a.length !== b.length) return a.length - b.length;
      for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] - b[i];
      return 0;
    });
}

/**
 * The buffers `generate_medusa_buffers` builds, for the same tree. Node order = the reference's
 * sorted order (root first, then by depth, then lexicographically). Validates the tree first
 * (depth is only bounded by TREE_LIMITS.maxDepth here; call validateChoices with the model's head
 * count to bound it by the number of heads).
 */
export function treeBuffers(choices: MedusaChoices, topk: number, where = 'medusa_choices'): TreeBuffers {
  validateChoices(choices, { numHeads: TREE_LIMITS.maxDepth, topk, where });
  const sorted = sortChoices(choices);
  const nodes = sorted.length + 1;
  const index = new Map<string, number>(); // path -> node index (1-based; root is 0)
  sorted.forEach((p, i) => index.set(key(p), i + 1));

  const attentionMask = new Uint8Array(nodes * nodes);
  const positionOffsets = new Int32Array(nodes);
  const treeIndices = new Int32Array(nodes);
  attentionMask[0] = 1;
  for (let n = 1; n < nodes; n++) {
    const p = sorted[n - 1];
    const row = n * nodes;
    attentionMask[row] = 1; // root
    attentionMask[row + n] = 1; // itself
    for (let c = 1; c < p.length; c++) attentionMask[row + index.get(key(p.slice(0, c)))!] = 1;
    positionOffsets[n] = p.length;
    treeIndices[n] = 1 + (p.length - 1) * topk + p[p.length - 1];
  }

  // Leaf paths in reverse sorted order (the reference walks sorted_medusa_choices backwards and
  // skips any path already seen as a prefix of an earlier one, which leaves exactly the leaves).
  const covered = new Set<string>();
  const leaves: number[][] = [];
  for (let i = sorted.length - 1; i >= 0; i--) {
    const p = sorted[i];
    if (covered.has(key(p))) continue;
    const ids: number[] = [];
    for (let c = 1; c <= p.length; c++) {
      const pre = p.slice(0, c);
      ids.push(index.get(key(pre))!);
      covered.add(key(pre));
    }
    leaves.push(ids);
  }
  const maxDepth = Math.max(...leaves.map((l) => l.length));
  const width = maxDepth + 1;
  const retrieveIndices = new Int32Array(leaves.length * width).fill(-1);
  leaves.forEach((ids, r) => {
    retrieveIndices[r * width] = 0;
    ids.forEach((id, c) => (retrieveIndices[r * width + 1 + c] = id));
  });
  return { nodes, attentionMask, positionOffsets, treeIndices, retrieveIndices, numPaths: leaves.length, maxDepth };
}

export interface AccuracyTable {
  /** acc[k][r]: probability that head k's rank-r token is right (per-rank, not cumulative). */
  acc: number[][];
}

interface Cand {
  path: number[];
  value: number;
  /** Position of this node's last rank in its parent's rank order (for lazy sibling expansion). */
  order: number;
}

/** Total order of the search: larger value first, then shallower, then lexicographically smaller. */
function before(a: Cand, b: Cand): boolean {
  if (a.value !== b.value) return a.value > b.value;
  if (a.path.length !== b.path.length) return a.path.length < b.path.length;
  for (let i = 0; i < a.path.length; i++) if (a.path[i] !== b.path[i]) return a.path[i] < b.path[i];
  return false;
}

class Heap {
  private items: Cand[] = [];
  get size(): number {
    return this.items.length;
  }
  push(c: Cand): void {
    const h = this.items;
    h.push(c);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }
  pop(): Cand | undefined {
    const h = this.items;
    if (h.length === 0) return undefined;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l], h[m])) m = l;
        if (r < h.length && before(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

function checkTable(t: AccuracyTable, numHeads: number, topk: number): void {
  const where = 'tree search';
  checkPositiveInt(numHeads, 'numHeads', where, TREE_LIMITS.maxDepth);
  checkPositiveInt(topk, 'topk', where, TREE_LIMITS.maxRank);
  if (!t || !Array.isArray(t.acc) || t.acc.length < numHeads) {
    fail('E_CONFIG', `${where}: the accuracy table has ${t?.acc?.length ?? 0} heads but numHeads is ${numHeads}`);
  }
  for (let k = 0; k < numHeads; k++) {
    const row = t.acc[k];
    if (!Array.isArray(row) || row.length < topk) {
      fail('E_CONFIG', `${where}: the accuracy table has ${row?.length ?? 0} ranks for head ${k} but topk is ${topk}`);
    }
    for (let r = 0; r < topk; r++) {
      const v = row[r];
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > 1) {
        fail('E_CONFIG', `${where}: acc[${k}][${r}] = ${v} is not a probability in [0, 1]`);
      }
    }
  }
}

/** Ranks of head k sorted by accuracy descending, ties by rank ascending. */
function rankOrders(t: AccuracyTable, numHeads: number, topk: number): number[][] {
  const out: number[][] = [];
  for (let k = 0; k < numHeads; k++) {
    const row = t.acc[k];
    const ranks = Array.from({ length: topk }, (_, r) => r);
    ranks.sort((a, b) => (row[b] !== row[a] ? row[b] - row[a] : a - b));
    out.push(ranks);
  }
  return out;
}

/**
 * Greedy sparse tree search (MEDUSA paper §3.3.1). Nodes come back in the order they were picked;
 * the tree for any smaller budget is a prefix of that list. Ties are broken by depth, then
 * lexicographic path order. Nodes whose path product is 0 are never added, so the tree may have
 * fewer than `budget` nodes (also when the full tree of numHeads levels x topk ranks is smaller).
 */
export function searchTree(
  t: AccuracyTable,
  o: { budget: number; numHeads: number; topk: number },
): { choices: MedusaChoices; expectedAcceptLength: number; expectedTokensPerStep: number } {
  checkPositiveInt(o.budget, 'budget', 'tree search', TREE_LIMITS.maxNodes);
  const picked = pick(t, o.budget, o.numHeads, o.topk);
  let sum = 0;
  for (const c of picked) sum += c.value;
  return { choices: picked.map((c) => c.path), expectedAcceptLength: sum, expectedTokensPerStep: 1 + sum };
}

function pick(t: AccuracyTable, budget: number, numHeads: number, topk: number): Cand[] {
  checkTable(t, numHeads, topk);
  const orders = rankOrders(t, numHeads, topk);
  const heap = new Heap();
  // Lazy expansion: a node's best child enters the frontier when the node is picked, and a node's
  // next sibling (in accuracy order) when the node is picked. Every node not yet in the frontier
  // is ordered after its parent or previous sibling, so popping the frontier's best is the same
  // as scanning every possible child of the current tree.
  const child = (parent: Cand | null, order: number): Cand | undefined => {
    const depth = parent ? parent.path.length : 0;
    if (depth >= numHeads || order >= topk) return undefined;
    const r = orders[depth][order];
    return { path: parent ? [...parent.path, r] : [r], value: (parent ? parent.value : 1) * t.acc[depth][r], order };
  };
  const parents = new Map<Cand, Cand | null>();
  const first = child(null, 0)!;
  parents.set(first, null);
  heap.push(first);
  const out: Cand[] = [];
  while (out.length < budget && heap.size > 0) {
    const c = heap.pop()!;
    if (!(c.value > 0)) break; // everything left is worth nothing
    out.push(c);
    const parent = parents.get(c)!;
    parents.delete(c);
    const sib = child(parent, c.order + 1);
    if (sib) {
      parents.set(sib, parent);
      heap.push(sib);
    }
    const kid = child(c, 0);
    if (kid) {
      parents.set(kid, c);
      heap.push(kid);
    }
  }
  return out;
}

/** Expected tokens per step of the greedy tree at each budget (one search; prefixes of its picks). */
export function budgetCurve(
  t: AccuracyTable,
  o: { budgets: number[]; numHeads: number; topk: number },
): { budget: number; expectedTokensPerStep: number; choices: MedusaChoices }[] {
  if (!Array.isArray(o.budgets) || o.budgets.length === 0) fail('E_CONFIG', 'tree search: budgets must be a non-empty list');
  for (const b of o.budgets) checkPositiveInt(b, 'budget', 'tree search', TREE_LIMITS.maxNodes);
  const picked = pick(t, Math.max(...o.budgets), o.numHeads, o.topk);
  const prefix = [0];
  for (const c of picked) prefix.push(prefix[prefix.length - 1] + c.value);
  return o.budgets.map((b) => {
    const n = Math.min(b, picked.length);
    return { budget: b, expectedTokensPerStep: 1 + prefix[n], choices: picked.slice(0, n).map((c) => c.path.slice()) };
  });
}
