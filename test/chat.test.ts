import { MedusaError } from '../src/errors.js';
import { type ChatMessage, compileChatTemplate, encodeChat, renderChat } from '../src/data/chat.js';
import { Tokenizer } from '../src/data/tokenizer.js';
import { CHATML_TEMPLATE, buildTinyTokenizer } from '../src/model/tiny-tokenizer.js';
import { llamaTokenizerJson } from './helpers/llama-tokenizer.js';

function errorOf(fn: () => unknown): MedusaError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    return e as MedusaError;
  }
  throw new Error('expected a MedusaError, nothing was thrown');
}

function tiny(configOverrides: Record<string, unknown> = {}): Tokenizer {
  const t = buildTinyTokenizer();
  return Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, ...configOverrides }, { generationConfig: t.generationConfig });
}

/** Contiguous runs of mask 1, as [start, end) spans. */
function maskedSpans(mask: number[]): [number, number][] {
  const spans: [number, number][] = [];
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] === 1 && (i === 0 || mask[i - 1] === 0)) spans.push([i, i]);
    if (mask[i] === 1) spans[spans.length - 1][1] = i + 1;
  }
  return spans;
}

const CONVERSATION: ChatMessage[] = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Hello!' },
  { role: 'assistant', content: 'Hi! How can I help?' },
  { role: 'user', content: 'What is 2+2?\nAnswer briefly.' },
  { role: 'assistant', content: '4 🙂 四\n(four)' },
];

/** meta-llama/Llama-2-7b-chat-hf's chat template. */
const LLAMA2_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}" +
  "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/** HuggingFaceH4/zephyr-7b-beta's chat template (with its real newlines between tags). */
const ZEPHYR_TEMPLATE = [
  '{% for message in messages %}',
  "{% if message['role'] == 'user' %}",
  "{{ '<|user|>\\n' + message['content'] + eos_token }}",
  "{% elif message['role'] == 'system' %}",
  "{{ '<|system|>\\n' + message['content'] + eos_token }}",
  "{% elif message['role'] == 'assistant' %}",
  "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}",
  '{% endif %}',
  '{% if loop.last and add_generation_prompt %}',
  "{{ '<|assistant|>' }}",
  '{% endif %}',
  '{% endfor %}',
].join('\n');

describe('renderChat', () => {
  test('ChatML: multi-turn with a system prompt matches the hand-built string', () => {
    const expected =
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' +
      '<|im_start|>user\nHello!<|im_end|>\n' +
      '<|im_start|>assistant\nHi! How can I help?<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n' +
      '<|im_start|>assistant\n4 🙂 四\n(four)<|im_end|>\n';
    expect(renderChat(CHATML_TEMPLATE, CONVERSATION, { addGenerationPrompt: false })).toBe(expected);
    expect(renderChat(CHATML_TEMPLATE, CONVERSATION.slice(0, 4), { addGenerationPrompt: true })).toBe(
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n' +
        '<|im_start|>assistant\nHi! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n',
    );
    // the system message is optional
    expect(renderChat(CHATML_TEMPLATE, [{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true })).toBe(
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
    );
  });

  test('Llama-2 and Zephyr templates', () => {
    const msgs: ChatMessage[] = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello.' },
      { role: 'user', content: 'Bye' },
    ];
    expect(renderChat(LLAMA2_TEMPLATE, msgs, { addGenerationPrompt: true, bosToken: '<s>', eosToken: '</s>' })).toBe(
      '<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]',
    );
    expect(renderChat(ZEPHYR_TEMPLATE, msgs, { addGenerationPrompt: true, bosToken: '<s>', eosToken: '</s>' })).toBe(
      '<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nBye</s>\n<|assistant|>\n',
    );
  });

  test('passes bos_token, eos_token, extra variables, strftime_now and range', () => {
    const tpl =
      "{{ bos_token }}|{{ eos_token }}|{{ greeting }}|{{ strftime_now('%d %b %Y') }}|{% for i in range(3) %}{{ i }}{% endfor %}|{{ messages|length }}|{{ add_generation_prompt }}";
    const out = renderChat(tpl, [{ role: 'user', content: 'x' }], {
      addGenerationPrompt: true,
      bosToken: '<s>',
      eosToken: '</s>',
      extra: { greeting: 'hey', messages: 'ignored', add_generation_prompt: 'ignored' },
      now: new Date(2024, 6, 26, 12, 0, 0),
    });
    expect(out).toBe('<s>|</s>|hey|26 Jul 2024|012|1|true');
  });

  test("the template's raise_exception is E_TOKENIZER with the template's message", () => {
    const e = errorOf(() =>
      renderChat(LLAMA2_TEMPLATE, [{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }], {
        addGenerationPrompt: false,
        bosToken: '<s>',
        eosToken: '</s>',
        templateSource: 'llama/tokenizer_config.json (chat_template)',
      }),
    );
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('Conversation roles must alternate user/assistant/user/assistant/...');
    expect(e.message).toContain('llama/tokenizer_config.json (chat_template)');
  });

  test('syntax and rendering errors are E_TOKENIZER naming the template', () => {
    for (const bad of ['{% for m in messages %}{{ m.content }', '{% for m in messages %}{{ m.content }}', '{{ messages[0]. }}', '{% if %}']) {
      const e = errorOf(() => compileChatTemplate(bad, 'x/tokenizer_config.json (chat_template)'));
      expect(e.code).toBe('E_TOKENIZER');
      expect(e.message).toContain('x/tokenizer_config.json (chat_template)');
      expect(e.message).toContain('not a valid Jinja template');
    }
    const e = errorOf(() => renderChat('{{ messages[0].content | no_such_filter }}', [{ role: 'user', content: 'a' }], { addGenerationPrompt: false }));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('rendering the chat template failed');
    expect(e.message).toContain('no_such_filter');
  });
});

describe('encodeChat', () => {
  test('ChatML: ids and assistant mask match an independent tokenization of the hand-built pieces', () => {
    const tok = tiny();
    const enc = encodeChat(tok, CHATML_TEMPLATE, CONVERSATION);
    // Independent computation: the pieces of the conversation, with whether the model generates them.
    const pieces: [string, 0 | 1][] = [
      ['<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n', 0],
      ['Hi! How can I help?<|im_end|>', 1],
      ['\n<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n', 0],
      ['4 🙂 四\n(four)<|im_end|>', 1],
      ['\n', 0],
    ];
    const ids: number[] = [];
    const mask: number[] = [];
    for (const [text, m] of pieces) {
      const p = tok.encode(text, { addSpecialTokens: false });
      ids.push(...p);
      mask.push(...p.map(() => m));
    }
    expect(enc.ids).toEqual(ids);
    expect(enc.assistantMask).toEqual(mask);
    expect(enc.text).toBe(pieces.map((p) => p[0]).join(''));
    // ... and equal to tokenizing the whole conversation at once
    expect(enc.ids).toEqual(tok.encode(enc.text, { addSpecialTokens: false }));

    // decoding the masked spans gives exactly each assistant content + <|im_end|>
    const spans = maskedSpans(enc.assistantMask);
    expect(spans.map(([s, e]) => tok.decode(enc.ids.slice(s, e)))).toEqual(['Hi! How can I help?<|im_end|>', '4 🙂 四\n(four)<|im_end|>']);
    for (const [, e] of spans) expect(enc.ids[e - 1]).toBe(4);
  });

  test('turns: contiguous spans; an assistant turn starts where generation starts', () => {
    const tok = tiny();
    const enc = encodeChat(tok, CHATML_TEMPLATE, CONVERSATION);
    expect(enc.turns.map((t) => t.role)).toEqual(CONVERSATION.map((m) => m.role));
    expect(enc.turns[0].start).toBe(0);
    expect(enc.turns[enc.turns.length - 1].end).toBe(enc.ids.length);
    for (let k = 1; k < enc.turns.length; k++) expect(enc.turns[k].start).toBe(enc.turns[k - 1].end);
    expect(enc.turns.map((t) => tok.decode(enc.ids.slice(t.start, t.end)))).toEqual([
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n',
      '<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n',
      'Hi! How can I help?<|im_end|>\n',
      '<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n',
      '4 🙂 四\n(four)<|im_end|>\n',
    ]);
    for (const k of [2, 4]) {
      const prompt = renderChat(CHATML_TEMPLATE, CONVERSATION.slice(0, k), { addGenerationPrompt: true });
      const promptIds = tok.encode(prompt, { addSpecialTokens: false });
      expect(enc.turns[k].start).toBe(promptIds.length);
      expect(enc.ids.slice(0, promptIds.length)).toEqual(promptIds);
    }
    // only assistant turns carry mask, and each one ends with 0 on the trailing "\n"
    for (const t of enc.turns) {
      const m = enc.assistantMask.slice(t.start, t.end);
      if (t.role === 'assistant') expect(m).toEqual([...m.slice(0, -1).map(() => 1), 0]);
      else expect(m.every((x) => x === 0)).toBe(true);
    }
  });

  test("uses the tokenizer's own template by default; generation prompt for inference prompts", () => {
    const tok = tiny();
    const msgs = CONVERSATION.slice(0, 2);
    const enc = encodeChat(tok, undefined, msgs, { addGenerationPrompt: true });
    expect(enc.text.endsWith('<|im_start|>assistant\n')).toBe(true);
    expect(enc.ids).toEqual(tok.encode(renderChat(CHATML_TEMPLATE, msgs, { addGenerationPrompt: true }), { addSpecialTokens: false }));
    expect(enc.assistantMask.every((m) => m === 0)).toBe(true);
    expect(enc.turns[1].end).toBe(enc.ids.length);
  });

  test('bos is added only when add_bos_token is set and the template does not render it', () => {
    const plain = encodeChat(tiny(), CHATML_TEMPLATE, CONVERSATION);
    const withBos = encodeChat(tiny({ add_bos_token: true }), CHATML_TEMPLATE, CONVERSATION);
    expect(withBos.ids).toEqual([1, ...plain.ids]);
    expect(withBos.assistantMask).toEqual([0, ...plain.assistantMask]);
    expect(withBos.turns[0].start).toBe(1);

    const bosTemplate = '{{ bos_token }}' + CHATML_TEMPLATE;
    const rendered = encodeChat(tiny({ add_bos_token: true }), bosTemplate, CONVERSATION);
    expect(rendered.ids).toEqual([1, ...plain.ids]);
    expect(rendered.ids.filter((id) => id === 1)).toHaveLength(1);
    // the preamble (what the template renders for no messages) belongs to no turn
    expect(rendered.turns[0].start).toBe(1);
  });

  test('Llama-2 template with a SentencePiece tokenizer: hand-verified ids, no spurious "▁" at segment seams', () => {
    const tok = Tokenizer.fromJSON(llamaTokenizerJson('prepend'), LLAMA_CONFIG);
    const msgs: ChatMessage[] = [
      { role: 'system', content: 'sys' },
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'hello world' },
      { role: 'user', content: 'hello' },
      { role: 'assistant', content: 'world hello' },
    ];
    const enc = encodeChat(tok, LLAMA2_TEMPLATE, msgs);
    expect(enc.text).toBe('<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] hello world </s><s>[INST] hello [/INST] world hello </s>');
    // the template renders <s>: no second bos although add_bos_token is true
    expect(enc.ids[0]).toBe(1);
    expect(enc.ids[1]).not.toBe(1);
    // same ids as tokenizing the whole text (Hugging Face apply_chat_template(tokenize=True))
    expect(enc.ids).toEqual(tok.encode(enc.text, { addSpecialTokens: false }));
    // the system message renders nothing of its own (Llama-2 folds it into the first [INST])
    expect(enc.turns[0]).toEqual({ role: 'system', start: 0, end: 0 });
    // assistant turns: " hello world </s>" = ▁hello ▁world ▁ </s>, " world hello </s>" = ▁world ▁hello ▁ </s>
    const a1 = enc.turns[2];
    const a2 = enc.turns[4];
    expect(enc.ids.slice(a1.start, a1.end)).toEqual([271, 276, 259, 2]);
    expect(enc.ids.slice(a2.start, a2.end)).toEqual([276, 271, 259, 2]);
    expect(maskedSpans(enc.assistantMask)).toEqual([
      [a1.start, a1.end],
      [a2.start, a2.end],
    ]);
    // the user turn after </s> starts with <s> and "▁[" (byte fallback: ▁ then <0x5B>)
    expect(enc.ids.slice(enc.turns[3].start, enc.turns[3].start + 3)).toEqual([1, 259, 3 + 0x5b]);
    // tokenizing " hello world </s>" naively would give a spurious leading "▁"
    expect(tok.encode(' hello world </s>', { addSpecialTokens: false })).toEqual([259, 271, 276, 259, 2]);
  });

  test('Llama-2 template with the byte-level tokenizer', () => {
    const tok = withExtraSpecials(['<s>', '</s>'], { bos_token: '<s>', eos_token: '</s>' });
    const msgs: ChatMessage[] = [
      { role: 'user', content: 'Hello!' },
      { role: 'assistant', content: 'Hi, how can I help?' },
      { role: 'user', content: 'Tell me a joke.' },
      { role: 'assistant', content: 'No. 🙂' },
    ];
    const enc = encodeChat(tok, LLAMA2_TEMPLATE, msgs);
    expect(enc.ids).toEqual(tok.encode(enc.text, { addSpecialTokens: false }));
    expect(maskedSpans(enc.assistantMask).map(([s, e]) => tok.decode(enc.ids.slice(s, e)))).toEqual([' Hi, how can I help? </s>', ' No. 🙂 </s>']);
  });

  test('Zephyr template: mask through </s>, not the "\\n" after it', () => {
    const tok = withExtraSpecials(['<s>', '</s>'], { bos_token: '<s>', eos_token: '</s>' });
    const enc = encodeChat(tok, ZEPHYR_TEMPLATE, CONVERSATION);
    expect(enc.ids).toEqual(tok.encode(enc.text, { addSpecialTokens: false }));
    expect(maskedSpans(enc.assistantMask).map(([s, e]) => tok.decode(enc.ids.slice(s, e)))).toEqual([
      'Hi! How can I help?</s>',
      '4 🙂 四\n(four)</s>',
    ]);
    const last = enc.turns[4];
    expect(tok.decode(enc.ids.slice(last.start, last.end))).toBe('4 🙂 四\n(four)</s>\n');
    expect(enc.assistantMask[last.end - 1]).toBe(0);
    // the previous turn ends with the generation prompt
    expect(tok.decode(enc.ids.slice(enc.turns[3].start, enc.turns[3].end))).toBe('<|user|>\nWhat is 2+2?\nAnswer briefly.</s>\n<|assistant|>\n');
  });

  test('an assistant segment without an eos id is masked whole', () => {
    const tok = tiny();
    const tpl = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}";
    const enc = encodeChat(tok, tpl, [
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'yo' },
    ]);
    const a = enc.turns[1];
    expect(enc.assistantMask.slice(a.start, a.end).every((m) => m === 1)).toBe(true);
    expect(tok.decode(enc.ids.slice(a.start, a.end))).toBe('assistant: yo\n');
  });

  test('a template that is not prefix-stable is E_TOKENIZER naming the template', () => {
    const tok = tiny();
    const tpl = '{{ messages|length }} messages\n' + CHATML_TEMPLATE;
    const e = errorOf(() => encodeChat(tok, tpl, CONVERSATION, { templateSource: 'my/tokenizer_config.json (chat_template)' }));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('not prefix-stable');
    expect(e.message).toContain('my/tokenizer_config.json (chat_template)');
  });

  test("raise_exception in the template surfaces as E_TOKENIZER with the template's message", () => {
    const tok = withExtraSpecials(['<s>', '</s>'], { bos_token: '<s>', eos_token: '</s>', chat_template: LLAMA2_TEMPLATE });
    const e = errorOf(() =>
      encodeChat(tok, undefined, [
        { role: 'user', content: 'a' },
        { role: 'assistant', content: 'b' },
        { role: 'assistant', content: 'c' },
      ]),
    );
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('Conversation roles must alternate user/assistant/user/assistant/...');
    expect(e.message).toContain('tokenizer_config.json (chat_template)');
  });

  test("a Jinja syntax error is E_TOKENIZER naming tokenizer_config.json's chat_template", () => {
    const tok = tiny({ chat_template: "{% for message in messages %}{{ message['content'] }" });
    const e = errorOf(() => encodeChat(tok, undefined, CONVERSATION));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('tokenizer_config.json (chat_template)');
    expect(e.message).not.toMatch(/\n\s+at /);
    const e2 = errorOf(() => encodeChat(tok, tok.chatTemplate, CONVERSATION));
    expect(e2.message).toContain('tokenizer_config.json (chat_template)');
  });

  test('bad input: no template, bad roles, empty conversation', () => {
    const noTemplate = tiny({ chat_template: undefined });
    expect(errorOf(() => encodeChat(noTemplate, undefined, CONVERSATION)).message).toContain('no chat template');
    const tok = tiny();
    const e = errorOf(() => encodeChat(tok, undefined, [{ role: 'tool' as 'user', content: 'x' }]));
    expect(e.code).toBe('E_TOKENIZER');
    expect(e.message).toContain('message 0');
    expect(errorOf(() => encodeChat(tok, undefined, [])).code).toBe('E_TOKENIZER');
    expect(errorOf(() => encodeChat(tok, undefined, [{ role: 'user', content: 5 as unknown as string }])).message).toContain('content');
  });
});

/** The tiny tokenizer with more special added tokens (ids from 512 on) and config overrides. */
function withExtraSpecials(tokens: string[], config: Record<string, unknown>): Tokenizer {
  const t = buildTinyTokenizer();
  const added = t.tokenizerJson.added_tokens as object[];
  tokens.forEach((content, i) => added.push({ id: 512 + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  return Tokenizer.fromJSON(t.tokenizerJson, { ...t.tokenizerConfig, ...config });
}

const LLAMA_CONFIG = { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>', pad_token: null, add_bos_token: true, add_eos_token: false, clean_up_tokenization_spaces: false };
