/**
 * Tokenizers from a Hugging Face model folder (tokenizer.json + tokenizer_config.json), run in pure
 * JS by @huggingface/tokenizers. This wrapper adds what training needs on top of the library:
 * validation with errors that name the file and the fix, the special-token ids (bos / eos list /
 * pad), the chat template, a content hash for dataset metadata, and "continuation" encoding of a
 * piece of text appended to an existing sequence (see `encodeContinuation`).
 *
 * Library quirks handled here (checked against @huggingface/tokenizers 0.2.0):
 *  - `decode([])` throws; we return "".
 *  - `clean_up_tokenization_spaces` defaults to true in the library (it rewrites " ." to "." and so
 *    breaks round trips); we default it to false unless tokenizer_config.json sets it.
 *  - An unknown `model.type` with a `vocab` is silently treated as a "Legacy" whitespace model; we
 *    reject every model type other than BPE, WordPiece and Unigram instead.
 *  - The library requires the keys normalizer / pre_tokenizer / post_processor / decoder /
 *    added_tokens to be present; missing ones are filled in as null / [] (what HF would assume).
 *  - An old-style Metaspace pre-tokenizer `{add_prefix_space: false}` without `prepend_scheme` is
 *    read by the library as prepend_scheme "always"; we pass prepend_scheme "never" as HF does.
 */

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { describe, fail } from '../errors.js';

/** A dependency's error message without its trailing period (we append our own sentence). */
const reason = (e: unknown): string => describe(e).replace(/[.\s]+$/, '');

/** tokenizer.json model types the library implements. */
export const SUPPORTED_MODEL_TYPES = ['BPE', 'WordPiece', 'Unigram'] as const;

export interface EncodeOptions {
  /**
   * Run the tokenizer.json post-processor (e.g. Llama's TemplateProcessing adds <s>). Default true,
   * as in Hugging Face `tokenizer.encode`. Special tokens written in the text are always encoded as
   * their single ids, whatever this flag says.
   */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (added tokens marked special, and additional_special_tokens). Default false. */
  skipSpecialTokens?: boolean;
  /** Default: tokenizer_config.json's clean_up_tokenization_spaces, else false (exact round trip). */
  cleanUpTokenizationSpaces?: boolean;
}

export interface TokenizerSourceOptions {
  /** Contents of special_tokens_map.json (fills special tokens tokenizer_config.json does not set). */
  specialTokensMap?: unknown;
  /** Contents of generation_config.json (its eos_token_id: int or list joins `eosIds`). */
  generationConfig?: unknown;
  /** Contents of the model's config.json (its eos_token_id: int or list joins `eosIds`). */
  modelConfig?: unknown;
  /** A chat template that overrides tokenizer_config.json's (e.g. a chat_template.jinja file). */
  chatTemplate?: { template: string; source: string };
  /** File labels used in error messages (defaults: the bare file names). */
  labels?: Partial<Record<'tokenizerJson' | 'tokenizerConfig' | 'specialTokensMap' | 'generationConfig' | 'modelConfig', string>>;
}

type Json = Record<string, unknown>;
type PrefixMode = 'none' | 'always' | 'first';

const FILES = {
  tokenizerJson: 'tokenizer.json',
  tokenizerConfig: 'tokenizer_config.json',
  specialTokensMap: 'special_tokens_map.json',
  generationConfig: 'generation_config.json',
  modelConfig: 'config.json',
  chatTemplate: 'chat_template.jinja',
} as const;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** JSON with object keys sorted recursively: the same content always hashes the same. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return '[' + value.map(canonicalJson).join(',') + ']';
  if (isObject(value)) {
    const keys = Object.keys(value).sort();
    return '{' + keys.filter((k) => value[k] !== undefined).map((k) => JSON.stringify(k) + ':' + canonicalJson(value[k])).join(',') + '}';
  }
  return JSON.stringify(value) ?? 'null';
}

/**
 * Parse an `eos_token_id` field of generation_config.json / config.json: an int, a list of ints,
 * or null/absent (-> []). Anything else is an E_TOKENIZER naming `source`.
 */
export function parseEosTokenId(value: unknown, source: string): number[] {
  if (value === undefined || value === null) return [];
  const list = Array.isArray(value) ? value : [value];
  for (const v of list) {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
      fail(
        'E_TOKENIZER',
        `${source}: eos_token_id must be a non-negative integer or a list of them, got ${JSON.stringify(value)}. ` +
          `Fix eos_token_id in ${source}.`,
      );
    }
  }
  return list as number[];
}

/**
 * The ids that end generation: tokenizer_config.json's eos_token first, then every id of the
 * generation_config.json / config.json `eos_token_id` fields (int or list), without duplicates.
 * Ids outside the vocabulary are an E_TOKENIZER naming their source.
 */
export function resolveEosIds(
  eosTokenId: number | undefined,
  fields: { value: unknown; source: string }[],
  vocabSize?: number,
): number[] {
  const out: number[] = [];
  if (eosTokenId !== undefined) out.push(eosTokenId);
  for (const { value, source } of fields) {
    for (const id of parseEosTokenId(value, source)) {
      if (vocabSize !== undefined && id >= vocabSize) {
        fail(
          'E_TOKENIZER',
          `${source}: eos_token_id ${id} is outside the tokenizer's vocabulary (size ${vocabSize}). ` +
            `Fix eos_token_id in ${source} or use the tokenizer that belongs to this model.`,
        );
      }
      if (!out.includes(id)) out.push(id);
    }
  }
  return out;
}

/** A special-token entry: "<s>" or {"content": "<s>", ...} (AddedToken form); null/absent -> undefined. */
function specialTokenString(value: unknown, key: string, source: string): string | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') return value;
  if (isObject(value) && typeof value.content === 'string') return value.content;
  return fail(
    'E_TOKENIZER',
    `${source}: ${key} must be a string or an object with a "content" string, got ${JSON.stringify(value)}. Fix ${key} in ${source}.`,
  );
}

function parseJsonText(text: string, label: string): Json {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    return fail('E_TOKENIZER', `${label} is not valid JSON (${reason(e)}). Re-download or repair ${label}.`, e);
  }
  if (!isObject(parsed)) {
    return fail('E_TOKENIZER', `${label} must contain a JSON object, got ${Array.isArray(parsed) ? 'an array' : typeof parsed}. Re-download or repair ${label}.`);
  }
  return parsed;
}

async function readText(path: string, required: boolean, what: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return undefined;
    if (code === 'ENOENT') {
      return fail('E_IO', `${path} not found: ${what}. Point the tokenizer path at a Hugging Face model folder that contains it.`, e);
    }
    return fail('E_IO', `cannot read ${path} (${reason(e)}). Check that it is a readable file.`, e);
  }
}

function patchPreTokenizer(pt: unknown, removePrefix: boolean): unknown {
  if (!isObject(pt)) return pt;
  if (pt.type === 'Sequence' && Array.isArray(pt.pretokenizers)) {
    return { ...pt, pretokenizers: pt.pretokenizers.map((p) => patchPreTokenizer(p, removePrefix)) };
  }
  if (pt.type === 'Metaspace') {
    let scheme = pt.prepend_scheme ?? (pt.add_prefix_space === false ? 'never' : 'always');
    if (removePrefix) scheme = 'never';
    return { ...pt, prepend_scheme: scheme };
  }
  if (pt.type === 'ByteLevel' && removePrefix) return { ...pt, add_prefix_space: false };
  return pt;
}

function removePrependNormalizer(n: unknown): unknown {
  if (!isObject(n)) return n;
  if (n.type === 'Prepend') return null;
  if (n.type === 'Sequence' && Array.isArray(n.normalizers)) {
    return { ...n, normalizers: n.normalizers.map(removePrependNormalizer).filter((x) => x !== null) };
  }
  return n;
}

function detectPrefixMode(tj: Json): PrefixMode {
  let mode: PrefixMode = 'none';
  const visitNorm = (n: unknown): void => {
    if (!isObject(n)) return;
    if (n.type === 'Prepend') mode = 'always';
    if (n.type === 'Sequence' && Array.isArray(n.normalizers)) n.normalizers.forEach(visitNorm);
  };
  const visitPre = (p: unknown): void => {
    if (!isObject(p)) return;
    if (p.type === 'Sequence' && Array.isArray(p.pretokenizers)) p.pretokenizers.forEach(visitPre);
    if (p.type === 'Metaspace') {
      const scheme = p.prepend_scheme ?? (p.add_prefix_space === false ? 'never' : 'always');
      if (scheme === 'always') mode = 'always';
      else if (scheme === 'first' && mode === 'none') mode = 'first';
    }
    if (p.type === 'ByteLevel' && p.add_prefix_space === true) mode = 'always';
  };
  visitNorm(tj.normalizer);
  visitPre(tj.pre_tokenizer);
  return mode;
}

/** The tokenizer.json we hand to the library: missing optional parts filled in, Metaspace fixed. */
function libraryJson(tj: Json, removePrefix: boolean): Json {
  const out: Json = {
    ...tj,
    normalizer: tj.normalizer ?? null,
    pre_tokenizer: patchPreTokenizer(tj.pre_tokenizer ?? null, removePrefix),
    post_processor: tj.post_processor ?? null,
    decoder: tj.decoder ?? null,
    added_tokens: tj.added_tokens ?? [],
  };
  if (removePrefix) out.normalizer = removePrependNormalizer(out.normalizer);
  return out;
}

export class Tokenizer {
  /** Number of ids (max id + 1, added tokens included): the minimum embedding rows a model needs. */
  readonly vocabSize: number;
  readonly modelType: string;
  readonly bosToken: string | undefined;
  readonly bosId: number | undefined;
  /** tokenizer_config.json's eos_token (for chat models usually the end-of-turn token). */
  readonly eosToken: string | undefined;
  /** Every id that ends generation: eos_token's id, then generation_config/config eos_token_id(s). */
  readonly eosIds: readonly number[];
  readonly padToken: string | undefined;
  readonly padId: number | undefined;
  readonly unkToken: string | undefined;
  readonly unkId: number | undefined;
  /** tokenizer_config.json add_bos_token, else whether the post-processor puts bos first. */
  readonly addBosToken: boolean;
  /** The chat template to use: chat_template.jinja, else tokenizer_config's chat_template ("default" if named). */
  readonly chatTemplate: string | undefined;
  /** All named chat templates (a string chat_template is named "default"). */
  readonly chatTemplates: Readonly<Record<string, string>>;
  /** Where `chatTemplate` came from, for error messages. */
  readonly chatTemplateSource: string;
  /** sha256 hex of canonical tokenizer.json + tokenizer_config.json (+ chat_template.jinja when used). */
  readonly hash: string;
  /** Ids of added tokens marked special. */
  readonly specialIds: ReadonlySet<number>;
  /** Ids of all added tokens (special or not): tokens matched verbatim in text. */
  readonly addedTokenIds: ReadonlySet<number>;
  /** Raw tokenizer_config.json. */
  readonly config: Readonly<Json>;

  private readonly lib: HfTokenizer;
  private readonly prefixMode: PrefixMode;
  private noPrefixLib: HfTokenizer | undefined;
  private readonly libJsonNoPrefix: () => Json;
  private readonly libConfig: Json;
  private readonly cleanUp: boolean;
  private readonly labels: { tokenizerJson: string; tokenizerConfig: string };
  /** Added-token contents grouped by first character, longest first (to find them in text). */
  private readonly addedByFirstChar: Map<string, string[]>;

  private constructor(tokenizerJson: unknown, tokenizerConfig: unknown, opts: TokenizerSourceOptions = {}) {
    const L = {
      tokenizerJson: opts.labels?.tokenizerJson ?? FILES.tokenizerJson,
      tokenizerConfig: opts.labels?.tokenizerConfig ?? FILES.tokenizerConfig,
      specialTokensMap: opts.labels?.specialTokensMap ?? FILES.specialTokensMap,
      generationConfig: opts.labels?.generationConfig ?? FILES.generationConfig,
      modelConfig: opts.labels?.modelConfig ?? FILES.modelConfig,
    };
    this.labels = L;
    if (!isObject(tokenizerJson)) fail('E_TOKENIZER', `${L.tokenizerJson} must contain a JSON object. Re-download or repair ${L.tokenizerJson}.`);
    if (!isObject(tokenizerConfig)) fail('E_TOKENIZER', `${L.tokenizerConfig} must contain a JSON object. Re-download or repair ${L.tokenizerConfig}.`);
    const tj = tokenizerJson;
    const tc = tokenizerConfig;
    this.config = tc;

    const model = tj.model;
    if (!isObject(model)) {
      fail('E_TOKENIZER', `${L.tokenizerJson} has no "model" object. This is not a Hugging Face tokenizer.json; re-download it or convert the tokenizer with the tokenizers library.`);
    }
    const modelType = model.type;
    if (typeof modelType !== 'string' || !(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
      fail(
        'E_TOKENIZER',
        `${L.tokenizerJson}: model type ${JSON.stringify(modelType ?? null)} is not supported by @huggingface/tokenizers ` +
          `(supported: ${SUPPORTED_MODEL_TYPES.join(', ')}). Use a model whose tokenizer.json has one of these types.`,
      );
    }
    this.modelType = modelType;
    if (tj.added_tokens !== undefined && !Array.isArray(tj.added_tokens)) {
      fail('E_TOKENIZER', `${L.tokenizerJson}: added_tokens must be a list. Re-download or repair ${L.tokenizerJson}.`);
    }

    // The library reads only a few tokenizer_config fields; chat_template etc. are ours.
    this.libConfig = { ...tc };
    this.prefixMode = detectPrefixMode(tj);
    this.libJsonNoPrefix = () => libraryJson(tj, true);
    try {
      this.lib = new HfTokenizer(libraryJson(tj, false), this.libConfig);
    } catch (e) {
      fail(
        'E_TOKENIZER',
        `cannot build the tokenizer from ${L.tokenizerJson}: ${reason(e)}. ` +
          `The file uses a component @huggingface/tokenizers does not implement or is malformed; use a standard Hugging Face tokenizer.json.`,
        e,
      );
    }

    const vocab = (this.lib.model?.vocab ?? []) as (string | undefined)[];
    this.vocabSize = vocab.length;
    if (this.vocabSize === 0) fail('E_TOKENIZER', `${L.tokenizerJson}: the vocabulary is empty. Re-download ${L.tokenizerJson}.`);

    const special = new Set<number>();
    const added = new Set<number>();
    const byFirst = new Map<string, string[]>();
    for (const [id, t] of this.lib.get_added_tokens_decoder()) {
      added.add(id);
      if (t.special) special.add(id);
      if (t.content.length > 0) {
        const list = byFirst.get(t.content[0]) ?? [];
        list.push(t.content);
        byFirst.set(t.content[0], list);
      }
    }
    for (const list of byFirst.values()) list.sort((a, b) => b.length - a.length);
    this.specialIds = special;
    this.addedTokenIds = added;
    this.addedByFirstChar = byFirst;

    // Special tokens: tokenizer_config.json wins, special_tokens_map.json fills the gaps.
    const stm = isObject(opts.specialTokensMap) ? opts.specialTokensMap : {};
    const pick = (key: string): { token: string | undefined; id: number | undefined } => {
      const fromConfig = specialTokenString(tc[key], key, L.tokenizerConfig);
      const token = fromConfig ?? specialTokenString(stm[key], key, L.specialTokensMap);
      if (token === undefined) return { token: undefined, id: undefined };
      const id = this.lib.token_to_id(token);
      if (id === undefined) {
        const where = fromConfig !== undefined ? L.tokenizerConfig : L.specialTokensMap;
        fail(
          'E_TOKENIZER',
          `${where}: ${key} ${JSON.stringify(token)} is not in the vocabulary of ${L.tokenizerJson}. ` +
            `Fix ${key} in ${where}, or add the token to added_tokens in ${L.tokenizerJson}.`,
        );
      }
      return { token, id };
    };
    const bos = pick('bos_token');
    const eos = pick('eos_token');
    const pad = pick('pad_token');
    const unk = pick('unk_token');
    this.bosToken = bos.token;
    this.bosId = bos.id;
    this.eosToken = eos.token;
    this.padToken = pad.token;
    this.padId = pad.id;
    this.unkToken = unk.token;
    this.unkId = unk.id;
    const fields: { value: unknown; source: string }[] = [];
    if (isObject(opts.generationConfig)) fields.push({ value: opts.generationConfig.eos_token_id, source: L.generationConfig });
    if (isObject(opts.modelConfig)) fields.push({ value: opts.modelConfig.eos_token_id, source: L.modelConfig });
    this.eosIds = resolveEosIds(eos.id, fields, this.vocabSize);

    if (tc.clean_up_tokenization_spaces !== undefined && typeof tc.clean_up_tokenization_spaces !== 'boolean') {
      fail('E_TOKENIZER', `${L.tokenizerConfig}: clean_up_tokenization_spaces must be true or false. Fix it in ${L.tokenizerConfig}.`);
    }
    this.cleanUp = tc.clean_up_tokenization_spaces === true;

    if (tc.add_bos_token !== undefined && typeof tc.add_bos_token !== 'boolean') {
      fail('E_TOKENIZER', `${L.tokenizerConfig}: add_bos_token must be true or false. Fix it in ${L.tokenizerConfig}.`);
    }
    if (typeof tc.add_bos_token === 'boolean') {
      this.addBosToken = tc.add_bos_token;
    } else {
      const probe = this.libEncode(this.lib, '', true);
      this.addBosToken = this.bosId !== undefined && probe[0] === this.bosId;
    }

    // Chat templates.
    const templates: Record<string, string> = {};
    const ct = tc.chat_template;
    const ctSource = `${L.tokenizerConfig} (chat_template)`;
    if (typeof ct === 'string') {
      templates.default = ct;
    } else if (Array.isArray(ct)) {
      for (const entry of ct) {
        if (!isObject(entry) || typeof entry.name !== 'string' || typeof entry.template !== 'string') {
          fail('E_TOKENIZER', `${ctSource}: a list chat_template must hold {"name": string, "template": string} entries. Fix chat_template in ${L.tokenizerConfig}.`);
        }
        templates[entry.name] = entry.template;
      }
    } else if (ct !== undefined && ct !== null) {
      fail('E_TOKENIZER', `${ctSource} must be a string or a list of {name, template}, got ${typeof ct}. Fix chat_template in ${L.tokenizerConfig}.`);
    }
    if (opts.chatTemplate) {
      templates.default = opts.chatTemplate.template;
      this.chatTemplateSource = opts.chatTemplate.source;
    } else {
      this.chatTemplateSource = Array.isArray(ct) ? `${L.tokenizerConfig} (chat_template "default")` : ctSource;
    }
    this.chatTemplates = templates;
    this.chatTemplate = templates.default;

    const h = createHash('sha256');
    h.update('tokenizer.json\0').update(canonicalJson(tj)).update('\0tokenizer_config.json\0').update(canonicalJson(tc));
    if (opts.chatTemplate) h.update('\0chat_template\0').update(opts.chatTemplate.template);
    this.hash = h.digest('hex');
  }

  /** Build from in-memory tokenizer.json / tokenizer_config.json contents (objects or JSON text). */
  static fromJSON(tokenizerJson: unknown, tokenizerConfig: unknown, opts: TokenizerSourceOptions = {}): Tokenizer {
    const tj = typeof tokenizerJson === 'string' ? parseJsonText(tokenizerJson, opts.labels?.tokenizerJson ?? FILES.tokenizerJson) : tokenizerJson;
    const tc = typeof tokenizerConfig === 'string' ? parseJsonText(tokenizerConfig, opts.labels?.tokenizerConfig ?? FILES.tokenizerConfig) : tokenizerConfig;
    return new Tokenizer(tj, tc, opts);
  }

  /**
   * Load a Hugging Face tokenizer folder: tokenizer.json and tokenizer_config.json (required),
   * special_tokens_map.json, generation_config.json, config.json, chat_template.jinja (optional).
   */
  static async load(dir: string): Promise<Tokenizer> {
    const p = (f: string): string => join(dir, f);
    const tjText = await readText(p(FILES.tokenizerJson), true, 'the tokenizer needs tokenizer.json (the fast-tokenizer file)');
    const tcText = await readText(p(FILES.tokenizerConfig), true, 'the tokenizer needs tokenizer_config.json (special tokens and chat template)');
    const optional = async (f: string): Promise<Json | undefined> => {
      const text = await readText(p(f), false, f);
      return text === undefined ? undefined : parseJsonText(text, p(f));
    };
    const specialTokensMap = await optional(FILES.specialTokensMap);
    const generationConfig = await optional(FILES.generationConfig);
    const modelConfig = await optional(FILES.modelConfig);
    const jinja = await readText(p(FILES.chatTemplate), false, FILES.chatTemplate);
    return new Tokenizer(parseJsonText(tjText!, p(FILES.tokenizerJson)), parseJsonText(tcText!, p(FILES.tokenizerConfig)), {
      specialTokensMap,
      generationConfig,
      modelConfig,
      chatTemplate: jinja === undefined ? undefined : { template: jinja, source: p(FILES.chatTemplate) },
      labels: {
        tokenizerJson: p(FILES.tokenizerJson),
        tokenizerConfig: p(FILES.tokenizerConfig),
        specialTokensMap: p(FILES.specialTokensMap),
        generationConfig: p(FILES.generationConfig),
        modelConfig: p(FILES.modelConfig),
      },
    });
  }

  private libEncode(lib: HfTokenizer, text: string, addSpecialTokens: boolean): number[] {
    let ids: (number | undefined)[];
    try {
      ids = lib.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    } catch (e) {
      return fail('E_TOKENIZER', `encoding failed with the tokenizer from ${this.labels.tokenizerJson}: ${reason(e)}.`, e);
    }
    if (ids.some((id) => id === undefined)) {
      fail(
        'E_TOKENIZER',
        `the text contains characters the tokenizer from ${this.labels.tokenizerJson} cannot represent, and it has no unk_token. ` +
          `Clean the data or use a byte-level / byte-fallback tokenizer.`,
      );
    }
    return ids as number[];
  }

  /** Text -> ids. Special tokens written in the text become their single ids. */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    return this.libEncode(this.lib, text, opts.addSpecialTokens ?? true);
  }

  /**
   * Encode `text` as the continuation of a sequence that already has tokens, so that
   * concatenating the pieces gives what tokenizing the whole text at once gives. For byte-level
   * tokenizers this is plain `encode(text, {addSpecialTokens: false})`. SentencePiece-style
   * tokenizers (Metaspace pre-tokenizer or a Prepend("▁") normalizer, e.g. Llama-2, Mistral) put a
   * "▁" before the start of every text section; a continuation must not get one where the whole
   * text would not have it. `afterAddedToken`: whether the previous piece ended with an added
   * token (then this piece starts a new section, as in the whole text).
   */
  encodeContinuation(text: string, afterAddedToken: boolean): number[] {
    if (this.prefixMode === 'none' || text.length === 0) return this.encode(text, { addSpecialTokens: false });
    const cut = this.firstAddedTokenIndex(text);
    const head = text.slice(0, cut);
    const rest = text.slice(cut);
    const ids: number[] = [];
    if (head.length > 0) {
      // Whole-text tokenization prefixes this section only if it starts after an added token and
      // the scheme is "always" ("first" prefixes only the very first section of a sequence).
      const withPrefix = afterAddedToken && this.prefixMode === 'always';
      ids.push(...this.libEncode(withPrefix ? this.lib : this.noPrefix(), head, false));
    }
    // `rest` starts with an added token, so its sections get exactly the prefixes they get in the whole text.
    if (rest.length > 0) ids.push(...this.libEncode(this.lib, rest, false));
    return ids;
  }

  private noPrefix(): HfTokenizer {
    if (!this.noPrefixLib) {
      try {
        this.noPrefixLib = new HfTokenizer(this.libJsonNoPrefix(), this.libConfig);
      } catch (e) {
        return fail('E_TOKENIZER', `cannot build the tokenizer from ${this.labels.tokenizerJson}: ${reason(e)}.`, e);
      }
    }
    return this.noPrefixLib;
  }

  /** Index of the first added token in `text` (text.length if none). */
  private firstAddedTokenIndex(text: string): number {
    for (let i = 0; i < text.length; i++) {
      const candidates = this.addedByFirstChar.get(text[i]);
      if (candidates && candidates.some((c) => text.startsWith(c, i))) return i;
    }
    return text.length;
  }

  /** Ids -> text. Ids must be integers in [0, vocabSize). */
  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    if (ids.length === 0) return '';
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize || this.lib.id_to_token(id) === undefined) {
        fail('E_TOKENIZER', `cannot decode token id ${id}: not in the vocabulary of ${this.labels.tokenizerJson} (ids 0..${this.vocabSize - 1}). The ids were produced by a different tokenizer or model.`);
      }
    }
    try {
      return this.lib.decode(ids as number[], {
        skip_special_tokens: opts.skipSpecialTokens ?? false,
        clean_up_tokenization_spaces: opts.cleanUpTokenizationSpaces ?? this.cleanUp,
      });
    } catch (e) {
      return fail('E_TOKENIZER', `decoding failed with the tokenizer from ${this.labels.tokenizerJson}: ${reason(e)}.`, e);
    }
  }

  idToToken(id: number): string | undefined {
    return Number.isInteger(id) && id >= 0 ? this.lib.id_to_token(id) : undefined;
  }

  tokenToId(token: string): number | undefined {
    return this.lib.token_to_id(token);
  }

  isSpecialId(id: number): boolean {
    return this.specialIds.has(id);
  }

  isEosId(id: number): boolean {
    return this.eosIds.includes(id);
  }
}

/** Load a Hugging Face tokenizer folder (see `Tokenizer.load`). */
export function loadTokenizer(dir: string): Promise<Tokenizer> {
  return Tokenizer.load(dir);
}

