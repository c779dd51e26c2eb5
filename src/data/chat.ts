/**
 * Chat templates: render Hugging Face Jinja chat templates with @huggingface/jinja, and turn a
 * conversation into token ids with a mask of the tokens the model must learn to generate.
 */

import { Environment, Interpreter, Template } from '@huggingface/jinja';
import { describe, fail, isMedusaError } from '../errors.js';

/** A dependency's error message without its trailing period (we append our own sentence). */
const reason = (e: unknown): string => describe(e).replace(/[.\s]+$/, '');
import type { Tokenizer } from './tokenizer.js';

export type ChatRole = 'system' | 'user' | 'assistant';
export interface ChatMessage {
  role: ChatRole;
  content: string;
}

export interface RenderChatOptions {
  /** Append the prompt that starts an assistant turn (HF `add_generation_prompt`). */
  addGenerationPrompt: boolean;
  bosToken?: string;
  eosToken?: string;
  /** More template variables (e.g. `tools`, `pad_token`); cannot replace messages / add_generation_prompt / raise_exception. */
  extra?: Record<string, unknown>;
  /** Where the template came from, for error messages (e.g. "model/tokenizer_config.json (chat_template)"). */
  templateSource?: string;
  /** The time `strftime_now` reports (default: now). */
  now?: Date;
}

export interface ChatTurn {
  role: ChatRole;
  /** First token of the message's segment. */
  start: number;
  /** One past the last token of the segment. */
  end: number;
}

export interface ChatEncoding {
  ids: number[];
  /** 1 on tokens the model is trained to generate (assistant content through its end-of-turn token), else 0. */
  assistantMask: number[];
  /** One entry per message, in order; spans are contiguous except for a leading bos / template preamble. */
  turns: ChatTurn[];
  /** The full rendered conversation. */
  text: string;
}

export interface EncodeChatOptions {
  /** Append the generation prompt after the last message (for building inference prompts). Default false. */
  addGenerationPrompt?: boolean;
  extra?: Record<string, unknown>;
  /** Label for error messages; default: the tokenizer's chat template source when `template` is its template. */
  templateSource?: string;
  now?: Date;
}

const DEFAULT_SOURCE = 'the chat template';
const ROLES: readonly string[] = ['system', 'user', 'assistant'];
const RESERVED = new Set(['messages', 'add_generation_prompt', 'raise_exception']);

/** Thrown by the template's raise_exception(); told apart from renderer failures. */
class TemplateRaised extends Error {}

const MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'];
const DAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];

/** Python's strftime for the directives chat templates use (C locale: English names). */
function strftime(date: Date, format: string): string {
  const pad = (n: number, w = 2): string => String(n).padStart(w, '0');
  return format.replace(/%[YmdbBaAHMSyjpIe%]/g, (d) => {
    switch (d) {
      case '%Y': return String(date.getFullYear());
      case '%y': return pad(date.getFullYear() % 100);
      case '%m': return pad(date.getMonth() + 1);
      case '%d': return pad(date.getDate());
      case '%e': return String(date.getDate()).padStart(2, ' ');
      case '%b': return MONTHS[date.getMonth()].slice(0, 3);
      case '%B': return MONTHS[date.getMonth()];
      case '%a': return DAYS[date.getDay()].slice(0, 3);
      case '%A': return DAYS[date.getDay()];
      case '%H': return pad(date.getHours());
      case '%I': return pad(((date.getHours() + 11) % 12) + 1);
      case '%p': return date.getHours() < 12 ? 'AM' : 'PM';
      case '%M': return pad(date.getMinutes());
      case '%S': return pad(date.getSeconds());
      case '%j': {
        const start = new Date(date.getFullYear(), 0, 1);
        return pad(Math.floor((date.getTime() - start.getTime()) / 86_400_000) + 1, 3);
      }
      default: return '%';
    }
  });
}

function range(start: number, stop?: number, step = 1): number[] {
  if (stop === undefined) {
    stop = start;
    start = 0;
  }
  if (step === 0) throw new Error('range() step must not be zero');
  const out: number[] = [];
  for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
  return out;
}

const compiled = new Map<string, Template>();

/**
 * Parse a chat template (cached). A Jinja syntax error is an E_TOKENIZER naming `source`.
 * Call it at startup to fail fast on a broken template.
 */
export function compileChatTemplate(template: string, source: string = DEFAULT_SOURCE): Template {
  if (typeof template !== 'string') {
    fail('E_TOKENIZER', `${source} must be a string of Jinja, got ${typeof template}.`);
  }
  let t = compiled.get(template);
  if (!t) {
    try {
      t = new Template(template);
    } catch (e) {
      fail('E_TOKENIZER', `${source} is not a valid Jinja template: ${reason(e)}. Fix the chat template's syntax in ${source}.`, e);
    }
    if (compiled.size >= 64) compiled.clear();
    compiled.set(template, t);
  }
  return t;
}

/**
 * Render a chat template as Hugging Face `apply_chat_template(tokenize=False)` does: variables
 * `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, plus
 * `range`, `strftime_now`, `namespace` and `extra`. Errors (syntax, the template's own
 * raise_exception, renderer failures) are E_TOKENIZER naming the template's source.
 */
export function renderChat(template: string, messages: readonly ChatMessage[], opts: RenderChatOptions): string {
  const source = opts.templateSource ?? DEFAULT_SOURCE;
  const program = compileChatTemplate(template, source).parsed;
  const now = opts.now ?? new Date();
  const env = new Environment();
  const globals: [string, unknown][] = [
    ['false', false], ['true', true], ['none', null], ['False', false], ['True', true], ['None', null],
    ['range', range],
    ['strftime_now', (format: unknown) => strftime(now, String(format))],
    ['raise_exception', (message: unknown) => {
      throw new TemplateRaised(String(message));
    }],
  ];
  const vars = new Map<string, unknown>(globals);
  if (opts.bosToken !== undefined) vars.set('bos_token', opts.bosToken);
  if (opts.eosToken !== undefined) vars.set('eos_token', opts.eosToken);
  for (const [k, v] of Object.entries(opts.extra ?? {})) if (!RESERVED.has(k)) vars.set(k, v);
  vars.set('messages', messages.map((m) => ({ ...m })));
  vars.set('add_generation_prompt', opts.addGenerationPrompt);
  for (const [k, v] of vars) env.set(k, v);

  let out: unknown;
  try {
    out = new Interpreter(env).run(program).value;
  } catch (e) {
    if (e instanceof TemplateRaised) {
      fail('E_TOKENIZER', `${source} raised an exception: "${e.message}". The conversation does not have the form this chat template accepts; fix the data (or the template).`);
    }
    fail('E_TOKENIZER', `rendering ${source} failed: ${reason(e)}. Fix the template or the messages it is given.`, e);
  }
  if (typeof out !== 'string') {
    fail('E_TOKENIZER', `${source} did not render to text (got ${typeof out}). Fix the template.`);
  }
  return out;
}

function validateMessages(messages: readonly ChatMessage[]): void {
  if (!Array.isArray(messages) || messages.length === 0) {
    fail('E_TOKENIZER', 'a conversation needs at least one message ({"role": ..., "content": ...}).');
  }
  messages.forEach((m, i) => {
    if (typeof m !== 'object' || m === null || !ROLES.includes((m as ChatMessage).role)) {
      fail('E_TOKENIZER', `message ${i}: role must be one of ${ROLES.join(', ')}, got ${JSON.stringify((m as ChatMessage | null)?.role)}. Fix the conversation data.`);
    }
    if (typeof m.content !== 'string') {
      fail('E_TOKENIZER', `message ${i} (${m.role}): content must be a string, got ${typeof m.content}. Fix the conversation data.`);
    }
  });
}

function firstDifference(a: string, b: string): number {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

/**
 * Render and tokenize a conversation, marking which tokens belong to assistant turns.
 *
 * Method. The rendered conversation is split into one segment per message by rendering growing
 * prefixes. With n messages let
 *     P_k = render(messages[:k], add_generation_prompt = (messages[k].role === 'assistant'))  for k < n,
 *     P_n = render(messages, add_generation_prompt = opts.addGenerationPrompt ?? false),
 * and segment_k = P_{k+1} minus P_k. So the generation prompt that opens an assistant turn (e.g.
 * "<|im_start|>assistant\n") belongs to the segment before it, and an assistant segment starts
 * exactly where the model starts generating. Each P_k must be a prefix of P_{k+1}; templates that
 * are not prefix-stable (that render something depending on the whole conversation ahead of the
 * messages) are an E_TOKENIZER naming the template. P_0 (rendering of no messages, e.g. a preamble)
 * is tokenized ahead of the first segment and belongs to no turn; if rendering no messages fails
 * P_0 is taken as "".
 *
 * Each segment is tokenized on its own, without post-processor special tokens, and the ids are
 * concatenated: this is how generation builds sequences (prompt ids, then generated ids appended).
 * Segments after the first are encoded with `Tokenizer.encodeContinuation`, so SentencePiece
 * tokenizers do not get a spurious "▁" at a segment boundary. A bos id is put first only when the
 * tokenizer config says add_bos_token and the rendered text does not already start with bos_token;
 * it too belongs to no turn.
 *
 * Mask: on an assistant segment, 1 from its first token through the first token that is one of
 * the tokenizer's eos ids (the end-of-turn token the model generates, e.g. <|im_end|> or </s>),
 * 0 after it (template formatting such as the "\n" that follows). If the segment holds no eos id,
 * the whole segment is 1. Every other token is 0.
 */
export function encodeChat(
  tokenizer: Tokenizer,
  template: string | undefined,
  messages: readonly ChatMessage[],
  opts: EncodeChatOptions = {},
): ChatEncoding {
  const tpl = template ?? tokenizer.chatTemplate;
  const source =
    opts.templateSource ?? (template === undefined || template === tokenizer.chatTemplate ? tokenizer.chatTemplateSource : DEFAULT_SOURCE);
  if (tpl === undefined) {
    fail('E_TOKENIZER', `${tokenizer.chatTemplateSource} is missing: the tokenizer has no chat template. Add chat_template to tokenizer_config.json or pass a template.`);
  }
  validateMessages(messages);
  const n = messages.length;
  const base: RenderChatOptions = {
    addGenerationPrompt: false,
    bosToken: tokenizer.bosToken,
    eosToken: tokenizer.eosToken,
    extra: opts.extra,
    templateSource: source,
    now: opts.now ?? new Date(),
  };
  const gp = (k: number): boolean => (k < n ? messages[k].role === 'assistant' : (opts.addGenerationPrompt ?? false));

  // The full conversation first, so that the template's own errors are reported for the whole of it.
  const prefixes: string[] = new Array<string>(n + 1);
  prefixes[n] = renderChat(tpl, messages, { ...base, addGenerationPrompt: gp(n) });
  for (let k = n - 1; k >= 1; k--) {
    prefixes[k] = renderChat(tpl, messages.slice(0, k), { ...base, addGenerationPrompt: gp(k) });
  }
  try {
    prefixes[0] = renderChat(tpl, [], { ...base, addGenerationPrompt: gp(0) });
  } catch (e) {
    if (!isMedusaError(e)) throw e;
    prefixes[0] = '';
  }
  for (let k = 0; k < n; k++) {
    const a = prefixes[k];
    const b = prefixes[k + 1];
    if (!b.startsWith(a)) {
      const at = firstDifference(a, b);
      fail(
        'E_TOKENIZER',
        `${source} is not prefix-stable: rendering the first ${k} message(s)` +
          `${gp(k) ? ' with the generation prompt' : ''} is not a prefix of rendering the first ${k + 1}` +
          ` (they differ at character ${at}: ${JSON.stringify(a.slice(at, at + 30))} vs ${JSON.stringify(b.slice(at, at + 30))}). ` +
          `Per-turn loss masks need a template whose output only grows as messages are appended; use such a template (e.g. ChatML).`,
      );
    }
  }

  const text = prefixes[n];
  const ids: number[] = [];
  const mask: number[] = [];
  const turns: ChatTurn[] = [];
  if (tokenizer.addBosToken && tokenizer.bosId !== undefined && !(tokenizer.bosToken !== undefined && text.startsWith(tokenizer.bosToken))) {
    ids.push(tokenizer.bosId);
    mask.push(0);
  }
  let textStarted = false;
  let afterAdded = false;
  const encodePiece = (piece: string): number[] => {
    if (piece.length === 0) return [];
    const out = textStarted ? tokenizer.encodeContinuation(piece, afterAdded) : tokenizer.encode(piece, { addSpecialTokens: false });
    textStarted = true;
    if (out.length > 0) afterAdded = tokenizer.addedTokenIds.has(out[out.length - 1]);
    return out;
  };

  const pre = encodePiece(prefixes[0]);
  ids.push(...pre);
  mask.push(...pre.map(() => 0));
  for (let k = 0; k < n; k++) {
    const seg = encodePiece(prefixes[k + 1].slice(prefixes[k].length));
    const start = ids.length;
    ids.push(...seg);
    if (messages[k].role === 'assistant') {
      const eos = seg.findIndex((id) => tokenizer.isEosId(id));
      const last = eos === -1 ? seg.length - 1 : eos;
      seg.forEach((_, j) => mask.push(j <= last ? 1 : 0));
    } else {
      mask.push(...seg.map(() => 0));
    }
    turns.push({ role: messages[k].role, start, end: ids.length });
  }
  return { ids, assistantMask: mask, turns, text };
}
