/**
 * The distill conversation builder: exact generated ids, the loss mask on exactly those ids, and
 * agreement with an independently rendered template and with encodeChat.
 */
import { type ChatMessage, encodeChat } from '../src/data/chat.js';
import { Tokenizer } from '../src/data/tokenizer.js';
import { CHATML_TEMPLATE, buildTinyTokenizer } from '../src/model/tiny-tokenizer.js';
import { ConversationBuilder } from '../src/distill/conversation.js';
import { topkLogprobs } from '../src/distill/local-engine.js';

function tiny(): Tokenizer {
  const t = buildTinyTokenizer();
  return Tokenizer.fromJSON(t.tokenizerJson, t.tokenizerConfig, { generationConfig: t.generationConfig });
}

const NOW = new Date('2026-01-02T00:00:00Z');
const SYSTEM = 'You are terse.';
const USERS = ['Hello there!', 'And what about 2+2?\nBe brief.'];
const REPLIES = ['Hi, how can I help?', '4 🙂'];

/** Build with the builder, "generating" the canonical tokens of each reply + <|im_end|>. */
function build(tok: Tokenizer, replies: string[], endWithEos = true) {
  const b = new ConversationBuilder(tok, CHATML_TEMPLATE, 'test template', NOW);
  b.addMessage({ role: 'system', content: SYSTEM }, false);
  const generated: number[][] = [];
  USERS.forEach((u, i) => {
    b.addMessage({ role: 'user', content: u }, true);
    const ids = [...tok.encode(replies[i], { addSpecialTokens: false }), ...(endWithEos ? [tok.tokenToId('<|im_end|>')!] : [])];
    generated.push(ids);
    b.addGenerated(ids, endWithEos);
  });
  return { result: b.result(), generated };
}

describe('ConversationBuilder', () => {
  const tok = tiny();

  test('matches a hand-rendered ChatML conversation; the mask covers exactly the generated ids', () => {
    const { result, generated } = build(tok, REPLIES);
    const hand =
      `<|im_start|>system\n${SYSTEM}<|im_end|>\n` +
      `<|im_start|>user\n${USERS[0]}<|im_end|>\n<|im_start|>assistant\n${REPLIES[0]}<|im_end|>\n` +
      `<|im_start|>user\n${USERS[1]}<|im_end|>\n<|im_start|>assistant\n${REPLIES[1]}<|im_end|>\n`;
    expect(tok.decode(result.ids)).toBe(hand);
    // masked spans are exactly the generated ids, in order
    const masked: number[][] = [];
    let cur: number[] | null = null;
    result.ids.forEach((id, i) => {
      if (result.mask[i] === 1) {
        if (!cur) masked.push((cur = []));
        cur.push(id);
      } else cur = null;
    });
    expect(masked).toEqual(generated);
    expect(result.turnRoles).toEqual(['system', 'user', 'assistant', 'user', 'assistant']);
    expect(result.truncated).toBe(false);
    // spans are contiguous and cover the sequence
    expect(result.turnStarts[0]).toBe(0);
    for (let i = 1; i < result.turnStarts.length; i++) expect(result.turnStarts[i]).toBe(result.turnEnds[i - 1]);
    expect(result.turnEnds[result.turnEnds.length - 1]).toBe(result.ids.length);
  });

  test('equals encodeChat of the regenerated conversation when the generated ids are canonical', () => {
    const { result } = build(tok, REPLIES);
    const messages: ChatMessage[] = [{ role: 'system', content: SYSTEM }];
    USERS.forEach((u, i) => messages.push({ role: 'user', content: u }, { role: 'assistant', content: REPLIES[i] }));
    const ref = encodeChat(tok, CHATML_TEMPLATE, messages, { now: NOW });
    expect(result.ids).toEqual(ref.ids);
    expect(result.mask).toEqual(ref.assistantMask);
    expect(result.turnStarts).toEqual(ref.turns.map((t) => t.start));
    expect(result.turnEnds).toEqual(ref.turns.map((t) => t.end));
  });

  test('keeps non-canonical generated ids exactly (no re-tokenization)', () => {
    const b = new ConversationBuilder(tok, CHATML_TEMPLATE, 'test template', NOW);
    b.addMessage({ role: 'user', content: 'Hi' }, true);
    // "the" spelled byte by byte: a sequence the tokenizer itself would never produce
    const bytes = [...'the'].map((ch) => tok.encode(ch, { addSpecialTokens: false })[0]);
    const gen = [...bytes, tok.tokenToId('<|im_end|>')!];
    b.addGenerated(gen, true);
    const r = b.result();
    const start = r.turnStarts[1];
    expect(r.ids.slice(start, start + gen.length)).toEqual(gen);
    expect(r.mask.slice(start, start + gen.length)).toEqual(gen.map(() => 1));
    expect(r.mask.slice(start + gen.length)).toEqual(r.ids.slice(start + gen.length).map(() => 0));
  });

  test('a reply cut by the length limit: generated ids masked, template closing unmasked, truncated', () => {
    const b = new ConversationBuilder(tok, CHATML_TEMPLATE, 'test template', NOW);
    b.addMessage({ role: 'user', content: 'Hi' }, true);
    const gen = tok.encode('Hello wor', { addSpecialTokens: false });
    b.addGenerated(gen, false);
    const r = b.result();
    const start = r.turnStarts[1];
    expect(r.mask.filter((m) => m === 1).length).toBe(gen.length);
    expect(tok.decode(r.ids.slice(start + gen.length))).toBe('<|im_end|>\n');
    expect(r.truncated).toBe(true);
  });
});

describe('teacher top-k', () => {
  test('log-probabilities of the k most likely ids, sorted, ties by id', () => {
    const logits = Float32Array.from([0, 2, 1, 2, -1, 0.5]);
    const ids = new Int32Array(3);
    const lp = new Float32Array(3);
    topkLogprobs(logits, 0, 6, 3, ids, lp, 0);
    expect(Array.from(ids)).toEqual([1, 3, 2]);
    const z = Math.log(Array.from(logits).reduce((a, x) => a + Math.exp(x), 0));
    expect(lp[0]).toBeCloseTo(2 - z, 6);
    expect(lp[2]).toBeCloseTo(1 - z, 6);
  });
});
