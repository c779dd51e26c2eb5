import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  Field,
  Float32,
  List,
  RecordBatch,
  Schema,
  Struct,
  Table,
  Uint8,
  makeData,
  tableFromIPC,
  tableToIPC,
  vectorFromArray,
  type Data,
  type DataType,
} from 'apache-arrow';
import { MedusaError } from '../src/errors.js';
import { Rng } from '../src/model/sampling.js';
import { expectMedusa } from './helpers/errors.js';
import {
  DATASET_LIMITS,
  DatasetWriter,
  iterateRecords,
  openDataset,
  readShard,
  shardFileName,
  type DistilledRecord,
  type FailureRecord,
  type Manifest,
  type SkipRecord,
  type StoredRecord,
  type WriterOptions,
} from '../src/data/dataset.js';

let tmpRoot: string;
beforeAll(() => {
  tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-ds-'));
});
afterAll(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true });
});

let counter = 0;
/** A fresh, not yet existing folder path under the test's temp root. */
function freshDir(): string {
  return path.join(tmpRoot, `d${counter++}`);
}


/** Deterministic PRNG (mulberry32, the project's seeded generator). */
function rng(seed: number): () => number {
  const r = new Rng(seed);
  return () => r.next();
}

/** A conversation: bos, system, user, assistant (content + eos masked, trailing "\n" not), maybe more. */
function makeRecord(index: number, topk: number): DistilledRecord {
  const r = rng(index + 1);
  const ids: number[] = [1];
  const mask: number[] = [0];
  const roles: string[] = [];
  const starts: number[] = [];
  const ends: number[] = [];
  const turns = 1 + (index % 2);
  const seg = (role: string, n: number, masked: number): void => {
    roles.push(role);
    starts.push(ids.length);
    for (let i = 0; i < n; i++) {
      ids.push(Math.floor(r() * 50_000) + (index === 3 && i === 0 ? 2_000_000_000 : 0));
      mask.push(i < masked ? 1 : 0);
    }
    ends.push(ids.length);
  };
  seg('system', 3, 0);
  for (let t = 0; t < turns; t++) {
    seg('user', 2 + Math.floor(r() * 5), 0);
    const n = 1 + Math.floor(r() * 8);
    seg('assistant', n + 1, n);
  }
  const rec: DistilledRecord = {
    id: `conv-${index}${index % 3 === 0 ? '-ünï😀' : ''}`,
    sourceIndex: index,
    inputIds: index % 2 === 0 ? Int32Array.from(ids) : ids,
    lossMask: index % 2 === 0 ? Uint8Array.from(mask) : mask,
    turnRoles: roles,
    turnStarts: starts,
    turnEnds: ends,
    truncated: index % 4 === 1,
  };
  if (topk > 0) {
    const masked = mask.reduce((a, b) => a + b, 0);
    const tIds = new Int32Array(masked * topk);
    const lp = new Float32Array(masked * topk);
    for (let j = 0; j < masked; j++) {
      const group: number[] = [];
      for (let k = 0; k < topk; k++) {
        tIds[j * topk + k] = Math.floor(r() * 50_000);
        group.push(Math.log(r() + 1e-30) * 3); // full float32 mantissas after rounding
      }
      if (j === 0 && index % 5 === 0) group[topk - 1] = -Infinity;
      if (j === 1) group[0] = -1e-40; // a float32 subnormal
      group.sort((a, b) => b - a);
      lp.set(group, j * topk);
    }
    rec.teacherTopkIds = tIds;
    rec.teacherTopkLogprobs = lp;
  }
  return rec;
}

const META = {
  base_model: '/models/tiny',
  base_config_sha256: 'ab'.repeat(32),
  tokenizer_sha256: 'cd'.repeat(32),
  chat_template: '{% for m in messages %}{{ m.content }}{% endfor %}',
  sampling: JSON.stringify({ temperature: 0.7, top_p: 0.9, seed: 1 }),
  engine: 'local',
  engine_url: 'http://127.0.0.1:8000',
};

interface Plan {
  records: DistilledRecord[];
  failures: FailureRecord[];
  skipped: SkipRecord[];
  upTo: number;
}

/** Three shards over indexes 0..13: some failures (2, 7, 12) and skipped input rows. */
function plan(topk: number): Plan[] {
  const ranges: Array<[number, number]> = [
    [0, 5],
    [5, 10],
    [10, 14],
  ];
  const failed = new Set([2, 7, 12]);
  return ranges.map(([a, b], s) => {
    const records: DistilledRecord[] = [];
    const failures: FailureRecord[] = [];
    for (let i = a; i < b; i++) {
      if (failed.has(i)) failures.push({ index: i, id: `conv-${i}`, reason: `engine error ${i}` });
      else records.push(makeRecord(i, topk));
    }
    return { records, failures, skipped: [{ file: 'in.jsonl', row: 100 + s, reason: 'no messages' }], upTo: b };
  });
}

function opts(topk: number, mode: WriterOptions['mode'] = 'new', meta: Record<string, string> = META): WriterOptions {
  return { meta, topk, mode, ignoreOnResume: ['engine_url'] };
}

function writeAll(dir: string, topk: number, shards = plan(topk)): void {
  const w = DatasetWriter.open(dir, opts(topk));
  for (const p of shards) w.appendShard(p.records, p.failures, p.skipped, p.upTo);
  w.finish({ conversations: 14, failed: 3 });
}

const bytesOf = (a: ArrayLike<number> & { buffer?: ArrayBufferLike }): Buffer =>
  ArrayBuffer.isView(a) ? Buffer.from(a.buffer, a.byteOffset, a.byteLength) : Buffer.from(Float32Array.from(a).buffer);

function expectSameRecord(got: StoredRecord, want: DistilledRecord): void {
  expect(got.id).toBe(want.id);
  expect(got.sourceIndex).toBe(want.sourceIndex);
  expect(got.inputIds).toBeInstanceOf(Int32Array);
  expect(got.lossMask).toBeInstanceOf(Uint8Array);
  expect(Array.from(got.inputIds)).toEqual(Array.from(want.inputIds));
  expect(Array.from(got.lossMask)).toEqual(Array.from(want.lossMask));
  expect(got.turnRoles).toEqual(want.turnRoles);
  expect(got.turnStarts).toEqual(want.turnStarts);
  expect(got.turnEnds).toEqual(want.turnEnds);
  expect(got.truncated).toBe(want.truncated);
  if (want.teacherTopkIds === undefined) {
    expect(got.teacherTopkIds).toBeUndefined();
    expect(got.teacherTopkLogprobs).toBeUndefined();
  } else {
    expect(got.teacherTopkIds).toBeInstanceOf(Int32Array);
    expect(got.teacherTopkLogprobs).toBeInstanceOf(Float32Array);
    expect(Array.from(got.teacherTopkIds!)).toEqual(Array.from(want.teacherTopkIds));
    // Bit-exact, including -Infinity and subnormals.
    expect(bytesOf(got.teacherTopkLogprobs!).equals(bytesOf(want.teacherTopkLogprobs!))).toBe(true);
  }
}

function readManifestJson(dir: string): Manifest {
  return JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as Manifest;
}

function writeManifestJson(dir: string, m: unknown): void {
  fs.writeFileSync(path.join(dir, 'manifest.json'), typeof m === 'string' ? m : JSON.stringify(m, null, 2));
}

/** Replace shard i with `bytes` and make the manifest's size and hash agree, so the content checks are reached. */
function replaceShard(dir: string, i: number, bytes: Uint8Array, patch: Partial<Manifest['shards'][number]> = {}): void {
  fs.writeFileSync(path.join(dir, shardFileName(i)), bytes);
  const m = readManifestJson(dir);
  m.shards[i] = { ...m.shards[i], bytes: bytes.length, sha256: crypto.createHash('sha256').update(bytes).digest('hex'), ...patch };
  writeManifestJson(dir, m);
}

/** Shard i re-encoded with some columns replaced (same schema metadata). */
function rebuiltShard(dir: string, i: number, replace: Record<string, Data>): Uint8Array {
  const t = tableFromIPC(fs.readFileSync(path.join(dir, shardFileName(i))));
  const fields: Field[] = [];
  const children: Data[] = [];
  t.schema.fields.forEach((f, k) => {
    const d = replace[f.name] ?? t.batches[0].data.children[k];
    fields.push(new Field(f.name, d.type as DataType, false));
    children.push(d);
  });
  const schema = new Schema(fields, t.schema.metadata);
  const struct = makeData({ type: new Struct(fields), length: t.numRows, nullCount: 0, children });
  return tableToIPC(new Table(schema, [new RecordBatch(schema, struct)]), 'file');
}

function listOf(type: DataType, rows: number[][]): Data {
  return vectorFromArray(rows, new List(new Field('item', type, false))).data[0];
}

// ---------------------------------------------------------------------------------------------

describe('round trip', () => {
  test.each([4, 0])('3 shards with topk %i: every field, meta in the manifest and in each shard schema', (topk) => {
    const dir = freshDir();
    const shards = plan(topk);
    writeAll(dir, topk, shards);

    expect(fs.readdirSync(dir).sort()).toEqual(['manifest.json', 'shard-00000.arrow', 'shard-00001.arrow', 'shard-00002.arrow']);
    const ds = openDataset(dir, { verifyChecksums: true });
    const expected = shards.flatMap((p) => p.records);
    expect(ds.rows).toBe(expected.length);
    expect(ds.topk).toBe(topk);
    expect(ds.meta).toEqual(META);
    const m = ds.manifest;
    expect(m.format).toBe('medusa-train-distill');
    expect(m.version).toBe(1);
    expect(m.complete).toBe(true);
    expect(m.summary).toEqual({ conversations: 14, failed: 3 });
    expect(m.next_index).toBe(14);
    expect(m.failures.map((f) => f.index)).toEqual([2, 7, 12]);
    expect(m.skipped).toEqual(shards.map((p) => p.skipped[0]));
    expect(m.shards.map((s) => [s.file, s.rows, s.first_index, s.last_index])).toEqual([
      ['shard-00000.arrow', 4, 0, 4],
      ['shard-00001.arrow', 4, 5, 9],
      ['shard-00002.arrow', 3, 10, 13],
    ]);
    m.shards.forEach((s, i) => {
      const bytes = fs.readFileSync(path.join(dir, s.file));
      expect(s.bytes).toBe(bytes.length);
      expect(s.sha256).toBe(crypto.createHash('sha256').update(bytes).digest('hex'));
      expect(s.tokens).toBe(shards[i].records.reduce((a, r) => a + r.inputIds.length, 0));
      // The Arrow IPC *file* format, with the meta as schema metadata.
      expect(bytes.subarray(0, 6).toString()).toBe('ARROW1');
      expect(bytes.subarray(bytes.length - 6).toString()).toBe('ARROW1');
      const t = tableFromIPC(bytes);
      expect(Object.fromEntries(t.schema.metadata)).toEqual(META);
      expect(t.schema.fields.map((f) => `${f.name}:${String(f.type)}`)).toEqual([
        'id:Utf8',
        'source_index:Int32',
        'input_ids:List<Int32>',
        'loss_mask:List<Uint8>',
        'turn_roles:List<Utf8>',
        'turn_starts:List<Int32>',
        'turn_ends:List<Int32>',
        'truncated:Bool',
        ...(topk > 0 ? ['teacher_topk_ids:List<Int32>', 'teacher_topk_logprobs:List<Float32>'] : []),
      ]);
    });

    const got = [...iterateRecords(ds)];
    expect(got.length).toBe(expected.length);
    got.forEach((g, k) => expectSameRecord(g, expected[k]));
    expect(readShard(ds, 1).map((r) => r.sourceIndex)).toEqual([5, 6, 8, 9]);
  });

  test('the writer returns typed arrays it does not share with apache-arrow or the file buffer', () => {
    const dir = freshDir();
    writeAll(dir, 2);
    const [a, b] = readShard(openDataset(dir), 0);
    expect(a.inputIds.byteOffset).toBe(0);
    expect(a.inputIds.buffer.byteLength).toBe(a.inputIds.byteLength);
    expect(a.inputIds.buffer).not.toBe(b.inputIds.buffer);
  });

  test('an appendShard with no records only moves nextIndex and records failures', () => {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(0));
    w.appendShard([], [{ index: 0, id: 'x', reason: 'timeout' }], [], 3);
    expect(w.nextIndex).toBe(3);
    w.close();
    const ds = openDataset(dir);
    expect(ds.rows).toBe(0);
    expect(ds.manifest.shards).toEqual([]);
    expect(ds.manifest.failures).toEqual([{ index: 0, id: 'x', reason: 'timeout' }]);
    expect(ds.manifest.complete).toBe(false);
    expect(fs.readdirSync(dir)).toEqual(['manifest.json']);
  });
});

describe('resume', () => {
  test('after 2 shards: state is restored and the result equals an uninterrupted run', () => {
    const ref = freshDir();
    writeAll(ref, 3);

    const dir = freshDir();
    const shards = plan(3);
    const w1 = DatasetWriter.open(dir, opts(3));
    w1.appendShard(shards[0].records, shards[0].failures, shards[0].skipped, shards[0].upTo);
    w1.appendShard(shards[1].records, shards[1].failures, shards[1].skipped, shards[1].upTo);
    expect(fs.existsSync(path.join(dir, 'lock'))).toBe(true);
    w1.close();
    expect(fs.existsSync(path.join(dir, 'lock'))).toBe(false);

    // engine_url is in ignoreOnResume: it may differ, and the stored value is kept.
    const w2 = DatasetWriter.open(dir, { ...opts(3, 'resume'), meta: { ...META, engine_url: 'http://other:9000' } });
    expect(w2.nextIndex).toBe(10);
    expect(w2.written).toBe(8);
    expect(w2.failures).toEqual([...shards[0].failures, ...shards[1].failures]);
    expect(w2.skipped).toEqual([...shards[0].skipped, ...shards[1].skipped]);
    expect(w2.orphansRemoved).toEqual([]);
    expect(w2.meta.engine_url).toBe(META.engine_url);
    w2.appendShard(shards[2].records, shards[2].failures, shards[2].skipped, shards[2].upTo);
    w2.finish({ conversations: 14, failed: 3 });

    expect(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')).toBe(fs.readFileSync(path.join(ref, 'manifest.json'), 'utf8'));
    for (let i = 0; i < 3; i++) {
      expect(fs.readFileSync(path.join(dir, shardFileName(i))).equals(fs.readFileSync(path.join(ref, shardFileName(i))))).toBe(true);
    }
  });

  test('resume on a missing or empty folder starts a new dataset; resume of a complete one stays complete until appended to', () => {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(0, 'resume'));
    expect(w.nextIndex).toBe(0);
    w.appendShard([makeRecord(0, 0)], [], [], 1);
    w.finish({});
    const again = DatasetWriter.open(dir, opts(0, 'resume'));
    expect(again.complete).toBe(true);
    expect(again.nextIndex).toBe(1);
    again.appendShard([makeRecord(1, 0)], [], [], 2);
    expect(again.complete).toBe(false);
    again.close();
    expect(openDataset(dir).rows).toBe(2);
  });

  test('meta mismatch: one error listing every differing key with both values and the fix', () => {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(2));
    w.appendShard([makeRecord(0, 2)], [], [], 1);
    w.close();
    const meta: Record<string, string> = { ...META, base_model: '/models/other', engine_url: 'http://x', extra_key: 'new' };
    delete meta.tokenizer_sha256;
    const e = expectMedusa(
      () => DatasetWriter.open(dir, { meta, topk: 5, mode: 'resume', ignoreOnResume: ['engine_url'] }),
      'E_CONFIG',
      dir,
      'base_model: stored "/models/tiny", now "/models/other"',
      'extra_key: stored (missing), now "new"',
      `tokenizer_sha256: stored "${META.tokenizer_sha256}", now (missing)`,
      'topk: stored 2, now 5',
      '--overwrite',
      '--out',
    );
    expect(e.message).not.toContain('engine_url');
    expect(e.message).not.toContain('chat_template');
    // The failed open left the folder as it was, unlocked.
    expect(fs.readdirSync(dir).sort()).toEqual(['manifest.json', 'shard-00000.arrow']);
    const ok = DatasetWriter.open(dir, { ...opts(2, 'resume'), meta: { ...META, engine_url: 'http://y' } });
    expect(ok.nextIndex).toBe(1);
    ok.close();
  });
});

describe('crash at any moment', () => {
  /** Two shards written, then the state a crash during the third leaves behind. */
  function crashed(kind: 'temp-shard' | 'renamed-shard' | 'manifest-temp' | 'stale-lock' | 'before-manifest'): { dir: string; orphans: string[] } {
    const dir = freshDir();
    const shards = plan(1);
    const w = DatasetWriter.open(dir, opts(1));
    w.appendShard(shards[0].records, shards[0].failures, shards[0].skipped, shards[0].upTo);
    w.appendShard(shards[1].records, shards[1].failures, shards[1].skipped, shards[1].upTo);
    const manifest = fs.readFileSync(path.join(dir, 'manifest.json'));
    if (kind === 'temp-shard') {
      fs.writeFileSync(path.join(dir, 'shard-00002.arrow.tmp'), Buffer.from('ARROW1\0\0 half a shard'));
      w.close();
      return { dir, orphans: ['shard-00002.arrow.tmp'] };
    }
    if (kind === 'renamed-shard') {
      w.appendShard(shards[2].records, shards[2].failures, shards[2].skipped, shards[2].upTo);
      w.close();
      fs.writeFileSync(path.join(dir, 'manifest.json'), manifest); // the manifest rename never happened
      return { dir, orphans: ['shard-00002.arrow'] };
    }
    if (kind === 'manifest-temp') {
      w.appendShard(shards[2].records, shards[2].failures, shards[2].skipped, shards[2].upTo);
      w.close();
      const next = fs.readFileSync(path.join(dir, 'manifest.json'));
      fs.writeFileSync(path.join(dir, 'manifest.json'), manifest);
      fs.writeFileSync(path.join(dir, 'manifest.json.tmp'), next.subarray(0, next.length >> 1));
      return { dir, orphans: ['manifest.json.tmp', 'shard-00002.arrow'] };
    }
    // A lock left by a killed process of this machine: this pid, but no writer open in this process.
    w.close();
    const lock = { pid: process.pid, host: os.hostname(), created: '2020-01-01T00:00:00.000Z' };
    fs.writeFileSync(path.join(dir, 'lock'), JSON.stringify(lock));
    if (kind === 'before-manifest') {
      fs.rmSync(path.join(dir, 'manifest.json'));
      fs.rmSync(path.join(dir, 'shard-00000.arrow'));
      fs.rmSync(path.join(dir, 'shard-00001.arrow'));
      fs.writeFileSync(path.join(dir, 'manifest.json.tmp'), '{"form');
      return { dir, orphans: ['lock', 'manifest.json.tmp'] };
    }
    return { dir, orphans: ['lock'] };
  }

  test.each(['temp-shard', 'renamed-shard', 'manifest-temp', 'stale-lock'] as const)(
    '%s: readers see the listed shards; resume removes and reports the leftovers, then completes like an uninterrupted run',
    (kind) => {
      const { dir, orphans } = crashed(kind);
      const ds = openDataset(dir, { verifyChecksums: true });
      expect(ds.manifest.shards.length).toBe(2);
      expect([...iterateRecords(ds)].map((r) => r.sourceIndex)).toEqual([0, 1, 3, 4, 5, 6, 8, 9]);

      const w = DatasetWriter.open(dir, opts(1, 'resume'));
      expect([...w.orphansRemoved].sort()).toEqual(orphans);
      for (const o of orphans) expect(fs.existsSync(path.join(dir, o)) && o !== 'lock').toBe(false);
      expect(w.nextIndex).toBe(10);
      const p = plan(1)[2];
      w.appendShard(p.records, p.failures, p.skipped, p.upTo);
      w.finish({ conversations: 14, failed: 3 });

      const ref = freshDir();
      writeAll(ref, 1);
      expect(fs.readdirSync(dir).sort()).toEqual(fs.readdirSync(ref).sort());
      for (const f of fs.readdirSync(ref)) expect(fs.readFileSync(path.join(dir, f)).equals(fs.readFileSync(path.join(ref, f)))).toBe(true);
    },
  );

  test('a crash before the first manifest: not a dataset for readers, and resume starts over', () => {
    const { dir, orphans } = crashed('before-manifest');
    expectMedusa(() => openDataset(dir), 'E_IO', path.join(dir, 'manifest.json'), 'does not exist');
    const w = DatasetWriter.open(dir, opts(1, 'resume'));
    expect([...w.orphansRemoved].sort()).toEqual(orphans);
    expect(w.nextIndex).toBe(0);
    w.close();
  });

  test('a live writer holds the folder: a second writer is refused', () => {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(0));
    expectMedusa(() => DatasetWriter.open(dir, opts(0, 'resume')), 'E_IO', dir, 'close() it first');
    w.close();
    // A lock of another live process on this host (our parent) is respected.
    fs.writeFileSync(path.join(dir, 'lock'), JSON.stringify({ pid: process.ppid, host: os.hostname(), created: 'then' }));
    expectMedusa(() => DatasetWriter.open(dir, opts(0, 'resume')), 'E_IO', `pid ${process.ppid}`, path.join(dir, 'lock'));
    // Readers do not care about the lock.
    expect(openDataset(dir).rows).toBe(0);
    fs.rmSync(path.join(dir, 'lock'));
  });
});

describe('writer modes', () => {
  test("'new' refuses a folder that is not empty; 'overwrite' starts again; both refuse foreign files", () => {
    const dir = freshDir();
    writeAll(dir, 0);
    expectMedusa(() => DatasetWriter.open(dir, opts(0, 'new')), 'E_IO', dir, 'not empty', '--overwrite');
    const w = DatasetWriter.open(dir, opts(2, 'overwrite'));
    expect(w.nextIndex).toBe(0);
    expect([...w.orphansRemoved].sort()).toEqual(['shard-00000.arrow', 'shard-00001.arrow', 'shard-00002.arrow']);
    w.close();
    const ds = openDataset(dir);
    expect([ds.rows, ds.topk, ds.manifest.complete]).toEqual([0, 2, false]);

    const home = freshDir();
    fs.mkdirSync(home);
    fs.writeFileSync(path.join(home, 'notes.txt'), 'mine');
    expectMedusa(() => DatasetWriter.open(home, opts(0, 'overwrite')), 'E_IO', 'notes.txt', 'refusing to overwrite');
    expectMedusa(() => DatasetWriter.open(home, opts(0, 'resume')), 'E_IO', 'notes.txt');
    expect(fs.readdirSync(home)).toEqual(['notes.txt']);

    const file = path.join(freshDir() + '.txt');
    fs.writeFileSync(file, 'x');
    expectMedusa(() => DatasetWriter.open(file, opts(0)), 'E_IO', 'not a folder');
    expectMedusa(() => DatasetWriter.open(freshDir(), opts(DATASET_LIMITS.maxTopk + 1)), 'E_CONFIG', 'maxTopk');
  });
});

describe('appendShard validation (E_INTERNAL naming the record; nothing written)', () => {
  function check(topk: number, mutate: (r: DistilledRecord) => void, ...parts: string[]): void {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(topk));
    w.appendShard([makeRecord(0, topk)], [], [], 1);
    const before = fs.readFileSync(path.join(dir, 'manifest.json'));
    const r = makeRecord(4, topk);
    mutate(r);
    expectMedusa(() => w.appendShard([makeRecord(2, topk), r], [], [], 6), 'E_INTERNAL', ...parts);
    expect(fs.readFileSync(path.join(dir, 'manifest.json')).equals(before)).toBe(true);
    expect(fs.readdirSync(dir).sort()).toEqual(['lock', 'manifest.json', 'shard-00000.arrow']);
    expect(w.nextIndex).toBe(1);
    w.close();
  }

  test('mask value 2', () => check(0, (r) => ((r.lossMask as Uint8Array)[5] = 2), '"conv-4"', 'loss_mask[5] is 2'));
  test('mask length', () => check(0, (r) => (r.lossMask = Array.from(r.lossMask).slice(1)), '"conv-4"', 'loss_mask has', 'input_ids has'));
  test('mask outside assistant turns', () => check(0, (r) => ((r.lossMask as Uint8Array)[1] = 1), '"conv-4"', 'outside every assistant turn'));
  test('topk length', () => check(3, (r) => (r.teacherTopkIds = (r.teacherTopkIds as Int32Array).subarray(1)), '"conv-4"', 'x topk 3'));
  test('unsorted logprobs', () =>
    check(2, (r) => {
      const lp = r.teacherTopkLogprobs as Float32Array;
      [lp[0], lp[1]] = [lp[1] - 1, lp[0]];
    }, 'sorted by probability'));
  test('teacher arrays in a topk-0 dataset', () => check(0, (r) => (r.teacherTopkIds = [1]), 'topk 0'));
  test('token id out of int32 range', () => check(0, (r) => ((r.inputIds as number[])[2] = 2 ** 31), 'input_ids[2]'));
  test('span past the sequence', () => check(0, (r) => r.turnEnds.push(r.turnEnds.length + 10_000) && r.turnStarts.push(0) && r.turnRoles.push('user'), 'spans'));

  test('indexes: below nextIndex, unsorted, failure colliding with a record, upTo too small', () => {
    const dir = freshDir();
    const w = DatasetWriter.open(dir, opts(0));
    w.appendShard([makeRecord(0, 0), makeRecord(1, 0)], [], [], 2);
    expectMedusa(() => w.appendShard([makeRecord(1, 0)], [], [], 3), 'E_INTERNAL', '"conv-1"', 'sourceIndex 1', 'nextIndex 2');
    expectMedusa(() => w.appendShard([makeRecord(3, 0), makeRecord(2, 0)], [], [], 4), 'E_INTERNAL', 'sorted');
    expectMedusa(() => w.appendShard([makeRecord(2, 0)], [{ index: 2, id: 'conv-2', reason: 'x' }], [], 3), 'E_INTERNAL', 'failure index 2');
    expectMedusa(() => w.appendShard([makeRecord(4, 0)], [], [], 4), 'E_INTERNAL', 'upTo 4');
    expectMedusa(() => w.appendShard([], [], [], 1), 'E_INTERNAL', 'upTo is 1');
    w.finish({});
    expectMedusa(() => w.appendShard([], [], [], 3), 'E_INTERNAL', 'closed');
    expect(openDataset(dir).rows).toBe(2);
  });
});

describe('untrusted input: clear MedusaErrors naming the file', () => {
  function dataset(topk = 2): string {
    const dir = freshDir();
    writeAll(dir, topk);
    return dir;
  }

  test('manifest missing, not JSON, wrong format or version', () => {
    const dir = freshDir();
    fs.mkdirSync(dir);
    expectMedusa(() => openDataset(dir), 'E_IO', path.join(dir, 'manifest.json'), 'not a distilled dataset');
    expectMedusa(() => openDataset(path.join(dir, 'nope')), 'E_IO', 'nope');
    writeManifestJson(dir, '{"format": "medusa-train-distill", "vers');
    expectMedusa(() => openDataset(dir), 'E_CONFIG', path.join(dir, 'manifest.json'), 'not valid JSON');
    writeManifestJson(dir, '[1, 2]');
    expectMedusa(() => openDataset(dir), 'E_CONFIG', 'manifest.json', 'JSON object');
    writeManifestJson(dir, { format: 'something-else' });
    expectMedusa(() => openDataset(dir), 'E_CONFIG', 'manifest.json', '"format"', 'not a medusa-train distilled dataset');
    const m = readManifestJson(dataset());
    writeManifestJson(dir, { ...m, version: 2 });
    expectMedusa(() => openDataset(dir), 'E_UNSUPPORTED', 'version 2', 'Upgrade');
  });

  test('manifest with missing keys and wrong types: every problem by key', () => {
    const dir = dataset();
    const m = readManifestJson(dir) as unknown as Record<string, unknown>;
    const shards = m.shards as Array<Record<string, unknown>>;
    shards[0].sha256 = 'xyz';
    shards[1].file = '../../etc/passwd';
    delete shards[2].rows;
    delete m.next_index;
    m.topk = 'four';
    m.meta = { a: 1 };
    m.failures = [{ index: -1, id: 'x' }];
    m.complete = 'yes';
    writeManifestJson(dir, m);
    expectMedusa(
      () => openDataset(dir),
      'E_CONFIG',
      path.join(dir, 'manifest.json'),
      'shards[0].sha256',
      'shards[1].file: must be "shard-00001.arrow"',
      'shards[2].rows',
      'next_index',
      'topk',
      'meta.a',
      'failures[0].index',
      'failures[0].reason',
      'complete',
    );
  });

  test('inconsistent shard ranges', () => {
    const dir = dataset();
    const m = readManifestJson(dir);
    m.shards[1].first_index = 3;
    m.next_index = 12;
    writeManifestJson(dir, m);
    expectMedusa(() => openDataset(dir), 'E_CONFIG', 'shards[1].first_index', 'next_index');
  });

  test('shard listed but missing; shard cut short; checksum mismatch', () => {
    const dir = dataset();
    const f1 = path.join(dir, 'shard-00001.arrow');
    const bytes = fs.readFileSync(f1);
    fs.rmSync(f1);
    expectMedusa(() => openDataset(dir), 'E_IO', f1, 'shards[1]', 'cannot be read');

    fs.writeFileSync(f1, bytes.subarray(0, bytes.length - 100));
    expectMedusa(() => openDataset(dir), 'E_IO', f1, `says ${bytes.length}`, 'cut');

    const flipped = Buffer.from(bytes);
    flipped[200] ^= 0xff;
    fs.writeFileSync(f1, flipped);
    const ds = openDataset(dir); // sizes only
    expectMedusa(() => readShard(ds, 1), 'E_IO', f1, 'SHA-256');
    expectMedusa(() => openDataset(dir, { verifyChecksums: true }), 'E_IO', f1, 'SHA-256');
    expect(readShard(ds, 0).length).toBe(4); // the other shards still read
  });

  test('shard cut short with a manifest that agrees (a hostile or buggy writer): the Arrow structure is refused', () => {
    const dir = dataset();
    const bytes = fs.readFileSync(path.join(dir, 'shard-00000.arrow'));
    for (const cut of [10, 200, bytes.length - 10, bytes.length - 1]) {
      replaceShard(dir, 0, bytes.subarray(0, cut));
      expectMedusa(() => readShard(openDataset(dir), 0), 'E_IO', path.join(dir, 'shard-00000.arrow'), 'not a valid shard');
    }
    replaceShard(dir, 0, Buffer.from('not arrow at all, just some text of a reasonable length'));
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_IO', 'shard-00000.arrow', 'magic');
  });

  test('shard with the wrong schema: input_ids as List<Float32>', () => {
    const dir = dataset();
    const ds0 = openDataset(dir);
    const rows = readShard(ds0, 0).map((r) => Array.from(r.inputIds));
    replaceShard(dir, 0, rebuiltShard(dir, 0, { input_ids: listOf(new Float32(), rows) }));
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_CONFIG', path.join(dir, 'shard-00000.arrow'), '"input_ids"', 'List<Float32>', 'List<Int32>');
    replaceShard(dir, 0, rebuiltShard(dir, 0, { input_ids: vectorFromArray(new Float32Array(rows.length)).data[0] }));
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_CONFIG', '"input_ids" has Arrow type Float32 but must be List<Int32>');
  });

  test('shard of another dataset (schema metadata differs from the manifest meta)', () => {
    const dir = dataset();
    const other = freshDir();
    DatasetWriter.open(other, { ...opts(2), meta: { ...META, base_model: '/models/x' } }).appendShard(plan(2)[0].records, [], [], 5);
    replaceShard(dir, 0, fs.readFileSync(path.join(other, 'shard-00000.arrow')));
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_CONFIG', 'shard-00000.arrow', 'base_model', 'another dataset');
  });

  test('a row whose loss_mask length differs from input_ids', () => {
    const dir = dataset();
    const recs = readShard(openDataset(dir), 1);
    const masks = recs.map((r) => Array.from(r.lossMask));
    masks[2].push(0);
    replaceShard(dir, 1, rebuiltShard(dir, 1, { loss_mask: listOf(new Uint8(), masks) }));
    expectMedusa(
      () => [...iterateRecords(openDataset(dir))],
      'E_CONFIG',
      path.join(dir, 'shard-00001.arrow'),
      `row 2 (id "${recs[2].id}", source_index ${recs[2].sourceIndex})`,
      'loss_mask has',
    );
  });

  test('rows that disagree with the manifest entry', () => {
    const dir = dataset();
    const bytes = fs.readFileSync(path.join(dir, 'shard-00000.arrow'));
    replaceShard(dir, 0, bytes, { tokens: 5 });
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_CONFIG', 'tokens');
    replaceShard(dir, 0, bytes, { rows: 3, last_index: 4 });
    expectMedusa(() => readShard(openDataset(dir), 0), 'E_CONFIG', 'rows');
  });

  test('fuzz: random byte changes (with a manifest that agrees) give a MedusaError or valid rows, quickly', () => {
    const dir = dataset(2);
    const file = path.join(dir, 'shard-00000.arrow');
    const orig = fs.readFileSync(file);
    const manifest = fs.readFileSync(path.join(dir, 'manifest.json'));
    const r = rng(42);
    const codes = new Map<string, number>();
    const t0 = Date.now();
    for (let it = 0; it < 400; it++) {
      const b = Buffer.from(orig);
      const k = 1 + Math.floor(r() * 4);
      for (let j = 0; j < k; j++) b[Math.floor(r() * b.length)] = Math.floor(r() * 256);
      fs.writeFileSync(path.join(dir, 'manifest.json'), manifest);
      replaceShard(dir, 0, b);
      try {
        const rows = readShard(openDataset(dir), 0);
        expect(rows.length).toBe(4);
        codes.set('ok', (codes.get('ok') ?? 0) + 1);
      } catch (e) {
        if (!(e instanceof MedusaError)) throw new Error(`iteration ${it}: not a MedusaError: ${String(e)}`);
        expect(e.message).toContain(file);
        codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
      }
    }
    expect(Date.now() - t0).toBeLessThan(60_000);
    expect((codes.get('E_IO') ?? 0) + (codes.get('E_CONFIG') ?? 0)).toBeGreaterThan(100);
  });
});
