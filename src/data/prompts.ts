/**
 * Prompt readers for self-distillation (`medusa-train distill`): public conversation sets in the shapes they are
 * published in, normalised to one conversation type. Distill regenerates every assistant turn with the user's
 * model, so assistant contents here are only the originals, kept for reference.
 *
 * Inputs (format `'auto'` decides per file: the container from the extension, the format from the first row
 * whose keys are recognised, or from the column names for Parquet):
 *
 * | format     | row shape |
 * |------------|-----------|
 * | `sharegpt` | `{"id"?, "conversations": [{"from": "human"\|"user"\|"gpt"\|"assistant"\|"chatgpt"\|"bing"\|"bard"\|"model"\|"system", "value": "..."}]}` |
 * | `openai`   | `{"messages": [{"role": "system"\|"developer"\|"user"\|"assistant", "content": "..." \| [{"type": "text", "text": "..."}]}]}` |
 * | `prompt`   | `{"prompt": "..."}` (one user message), or Alpaca `{"instruction": "...", "input"?: "...", "output"?: "..."}` (user = instruction, plus a blank line and input when input is non-empty; a non-empty string output is kept as the reference assistant turn) |
 * | `text`     | one prompt per non-blank line of a `.txt` file (the line as is, minus a trailing `\r`) |
 *
 * A message may use either key pair (`from`/`value` or `role`/`content`) in either format. When a row has
 * several shape keys the first of `conversations`, `messages`, `prompt`, `instruction` wins (UltraChat-200k rows
 * have both `messages` and `prompt`: `messages` is read). Once a file's format is decided, rows of another
 * shape are skipped.
 *
 * Containers, by extension: `.jsonl`/`.ndjson` JSON Lines (streamed line by line, never held whole); `.json` a
 * top-level JSON array (read whole, at most `PROMPT_LIMITS.maxJsonFileBytes`) or, if its first non-blank
 * character is `{`, JSON Lines (many datasets name JSONL files `.json`); `.parquet` (one row group in memory at
 * a time, only the columns needed); `.txt` text. With an explicit format, `text` reads any non-Parquet file as
 * text, `.txt` files are read as JSON Lines for the JSON formats, and unknown extensions are read as `.json`.
 *
 * Row numbers (`source.row`, `SkippedRow.row`, and the fallback id): 1-based physical line numbers for JSON
 * Lines and text (blank lines are counted in the numbering but are not rows); 0-based element index for JSON
 * array files; 0-based row index for Parquet files.
 *
 * Normalisation (every violation skips the row with a reason; the run goes on):
 * - roles are mapped as in the table; any other role (tool, function, observation, ...) skips the row;
 * - content must be a string, or a list of only `{"type": "text", "text": string}` parts (joined with a blank
 *   line); any other part type skips the row; empty or whitespace-only content skips the row;
 * - one system message is allowed, and only as the first message;
 * - leading assistant turns (after the optional system message) are dropped: ShareGPT dumps often start with gpt;
 * - consecutive messages of the same role (user, user or assistant, assistant) are MERGED into one, their
 *   contents joined with a blank line ("\n\n"); so the result alternates user/assistant starting with user;
 * - at least one user message must remain; a trailing user message without an answer is kept (distill answers it);
 * - more than `maxMessages` messages, content (after merging) longer than `maxContentChars` characters, or an own
 *   id longer than `maxIdChars` skips the row, with the limit in the reason;
 * - an id already yielded earlier in this read skips the row, naming the first occurrence (`file:row`); ids of
 *   skipped rows are not remembered, so a later good row with that id still comes through.
 *
 * File-level problems stop the read with a `MedusaError`: a missing or unreadable file (`E_IO`, checked for all
 * files before anything is yielded), an unknown extension under `'auto'` or a file listed twice (`E_USAGE`), an
 * empty file, a file none of whose rows has a recognised shape, a JSON array file over the size limit or not
 * valid JSON (`E_CONFIG`), a corrupt Parquet file (`E_IO`, wrapping the reader's message).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects, parquetSchema } from 'hyparquet';
import type { AsyncBuffer, FileMetaData } from 'hyparquet';
import { compressors } from 'hyparquet-compressors';
import { MedusaError, describe, fail, isMedusaError } from '../errors.js';

export type PromptRole = 'system' | 'user' | 'assistant';

export interface PromptMessage {
  role: PromptRole;
  content: string;
}

export interface PromptConversation {
  /**
   * Stable id: the row's own `id`, `conversation_id`, `prompt_id` or `conv_id` (the first of these that is a
   * non-empty string or a number), else `${basename(file)}:${row}` (the path as given instead of the basename
   * when two input files share a basename).
   */
  id: string;
  /** 0-based position among the conversations yielded, across all files in the given order (the order distill writes). */
  index: number;
  /**
   * Where the row came from: `file` as given; `row` is the 1-based line number for JSON Lines and text files,
   * the 0-based element index for JSON array files, the 0-based row index for Parquet files.
   */
  source: { file: string; row: number };
  /**
   * Normalised: optional leading system message, then user/assistant alternating, starting with user (consecutive
   * same-role messages merged with "\n\n"). Assistant contents are the originals (distill regenerates them; kept
   * for reference). May end with a user message.
   */
  messages: PromptMessage[];
}

/** A row that was not used, with the reason. `row` is numbered as in `PromptConversation.source`. */
export interface SkippedRow {
  file: string;
  row: number;
  reason: string;
}

export type PromptFormat = 'auto' | 'sharegpt' | 'openai' | 'prompt' | 'text';

export const PROMPT_FORMATS: readonly PromptFormat[] = ['auto', 'sharegpt', 'openai', 'prompt', 'text'];

/** One input file, reported (through `onFile`) after its last conversation has been yielded. */
export interface PromptFileInfo {
  path: string;
  format: Exclude<PromptFormat, 'auto'>;
  container: 'json' | 'jsonl' | 'text' | 'parquet';
  /** Data rows: non-blank lines (JSON Lines, text), array elements (JSON), rows (Parquet). Equals yielded + skipped rows of this file. */
  rows: number;
  bytes: number;
  /** Hex SHA-256 of the file's bytes. */
  sha256: string;
}

export const PROMPT_LIMITS = {
  /** Longest JSON Lines / text line; longer lines are skipped without being held in memory. */
  maxLineBytes: 64 * 1024 * 1024,
  /**
   * Largest `.json` array file, which is parsed whole. V8 strings stop at ~512 MiB and JSON.parse needs several
   * times the file size in memory; larger sets must be JSON Lines.
   */
  maxJsonFileBytes: 256 * 1024 * 1024,
  /** Uncompressed size of the columns read from one Parquet row group (held in memory at once). */
  maxParquetRowGroupBytes: 1024 * 1024 * 1024,
  /** Messages per conversation (before normalisation). */
  maxMessages: 1024,
  /** Characters (UTF-16 code units) per message, after merging. */
  maxContentChars: 1_000_000,
  /** Characters of a row's own id. */
  maxIdChars: 1024,
} as const;

type ConcreteFormat = Exclude<PromptFormat, 'auto'>;
type Container = PromptFileInfo['container'];

export interface IteratePromptsOptions {
  format?: PromptFormat;
  onSkip?: (s: SkippedRow) => void;
  onFile?: (f: PromptFileInfo) => void;
}

/** Keys that hold a row's own id, in order of preference. */
const ID_KEYS = ['id', 'conversation_id', 'prompt_id', 'conv_id'] as const;

/** Keys that decide a row's format, in order of precedence. */
const SHAPE_KEYS: readonly { key: string; format: Exclude<ConcreteFormat, 'text'> }[] = [
  { key: 'conversations', format: 'sharegpt' },
  { key: 'messages', format: 'openai' },
  { key: 'prompt', format: 'prompt' },
  { key: 'instruction', format: 'prompt' },
];

const ROLES: Record<string, PromptRole> = {
  system: 'system',
  developer: 'system',
  user: 'user',
  human: 'user',
  assistant: 'assistant',
  gpt: 'assistant',
  chatgpt: 'assistant',
  bing: 'assistant',
  bard: 'assistant',
  model: 'assistant',
};

const EXTENSIONS: Record<string, Container> = {
  '.jsonl': 'jsonl',
  '.ndjson': 'jsonl',
  '.json': 'json',
  '.parquet': 'parquet',
  '.txt': 'text',
};

const SUPPORTED_EXTENSIONS =
  '.jsonl or .ndjson (JSON Lines), .json (a JSON array, or JSON Lines), .parquet, .txt (one prompt per line)';

/** How a file will be read: `container` 'json' may still turn out to be JSON Lines (sniffed when opened). */
interface FilePlan {
  file: string;
  label: string;
  container: Container;
  bytes: number;
}

/** Per-file reading state. */
interface FileState {
  plan: FilePlan;
  fileIndex: number;
  /** Decided format; undefined until the first recognised row under 'auto'. */
  format: ConcreteFormat | undefined;
  /** Where the format came from, for reasons. */
  formatOrigin: string;
  /** What a row is called in messages: "line" (JSON Lines, text), "element" (JSON array), "row" (Parquet). */
  rowWord: string;
  rows: number;
  recognised: number;
  firstUnrecognised: string | undefined;
}

/** State shared across the files of one read. */
interface ReadState {
  index: number;
  /** id -> fileIndex * 2^32 + row of the conversation that first had it. */
  seen: Map<string, number>;
  plans: FilePlan[];
  onSkip?: (s: SkippedRow) => void;
}

const ROW_SPLIT = 2 ** 32;

function kind(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'missing';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'an object';
  return `a ${typeof v}`;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function keysOf(obj: Record<string, unknown>): string {
  const keys = Object.keys(obj);
  const shown = keys.slice(0, 12).map((k) => JSON.stringify(k));
  if (keys.length > shown.length) shown.push(`... (${keys.length} keys)`);
  return keys.length === 0 ? 'no keys' : `keys ${shown.join(', ')}`;
}

function preview(s: string): string {
  return JSON.stringify(s.length > 40 ? `${s.slice(0, 40)}...` : s);
}

function checkFormat(format: unknown): PromptFormat {
  if (typeof format === 'string' && (PROMPT_FORMATS as readonly string[]).includes(format)) return format as PromptFormat;
  fail('E_USAGE', `Unknown prompt format ${JSON.stringify(format)}: use one of ${PROMPT_FORMATS.join(', ')} (--format).`);
}

/** Checks every file exists and can be read before anything is yielded, and decides containers. */
function planFiles(files: string[], format: PromptFormat): FilePlan[] {
  if (files.length === 0) fail('E_USAGE', 'No prompt files given: pass at least one .jsonl, .json, .parquet or .txt file.');
  const resolved = new Map<string, string>();
  const plans: FilePlan[] = [];
  for (const file of files) {
    let st: fs.Stats;
    try {
      st = fs.statSync(file);
    } catch (e) {
      fail('E_IO', `Cannot read prompt file ${file}: ${describe(e)}. Check the path.`, e);
    }
    if (st.isDirectory()) fail('E_IO', `Prompt file ${file} is a directory; list the files inside it instead (e.g. ${path.join(file, '*.parquet')}).`);
    try {
      fs.accessSync(file, fs.constants.R_OK);
    } catch (e) {
      fail('E_IO', `Cannot read prompt file ${file}: ${describe(e)}. Check its permissions.`, e);
    }
    const abs = path.resolve(file);
    const earlier = resolved.get(abs);
    if (earlier !== undefined) fail('E_USAGE', `Prompt file ${file} is listed twice (also as ${earlier}); every row would be a duplicate. List each file once.`);
    resolved.set(abs, file);
    if (st.size === 0) fail('E_CONFIG', `Prompt file ${file} is empty (0 bytes). Remove it from the list, or check that it was downloaded completely.`);

    const ext = path.extname(file).toLowerCase();
    let container: Container | undefined = EXTENSIONS[ext];
    if (container === 'parquet') {
      if (format === 'text') fail('E_USAGE', `--format text reads text files, but ${file} is Parquet; use --format auto (or sharegpt, openai, prompt) for it.`);
    } else if (format === 'text') {
      container = 'text';
    } else if (container === undefined || container === 'text') {
      if (format === 'auto') {
        if (container === undefined) {
          const hint = /\.(gz|bz2|xz|zst|zstd|zip|tar)$/.test(ext) ? ' Decompress it first.' : '';
          fail('E_USAGE', `Cannot tell the format of prompt file ${file} from its extension ${ext === '' ? '(none)' : JSON.stringify(ext)}: supported extensions are ${SUPPORTED_EXTENSIONS}.${hint} Rename the file, or pass --format sharegpt|openai|prompt|text.`);
        }
      } else {
        container = container === 'text' ? 'jsonl' : 'json';
      }
    }
    plans.push({ file, label: '', container: container as Container, bytes: st.size });
  }
  // Fallback ids use the basename, unless two inputs share it (then the path as given keeps ids unique).
  const byBase = new Map<string, number>();
  for (const p of plans) byBase.set(path.basename(p.file), (byBase.get(path.basename(p.file)) ?? 0) + 1);
  for (const p of plans) p.label = (byBase.get(path.basename(p.file)) ?? 0) > 1 ? p.file : path.basename(p.file);
  return plans;
}

interface RawMessages {
  list: unknown;
  /** Name of the list in reasons, e.g. "conversations". */
  key: string;
}

/**
 * Converts a raw message list to normalised messages, or returns the reason the row cannot be used.
 */
function normaliseMessages(list: unknown, key: string): PromptMessage[] | string {
  if (!Array.isArray(list)) return `"${key}" is ${kind(list)}, expected a list of messages`;
  if (list.length === 0) return `"${key}" is an empty list`;
  if (list.length > PROMPT_LIMITS.maxMessages) {
    return `"${key}" has ${list.length} messages, over the limit of ${PROMPT_LIMITS.maxMessages} (PROMPT_LIMITS.maxMessages)`;
  }
  const out: PromptMessage[] = [];
  for (let i = 0; i < list.length; i++) {
    const m: unknown = list[i];
    const at = `${key}[${i}]`;
    if (!isRecord(m)) return `${at} is ${kind(m)}, expected an object with "role"/"content" or "from"/"value"`;
    const rawRole = m.role !== undefined ? m.role : m.from;
    if (typeof rawRole !== 'string') return `${at} has no string "role" or "from" (${keysOf(m)})`;
    const role = ROLES[rawRole.trim().toLowerCase()];
    if (role === undefined) {
      return `${at} has role ${preview(rawRole)}, which is not supported (only system/developer, user/human, assistant/gpt/chatgpt/bing/bard/model)`;
    }
    const rawContent = m.content !== undefined ? m.content : m.value;
    let content: string;
    if (typeof rawContent === 'string') {
      content = rawContent;
    } else if (Array.isArray(rawContent)) {
      const texts: string[] = [];
      for (let j = 0; j < rawContent.length; j++) {
        const part: unknown = rawContent[j];
        if (!isRecord(part)) return `${at} (${role}) content[${j}] is ${kind(part)}, expected {"type": "text", "text": ...}`;
        if (part.type !== 'text') return `${at} (${role}) content[${j}] has type ${JSON.stringify(part.type ?? null)}; only text parts are supported`;
        if (typeof part.text !== 'string') return `${at} (${role}) content[${j}] text is ${kind(part.text)}, expected a string`;
        texts.push(part.text);
      }
      content = texts.join('\n\n');
    } else {
      return `${at} (${role}) content is ${kind(rawContent)}, expected a string`;
    }
    if (content.trim() === '') return `${at} (${role}) content is empty`;
    if (content.length > PROMPT_LIMITS.maxContentChars) {
      return `${at} (${role}) content is ${content.length} characters, over the limit of ${PROMPT_LIMITS.maxContentChars} (PROMPT_LIMITS.maxContentChars)`;
    }
    if (role === 'system' && i !== 0) return `${at} is a system message but not the first message; only one leading system message is supported`;
    out.push({ role, content });
  }

  // Drop leading assistant turns (after an optional system message).
  let start = out[0].role === 'system' ? 1 : 0;
  const sys = start === 1 ? [out[0]] : [];
  while (start < out.length && out[start].role === 'assistant') start++;
  const merged: PromptMessage[] = [...sys];
  for (let i = start; i < out.length; i++) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.role === out[i].role) {
      const content = `${last.content}\n\n${out[i].content}`;
      if (content.length > PROMPT_LIMITS.maxContentChars) {
        return `consecutive ${last.role} messages ending at ${key}[${i}] merge into ${content.length} characters, over the limit of ${PROMPT_LIMITS.maxContentChars} (PROMPT_LIMITS.maxContentChars)`;
      }
      merged[merged.length - 1] = { role: last.role, content };
    } else {
      merged.push(out[i]);
    }
  }
  if (!merged.some((m) => m.role === 'user')) {
    const roles = out.map((m) => m.role).join(', ');
    return `no user message ("${key}" has only ${roles}${start > sys.length ? '; leading assistant turns are dropped' : ''})`;
  }
  return merged;
}

/** The row's format-specific message list, or the reason it has none. */
function rawMessagesOf(obj: Record<string, unknown>, format: Exclude<ConcreteFormat, 'text'>): RawMessages | string {
  switch (format) {
    case 'sharegpt':
      return { list: obj.conversations, key: 'conversations' };
    case 'openai':
      return { list: obj.messages, key: 'messages' };
    case 'prompt': {
      if (obj.prompt !== undefined && obj.prompt !== null) {
        if (typeof obj.prompt !== 'string') return `"prompt" is ${kind(obj.prompt)}, expected a string`;
        return { list: [{ role: 'user', content: obj.prompt }], key: 'prompt' };
      }
      if (obj.instruction === undefined || obj.instruction === null) return `row has neither "prompt" nor "instruction" (${keysOf(obj)})`;
      if (typeof obj.instruction !== 'string') return `"instruction" is ${kind(obj.instruction)}, expected a string`;
      if (obj.input !== undefined && obj.input !== null && typeof obj.input !== 'string') return `"input" is ${kind(obj.input)}, expected a string`;
      const input = typeof obj.input === 'string' && obj.input.trim() !== '' ? obj.input : undefined;
      const list: PromptMessage[] = [{ role: 'user', content: input === undefined ? obj.instruction : `${obj.instruction}\n\n${input}` }];
      if (typeof obj.output === 'string' && obj.output.trim() !== '') list.push({ role: 'assistant', content: obj.output });
      return { list, key: 'instruction' };
    }
  }
}

function detectFormat(obj: Record<string, unknown>): Exclude<ConcreteFormat, 'text'> | undefined {
  for (const { key, format } of SHAPE_KEYS) if (Object.hasOwn(obj, key)) return format;
  return undefined;
}

function hasShape(obj: Record<string, unknown>, format: Exclude<ConcreteFormat, 'text'>): boolean {
  return SHAPE_KEYS.some((s) => s.format === format && Object.hasOwn(obj, s.key));
}

const SHAPE_HINT = '"conversations" (ShareGPT), "messages" (OpenAI chat), "prompt" or "instruction"';

function ownId(obj: Record<string, unknown>): string | undefined {
  for (const k of ID_KEYS) {
    const v = obj[k];
    if (typeof v === 'string' && v.trim() !== '') return v;
    if (typeof v === 'number' && Number.isFinite(v)) return String(v);
    if (typeof v === 'bigint') return String(v);
  }
  return undefined;
}

/** Result of one row: a conversation or a skip, already counted in the file state. */
type RowOutcome = PromptConversation | undefined;

function skip(rs: ReadState, st: FileState, row: number, reason: string): undefined {
  rs.onSkip?.({ file: st.plan.file, row, reason });
  return undefined;
}

/** Turns messages into a conversation (id, duplicate check, index), or reports the skip. */
function finish(rs: ReadState, st: FileState, row: number, messages: PromptMessage[] | string, id: string | undefined): RowOutcome {
  if (typeof messages === 'string') return skip(rs, st, row, messages);
  const finalId = id ?? `${st.plan.label}:${row}`;
  const first = rs.seen.get(finalId);
  if (first !== undefined) {
    const firstFile = rs.plans[Math.floor(first / ROW_SPLIT)].file;
    return skip(rs, st, row, `duplicate id ${preview(finalId)}: first seen at ${firstFile}:${first % ROW_SPLIT}`);
  }
  rs.seen.set(finalId, st.fileIndex * ROW_SPLIT + row);
  return { id: finalId, index: rs.index++, source: { file: st.plan.file, row }, messages };
}

/** One JSON value (a JSON Lines row, a JSON array element or a Parquet row object). */
function processValue(rs: ReadState, st: FileState, row: number, value: unknown): RowOutcome {
  st.rows++;
  if (!isRecord(value)) {
    st.firstUnrecognised ??= `${st.rowWord} ${row} is ${kind(value)}`;
    return skip(rs, st, row, `row is ${kind(value)}, expected an object with ${SHAPE_HINT}`);
  }
  if (st.format === undefined) {
    const detected = detectFormat(value);
    if (detected === undefined) {
      st.firstUnrecognised ??= `${st.rowWord} ${row} has ${keysOf(value)}`;
      return skip(rs, st, row, `unrecognised row shape: ${keysOf(value)}; expected ${SHAPE_HINT}`);
    }
    st.format = detected;
    st.formatOrigin = `detected from ${st.rowWord} ${row}`;
  }
  const format = st.format;
  if (format === 'text') throw new MedusaError('E_INTERNAL', 'text rows are not JSON values');
  if (!hasShape(value, format)) {
    st.firstUnrecognised ??= `${st.rowWord} ${row} has ${keysOf(value)}`;
    const want = format === 'prompt' ? '"prompt" or "instruction"' : format === 'sharegpt' ? '"conversations"' : '"messages"';
    return skip(rs, st, row, `row has no ${want} (${keysOf(value)}); this file is read as ${format} (${st.formatOrigin})`);
  }
  st.recognised++;
  const id = ownId(value);
  if (id !== undefined && id.length > PROMPT_LIMITS.maxIdChars) {
    return skip(rs, st, row, `id is ${id.length} characters, over the limit of ${PROMPT_LIMITS.maxIdChars} (PROMPT_LIMITS.maxIdChars)`);
  }
  const raw = rawMessagesOf(value, format);
  if (typeof raw === 'string') return skip(rs, st, row, raw);
  return finish(rs, st, row, normaliseMessages(raw.list, raw.key), id);
}

function processTextLine(rs: ReadState, st: FileState, row: number, line: string): RowOutcome {
  st.rows++;
  st.recognised++;
  if (line.length > PROMPT_LIMITS.maxContentChars) {
    return skip(rs, st, row, `line is ${line.length} characters, over the limit of ${PROMPT_LIMITS.maxContentChars} (PROMPT_LIMITS.maxContentChars)`);
  }
  return finish(rs, st, row, [{ role: 'user', content: line }], undefined);
}

interface Line {
  /** 1-based physical line number. */
  lineNo: number;
  /** The line's bytes without the newline, or undefined when it is over the limit (its bytes were dropped). */
  data: Buffer | undefined;
}

/** Splits a byte stream into lines without ever holding more than `maxBytes` of one line. */
async function* splitLines(chunks: AsyncIterable<Buffer>, maxBytes: number, onChunk: (b: Buffer) => void): AsyncGenerator<Line> {
  let parts: Buffer[] = [];
  let partLen = 0;
  let overflow = false;
  let lineNo = 0;
  for await (const chunk of chunks) {
    onChunk(chunk);
    let start = 0;
    while (start < chunk.length) {
      const nl = chunk.indexOf(10, start);
      const end = nl === -1 ? chunk.length : nl;
      if (!overflow && end > start) {
        if (partLen + (end - start) > maxBytes) {
          overflow = true;
          parts = [];
          partLen = 0;
        } else {
          parts.push(chunk.subarray(start, end));
          partLen += end - start;
        }
      }
      if (nl === -1) break;
      lineNo++;
      const data = overflow ? undefined : parts.length === 1 ? parts[0] : Buffer.concat(parts, partLen);
      parts = [];
      partLen = 0;
      overflow = false;
      yield { lineNo, data };
      start = nl + 1;
    }
  }
  if (partLen > 0 || overflow) yield { lineNo: lineNo + 1, data: overflow ? undefined : Buffer.concat(parts, partLen) };
}

function wrapIo(file: string, e: unknown): never {
  if (isMedusaError(e)) throw e;
  fail('E_IO', `Cannot read prompt file ${file}: ${describe(e)}.`, e);
}

function newFileState(plan: FilePlan, fileIndex: number, format: PromptFormat): FileState {
  return {
    plan,
    fileIndex,
    format: format === 'auto' ? undefined : format,
    formatOrigin: format === 'auto' ? '' : `--format ${format}`,
    rowWord: 'line',
    rows: 0,
    recognised: 0,
    firstUnrecognised: undefined,
  };
}

/** After a file: refuse files that held nothing usable in the expected shape, then report the file. */
function endFile(st: FileState, container: Container, bytes: number, sha256: string, onFile?: (f: PromptFileInfo) => void): void {
  const file = st.plan.file;
  if (st.rows === 0) fail('E_CONFIG', `Prompt file ${file} contains no rows. Remove it from the list, or check that it was downloaded completely.`);
  if (st.recognised === 0 || st.format === undefined) {
    const expected = st.format === undefined ? SHAPE_HINT : `the ${st.format} shape (${st.formatOrigin})`;
    const shape =
      container === 'json' || path.extname(file).toLowerCase() === '.json'
        ? 'a JSON array of row objects, or one JSON object per line (JSON Lines)'
        : container === 'parquet'
          ? 'rows with one of those columns'
          : 'one JSON object per line';
    fail(
      'E_CONFIG',
      `None of the ${st.rows} rows of prompt file ${file} has ${expected} (first: ${st.firstUnrecognised ?? 'no row parsed'}). ` +
        `It should hold ${shape}; check it is the right file, or pass the right --format.`,
    );
  }
  onFile?.({ path: file, format: st.format, container, rows: st.rows, bytes, sha256 });
}

const decoder = new TextDecoder('utf-8', { fatal: true });

/** Reads the first non-blank byte of a file (to tell a JSON array from JSON Lines). */
function firstNonBlankByte(file: string): number | undefined {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(64 * 1024);
    let pos = 0;
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) return undefined;
      for (let i = 0; i < n; i++) {
        const b = buf[i];
        // whitespace, or a UTF-8 byte order mark
        if (b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d || (pos === 0 && i < 3 && (b === 0xef || b === 0xbb || b === 0xbf))) continue;
        return b;
      }
      pos += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

async function* readLines(rs: ReadState, st: FileState, asText: boolean, onFile?: (f: PromptFileInfo) => void): AsyncGenerator<PromptConversation> {
  const file = st.plan.file;
  const hash = createHash('sha256');
  let bytes = 0;
  let stream: fs.ReadStream;
  try {
    stream = fs.createReadStream(file, { highWaterMark: 1024 * 1024 });
  } catch (e) {
    wrapIo(file, e);
  }
  const lines = splitLines(stream, PROMPT_LIMITS.maxLineBytes, (b) => {
    hash.update(b);
    bytes += b.length;
  });
  try {
    for (;;) {
      let next: IteratorResult<Line>;
      try {
        next = await lines.next();
      } catch (e) {
        stream.destroy();
        wrapIo(file, e);
      }
      if (next.done) break;
      const { lineNo, data } = next.value;
      let out: RowOutcome;
      if (data === undefined) {
        st.rows++;
        out = skip(rs, st, lineNo, `line is over ${PROMPT_LIMITS.maxLineBytes} bytes (PROMPT_LIMITS.maxLineBytes); shorten or remove this row`);
      } else {
        let text: string;
        try {
          text = decoder.decode(data);
        } catch {
          st.rows++;
          skip(rs, st, lineNo, 'line is not valid UTF-8');
          continue;
        }
        if (text.endsWith('\r')) text = text.slice(0, -1);
        if (text.trim() === '') continue;
        if (asText) {
          out = processTextLine(rs, st, lineNo, text);
        } else {
          let value: unknown;
          try {
            value = JSON.parse(text);
          } catch (e) {
            st.rows++;
            st.firstUnrecognised ??= `line ${lineNo} is not valid JSON`;
            skip(rs, st, lineNo, `line is not valid JSON: ${describe(e)}`);
            continue;
          }
          out = processValue(rs, st, lineNo, value);
        }
      }
      if (out !== undefined) yield out;
    }
  } finally {
    // Also runs when the consumer stops early: close the file.
    await lines.return(undefined);
    stream.destroy();
  }
  endFile(st, asText ? 'text' : 'jsonl', bytes, hash.digest('hex'), onFile);
}

async function* readJsonArray(rs: ReadState, st: FileState, onFile?: (f: PromptFileInfo) => void): AsyncGenerator<PromptConversation> {
  const file = st.plan.file;
  if (st.plan.bytes > PROMPT_LIMITS.maxJsonFileBytes) {
    fail(
      'E_CONFIG',
      `Prompt file ${file} is a JSON array of ${st.plan.bytes} bytes, over the limit of ${PROMPT_LIMITS.maxJsonFileBytes} bytes (PROMPT_LIMITS.maxJsonFileBytes) for a file read whole. ` +
        `Convert it to JSON Lines (one row per line), e.g. jq -c '.[]' ${file} > ${file.replace(/\.json$/i, '')}.jsonl`,
    );
  }
  st.rowWord = 'element';
  let buf: Buffer;
  try {
    buf = await fs.promises.readFile(file);
  } catch (e) {
    wrapIo(file, e);
  }
  const bytes = buf.length;
  const sha256 = createHash('sha256').update(buf).digest('hex');
  let value: unknown;
  try {
    let text = buf.toString('utf8');
    buf = Buffer.alloc(0); // only the parsed rows are kept
    if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    value = JSON.parse(text);
  } catch (e) {
    fail('E_CONFIG', `Prompt file ${file} is not valid JSON (${describe(e)}). Fix the file, or convert it to JSON Lines so bad rows can be skipped one by one.`, e);
  }
  if (!Array.isArray(value)) fail('E_CONFIG', `Prompt file ${file} holds ${kind(value)}; expected a JSON array of rows (or JSON Lines, one row per line).`);
  const rows = value as unknown[];
  for (let i = 0; i < rows.length; i++) {
    const out = processValue(rs, st, i, rows[i]);
    rows[i] = undefined; // let the row be collected once used
    if (out !== undefined) yield out;
  }
  endFile(st, 'json', bytes, sha256, onFile);
}

async function sha256OfFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  try {
    for await (const chunk of fs.createReadStream(file, { highWaterMark: 1024 * 1024 })) hash.update(chunk as Buffer);
  } catch (e) {
    wrapIo(file, e);
  }
  return hash.digest('hex');
}

function parquetError(file: string, what: string, e: unknown): never {
  fail('E_IO', `Cannot read Parquet file ${file}${what}: ${describe(e)}. The file may be truncated or not Parquet; re-download it.`, e);
}

async function* readParquet(rs: ReadState, st: FileState, onFile?: (f: PromptFileInfo) => void): AsyncGenerator<PromptConversation> {
  const file = st.plan.file;
  st.rowWord = 'row';
  let buffer: AsyncBuffer;
  let metadata: FileMetaData;
  let columns: string[];
  try {
    buffer = await asyncBufferFromFile(file);
    metadata = await parquetMetadataAsync(buffer);
    columns = parquetSchema(metadata).children.map((c) => c.element.name);
  } catch (e) {
    parquetError(file, '', e);
  }
  // The format comes from the columns (a Parquet file has one shape for all rows).
  const want = st.format === undefined ? SHAPE_KEYS : SHAPE_KEYS.filter((s) => s.format === st.format);
  const shape = want.find((s) => columns.includes(s.key));
  if (shape === undefined) {
    const expected = st.format === undefined ? SHAPE_HINT : want.map((s) => JSON.stringify(s.key)).join(' or ');
    fail('E_CONFIG', `Parquet file ${file} has columns ${columns.map((c) => JSON.stringify(c)).join(', ')} but no ${expected} column${st.format === undefined ? '' : ` (${st.formatOrigin})`}; check it is the right file, or pass the right --format.`);
  }
  if (st.format === undefined) {
    st.format = shape.format;
    st.formatOrigin = `detected from column "${shape.key}"`;
  }
  const format = shape.format;
  const needed = new Set<string>(format === 'prompt' ? ['prompt', 'instruction', 'input', 'output'] : [shape.key]);
  for (const k of ID_KEYS) needed.add(k);
  const read = columns.filter((c) => needed.has(c));

  let groupStart = 0;
  for (let g = 0; g < metadata.row_groups.length; g++) {
    const group = metadata.row_groups[g];
    const groupRows = Number(group.num_rows);
    const rowStart = groupStart;
    groupStart += groupRows;
    if (groupRows === 0) continue;
    let size = 0;
    for (const c of group.columns) if (c.meta_data && read.includes(c.meta_data.path_in_schema[0])) size += Number(c.meta_data.total_uncompressed_size);
    if (size > PROMPT_LIMITS.maxParquetRowGroupBytes) {
      fail(
        'E_CONFIG',
        `Parquet file ${file}: row group ${g} (rows ${rowStart}-${rowStart + groupRows - 1}) holds ${size} bytes of the columns read, over the limit of ${PROMPT_LIMITS.maxParquetRowGroupBytes} bytes (PROMPT_LIMITS.maxParquetRowGroupBytes) held in memory at once. ` +
          'Rewrite it with smaller row groups (e.g. pyarrow.parquet.write_table(table, path, row_group_size=10000)) or convert it to JSON Lines.',
      );
    }
    let rows: (Record<string, unknown> | undefined)[];
    try {
      rows = await parquetReadObjects({ file: buffer, metadata, columns: read, rowStart, rowEnd: rowStart + groupRows, compressors });
    } catch (e) {
      parquetError(file, ` (row group ${g}, rows ${rowStart}-${rowStart + groupRows - 1})`, e);
    }
    for (let i = 0; i < rows.length; i++) {
      const row = rows[i] ?? {};
      rows[i] = undefined; // let the row be collected once used
      for (const c of read) if (row[c] === undefined) row[c] = null; // hyparquet gives undefined for a null list
      const out = processValue(rs, st, rowStart + i, row);
      if (out !== undefined) yield out;
    }
  }
  endFile(st, 'parquet', st.plan.bytes, await sha256OfFile(file), onFile);
}

/**
 * Yields the conversations of `files` in order (files in the given order, rows in file order), normalised as
 * described at the top of this module. Rows that cannot be used are reported through `onSkip` and never stop
 * the read; `onFile` reports each file after its last conversation. All files are checked to exist before the
 * first conversation is yielded.
 */
export async function* iteratePrompts(
  files: string[],
  opts: IteratePromptsOptions = {},
): AsyncGenerator<PromptConversation> {
  const format = checkFormat(opts.format ?? 'auto');
  const plans = planFiles(files, format);
  const rs: ReadState = { index: 0, seen: new Map(), plans, onSkip: opts.onSkip };
  for (let fi = 0; fi < plans.length; fi++) {
    const plan = plans[fi];
    const st = newFileState(plan, fi, format);
    if (plan.container === 'parquet') {
      yield* readParquet(rs, st, opts.onFile);
    } else if (plan.container === 'text') {
      st.format = 'text';
      st.formatOrigin = format === 'text' ? '--format text' : 'a .txt file';
      yield* readLines(rs, st, true, opts.onFile);
    } else if (plan.container === 'jsonl') {
      yield* readLines(rs, st, false, opts.onFile);
    } else {
      let first: number | undefined;
      try {
        first = firstNonBlankByte(plan.file);
      } catch (e) {
        wrapIo(plan.file, e);
      }
      if (first === 0x5b /* [ */) yield* readJsonArray(rs, st, opts.onFile);
      else yield* readLines(rs, st, false, opts.onFile);
    }
  }
}

/** Reads everything at once (for small sets and tests); distill streams with `iteratePrompts`. */
export async function readPrompts(
  files: string[],
  opts: { format?: PromptFormat } = {},
): Promise<{ conversations: PromptConversation[]; skipped: SkippedRow[]; files: PromptFileInfo[] }> {
  const conversations: PromptConversation[] = [];
  const skipped: SkippedRow[] = [];
  const infos: PromptFileInfo[] = [];
  for await (const c of iteratePrompts(files, { format: opts.format, onSkip: (s) => skipped.push(s), onFile: (f) => infos.push(f) })) {
    conversations.push(c);
  }
  return { conversations, skipped, files: infos };
}
