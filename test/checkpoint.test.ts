import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Rng } from '../src/model/sampling.js';
import { writeSafetensors } from '../src/io/safetensors.js';
import { latestCheckpoint, listCheckpoints, loadCheckpoint, saveCheckpoint, type CheckpointData } from '../src/train/checkpoint.js';
import { expectMedusa } from './helpers/errors.js';

let tmpRoot: string;
beforeAll(() => {
  tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-ckpt-'));
});
afterAll(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true });
});
let counter = 0;
const freshRun = (): string => path.join(tmpRoot, `run${counter++}`);


/** Random f32 values with full mantissas, plus the awkward ones: -0, subnormal, NaN with a payload, ±Inf. */
function tensor(shape: number[], seed: number): { shape: number[]; data: Float32Array } {
  const r = new Rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  const data = Float32Array.from({ length: n }, () => (r.next() - 0.5) * 3);
  const bits = new Uint32Array(data.buffer);
  if (n > 4) {
    data[0] = -0;
    data[1] = 1e-42;
    bits[2] = 0x7fc01234; // NaN with a payload
    data[3] = -Infinity;
  }
  return { shape, data };
}

function sample(step: number, d = 4, V = 7): CheckpointData {
  return {
    step,
    heads: {
      '0.0.linear.weight': tensor([d, d], step * 10 + 1),
      '0.0.linear.bias': tensor([d], step * 10 + 2),
      '0.1.weight': tensor([V, d], step * 10 + 3),
      '1.0.linear.weight': tensor([d, d], step * 10 + 4),
      '1.0.linear.bias': tensor([d], step * 10 + 5),
      '1.1.weight': tensor([V, d], step * 10 + 6),
    },
    optimizer: {
      'exp_avg.0.0.linear.weight': tensor([d, d], step * 10 + 7),
      'exp_avg_sq.0.0.linear.weight': tensor([d, d], step * 10 + 8),
    },
    state: {
      step,
      epoch: 1,
      next_batch: 17,
      rng: [0xdeadbeef, 12345],
      lr: 0.1 + 0.2, // 0.30000000000000004 must come back as the same double
      tiny: 5e-324,
      config_hash: 'ab'.repeat(32),
      metrics: { loss: [2.5, 1.25], eval: null, nested: { ok: true, text: 'ünï😀' } },
    },
  };
}

const bytes = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

function expectSame(got: CheckpointData, want: CheckpointData): void {
  expect(got.step).toBe(want.step);
  expect(got.state).toEqual(want.state);
  for (const part of ['heads', 'optimizer'] as const) {
    expect(Object.keys(got[part]).sort()).toEqual(Object.keys(want[part]).sort());
    for (const [name, t] of Object.entries(want[part])) {
      expect(got[part][name].shape).toEqual(t.shape);
      expect(got[part][name].data).toBeInstanceOf(Float32Array);
      expect(bytes(got[part][name].data).equals(bytes(t.data))).toBe(true); // bit-exact, NaN payload and -0 included
    }
  }
}

describe('checkpoints', () => {
  test('save / load round trip is bit-exact', () => {
    const run = freshRun();
    const c = sample(12);
    const p = saveCheckpoint(run, c, { keep: 3 });
    expect(p).toBe(path.join(path.resolve(run), 'checkpoints', 'step-00000012'));
    expect(fs.readdirSync(p).sort()).toEqual(['heads.safetensors', 'optimizer.safetensors', 'state.json']);
    expect(fs.readdirSync(path.dirname(p))).toEqual(['step-00000012']); // no temp folder left
    const got = loadCheckpoint(p);
    expectSame(got, c);
    expect(Object.is((got.state['lr'] as number), 0.1 + 0.2)).toBe(true);
    expect(got.state['tiny']).toBe(5e-324);
    // an empty optimizer (before the first step) round-trips too
    const empty = { ...sample(0), optimizer: {} };
    expectSame(loadCheckpoint(saveCheckpoint(run, empty, { keep: 3 })), empty);
    expect(listCheckpoints(run).map((x) => x.step)).toEqual([0, 12]);
  });

  test('keeps the newest `keep` checkpoints; list ascending; latest', () => {
    const run = freshRun();
    expect(listCheckpoints(run)).toEqual([]);
    expect(latestCheckpoint(run)).toBeNull();
    for (const step of [5, 10, 15, 20, 100_000_000]) saveCheckpoint(run, sample(step), { keep: 2 });
    expect(listCheckpoints(run).map((x) => x.step)).toEqual([20, 100_000_000]);
    expect(latestCheckpoint(run)).toBe(path.join(path.resolve(run), 'checkpoints', 'step-100000000'));
    expect(fs.readdirSync(path.join(run, 'checkpoints')).sort()).toEqual(['step-00000020', 'step-100000000']);
    expectSame(loadCheckpoint(latestCheckpoint(run)!), sample(100_000_000));
    // saving a step again replaces it
    const again = sample(20);
    again.state['epoch'] = 9;
    saveCheckpoint(run, again, { keep: 5 });
    expect(loadCheckpoint(listCheckpoints(run)[0].path).state['epoch']).toBe(9);
    expect(fs.readdirSync(path.join(run, 'checkpoints')).sort()).toEqual(['step-00000020', 'step-100000000']);
    expectMedusa(() => saveCheckpoint(run, sample(1), { keep: 0 }), 'E_INTERNAL', 'keep');
  });

  test('leftover temp folders and folders without state.json are ignored; dead leftovers are cleaned', () => {
    const run = freshRun();
    saveCheckpoint(run, sample(3), { keep: 5 });
    const ck = path.join(run, 'checkpoints');
    // a save killed before its rename (a pid that cannot exist), one by a live process, one of a deletion
    const dead = path.join(ck, '.tmp-step-00000007-999999999');
    fs.mkdirSync(dead);
    writeSafetensors(path.join(dead, 'heads.safetensors'), { a: { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    const alive = path.join(ck, `.tmp-step-00000008-${process.ppid}`);
    fs.mkdirSync(alive);
    const delDead = path.join(ck, '.tmp-delete-step-00000001-999999999');
    fs.mkdirSync(delDead);
    // a step folder missing state.json (never written by saveCheckpoint): ignored, not deleted
    const noState = path.join(ck, 'step-00000009');
    fs.mkdirSync(noState);
    const f32 = (ts: CheckpointData['heads']) => Object.fromEntries(Object.entries(ts).map(([k, t]) => [k, { dtype: 'F32' as const, ...t }]));
    writeSafetensors(path.join(noState, 'heads.safetensors'), f32(sample(9).heads));
    writeSafetensors(path.join(noState, 'optimizer.safetensors'), f32(sample(9).optimizer));
    // stray names
    fs.mkdirSync(path.join(ck, 'step-12'));
    fs.writeFileSync(path.join(ck, 'notes.txt'), 'hi');

    expect(listCheckpoints(run).map((x) => x.step)).toEqual([3]);
    expect(latestCheckpoint(run)).toBe(path.join(path.resolve(run), 'checkpoints', 'step-00000003'));
    expect(fs.existsSync(dead)).toBe(false);
    expect(fs.existsSync(delDead)).toBe(false);
    expect(fs.existsSync(alive)).toBe(true); // another live process may be writing it
    expect(fs.existsSync(noState)).toBe(true);
    expectMedusa(() => loadCheckpoint(noState), 'E_IO', path.join(noState, 'state.json'));

    // pruning counts complete checkpoints only
    saveCheckpoint(run, sample(4), { keep: 1 });
    expect(listCheckpoints(run).map((x) => x.step)).toEqual([4]);
    expect(fs.existsSync(noState)).toBe(true);
    fs.rmSync(alive, { recursive: true });
  });

  test('damaged checkpoints give clear errors naming the file', () => {
    const run = freshRun();
    const p = saveCheckpoint(run, sample(42), { keep: 5 });
    const state = path.join(p, 'state.json');
    const good = fs.readFileSync(state, 'utf8');

    fs.writeFileSync(state, good.slice(0, good.length / 2));
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', state, 'not valid JSON');
    fs.writeFileSync(state, '[1, 2]');
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', state, 'object');
    const doc = JSON.parse(good) as Record<string, unknown>;
    fs.writeFileSync(state, JSON.stringify({ ...doc, step: 41 }));
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', state, '41', 'step-00000042');
    fs.writeFileSync(state, JSON.stringify({ ...doc, step: '42' }));
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', state, 'step');
    fs.writeFileSync(state, JSON.stringify({ ...doc, state: 3 }));
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', state, 'state');
    fs.writeFileSync(state, JSON.stringify({ ...doc, version: 2 }));
    expectMedusa(() => loadCheckpoint(p), 'E_UNSUPPORTED', state, 'upgrade');
    fs.writeFileSync(state, good);
    expectSame(loadCheckpoint(p), sample(42));

    // tensors must be F32
    const heads = path.join(p, 'heads.safetensors');
    const saved = fs.readFileSync(heads);
    writeSafetensors(heads, { '0.0.linear.weight': { dtype: 'F16', shape: [2], data: new Float32Array(2) } });
    expectMedusa(() => loadCheckpoint(p), 'E_CONFIG', heads, '0.0.linear.weight', 'F16');
    fs.writeFileSync(heads, saved.subarray(0, saved.length - 3));
    expectMedusa(() => loadCheckpoint(p), 'E_SAFETENSORS', heads);
    fs.rmSync(heads);
    expectMedusa(() => loadCheckpoint(p), 'E_IO', heads);
    expect(listCheckpoints(run)).toEqual([]);

    expectMedusa(() => loadCheckpoint(path.join(run, 'checkpoints', 'step-00000099')), 'E_IO', 'step-00000099');
    const renamed = path.join(run, 'elsewhere');
    fs.mkdirSync(renamed);
    expectMedusa(() => loadCheckpoint(renamed), 'E_CONFIG', 'step-<8 digits>');
  });

  test('a failed save leaves the previous checkpoints and no temp folder', () => {
    const run = freshRun();
    saveCheckpoint(run, sample(1), { keep: 5 });
    const c = sample(2);
    c.heads['0.0.linear.bias'] = { shape: [3], data: new Float32Array(2) };
    expectMedusa(() => saveCheckpoint(run, c, { keep: 5 }), 'E_SAFETENSORS', 'heads.safetensors');
    expect(fs.readdirSync(path.join(run, 'checkpoints'))).toEqual(['step-00000001']);
    expect(listCheckpoints(run).map((x) => x.step)).toEqual([1]);
  });

  test('state that JSON cannot round-trip is refused before anything is written', () => {
    const run = freshRun();
    for (const bad of [{ loss: NaN }, { x: Infinity }, { u: undefined }, { t: new Float32Array(2) }, { n: 10n }, { nested: [{ f: () => 1 }] }] as Record<string, unknown>[]) {
      const c = sample(1);
      c.state = { ...c.state, ...bad };
      expectMedusa(() => saveCheckpoint(run, c, { keep: 2 }), 'E_INTERNAL', 'state');
    }
    const c = sample(2);
    c.state['step'] = 3;
    expectMedusa(() => saveCheckpoint(run, c, { keep: 2 }), 'E_INTERNAL', 'step');
    expect(fs.existsSync(path.join(run, 'checkpoints'))).toBe(false);
  });
});
