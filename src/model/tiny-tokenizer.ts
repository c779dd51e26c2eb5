/**
 * A tiny but real byte-level BPE tokenizer in the Hugging Face `tokenizer.json` format (the
 * GPT-2 / Llama-3 / Qwen2 family), for tests and for the tiny models we train end to end.
 *
 * Layout of the vocabulary (ids are dense, 0..vocabSize-1):
 *   0..4     special tokens: <|pad|> <|bos|> <|eos|> <|im_start|> <|im_end|>
 *   5..260   the 256 byte-level symbols (GPT-2 `bytes_to_unicode`), in byte order 0x00..0xFF
 *   261..    merged tokens, in the order the trainer below learned them
 *
 * The merges are learned deterministically by a small BPE trainer (`trainByteLevelBpe`) over the
 * built-in English text `TINY_CORPUS`: pre-tokenize with the GPT-2 regex (the same one the ByteLevel
 * pre-tokenizer uses), count adjacent symbol pairs weighted by word frequency, merge the most
 * frequent pair (ties broken by the smaller pair in code-unit order), repeat until the vocabulary
 * holds `TINY_VOCAB_SIZE` tokens or no pair occurs twice. The result is identical on every run
 * and every machine, so ids can be hard-coded in tests.
 *
 * End of sequence: the chat model ends every turn with <|im_end|>, so tokenizer_config.json's
 * `eos_token` is "<|im_end|>" (generation stops at the end of the assistant turn, as in Qwen2
 * chat models). <|eos|> is the end-of-document token for plain-text data; both ids are listed in
 * generation_config.json's `eos_token_id` so generation stops on either.
 */

/** Final vocabulary size of the tiny tokenizer (5 specials + 256 bytes + 251 merges). */
export const TINY_VOCAB_SIZE = 512;

export const TINY_SPECIAL_TOKENS = ['<|pad|>', '<|bos|>', '<|eos|>', '<|im_start|>', '<|im_end|>'] as const;

/**
 * ChatML in the style of Qwen2's template, without Qwen2's injected default system prompt (the
 * system message is optional). Prefix-stable: rendering a prefix of a conversation yields a prefix
 * of the full rendering, which `encodeChat` relies on.
 */
export const CHATML_TEMPLATE =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/** Built-in training text for the tiny BPE: plain English, with the words of the chat format. */
export const TINY_CORPUS = `The user asks a question and the assistant gives an answer. The system message tells the assistant how to behave.
A language model reads text as a list of tokens. Each token is a small piece of a word, a whole word, or a single byte.
When the model is trained, it learns to predict the next token from all of the tokens that came before it.
The heads that we train look further ahead: they try to guess the second, the third and the fourth token as well.
If the guesses are right, the model can accept several tokens in one step, and the answer is written much faster.
This is the main idea of speculative decoding with extra heads. The base model checks every guess, so the output does not change.
Here is a short conversation. The user said: "Hello! Can you help me with my homework?" The assistant said: "Of course. What is the question?"
The user wrote: "What is the capital of France?" and the assistant replied: "The capital of France is Paris."
Then the user asked about the weather, and the assistant explained that it could not see the weather outside.
Good answers are clear, correct and short. They use simple words, and they explain the reasons behind the result.
We write the numbers one, two, three, four, five, six, seven, eight, nine and ten, and also 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10.
In the morning the children walk to school. In the evening they come home, eat dinner with their family and read a book.
The weather today is warm and sunny, but tomorrow there will be rain in the north and wind along the coast.
She opened the window, looked at the garden and saw that the flowers were growing well after the rain.
He thought about the problem for a long time before he found the answer. Then he wrote it down and went to sleep.
Training a model takes time. You need data, a good learning rate, and patience. You should check the loss often.
If the loss goes down, the model is learning. If the loss goes up, something is wrong, and you should look at the data.
Please tell me more about the history of this city. I would like to know when it was founded and who lived there.
Thank you for your help. You are welcome. Is there anything else that I can do for you today?
Every example in the dataset has a prompt and a response. The response is the part that the model should learn to write.
The tokenizer turns the text into numbers, and the decoder turns the numbers back into text without losing a single character.
`;

/** GPT-2's `bytes_to_unicode`: a printable character for every byte, so BPE never sees raw control bytes or spaces. */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  const out = new Array<string>(256);
  bs.forEach((b, i) => {
    out[b] = String.fromCharCode(cs[i]);
  });
  return out;
}

/** The GPT-2 pre-tokenization regex (what the ByteLevel pre-tokenizer with use_regex=true applies). */
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

export interface TrainedBpe {
  /** token -> id for the byte symbols and the learned merges (ids start at `firstId`). */
  vocab: Map<string, number>;
  /** merges in rank order, as [left, right] pairs. */
  merges: [string, string][];
}

/**
 * A tiny deterministic byte-level BPE trainer. Base vocabulary: the 256 byte symbols (ids
 * firstId..firstId+255 in byte order); then learned tokens until `vocabTarget` tokens (counting
 * the `firstId` ids reserved before the bytes) or until no pair occurs at least twice.
 */
export function trainByteLevelBpe(text: string, vocabTarget: number, firstId = 0): TrainedBpe {
  const byteChars = bytesToUnicode();
  const encoder = new TextEncoder();
  const vocab = new Map<string, number>();
  for (let b = 0; b < 256; b++) vocab.set(byteChars[b], firstId + b);
  let nextId = firstId + 256;

  const wordCounts = new Map<string, number>();
  for (const piece of text.match(GPT2_SPLIT) ?? []) {
    const w = Array.from(encoder.encode(piece), (b) => byteChars[b]).join('');
    wordCounts.set(w, (wordCounts.get(w) ?? 0) + 1);
  }
  // Sorted so that iteration order (and therefore everything below) never depends on insertion order.
  const words = [...wordCounts.entries()]
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map(([w, count]) => ({ symbols: Array.from(w), count }));

  const merges: [string, string][] = [];
  while (nextId < vocabTarget) {
    const pairCounts = new Map<string, { a: string; b: string; count: number }>();
    for (const { symbols, count } of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = symbols[i] + '\u0000' + symbols[i + 1];
        const entry = pairCounts.get(key);
        if (entry) entry.count += count;
        else pairCounts.set(key, { a: symbols[i], b: symbols[i + 1], count });
      }
    }
    let best: { a: string; b: string; count: number } | undefined;
    for (const p of pairCounts.values()) {
      if (
        !best ||
        p.count > best.count ||
        (p.count === best.count && (p.a < best.a || (p.a === best.a && p.b < best.b)))
      ) {
        best = p;
      }
    }
    if (!best || best.count < 2) break;
    const { a, b } = best;
    const merged = a + b;
    merges.push([a, b]);
    if (!vocab.has(merged)) vocab.set(merged, nextId++);
    for (const word of words) {
      const s = word.symbols;
      const out: string[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(merged);
          i++;
        } else {
          out.push(s[i]);
        }
      }
      word.symbols = out;
    }
  }
  return { vocab, merges };
}

export interface TinyTokenizer {
  /** Contents of tokenizer.json. */
  tokenizerJson: Record<string, unknown>;
  /** Contents of tokenizer_config.json (with the ChatML chat_template). */
  tokenizerConfig: Record<string, unknown>;
  /** Contents of special_tokens_map.json. */
  specialTokensMap: Record<string, unknown>;
  /** The generation_config.json fields for the tokens: eos_token_id lists <|im_end|> and <|eos|>. */
  generationConfig: { bos_token_id: number; eos_token_id: number[]; pad_token_id: number };
  specialTokens: {
    pad: { token: '<|pad|>'; id: 0 };
    bos: { token: '<|bos|>'; id: 1 };
    /** End of document (plain-text data). */
    endOfText: { token: '<|eos|>'; id: 2 };
    imStart: { token: '<|im_start|>'; id: 3 };
    /** End of turn; tokenizer_config's eos_token. */
    imEnd: { token: '<|im_end|>'; id: 4 };
  };
  /** Ids that stop generation, in generation_config order: [<|im_end|>, <|eos|>]. */
  eosTokenIds: number[];
  vocabSize: number;
  chatTemplate: string;
}

let cached: { vocab: [string, number][]; merges: [string, string][] } | undefined;

/** Build the tiny tokenizer. Returns fresh objects on every call (safe to mutate). */
export function buildTinyTokenizer(): TinyTokenizer {
  if (!cached) {
    const trained = trainByteLevelBpe(TINY_CORPUS, TINY_VOCAB_SIZE, TINY_SPECIAL_TOKENS.length);
    cached = { vocab: [...trained.vocab.entries()], merges: trained.merges };
  }
  const vocab: Record<string, number> = {};
  TINY_SPECIAL_TOKENS.forEach((t, i) => {
    vocab[t] = i;
  });
  for (const [t, id] of cached.vocab) vocab[t] = id;
  const vocabSize = Object.keys(vocab).length;

  const addedTokens = TINY_SPECIAL_TOKENS.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));

  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    // No normalizer (not even NFC): every UTF-8 string round-trips exactly.
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      // The classic "left right" string form: readable by every tokenizers version.
      merges: cached.merges.map(([a, b]) => `${a} ${b}`),
    },
  };

  const addedTokensDecoder: Record<string, unknown> = {};
  for (const t of addedTokens) {
    const { id, ...rest } = t;
    addedTokensDecoder[String(id)] = rest;
  }

  const tokenizerConfig: Record<string, unknown> = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    added_tokens_decoder: addedTokensDecoder,
    bos_token: '<|bos|>',
    eos_token: '<|im_end|>',
    pad_token: '<|pad|>',
    unk_token: null,
    additional_special_tokens: ['<|im_start|>', '<|im_end|>', '<|eos|>'],
    add_bos_token: false,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: 2048,
    chat_template: CHATML_TEMPLATE,
  };

  const specialTokensMap: Record<string, unknown> = {
    bos_token: '<|bos|>',
    eos_token: '<|im_end|>',
    pad_token: '<|pad|>',
    additional_special_tokens: ['<|im_start|>', '<|im_end|>', '<|eos|>'],
  };

  return {
    tokenizerJson,
    tokenizerConfig,
    specialTokensMap,
    generationConfig: { bos_token_id: 1, eos_token_id: [4, 2], pad_token_id: 0 },
    specialTokens: {
      pad: { token: '<|pad|>', id: 0 },
      bos: { token: '<|bos|>', id: 1 },
      endOfText: { token: '<|eos|>', id: 2 },
      imStart: { token: '<|im_start|>', id: 3 },
      imEnd: { token: '<|im_end|>', id: 4 },
    },
    eosTokenIds: [4, 2],
    vocabSize,
    chatTemplate: CHATML_TEMPLATE,
  };
}
