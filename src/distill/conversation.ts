/**
 * Builds a self-distilled conversation token by token: prompt segments come from the chat template,
 * assistant segments are the exact token ids the model generated. The loss mask is 1 exactly on the
 * generated tokens.
 *
 * It mirrors `encodeChat` (src/data/chat.ts) incrementally. With P_k the template rendered for the
 * first k messages (with the generation prompt when message k is the assistant's), segment k is
 * P_{k+1} minus P_k; non-assistant segments are tokenized (as continuations), an assistant segment is
 * the generated ids followed by the template's own formatting after the end-of-turn token (e.g. the
 * "\n" after "<|im_end|>"), tokenized with mask 0. So when the generated ids are the canonical
 * tokenization of their text, the result equals `encodeChat` of the regenerated conversation.
 */
import { fail } from '../errors.js';
import type { Tokenizer } from '../data/tokenizer.js';
import { renderChat, type ChatMessage, type ChatRole } from '../data/chat.js';

export interface BuiltConversation {
  ids: number[];
  mask: number[];
  turnRoles: string[];
  turnStarts: number[];
  turnEnds: number[];
  truncated: boolean;
}

export class ConversationBuilder {
  readonly ids: number[] = [];
  readonly mask: number[] = [];
  readonly turnRoles: ChatRole[] = [];
  readonly turnStarts: number[] = [];
  readonly turnEnds: number[] = [];
  truncated = false;
  private readonly messages: ChatMessage[] = [];
  private prevText = '';
  private textStarted = false;
  private afterAdded = false;
  /**
   * `now`: the date templates see through strftime_now (fixed for a whole dataset and recorded in its
   * metadata, so a resumed run renders exactly what the first run did).
   */
  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly template: string,
    private readonly templateSource: string,
    private readonly now: Date,
  ) {
    // P_0: what the template renders for no messages (a preamble), plus bos when the tokenizer adds one.
    let p0 = '';
    try {
      p0 = this.render([], false);
    } catch {
      p0 = '';
    }
    const t = tokenizer;
    const firstText = p0;
    if (t.addBosToken && t.bosId !== undefined && !(t.bosToken !== undefined && firstText.startsWith(t.bosToken))) {
      this.push([t.bosId], 0);
    }
    this.push(this.encodePiece(p0), 0);
    this.prevText = p0;
  }

  private render(messages: readonly ChatMessage[], addGenerationPrompt: boolean): string {
    return renderChat(this.template, messages, {
      addGenerationPrompt, bosToken: this.tokenizer.bosToken, eosToken: this.tokenizer.eosToken, templateSource: this.templateSource, now: this.now,
    });
  }

  private encodePiece(piece: string): number[] {
    if (piece.length === 0) return [];
    const out = this.textStarted ? this.tokenizer.encodeContinuation(piece, this.afterAdded) : this.tokenizer.encode(piece, { addSpecialTokens: false });
    this.textStarted = true;
    if (out.length > 0) this.afterAdded = this.tokenizer.addedTokenIds.has(out[out.length - 1]);
    return out;
  }

  private push(ids: number[], m: 0 | 1): void {
    for (const id of ids) {
      this.ids.push(id);
      this.mask.push(m);
    }
  }

  private nextText(addGenerationPrompt: boolean): string {
    const text = this.render(this.messages, addGenerationPrompt);
    if (!text.startsWith(this.prevText)) {
      fail('E_TOKENIZER', `${this.templateSource} is not prefix-stable: rendering ${this.messages.length} message(s) does not extend the rendering of the first ${this.messages.length - 1}. ` +
        'Self-distillation needs a template whose output only grows as messages are appended (e.g. ChatML).');
    }
    return text;
  }

  /** Token count if `message` were added (without adding it). */
  peekLength(message: ChatMessage, generationPromptAfter: boolean): number {
    const text = renderChat(this.template, [...this.messages, message], {
      addGenerationPrompt: generationPromptAfter, bosToken: this.tokenizer.bosToken, eosToken: this.tokenizer.eosToken, templateSource: this.templateSource, now: this.now,
    });
    const seg = text.slice(this.prevText.length);
    const saved = { textStarted: this.textStarted, afterAdded: this.afterAdded };
    const n = this.encodePiece(seg).length;
    this.textStarted = saved.textStarted;
    this.afterAdded = saved.afterAdded;
    return this.ids.length + n;
  }

  /** Add a system or user message; `generationPromptAfter` when the assistant answers next. */
  addMessage(message: ChatMessage, generationPromptAfter: boolean): void {
    if (message.role === 'assistant') fail('E_INTERNAL', 'assistant turns are added with addGenerated');
    this.messages.push(message);
    const text = this.nextText(generationPromptAfter);
    const start = this.ids.length;
    this.push(this.encodePiece(text.slice(this.prevText.length)), 0);
    this.turnRoles.push(message.role);
    this.turnStarts.push(start);
    this.turnEnds.push(this.ids.length);
    this.prevText = text;
  }

  /**
   * Add the assistant turn the model generated: `tokens` exactly (mask 1), then the template's
   * formatting after the end-of-turn token (mask 0). `endedByEos`: the last token is an eos id.
   */
  addGenerated(tokens: number[], endedByEos: boolean): void {
    const t = this.tokenizer;
    const body = endedByEos ? tokens.slice(0, -1) : tokens;
    const content = t.decode(body, { skipSpecialTokens: true });
    this.messages.push({ role: 'assistant', content });
    const text = this.nextText(false);
    const seg = text.slice(this.prevText.length);
    let tail = '';
    if (endedByEos) {
      const eosText = t.idToToken(tokens[tokens.length - 1]) ?? '';
      const at = eosText.length > 0 ? seg.indexOf(eosText) : -1;
      tail = at >= 0 ? seg.slice(at + eosText.length) : '';
    } else {
      // Cut off by the length limit: the template's closing (end-of-turn token and formatting) follows as context, mask 0.
      const at = content.length > 0 ? seg.indexOf(content) : -1;
      tail = at >= 0 ? seg.slice(at + content.length) : content.length === 0 ? seg : '';
      this.truncated = true;
    }
    const start = this.ids.length;
    this.push(tokens, 1);
    if (tokens.length > 0) {
      this.textStarted = true;
      this.afterAdded = t.addedTokenIds.has(tokens[tokens.length - 1]);
    }
    this.push(this.encodePiece(tail), 0);
    this.turnRoles.push('assistant');
    this.turnStarts.push(start);
    this.turnEnds.push(this.ids.length);
    this.prevText = text;
  }

  result(): BuiltConversation {
    return { ids: [...this.ids], mask: [...this.mask], turnRoles: [...this.turnRoles], turnStarts: [...this.turnStarts], turnEnds: [...this.turnEnds], truncated: this.truncated };
  }
}
