/** Hand-built Llama-2 style SentencePiece BPE tokenizer.json for tokenizer and chat tests. */

/**
 * A Llama-2 style SentencePiece BPE tokenizer.json with a tiny vocabulary:
 *   0 <unk>, 1 <s>, 2 </s>, 3..258 the byte-fallback tokens <0x00>..<0xFF>,
 *   259 ▁, 260 h, 261 e, 262 l, 263 o, 264 w, 265 r, 266 d,
 *   267 ll, 268 ▁h, 269 ell, 270 ▁hell, 271 ▁hello, 272 or, 273 ▁w, 274 ▁wor, 275 ld, 276 ▁world
 * with merges in that order. `style`:
 *   'prepend'   the Llama-2 / Mistral-v0.1 tokenizer.json: normalizer Prepend("▁") + Replace(" " -> "▁"), no pre-tokenizer
 *   'metaspace' the newer (legacy=false) form: Metaspace pre-tokenizer, prepend_scheme "first"
 *   'metaspace-no-prefix' an old-style Metaspace with add_prefix_space false (no prepend_scheme)
 */
export function llamaTokenizerJson(style: 'prepend' | 'metaspace' | 'metaspace-no-prefix'): Record<string, unknown> {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  const pieces = ['▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd', 'll', '▁h', 'ell', '▁hell', '▁hello', 'or', '▁w', '▁wor', 'ld', '▁world'];
  pieces.forEach((p, i) => {
    vocab[p] = 259 + i;
  });
  const merges = ['l l', '▁ h', 'e ll', '▁h ell', '▁hell o', 'o r', '▁ w', '▁w or', 'l d', '▁wor ld'];
  const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  const metaspace =
    style === 'metaspace'
      ? { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first', split: false }
      : { type: 'Metaspace', replacement: '▁', add_prefix_space: false };
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
    normalizer:
      style === 'prepend'
        ? { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] }
        : null,
    pre_tokenizer: style === 'prepend' ? null : metaspace,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '<s>', type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      vocab,
      merges,
    },
  };
}
