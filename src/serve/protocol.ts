/**
 * OpenAI request bodies -> validated generation requests. Every problem is a 400 naming the field
 * (`param`), an unknown model a 404 `model_not_found`, prompt + max_tokens over the context a 400
 * naming both numbers. Fields the server cannot honour (logprobs, penalties, n > 1, echo, tools, ...)
 * are refused when set to a non-default value rather than silently ignored; unknown fields are ignored,
 * as OpenAI-compatible servers do. `null` means "not given" for every optional field.
 */
import { ApiError, badRequest } from './api-error.js';
import { renderChat, type ChatMessage } from '../data/chat.js';
import type { Tokenizer } from '../data/tokenizer.js';

export const PROTOCOL_LIMITS = {
  /** Default max_tokens of /v1/completions (as OpenAI). */
  defaultCompletionTokens: 16,
  maxStopStrings: 16,
  maxStopStringLength: 1000,
  maxStopTokenIds: 1024,
  maxMessages: 100_000,
  maxTemperature: 100,
  /**
   * Text longer than this many characters per context position is refused before tokenizing (it
   * cannot fit: real tokens average ~4 characters), so a huge prompt cannot block the server while
   * the tokenizer works through it.
   */
  maxCharsPerPosition: 64,
} as const;

function checkTextLength(chars: number, param: string, ctx: ProtocolContext): void {
  const max = ctx.maxContext * PROTOCOL_LIMITS.maxCharsPerPosition;
  if (chars > max) {
    throw badRequest(param,
      `This model's maximum context length is ${ctx.maxContext} tokens. However, your ${param} has ${chars} characters; at most ${max} characters (${PROTOCOL_LIMITS.maxCharsPerPosition} per token) are accepted. Please reduce the length of the ${param}.`,
      'context_length_exceeded');
  }
}

export interface ProtocolContext {
  modelName: string;
  tokenizer: Tokenizer;
  /** The model's vocabulary (embedding rows): valid token ids are [0, vocabSize). */
  vocabSize: number;
  /** max_position_embeddings: prompt + max_tokens must fit. */
  maxContext: number;
  maxNewTokensLimit: number;
  /** Ids that end generation unless ignore_eos. */
  eosIds: readonly number[];
  /** Medusa decoding (serve --medusa): top_p / top_k at temperature > 0 are refused (typical acceptance has neither). */
  medusa?: boolean;
}

export interface GenerationRequest {
  kind: 'completion' | 'chat';
  promptIds: number[];
  maxTokens: number;
  temperature: number;
  topP: number;
  /** 0 = off. */
  topK: number;
  /** The row's 32-bit sampling stream seed, or null to draw a random one. */
  seed: number | null;
  stop: string[];
  /** Tokens that end the row (finish_reason "stop"; kept in token_ids, not in the text). */
  stopTokenIds: Set<number>;
  includeStopStr: boolean;
  skipSpecialTokens: boolean;
  stream: boolean;
  includeUsage: boolean;
  returnTokenIds: boolean;
}

type Body = Record<string, unknown>;

const given = (b: Body, k: string): boolean => b[k] !== undefined && b[k] !== null;

function isObject(v: unknown): v is Body {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v;
}

function bool(b: Body, k: string, dflt: boolean): boolean {
  if (!given(b, k)) return dflt;
  if (typeof b[k] !== 'boolean') throw badRequest(k, `'${k}' must be a boolean, got ${typeName(b[k])}.`);
  return b[k] as boolean;
}

function num(b: Body, k: string, dflt: number, lo: number, hi: number, loOpen = false): number {
  if (!given(b, k)) return dflt;
  const v = b[k];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw badRequest(k, `'${k}' must be a number, got ${typeName(v)}.`);
  if (v > hi || v < lo || (loOpen && v === lo)) throw badRequest(k, `'${k}' must be in ${loOpen ? '(' : '['}${lo}, ${hi}], got ${v}.`);
  return v;
}

function int(b: Body, k: string, lo: number, hi: number): number | undefined {
  if (!given(b, k)) return undefined;
  const v = b[k];
  if (typeof v !== 'number' || !Number.isInteger(v)) throw badRequest(k, `'${k}' must be an integer, got ${typeof v === 'number' ? v : typeName(v)}.`);
  if (v < lo || v > hi) throw badRequest(k, `'${k}' must be in [${lo}, ${hi}], got ${v}.`);
  return v;
}

/** Refuse a field the server does not implement unless it has its no-op value. */
function unsupported(b: Body, k: string, isDefault: (v: unknown) => boolean, what = 'is not supported by this server'): void {
  if (given(b, k) && !isDefault(b[k])) throw badRequest(k, `'${k}' = ${JSON.stringify(b[k])} ${what}.`, 'unsupported_parameter');
}

/** A seed of any safe integer, folded to the 32-bit stream seed the sampler uses (identity on [0, 2^32)). */
export function foldSeed(seed: number): number {
  const lo = ((seed % 2 ** 32) + 2 ** 32) % 2 ** 32;
  const hi = ((Math.floor(seed / 2 ** 32) % 2 ** 32) + 2 ** 32) % 2 ** 32;
  return (lo ^ (hi === 0 ? 0 : Math.imul(hi, 0x9e3779b1))) >>> 0;
}

/** The `model` field: optional; when given it must name the served model. */
export function checkModel(b: Body, modelName: string): void {
  if (!given(b, 'model')) return;
  if (typeof b.model !== 'string') throw badRequest('model', `'model' must be a string, got ${typeName(b.model)}.`);
  if (b.model !== modelName) {
    throw new ApiError(404, `The model \`${b.model}\` does not exist. This server serves \`${modelName}\`.`, { param: 'model', code: 'model_not_found' });
  }
}

function checkTokenIds(ids: unknown[], param: string, vocabSize: number): number[] {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (typeof id !== 'number' || !Number.isInteger(id)) throw badRequest(param, `'${param}' token ${i} must be an integer token id, got ${JSON.stringify(id)}.`);
    if (id < 0 || id >= vocabSize) throw badRequest(param, `'${param}' token id ${id} (position ${i}) is outside the vocabulary [0, ${vocabSize}).`, 'invalid_token_id');
  }
  return ids as number[];
}

/** The sampling and output fields both endpoints share. */
function commonFields(b: Body, ctx: ProtocolContext): Omit<GenerationRequest, 'kind' | 'promptIds' | 'maxTokens'> {
  unsupported(b, 'n', (v) => v === 1, 'is not supported: only n = 1 (one choice per request)');
  unsupported(b, 'best_of', (v) => v === 1);
  unsupported(b, 'presence_penalty', (v) => v === 0);
  unsupported(b, 'frequency_penalty', (v) => v === 0);
  unsupported(b, 'repetition_penalty', (v) => v === 1);
  unsupported(b, 'min_p', (v) => v === 0);
  unsupported(b, 'min_tokens', (v) => v === 0);
  unsupported(b, 'logit_bias', (v) => isObject(v) && Object.keys(v).length === 0);
  unsupported(b, 'use_beam_search', (v) => v === false);
  unsupported(b, 'response_format', (v) => isObject(v) && v.type === 'text');
  unsupported(b, 'guided_json', () => false);
  unsupported(b, 'guided_regex', () => false);
  unsupported(b, 'guided_choice', () => false);
  unsupported(b, 'guided_grammar', () => false);
  unsupported(b, 'prompt_logprobs', () => false);

  const temperature = num(b, 'temperature', 1, 0, PROTOCOL_LIMITS.maxTemperature);
  const topP = num(b, 'top_p', 1, 0, 1, true);
  const topKRaw = int(b, 'top_k', -1, Number.MAX_SAFE_INTEGER);
  const topK = topKRaw === undefined || topKRaw <= 0 ? 0 : Math.min(topKRaw, ctx.vocabSize);
  if (ctx.medusa && temperature > 0 && (topP < 1 || (topK > 0 && topK < ctx.vocabSize))) {
    throw badRequest(topP < 1 ? 'top_p' : 'top_k',
      `This server decodes with Medusa heads: at temperature > 0 it uses typical acceptance, which has no ${topP < 1 ? 'top_p' : 'top_k'}. Leave top_p at 1 and top_k unset, or send temperature 0 for greedy decoding.`);
  }
  const seedRaw = int(b, 'seed', Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  const seed = seedRaw === undefined ? null : foldSeed(seedRaw);

  let stop: string[] = [];
  if (given(b, 'stop')) {
    const s = b.stop;
    if (typeof s === 'string') stop = [s];
    else if (Array.isArray(s) && s.every((x) => typeof x === 'string')) stop = s as string[];
    else throw badRequest('stop', `'stop' must be a string or a list of strings, got ${typeName(s)}.`);
    if (stop.length > PROTOCOL_LIMITS.maxStopStrings) throw badRequest('stop', `'stop' has ${stop.length} strings; at most ${PROTOCOL_LIMITS.maxStopStrings} are allowed.`);
    for (const x of stop) {
      if (x.length === 0) throw badRequest('stop', "'stop' strings must not be empty.");
      if (x.length > PROTOCOL_LIMITS.maxStopStringLength) throw badRequest('stop', `'stop' strings must be at most ${PROTOCOL_LIMITS.maxStopStringLength} characters.`);
    }
  }

  const ignoreEos = bool(b, 'ignore_eos', false);
  const stopTokenIds = new Set<number>(ignoreEos ? [] : ctx.eosIds);
  if (given(b, 'stop_token_ids')) {
    const s = b.stop_token_ids;
    if (!Array.isArray(s)) throw badRequest('stop_token_ids', `'stop_token_ids' must be a list of token ids, got ${typeName(s)}.`);
    if (s.length > PROTOCOL_LIMITS.maxStopTokenIds) throw badRequest('stop_token_ids', `'stop_token_ids' has ${s.length} ids; at most ${PROTOCOL_LIMITS.maxStopTokenIds} are allowed.`);
    for (const id of checkTokenIds(s, 'stop_token_ids', ctx.vocabSize)) stopTokenIds.add(id);
  }

  const stream = bool(b, 'stream', false);
  let includeUsage = false;
  if (given(b, 'stream_options')) {
    const so = b.stream_options;
    if (!isObject(so)) throw badRequest('stream_options', `'stream_options' must be an object, got ${typeName(so)}.`);
    if (!stream) throw badRequest('stream_options', "'stream_options' is only allowed when 'stream' is true.");
    includeUsage = bool(so, 'include_usage', false);
  }

  return {
    temperature, topP, topK, seed, stop, stopTokenIds,
    includeStopStr: bool(b, 'include_stop_str_in_output', false),
    skipSpecialTokens: bool(b, 'skip_special_tokens', true),
    stream, includeUsage,
    returnTokenIds: bool(b, 'return_token_ids', false),
  };
}

/** max_tokens against the server limit and the context; `dflt` when not given (null: as many as fit). */
function maxTokens(b: Body, keys: string[], promptLen: number, promptParam: string, dflt: number | null, ctx: ProtocolContext): number {
  let requested: number | undefined;
  let key = keys[0];
  for (const k of keys) {
    const v = int(b, k, 1, Number.MAX_SAFE_INTEGER);
    if (v !== undefined) {
      requested = v;
      key = k;
      break;
    }
  }
  const room = ctx.maxContext - promptLen;
  if (room < 1) {
    throw badRequest(promptParam,
      `This model's maximum context length is ${ctx.maxContext} tokens. However, your prompt has ${promptLen} tokens, which leaves no room for a completion. Please reduce the length of the ${promptParam}.`,
      'context_length_exceeded');
  }
  if (requested !== undefined && requested > ctx.maxNewTokensLimit) {
    throw badRequest(key, `'${key}' = ${requested} exceeds this server's limit of ${ctx.maxNewTokensLimit} new tokens per request.`);
  }
  const n = requested ?? Math.min(dflt ?? ctx.maxNewTokensLimit, ctx.maxNewTokensLimit, room);
  if (promptLen + n > ctx.maxContext) {
    throw badRequest(key,
      `This model's maximum context length is ${ctx.maxContext} tokens. However, you requested ${promptLen + n} tokens (${promptLen} in the ${promptParam}, ${n} in the completion). Please reduce the length of the ${promptParam} or the completion.`,
      'context_length_exceeded');
  }
  return n;
}

/** POST /v1/completions. */
export function parseCompletionRequest(b: Body, ctx: ProtocolContext): GenerationRequest {
  checkModel(b, ctx.modelName);
  unsupported(b, 'echo', (v) => v === false);
  unsupported(b, 'suffix', () => false);
  unsupported(b, 'logprobs', () => false, 'is not supported by this server (logprobs are not returned)');
  if (!given(b, 'prompt')) throw badRequest('prompt', "'prompt' is required: a string or a list of token ids.");
  let p = b.prompt;
  // A list holding one prompt (["text"] or [[ids]]) is that prompt; more than one is refused.
  if (Array.isArray(p) && p.length > 0 && (typeof p[0] === 'string' || Array.isArray(p[0]))) {
    if (p.length > 1) throw badRequest('prompt', `'prompt' holds ${p.length} prompts: this server takes one prompt per request.`);
    p = p[0];
  }
  let promptIds: number[];
  if (typeof p === 'string') {
    checkTextLength(p.length, 'prompt', ctx);
    promptIds = ctx.tokenizer.encode(p);
  } else if (Array.isArray(p)) {
    promptIds = checkTokenIds(p, 'prompt', ctx.vocabSize);
  } else {
    throw badRequest('prompt', `'prompt' must be a string or a list of token ids, got ${typeName(p)}.`);
  }
  if (promptIds.length === 0) throw badRequest('prompt', "'prompt' is empty: it must have at least one token.");
  const common = commonFields(b, ctx);
  return { kind: 'completion', promptIds, maxTokens: maxTokens(b, ['max_tokens'], promptIds.length, 'prompt', PROTOCOL_LIMITS.defaultCompletionTokens, ctx), ...common };
}

const ROLES = new Set(['system', 'user', 'assistant']);

function messageContent(m: Body, i: number): string {
  const c = m.content;
  if (typeof c === 'string') return c;
  // Content parts: only text parts, concatenated.
  if (Array.isArray(c)) {
    return c.map((part, j) => {
      if (!isObject(part) || part.type !== 'text' || typeof part.text !== 'string') {
        throw badRequest(`messages[${i}].content[${j}]`, `messages[${i}].content[${j}] must be a text part {"type": "text", "text": string}; this server handles text only.`);
      }
      return part.text;
    }).join('');
  }
  throw badRequest(`messages[${i}].content`, `messages[${i}].content must be a string, got ${typeName(c)}.`);
}

/** POST /v1/chat/completions. */
export function parseChatRequest(b: Body, ctx: ProtocolContext): GenerationRequest {
  checkModel(b, ctx.modelName);
  unsupported(b, 'logprobs', (v) => v === false, 'is not supported by this server (logprobs are not returned)');
  unsupported(b, 'top_logprobs', (v) => v === 0);
  unsupported(b, 'tools', (v) => Array.isArray(v) && v.length === 0, 'is not supported: this server has no tool calling');
  unsupported(b, 'tool_choice', (v) => v === 'none');
  unsupported(b, 'functions', (v) => Array.isArray(v) && v.length === 0);
  if (!given(b, 'messages')) throw badRequest('messages', "'messages' is required: a list of {role, content}.");
  const raw = b.messages;
  if (!Array.isArray(raw) || raw.length === 0) throw badRequest('messages', "'messages' must be a non-empty list of {role, content}.");
  if (raw.length > PROTOCOL_LIMITS.maxMessages) throw badRequest('messages', `'messages' has ${raw.length} entries; at most ${PROTOCOL_LIMITS.maxMessages} are allowed.`);
  const messages: ChatMessage[] = raw.map((m, i) => {
    if (!isObject(m)) throw badRequest(`messages[${i}]`, `messages[${i}] must be an object {role, content}.`);
    const role = m.role === 'developer' ? 'system' : m.role;
    if (typeof role !== 'string' || !ROLES.has(role)) {
      throw badRequest(`messages[${i}].role`, `messages[${i}].role must be one of system, user, assistant (developer is read as system), got ${JSON.stringify(m.role ?? null)}.`);
    }
    return { role: role as ChatMessage['role'], content: messageContent(m, i) };
  });
  checkTextLength(messages.reduce((n, m) => n + m.content.length, 0), 'messages', ctx);
  const tok = ctx.tokenizer;
  if (!tok.chatTemplate) throw badRequest('messages', `The model's tokenizer has no chat template (${tok.chatTemplateSource}); use /v1/completions.`);
  // Chat template problems (e.g. a template that refuses the role order) are the request's: 400.
  const text = renderChat(tok.chatTemplate, messages, { addGenerationPrompt: true, bosToken: tok.bosToken, eosToken: tok.eosToken, templateSource: tok.chatTemplateSource });
  const promptIds = tok.encode(text, { addSpecialTokens: false });
  if (promptIds.length === 0) throw badRequest('messages', 'The rendered conversation is empty.');
  const common = commonFields(b, ctx);
  return { kind: 'chat', promptIds, maxTokens: maxTokens(b, ['max_completion_tokens', 'max_tokens'], promptIds.length, 'messages', null, ctx), ...common };
}
