/**
 * Prompt readers for distill: every input format and container, normalisation, per-row skips with reasons,
 * multi-file indexing, Parquet (written at test time with hyparquet-writer, no binary fixtures), file-level
 * errors, and streaming of a large JSON Lines file.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { parquetWriteBuffer } from 'hyparquet-writer';
import type { SchemaElement } from 'hyparquet';
import { MedusaError } from '../src/errors.js';
import {
  PROMPT_LIMITS,
  type PromptConversation,
  type PromptFileInfo,
  type PromptFormat,
  type SkippedRow,
  iteratePrompts,
  readPrompts,
} from '../src/data/prompts.js';

let tmp: string;
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-prompts-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function write(name: string, content: string | Buffer | ArrayBuffer): string {
  const file = path.join(tmp, name);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content instanceof ArrayBuffer ? Buffer.from(content) : content);
  return file;
}

function jsonl(rows: unknown[]): string {
  return rows.map((r) => JSON.stringify(r)).join('\n') + '\n';
}

async function errorOf(p: Promise<unknown>): Promise<MedusaError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    return e as MedusaError;
  }
  throw new Error('expected a MedusaError, nothing was thrown');
}

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

const u = (content: string) => ({ role: 'user' as const, content });
const a = (content: string) => ({ role: 'assistant' as const, content });
const s = (content: string) => ({ role: 'system' as const, content });

describe('formats', () => {
  test('ShareGPT JSON array: roles mapped, leading gpt dropped, system first, same-role turns merged, 0-based rows', async () => {
    const file = write('sg/sharegpt.json', JSON.stringify([
      { id: 'conv-a', conversations: [{ from: 'human', value: 'Hi' }, { from: 'gpt', value: 'Hello!' }, { from: 'human', value: 'Bye' }] },
      { conversations: [{ from: 'gpt', value: 'I start' }, { from: 'human', value: 'Q1' }, { from: 'human', value: 'Q1 more' }, { from: 'chatgpt', value: 'A1' }] },
      { id: 7, conversations: [{ from: 'system', value: 'Be brief.' }, { from: 'user', value: 'Q' }, { from: 'bard', value: 'A' }, { from: 'bing', value: 'A2' }] },
    ], null, 2));
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(skipped).toEqual([]);
    expect(conversations).toEqual<PromptConversation[]>([
      { id: 'conv-a', index: 0, source: { file, row: 0 }, messages: [u('Hi'), a('Hello!'), u('Bye')] },
      { id: 'sharegpt.json:1', index: 1, source: { file, row: 1 }, messages: [u('Q1\n\nQ1 more'), a('A1')] },
      { id: '7', index: 2, source: { file, row: 2 }, messages: [s('Be brief.'), u('Q'), a('A\n\nA2')] },
    ]);
    expect(files).toEqual<PromptFileInfo[]>([
      { path: file, format: 'sharegpt', container: 'json', rows: 3, bytes: fs.statSync(file).size, sha256: sha256(file) },
    ]);
  });

  test('ShareGPT JSON Lines: 1-based line numbers, blank lines not counted as rows', async () => {
    const file = write('sharegpt.jsonl', [
      JSON.stringify({ conversation_id: 'x1', conversations: [{ from: 'human', value: 'one' }] }),
      '',
      JSON.stringify({ conversations: [{ from: 'human', value: 'two' }, { from: 'gpt', value: 'ans' }] }),
      '   ',
    ].join('\r\n'));
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(skipped).toEqual([]);
    expect(conversations).toEqual([
      { id: 'x1', index: 0, source: { file, row: 1 }, messages: [u('one')] },
      { id: 'sharegpt.jsonl:3', index: 1, source: { file, row: 3 }, messages: [u('two'), a('ans')] },
    ]);
    expect(files[0]).toMatchObject({ format: 'sharegpt', container: 'jsonl', rows: 2 });
  });

  test('OpenAI chat JSON Lines: developer -> system, text parts joined, non-text parts skip the row', async () => {
    const file = write('openai.jsonl', jsonl([
      { messages: [{ role: 'developer', content: 'Rules.' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Yo' }] },
      { id: 'parts', messages: [{ role: 'user', content: [{ type: 'text', text: 'Look' }, { type: 'text', text: 'here' }] }] },
      { messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url: 'x' } }] }] },
      { messages: [{ role: 'system', content: 'S' }, { role: 'assistant', content: 'Greeting' }, { role: 'user', content: 'Q' }] },
    ]));
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(conversations).toEqual([
      { id: 'openai.jsonl:1', index: 0, source: { file, row: 1 }, messages: [s('Rules.'), u('Hi'), a('Yo')] },
      { id: 'parts', index: 1, source: { file, row: 2 }, messages: [u('Look\n\nhere')] },
      { id: 'openai.jsonl:4', index: 2, source: { file, row: 4 }, messages: [s('S'), u('Q')] },
    ]);
    expect(skipped).toEqual([{ file, row: 3, reason: 'messages[0] (user) content[1] has type "image_url"; only text parts are supported' }]);
    expect(files[0]).toMatchObject({ format: 'openai', container: 'jsonl', rows: 4 });
  });

  test('plain prompts and Alpaca instructions', async () => {
    const file = write('prompts.jsonl', jsonl([
      { prompt: 'Write a haiku.', prompt_id: 'p1' },
      { instruction: 'Translate to French.', input: 'Hello', output: 'Bonjour' },
      { instruction: 'Name a colour.', input: '' },
    ]));
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(skipped).toEqual([]);
    expect(conversations.map((c) => [c.id, c.messages])).toEqual([
      ['p1', [u('Write a haiku.')]],
      ['prompts.jsonl:2', [u('Translate to French.\n\nHello'), a('Bonjour')]],
      ['prompts.jsonl:3', [u('Name a colour.')]],
    ]);
    expect(files[0].format).toBe('prompt');
  });

  test('text: one prompt per non-blank line', async () => {
    const file = write('lines.txt', 'First prompt\r\n\r\n  indented prompt\n\t\nlast without newline');
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(skipped).toEqual([]);
    expect(conversations).toEqual([
      { id: 'lines.txt:1', index: 0, source: { file, row: 1 }, messages: [u('First prompt')] },
      { id: 'lines.txt:3', index: 1, source: { file, row: 3 }, messages: [u('  indented prompt')] },
      { id: 'lines.txt:5', index: 2, source: { file, row: 5 }, messages: [u('last without newline')] },
    ]);
    expect(files[0]).toMatchObject({ format: 'text', container: 'text', rows: 3 });
  });

  test('a .json file holding JSON Lines is read as JSON Lines', async () => {
    const file = write('really-lines.json', jsonl([{ prompt: 'a' }, { prompt: 'b' }]));
    const { conversations, files } = await readPrompts([file]);
    expect(conversations.map((c) => c.source.row)).toEqual([1, 2]);
    expect(files[0]).toMatchObject({ container: 'jsonl', format: 'prompt' });
  });

  test('explicit --format: text reads any file line by line; a JSON format reads .txt and unknown extensions', async () => {
    const lines = write('explicit.jsonl', jsonl([{ prompt: 'a' }]));
    const asText = await readPrompts([lines], { format: 'text' });
    expect(asText.conversations[0].messages).toEqual([u('{"prompt":"a"}')]);
    expect(asText.files[0]).toMatchObject({ container: 'text', format: 'text' });

    const txt = write('explicit.txt', jsonl([{ messages: [{ role: 'user', content: 'q' }] }]));
    const dat = write('explicit.dat', JSON.stringify([{ messages: [{ role: 'user', content: 'r' }] }]));
    const r = await readPrompts([txt, dat], { format: 'openai' });
    expect(r.conversations.map((c) => c.messages[0].content)).toEqual(['q', 'r']);
    expect(r.files.map((f) => f.container)).toEqual(['jsonl', 'json']);
  });
});

describe('bad rows', () => {
  test('a mixed file: good rows come through, every bad row is reported with its line and a specific reason', async () => {
    const long = 'x'.repeat(PROMPT_LIMITS.maxContentChars + 1);
    const rows: string[] = [
      JSON.stringify({ id: 'ok-1', conversations: [{ from: 'human', value: 'fine' }, { from: 'gpt', value: 'yes' }] }), // 1
      '{"conversations": [ {"from": "human", "value": "unterminated"', // 2
      JSON.stringify({ foo: 1, bar: 2 }), // 3
      JSON.stringify({ conversations: [{ from: 'human', value: '   ' }] }), // 4
      JSON.stringify({ conversations: [{ from: 'human', value: 42 }] }), // 5
      JSON.stringify({ conversations: [{ from: 'gpt', value: 'only me' }] }), // 6
      JSON.stringify({ conversations: [{ from: 'human', value: 'q' }, { from: 'system', value: 'late' }] }), // 7
      JSON.stringify({ conversations: [{ from: 'human', value: 'q' }, { from: 'tool', value: 'r' }] }), // 8
      JSON.stringify({ conversations: Array.from({ length: PROMPT_LIMITS.maxMessages + 1 }, (_, i) => ({ from: i % 2 ? 'gpt' : 'human', value: 'm' })) }), // 9
      JSON.stringify({ conversations: [{ from: 'human', value: long }] }), // 10
      JSON.stringify({ id: 'ok-1', conversations: [{ from: 'human', value: 'again' }] }), // 11
      JSON.stringify({ messages: [{ role: 'user', content: 'other shape' }] }), // 12
      JSON.stringify([1, 2]), // 13
      JSON.stringify({ conversations: 'not a list' }), // 14
      JSON.stringify({ conversations: [] }), // 15
      JSON.stringify({ conversations: [{ value: 'no role' }] }), // 16
      JSON.stringify({ id: 'ok-2', conversations: [{ from: 'human', value: 'fine too' }] }), // 17
    ];
    const file = write('mixed.jsonl', rows.join('\n') + '\n');
    const skipped: SkippedRow[] = [];
    const infos: PromptFileInfo[] = [];
    const conversations: PromptConversation[] = [];
    for await (const c of iteratePrompts([file], { onSkip: (x) => skipped.push(x), onFile: (f) => infos.push(f) })) conversations.push(c);

    expect(conversations.map((c) => [c.id, c.index, c.source.row])).toEqual([['ok-1', 0, 1], ['ok-2', 1, 17]]);
    const byRow = new Map(skipped.map((x) => [x.row, x.reason]));
    expect(skipped.every((x) => x.file === file)).toBe(true);
    expect(byRow.get(2)).toMatch(/^line is not valid JSON: /);
    expect(byRow.get(3)).toBe('row has no "conversations" (keys "foo", "bar"); this file is read as sharegpt (detected from line 1)');
    expect(byRow.get(4)).toBe('conversations[0] (user) content is empty');
    expect(byRow.get(5)).toBe('conversations[0] (user) content is a number, expected a string');
    expect(byRow.get(6)).toMatch(/^no user message/);
    expect(byRow.get(7)).toMatch(/^conversations\[1\] is a system message but not the first message/);
    expect(byRow.get(8)).toMatch(/^conversations\[1\] has role "tool", which is not supported/);
    expect(byRow.get(9)).toBe(`"conversations" has ${PROMPT_LIMITS.maxMessages + 1} messages, over the limit of ${PROMPT_LIMITS.maxMessages} (PROMPT_LIMITS.maxMessages)`);
    expect(byRow.get(10)).toBe(`conversations[0] (user) content is ${long.length} characters, over the limit of ${PROMPT_LIMITS.maxContentChars} (PROMPT_LIMITS.maxContentChars)`);
    expect(byRow.get(11)).toBe(`duplicate id "ok-1": first seen at ${file}:1`);
    expect(byRow.get(12)).toBe('row has no "conversations" (keys "messages"); this file is read as sharegpt (detected from line 1)');
    expect(byRow.get(13)).toMatch(/^row is a list, expected an object/);
    expect(byRow.get(14)).toBe('"conversations" is a string, expected a list of messages');
    expect(byRow.get(15)).toBe('"conversations" is an empty list');
    expect(byRow.get(16)).toMatch(/^conversations\[0\] has no string "role" or "from"/);
    expect(skipped.length).toBe(15);
    expect(conversations.length + skipped.length).toBe(rows.length);
    expect(infos[0].rows).toBe(rows.length);
  });

  test('a line over the byte limit is skipped without stopping the read', async () => {
    const big = Buffer.alloc(PROMPT_LIMITS.maxLineBytes + 10, 0x61);
    const file = write('long-line.txt', Buffer.concat([Buffer.from('before\n'), big, Buffer.from('\nafter\n')]));
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(conversations.map((c) => [c.source.row, c.messages[0].content])).toEqual([[1, 'before'], [3, 'after']]);
    expect(skipped).toEqual([{ file, row: 2, reason: `line is over ${PROMPT_LIMITS.maxLineBytes} bytes (PROMPT_LIMITS.maxLineBytes); shorten or remove this row` }]);
    expect(files[0]).toMatchObject({ rows: 3, bytes: big.length + 14 });
  });

  test('invalid UTF-8 in a line skips that line', async () => {
    const file = write('bad-utf8.jsonl', Buffer.concat([Buffer.from('{"prompt": "ok"}\n{"prompt": "'), Buffer.from([0xff, 0xfe]), Buffer.from('"}\n')]));
    const { conversations, skipped } = await readPrompts([file]);
    expect(conversations.length).toBe(1);
    expect(skipped).toEqual([{ file, row: 2, reason: 'line is not valid UTF-8' }]);
  });
});

describe('several files', () => {
  test('indexes are continuous across files, ids are unique, and two reads give the same result', async () => {
    const f1 = write('multi/a.jsonl', jsonl([{ prompt: 'a1' }, { bad: true }, { prompt: 'a3' }]));
    const f2 = write('multi/b.txt', 'b1\nb2\n');
    const f3 = write('multi/c.json', JSON.stringify([{ id: 'c0', messages: [{ role: 'user', content: 'c0' }] }]));
    const seen: string[] = [];
    const one = await readPrompts([f1, f2, f3]);
    for await (const c of iteratePrompts([f1, f2, f3], { onFile: (f) => seen.push(f.path) })) expect(c.index).toBeGreaterThanOrEqual(0);
    const two = await readPrompts([f1, f2, f3]);
    expect(one).toEqual(two);
    expect(one.conversations.map((c) => [c.index, c.id, c.source.file])).toEqual([
      [0, 'a.jsonl:1', f1],
      [1, 'a.jsonl:3', f1],
      [2, 'b.txt:1', f2],
      [3, 'b.txt:2', f2],
      [4, 'c0', f3],
    ]);
    expect(one.skipped).toEqual([{ file: f1, row: 2, reason: expect.stringMatching(/^row has no "prompt" or "instruction"/) as unknown as string }]);
    expect(one.files.map((f) => [f.path, f.format, f.rows, f.sha256])).toEqual([
      [f1, 'prompt', 3, sha256(f1)],
      [f2, 'text', 2, sha256(f2)],
      [f3, 'openai', 1, sha256(f3)],
    ]);
    expect(seen).toEqual([f1, f2, f3]);
    // Reversed order: same conversations, indexes follow the new order.
    const rev = await readPrompts([f3, f2, f1]);
    expect(rev.conversations.map((c) => [c.index, c.id])).toEqual([[0, 'c0'], [1, 'b.txt:1'], [2, 'b.txt:2'], [3, 'a.jsonl:1'], [4, 'a.jsonl:3']]);
  });

  test('a duplicate id in a later file names the first occurrence', async () => {
    const f1 = write('dup/one.jsonl', jsonl([{ id: 'same', prompt: 'first' }]));
    const f2 = write('dup/two.jsonl', jsonl([{ prompt: 'x' }, { id: 'same', prompt: 'second' }]));
    const { conversations, skipped } = await readPrompts([f1, f2]);
    expect(conversations.map((c) => c.messages[0].content)).toEqual(['first', 'x']);
    expect(skipped).toEqual([{ file: f2, row: 2, reason: `duplicate id "same": first seen at ${f1}:1` }]);
  });

  test('files sharing a basename get path-based fallback ids', async () => {
    const f1 = write('same1/train.txt', 'p\n');
    const f2 = write('same2/train.txt', 'p\n');
    const { conversations, skipped } = await readPrompts([f1, f2]);
    expect(skipped).toEqual([]);
    expect(conversations.map((c) => c.id)).toEqual([`${f1}:1`, `${f2}:1`]);
  });

  test('stopping early is fine', async () => {
    const file = write('early.txt', 'a\nb\nc\n');
    const got: string[] = [];
    for await (const c of iteratePrompts([file])) {
      got.push(c.id);
      break;
    }
    expect(got).toEqual(['early.txt:1']);
  });
});

/** Parquet schema for a list-of-struct column, as pyarrow / Hugging Face datasets write it. */
function listOfStruct(name: string, fields: string[]): SchemaElement[] {
  return [
    { name, repetition_type: 'OPTIONAL', converted_type: 'LIST', num_children: 1 },
    { name: 'list', repetition_type: 'REPEATED', num_children: 1 },
    { name: 'element', repetition_type: 'OPTIONAL', num_children: fields.length },
    ...fields.map((f): SchemaElement => ({ name: f, type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' })),
  ];
}

function stringColumn(name: string): SchemaElement {
  return { name, type: 'BYTE_ARRAY', converted_type: 'UTF8', repetition_type: 'OPTIONAL' };
}

describe('Parquet', () => {
  test('UltraChat shape (prompt, prompt_id, messages): messages read, ids from prompt_id, row groups one by one, gzip via hyparquet-compressors', async () => {
    const messages = [
      [{ role: 'user', content: 'How do plants grow?' }, { role: 'assistant', content: 'Sunlight.' }, { role: 'user', content: 'And?' }, { role: 'assistant', content: 'Water.' }],
      [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello' }],
      [{ role: 'user', content: 'Q' }, { role: 'user', content: 'more' }],
      null,
      [{ role: 'user', content: '' }],
    ];
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'prompt', data: ['How do plants grow?', 'Hi', 'Q', 'null row', ''] },
        { name: 'prompt_id', data: ['h0', 'h1', 'h2', 'h3', 'h4'] },
        { name: 'messages', data: messages },
      ],
      schema: [{ name: 'schema', num_children: 3 }, stringColumn('prompt'), stringColumn('prompt_id'), ...listOfStruct('messages', ['content', 'role'])],
      rowGroupSize: 2,
      codec: 'GZIP',
      compressors: { GZIP: (input: Uint8Array) => new Uint8Array(zlib.gzipSync(input)) },
    });
    const file = write('ultrachat/train_sft-00000-of-00001.parquet', buf);
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(conversations).toEqual([
      { id: 'h0', index: 0, source: { file, row: 0 }, messages: [u('How do plants grow?'), a('Sunlight.'), u('And?'), a('Water.')] },
      { id: 'h1', index: 1, source: { file, row: 1 }, messages: [u('Hi'), a('Hello')] },
      { id: 'h2', index: 2, source: { file, row: 2 }, messages: [u('Q\n\nmore')] },
    ]);
    expect(skipped).toEqual([
      { file, row: 3, reason: '"messages" is null, expected a list of messages' },
      { file, row: 4, reason: 'messages[0] (user) content is empty' },
    ]);
    expect(files).toEqual([{ path: file, format: 'openai', container: 'parquet', rows: 5, bytes: buf.byteLength, sha256: sha256(file) }]);
  });

  test('ShareGPT shape (conversations of from/value) with an int64 id column', async () => {
    const buf = parquetWriteBuffer({
      columnData: [
        { name: 'id', data: [10n, 11n, 12n] },
        { name: 'conversations', data: [
          [{ from: 'gpt', value: 'intro' }, { from: 'human', value: 'q1' }, { from: 'gpt', value: 'a1' }],
          [{ from: 'system', value: 'sys' }, { from: 'human', value: 'q2' }],
          [{ from: 'function', value: 'x' }],
        ] },
      ],
      schema: [{ name: 'schema', num_children: 2 }, { name: 'id', type: 'INT64', repetition_type: 'OPTIONAL' }, ...listOfStruct('conversations', ['from', 'value'])],
    });
    const file = write('sharegpt.parquet', buf);
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(conversations.map((c) => [c.id, c.source.row, c.messages])).toEqual([
      ['10', 0, [u('q1'), a('a1')]],
      ['11', 1, [s('sys'), u('q2')]],
    ]);
    expect(skipped).toEqual([{ file, row: 2, reason: expect.stringMatching(/^conversations\[0\] has role "function", which is not supported/) as unknown as string }]);
    expect(files[0]).toMatchObject({ format: 'sharegpt', rows: 3 });
  });

  test('prompt column only', async () => {
    const buf = parquetWriteBuffer({ columnData: [{ name: 'prompt', data: ['one', 'two', null], type: 'STRING' }] });
    const file = write('plain.parquet', buf);
    const { conversations, skipped, files } = await readPrompts([file]);
    expect(conversations).toEqual([
      { id: 'plain.parquet:0', index: 0, source: { file, row: 0 }, messages: [u('one')] },
      { id: 'plain.parquet:1', index: 1, source: { file, row: 1 }, messages: [u('two')] },
    ]);
    expect(skipped).toEqual([{ file, row: 2, reason: expect.stringMatching(/^row has neither "prompt" nor "instruction"/) as unknown as string }]);
    expect(files[0]).toMatchObject({ format: 'prompt', container: 'parquet', rows: 3 });
  });

  test('many row groups: order and row numbers are kept', async () => {
    const n = 2500;
    const buf = parquetWriteBuffer({ columnData: [{ name: 'prompt', data: Array.from({ length: n }, (_, i) => `p${i}`), type: 'STRING' }], rowGroupSize: 300 });
    const file = write('groups.parquet', buf);
    const got: PromptConversation[] = [];
    for await (const c of iteratePrompts([file])) got.push(c);
    expect(got.length).toBe(n);
    expect(got.every((c, i) => c.index === i && c.source.row === i && c.messages[0].content === `p${i}`)).toBe(true);
  });

  test('a corrupt or truncated Parquet file is a clean E_IO naming the file', async () => {
    const garbage = write('corrupt.parquet', 'this is not parquet at all, just some text pretending');
    let e = await errorOf(readPrompts([garbage]));
    expect(e.code).toBe('E_IO');
    expect(e.message).toContain(garbage);
    expect(e.message).toMatch(/re-download/);
    expect(e.message).not.toMatch(/\n\s+at /);

    const good = Buffer.from(parquetWriteBuffer({ columnData: [{ name: 'prompt', data: ['x', 'y'], type: 'STRING' }] }));
    const truncated = write('truncated.parquet', good.subarray(0, good.length - 20));
    e = await errorOf(readPrompts([truncated]));
    expect(e.code).toBe('E_IO');
    expect(e.message).toContain(truncated);
  });

  test('a Parquet file without a known column is E_CONFIG listing its columns', async () => {
    const file = write('columns.parquet', parquetWriteBuffer({ columnData: [{ name: 'text', data: ['x'], type: 'STRING' }] }));
    const e = await errorOf(readPrompts([file]));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toContain(file);
    expect(e.message).toContain('"text"');
    const t = await errorOf(readPrompts([file], { format: 'text' }));
    expect(t.code).toBe('E_USAGE');
  });
});

describe('file-level errors', () => {
  test('a missing file is E_IO naming it, before anything is yielded', async () => {
    const ok = write('exists.txt', 'a\n');
    const missing = path.join(tmp, 'nope.jsonl');
    let yielded = 0;
    const e = await errorOf((async () => {
      for await (const _ of iteratePrompts([ok, missing])) yielded++;
    })());
    expect(e.code).toBe('E_IO');
    expect(e.message).toContain(missing);
    expect(yielded).toBe(0);
  });

  test('an unknown extension under auto is E_USAGE listing extensions and --format', async () => {
    const file = write('data.csv', 'a,b\n');
    const e = await errorOf(readPrompts([file]));
    expect(e.code).toBe('E_USAGE');
    expect(e.message).toContain(file);
    expect(e.message).toContain('.jsonl');
    expect(e.message).toContain('.parquet');
    expect(e.message).toContain('--format');
    const gz = await errorOf(readPrompts([write('data.jsonl.gz', 'x')]));
    expect(gz.message).toContain('Decompress');
  });

  test('an unknown --format value, no files, a file listed twice, an empty file, a directory', async () => {
    const f = write('twice.txt', 'a\n');
    expect((await errorOf(readPrompts([f], { format: 'csv' as PromptFormat }))).code).toBe('E_USAGE');
    expect((await errorOf(readPrompts([]))).code).toBe('E_USAGE');
    const twice = await errorOf(readPrompts([f, path.join(tmp, '.', 'twice.txt')]));
    expect(twice.code).toBe('E_USAGE');
    expect(twice.message).toContain('listed twice');
    const empty = await errorOf(readPrompts([write('empty.jsonl', '')]));
    expect(empty.code).toBe('E_CONFIG');
    expect(empty.message).toContain('empty');
    const blank = await errorOf(readPrompts([write('blank.jsonl', '\n\n  \n')]));
    expect(blank.message).toContain('no rows');
    const dir = await errorOf(readPrompts([tmp]));
    expect(dir.code).toBe('E_IO');
  });

  test('a JSON array file that is not valid JSON, or not an array', async () => {
    const bad = write('bad.json', '[{"prompt": "a"},');
    let e = await errorOf(readPrompts([bad]));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toContain(bad);
    expect(e.message).toContain('JSON Lines');
    const obj = write('obj.json', '{\n  "data": [{"prompt": "a"}]\n}\n');
    e = await errorOf(readPrompts([obj]));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toContain(obj);
  });

  test('a file none of whose rows has a known shape is E_CONFIG (wrong file or wrong --format)', async () => {
    const file = write('unknown-rows.jsonl', jsonl([{ text: 'a' }, { text: 'b' }]));
    const skipped: SkippedRow[] = [];
    const e = await errorOf((async () => {
      for await (const _ of iteratePrompts([file], { onSkip: (x) => skipped.push(x) })) { /* nothing */ }
    })());
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toContain(file);
    expect(e.message).toContain('"text"');
    expect(skipped).toEqual([1, 2].map((row) => ({
      file,
      row,
      reason: 'unrecognised row shape: keys "text"; expected "conversations" (ShareGPT), "messages" (OpenAI chat), "prompt" or "instruction"',
    })));
    const sg = write('sg-as-openai.jsonl', jsonl([{ conversations: [{ from: 'human', value: 'q' }] }]));
    const w = await errorOf(readPrompts([sg], { format: 'openai' }));
    expect(w.message).toContain('--format openai');
  });
});

describe('streaming', () => {
  test('50k short JSON Lines rows are read quickly, in order', async () => {
    const n = 50_000;
    const file = path.join(tmp, 'big.jsonl');
    const fd = fs.openSync(file, 'w');
    const batch: string[] = [];
    for (let i = 0; i < n; i++) {
      batch.push(JSON.stringify({ id: `r${i}`, messages: [{ role: 'user', content: `question ${i}` }, { role: 'assistant', content: `answer ${i}` }] }));
      if (batch.length === 5000) {
        fs.writeSync(fd, batch.join('\n') + '\n');
        batch.length = 0;
      }
    }
    fs.closeSync(fd);
    const t0 = Date.now();
    let count = 0;
    let last: PromptConversation | undefined;
    let info: PromptFileInfo | undefined;
    for await (const c of iteratePrompts([file], { onFile: (f) => (info = f) })) {
      if (c.index !== count) throw new Error(`index ${c.index} at position ${count}`);
      count++;
      last = c;
    }
    const ms = Date.now() - t0;
    expect(count).toBe(n);
    expect(last).toEqual({ id: `r${n - 1}`, index: n - 1, source: { file, row: n }, messages: [u(`question ${n - 1}`), a(`answer ${n - 1}`)] });
    expect(info).toMatchObject({ rows: n, bytes: fs.statSync(file).size, sha256: sha256(file) });
    expect(ms).toBeLessThan(10_000);
  });
});
