import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MedusaError } from '../src/errors.js';
import { Tokenizer, canonicalJson, loadTokenizer, parseEosTokenId, resolveEosIds } from '../src/data/tokenizer.js';
import { TINY_VOCAB_SIZE, buildTinyTokenizer, bytesToUnicode, CHATML_TEMPLATE } from '../src/model/tiny-tokenizer.js';
import { llamaTokenizerJson } from './helpers/llama-tokenizer.js';
import { Rng } from '../src/model/sampling.js';

/** Runs `fn` and returns the MedusaError it throws (fails the test if it throws something else or nothing). */
async function errorOf(fn: () => unknown): Promise<MedusaError> {
  try {
    await fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    return e as MedusaError;
  }
  throw new Error('expected a MedusaError, nothing was thrown');
}

function tiny(): Tokenizer {
  const t = buildTinyTokenizer();
  return Tokenizer.fromJSON(t.tokenizerJson, t.tokenizerConfig, { generationConfig: t.generationConfig, specialTokensMap: t.specialTokensMap });
}

/** Deterministic PRNG (mulberry32, the project's seeded generator). */
function rng(seed: number): () => number {
  const r = new Rng(seed);
  return () => r.next();
}

/** A random valid string (no lone surrogates) mixing ASCII, whitespace, Latin-1, CJK, emoji and more. */
function randomText(r: () => number, len: number): string {
  const pools: [number, number][] = [
    [0x20, 0x7e], [0x20, 0x20], [0x0a, 0x0a], [0x09, 0x0d], [0x00, 0x1f], [0x80, 0xff], [0x100, 0x24f],
    [0x300, 0x36f], [0x400, 0x4ff], [0x600, 0x6ff], [0x900, 0x97f], [0x3040, 0x30ff], [0x4e00, 0x9fff],
    [0xac00, 0xd7a3], [0xe000, 0xf8ff], [0xfe00, 0xfe0f], [0x1f300, 0x1faff], [0x10000, 0x10ffff],
  ];
  let s = '';
  for (let i = 0; i < len; i++) {
    const [lo, hi] = pools[Math.floor(r() * pools.length)];
    s += String.fromCodePoint(lo + Math.floor(r() * (hi - lo + 1)));
  }
  return s;
}

describe('tiny byte-level BPE tokenizer', () => {
  test('layout: 5 specials, 256 byte symbols, learned merges; 512 ids in total', () => {
    const t = buildTinyTokenizer();
    expect(t.vocabSize).toBe(512);
    expect(TINY_VOCAB_SIZE).toBe(512);
    const model = t.tokenizerJson.model as { type: string; vocab: Record<string, number>; merges: string[] };
    expect(model.type).toBe('BPE');
    expect(t.tokenizerJson.pre_tokenizer).toMatchObject({ type: 'ByteLevel' });
    expect(t.tokenizerJson.decoder).toMatchObject({ type: 'ByteLevel' });
    const ids = Object.values(model.vocab).sort((a, b) => a - b);
    expect(ids).toEqual(Array.from({ length: 512 }, (_, i) => i));
    expect(model.vocab['<|pad|>']).toBe(0);
    expect(model.vocab['<|bos|>']).toBe(1);
    expect(model.vocab['<|eos|>']).toBe(2);
    expect(model.vocab['<|im_start|>']).toBe(3);
    expect(model.vocab['<|im_end|>']).toBe(4);
    const bytes = bytesToUnicode();
    for (let b = 0; b < 256; b++) expect(model.vocab[bytes[b]]).toBe(5 + b);
    expect(model.merges).toHaveLength(251);
    // every merge's parts and result are in the vocabulary
    for (const m of model.merges) {
      const [a, b] = m.split(' ');
      expect(model.vocab[a]).toBeDefined();
      expect(model.vocab[b]).toBeDefined();
      expect(model.vocab[a + b]).toBeDefined();
    }
    expect(t.tokenizerConfig).toMatchObject({ bos_token: '<|bos|>', eos_token: '<|im_end|>', pad_token: '<|pad|>', add_bos_token: false, chat_template: CHATML_TEMPLATE });
    expect(t.generationConfig.eos_token_id).toEqual([4, 2]);
    expect(t.eosTokenIds).toEqual([4, 2]);
  });

  test('is deterministic and returns fresh objects', () => {
    const a = buildTinyTokenizer();
    const b = buildTinyTokenizer();
    expect(canonicalJson(a.tokenizerJson)).toBe(canonicalJson(b.tokenizerJson));
    (a.tokenizerJson.model as { vocab: Record<string, number> }).vocab['x'] = 99;
    expect((b.tokenizerJson.model as { vocab: Record<string, number> }).vocab['x']).toBe(bytesToUnicode().indexOf('x') + 5);
  });

  test('wrapper exposes ids, special tokens and template', () => {
    const tok = tiny();
    expect(tok.vocabSize).toBe(512);
    expect(tok.modelType).toBe('BPE');
    expect([tok.padId, tok.bosId, tok.eosIds]).toEqual([0, 1, [4, 2]]);
    expect([tok.padToken, tok.bosToken, tok.eosToken]).toEqual(['<|pad|>', '<|bos|>', '<|im_end|>']);
    expect(tok.addBosToken).toBe(false);
    expect(tok.chatTemplate).toBe(CHATML_TEMPLATE);
    expect(tok.idToToken(3)).toBe('<|im_start|>');
    expect(tok.tokenToId('<|im_end|>')).toBe(4);
    expect(tok.idToToken(5 + 0x41)).toBe('A');
    expect(tok.idToToken(512)).toBeUndefined();
    expect(tok.idToToken(-1)).toBeUndefined();
    expect(tok.tokenToId('not a token')).toBeUndefined();
    expect([...tok.specialIds].sort()).toEqual([0, 1, 2, 3, 4]);
    expect(tok.hash).toMatch(/^[0-9a-f]{64}$/);
  });

  test('common English words become few tokens', () => {
    const tok = tiny();
    for (const w of [' the', ' and', ' assistant', ' user', ' question', ' answer', ' model', ' token']) {
      expect([w, tok.encode(w).length]).toEqual([w, 1]);
    }
    const s = 'The user asks a question and the assistant gives an answer.';
    expect(tok.encode(s).length).toBeLessThanOrEqual(16);
    expect(tok.encode(s).length).toBeLessThan(new TextEncoder().encode(s).length / 3);
  });

  test('round-trips arbitrary UTF-8: emoji, CJK, newlines, control characters', () => {
    const tok = tiny();
    const fixed = [
      '', ' ', '\n', '\r\n', '\t\t', '   leading and trailing   ', 'Hello, world! ', "don't stop . , ? !",
      'héllo wörld', 'e\u0301 (decomposed) vs é', '中文字符和日本語のテキスト', '한국어 텍스트', 'emoji 🙂👍🏽👨‍👩‍👧‍👦 and flags 🇫🇷',
      'tabs\tand\nnew\n\nlines\n', '\u0000\u0001\u007f\u0080\u00ad\u00a0', 'math ∑ ∫ √ ∞ ≠', 'mixed 123 4567 89.0e-3',
      'special-looking <|im_start|> text <|im_end|> in the middle', '<|im_start|', '|>', 'a<|pad|>b',
    ];
    for (const s of fixed) expect(tok.decode(tok.encode(s))).toBe(s);
    const r = rng(1234);
    for (let i = 0; i < 300; i++) {
      const s = randomText(r, 1 + Math.floor(r() * 60));
      const ids = tok.encode(s);
      expect(ids.every((id) => Number.isInteger(id) && id >= 0 && id < tok.vocabSize)).toBe(true);
      expect(tok.decode(ids)).toBe(s);
    }
  });

  test('special tokens written in text are single ids; skipSpecialTokens drops them', () => {
    const tok = tiny();
    const ids = tok.encode('<|im_start|>user\nHi<|im_end|>\n<|eos|><|pad|><|bos|>');
    expect(ids[0]).toBe(3);
    expect(ids.filter((id) => id < 5)).toEqual([3, 4, 2, 0, 1]);
    expect(ids.slice(-3)).toEqual([2, 0, 1]);
    const i4 = ids.indexOf(4);
    expect(tok.decode(ids.slice(1, i4))).toBe('user\nHi');
    expect(tok.decode(ids, { skipSpecialTokens: true })).toBe('user\nHi\n');
    // no post-processor additions for this tokenizer
    expect(tok.encode('hi', { addSpecialTokens: true })).toEqual(tok.encode('hi', { addSpecialTokens: false }));
  });

  test('decode: empty list, and ids outside the vocabulary', async () => {
    const tok = tiny();
    expect(tok.decode([])).toBe('');
    const e = await errorOf(() => tok.decode([5, 512]));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('512');
    expect((await errorOf(() => tok.decode([1.5]))).code).toBe('E_TOKENIZER');
  });

  test('loads from a folder; hash matches the in-memory tokenizer; eos ids come from generation_config.json', async () => {
    const t = buildTinyTokenizer();
    const dir = await mkdtemp(join(tmpdir(), 'medusa-tok-'));
    try {
      await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(t.tokenizerJson, null, 2));
      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(t.tokenizerConfig));
      await writeFile(join(dir, 'special_tokens_map.json'), JSON.stringify(t.specialTokensMap));
      await writeFile(join(dir, 'generation_config.json'), JSON.stringify(t.generationConfig));
      await writeFile(join(dir, 'config.json'), JSON.stringify({ eos_token_id: 2, vocab_size: 512 }));
      const tok = await loadTokenizer(dir);
      expect(tok.eosIds).toEqual([4, 2]);
      expect(tok.hash).toBe(tiny().hash);
      expect(tok.chatTemplateSource).toContain(join(dir, 'tokenizer_config.json'));
      expect(tok.encode('Hello world')).toEqual(tiny().encode('Hello world'));

      // chat_template.jinja overrides tokenizer_config.json's template, and changes the hash
      await writeFile(join(dir, 'chat_template.jinja'), '{{ messages[0].content }}');
      const tok2 = await Tokenizer.load(dir);
      expect(tok2.chatTemplate).toBe('{{ messages[0].content }}');
      expect(tok2.chatTemplateSource).toBe(join(dir, 'chat_template.jinja'));
      expect(tok2.hash).not.toBe(tok.hash);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('hash depends on content, not key order or formatting', () => {
    const t = buildTinyTokenizer();
    const reordered = Object.fromEntries(Object.entries(t.tokenizerConfig).reverse());
    const a = Tokenizer.fromJSON(t.tokenizerJson, t.tokenizerConfig);
    expect(Tokenizer.fromJSON(JSON.stringify(t.tokenizerJson, null, 4), reordered).hash).toBe(a.hash);
    expect(Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, eos_token: '<|eos|>' }).hash).not.toBe(a.hash);
  });

  test('missing files are E_IO naming the file', async () => {
    const t = buildTinyTokenizer();
    const dir = await mkdtemp(join(tmpdir(), 'medusa-tok-'));
    try {
      let e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_IO');
      expect(e.message).toContain(join(dir, 'tokenizer.json'));
      await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(t.tokenizerJson));
      e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_IO');
      expect(e.message).toContain(join(dir, 'tokenizer_config.json'));
      e = await errorOf(() => loadTokenizer(join(dir, 'no-such-folder')));
      expect(e.code).toBe('E_IO');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('files that are not JSON are E_TOKENIZER naming the file', async () => {
    const t = buildTinyTokenizer();
    const dir = await mkdtemp(join(tmpdir(), 'medusa-tok-'));
    try {
      await writeFile(join(dir, 'tokenizer.json'), '{"model": {');
      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(t.tokenizerConfig));
      let e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain(join(dir, 'tokenizer.json'));
      expect(e.message).toContain('not valid JSON');

      await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(t.tokenizerJson));
      await writeFile(join(dir, 'tokenizer_config.json'), '[1, 2]');
      e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain(join(dir, 'tokenizer_config.json'));

      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(t.tokenizerConfig));
      await writeFile(join(dir, 'generation_config.json'), 'eos_token_id = 2');
      e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain(join(dir, 'generation_config.json'));

      await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [4, 'x'] }));
      e = await errorOf(() => loadTokenizer(dir));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain('eos_token_id');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('unsupported model types and components are E_TOKENIZER, without a raw dependency error', async () => {
    const t = buildTinyTokenizer();
    const wordLevel = { ...t.tokenizerJson, model: { type: 'WordLevel', vocab: { a: 0, '[UNK]': 1 }, unk_token: '[UNK]' } };
    let e = await errorOf(() => Tokenizer.fromJSON(wordLevel, t.tokenizerConfig));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('"WordLevel"');
    expect(e.message).toContain('tokenizer.json');

    e = await errorOf(() => Tokenizer.fromJSON({ version: '1.0' }, t.tokenizerConfig));
    expect(e.code).toBe('E_TOKENIZER');

    const badPre = { ...t.tokenizerJson, pre_tokenizer: { type: 'UnicodeScripts' } };
    e = await errorOf(() => Tokenizer.fromJSON(badPre, t.tokenizerConfig));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('UnicodeScripts');
    expect(e.message).toContain('tokenizer.json');

    e = await errorOf(() => Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, eos_token: '</s>' }));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('eos_token');
    expect(e.message).toContain('"</s>"');

    e = await errorOf(() => Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, chat_template: 42 }));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('chat_template');
  });

  test('special tokens as AddedToken objects, special_tokens_map.json fallback, named chat templates', () => {
    const t = buildTinyTokenizer();
    const cfg = { ...t.tokenizerConfig, bos_token: { __type: 'AddedToken', content: '<|bos|>', special: true }, pad_token: undefined };
    const tok = Tokenizer.fromJSON(t.tokenizerJson, cfg, { specialTokensMap: { pad_token: { content: '<|eos|>' } } });
    expect(tok.bosId).toBe(1);
    expect(tok.padId).toBe(2);
    expect(tok.eosIds).toEqual([4]);

    const named = Tokenizer.fromJSON(t.tokenizerJson, {
      ...t.tokenizerConfig,
      chat_template: [
        { name: 'tool_use', template: 'TOOLS' },
        { name: 'default', template: 'DEFAULT' },
      ],
    });
    expect(named.chatTemplate).toBe('DEFAULT');
    expect(named.chatTemplates).toEqual({ tool_use: 'TOOLS', default: 'DEFAULT' });
    expect(Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, chat_template: undefined }).chatTemplate).toBeUndefined();
  });
});

describe('eos id helpers', () => {
  test('parseEosTokenId accepts an int, a list, or nothing', async () => {
    expect(parseEosTokenId(2, 'g')).toEqual([2]);
    expect(parseEosTokenId([128001, 128009], 'g')).toEqual([128001, 128009]);
    expect(parseEosTokenId(null, 'g')).toEqual([]);
    expect(parseEosTokenId(undefined, 'g')).toEqual([]);
    for (const bad of ['2', -1, 1.5, [1, null], { id: 2 }]) {
      const e = await errorOf(() => parseEosTokenId(bad, 'generation_config.json'));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain('generation_config.json');
    }
  });

  test('resolveEosIds: tokenizer eos first, then the config fields, no duplicates, in range', async () => {
    expect(resolveEosIds(4, [{ value: [4, 2], source: 'generation_config.json' }, { value: 7, source: 'config.json' }], 512)).toEqual([4, 2, 7]);
    expect(resolveEosIds(undefined, [{ value: 2, source: 'config.json' }])).toEqual([2]);
    const e = await errorOf(() => resolveEosIds(4, [{ value: 600, source: 'config.json' }], 512));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('config.json');
    expect(e.message).toContain('600');
  });
});

const LLAMA_CONFIG = {
  tokenizer_class: 'LlamaTokenizer',
  bos_token: { __type: 'AddedToken', content: '<s>', lstrip: false, normalized: false, rstrip: false, single_word: false },
  eos_token: { __type: 'AddedToken', content: '</s>', lstrip: false, normalized: false, rstrip: false, single_word: false },
  unk_token: { __type: 'AddedToken', content: '<unk>', lstrip: false, normalized: false, rstrip: false, single_word: false },
  pad_token: null,
  add_bos_token: true,
  add_eos_token: false,
  clean_up_tokenization_spaces: false,
  legacy: true,
};

describe('Llama-2 style SentencePiece BPE (byte_fallback)', () => {
  test('Prepend + Replace normalizer: hand-computed ids', () => {
    const tok = Tokenizer.fromJSON(llamaTokenizerJson('prepend'), LLAMA_CONFIG);
    expect(tok.vocabSize).toBe(277);
    expect([tok.bosId, tok.eosIds, tok.unkId, tok.padId]).toEqual([1, [2], 0, undefined]);
    expect(tok.addBosToken).toBe(true);
    // "▁hello▁world": l+l, ▁+h, e+ll, ▁h+ell, ▁hell+o, o+r, ▁+w, ▁w+or, l+d, ▁wor+ld
    expect(tok.encode('hello world', { addSpecialTokens: false })).toEqual([271, 276]);
    // the post-processor (TemplateProcessing) adds <s>; the default is addSpecialTokens: true as in HF
    expect(tok.encode('hello world')).toEqual([1, 271, 276]);
    // "," and "é" are not pieces: byte fallback to <0x2C> (3+0x2C) and <0xC3><0xA9> (3+0xC3, 3+0xA9)
    expect(tok.encode('hello, wé', { addSpecialTokens: false })).toEqual([271, 3 + 0x2c, 273, 3 + 0xc3, 3 + 0xa9]);
    // "▁hold": ▁ h o l d -> ▁+h (rank 1), l+d (rank 8); ▁h+o is no merge: ▁h, o, ld
    expect(tok.encode('hold', { addSpecialTokens: false })).toEqual([268, 263, 275]);
    // 🙂 = F0 9F 99 82
    expect(tok.encode('🙂', { addSpecialTokens: false })).toEqual([259, 3 + 0xf0, 3 + 0x9f, 3 + 0x99, 3 + 0x82]);
    // special tokens in text; the section after an added token gets its own "▁" (Prepend applies per section)
    expect(tok.encode('<s>hello</s>', { addSpecialTokens: false })).toEqual([1, 271, 2]);
    // a leading space becomes a second ▁
    expect(tok.encode(' world', { addSpecialTokens: false })).toEqual([259, 276]);

    expect(tok.decode([271, 276])).toBe('hello world');
    expect(tok.decode([1, 271, 276])).toBe('<s> hello world');
    expect(tok.decode([1, 271, 276], { skipSpecialTokens: true })).toBe('hello world');
    expect(tok.decode([271, 3 + 0x2c, 273, 3 + 0xc3, 3 + 0xa9])).toBe('hello, wé');
    for (const s of ['hello world', 'héllo, wörld! 🙂 中文', 'multi\nline\ttext', 'world hello hold']) {
      expect(tok.decode(tok.encode(s, { addSpecialTokens: false }))).toBe(s);
    }
  });

  test('encodeContinuation does not add a second "▁" at a seam', () => {
    const tok = Tokenizer.fromJSON(llamaTokenizerJson('prepend'), LLAMA_CONFIG);
    expect(tok.encodeContinuation(' world', false)).toEqual([276]);
    expect(tok.encodeContinuation('world', false)).toEqual([264, 272, 275]);
    // after an added token the whole text starts a new section, which Prepend prefixes
    expect(tok.encodeContinuation('hello', true)).toEqual([271]);
    // " hello " continues a section (no extra ▁); "world" after <s> is a new section (▁world)
    expect(tok.encodeContinuation(' hello </s><s>world', false)).toEqual([271, 259, 2, 1, 276]);
    const whole = tok.encode('<s>hello world </s><s>world', { addSpecialTokens: false });
    const pieces = [...tok.encode('<s>hello', { addSpecialTokens: false }), ...tok.encodeContinuation(' world </s>', false), ...tok.encodeContinuation('<s>world', true)];
    expect(pieces).toEqual(whole);
  });

  test('Metaspace pre-tokenizer with prepend_scheme "first"', () => {
    const tok = Tokenizer.fromJSON(llamaTokenizerJson('metaspace'), LLAMA_CONFIG);
    expect(tok.encode('hello world', { addSpecialTokens: false })).toEqual([271, 276]);
    expect(tok.encode('hello world')).toEqual([1, 271, 276]);
    // only the first section gets "▁": after <s> in the text, "hello" is h + ell + o
    expect(tok.encode('<s>hello', { addSpecialTokens: false })).toEqual([1, 260, 269, 263]);
    expect(tok.encode('hello, wé', { addSpecialTokens: false })).toEqual([271, 3 + 0x2c, 273, 3 + 0xc3, 3 + 0xa9]);
    expect(tok.decode([271, 276])).toBe('hello world');
    expect(tok.encodeContinuation(' world', false)).toEqual([276]);
    expect(tok.encodeContinuation('hello', true)).toEqual([260, 269, 263]);
  });

  test('old Metaspace {add_prefix_space: false} adds no "▁" (as Hugging Face reads it)', () => {
    const tok = Tokenizer.fromJSON(llamaTokenizerJson('metaspace-no-prefix'), LLAMA_CONFIG);
    expect(tok.encode('hello world', { addSpecialTokens: false })).toEqual([260, 269, 263, 276]);
  });

  test('add_bos_token is inferred from the post-processor when tokenizer_config.json does not say', () => {
    const { add_bos_token: _drop, ...cfg } = LLAMA_CONFIG;
    expect(Tokenizer.fromJSON(llamaTokenizerJson('prepend'), cfg).addBosToken).toBe(true);
    const noPost = { ...llamaTokenizerJson('prepend'), post_processor: null };
    expect(Tokenizer.fromJSON(noPost, cfg).addBosToken).toBe(false);
  });
});
