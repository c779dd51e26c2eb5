/**
 * Text of a generated row as its tokens arrive: incremental detokenization, stop strings, and the
 * part of the text that is safe to stream.
 *
 * Incremental detokenization (the prefix/read-offset scheme vLLM and TGI use): the text of a new
 * token is decode(ids[prefix:]) minus decode(ids[prefix:read]), emitted only once it does not end in
 * U+FFFD (an incomplete multi-byte character split across tokens). Decoding a short window keeps the
 * cost per token constant while giving the same text as decoding everything (for byte-level and
 * SentencePiece tokenizers: the window starts at a token boundary of already-emitted text).
 *
 * Streaming never emits text it might have to take back: a suffix that could be the start of a stop
 * string is held until the next tokens settle it, so the streamed deltas always concatenate to the
 * final (stop-trimmed) text.
 */

export class IncrementalDetokenizer {
  private readonly ids: number[] = [];
  private prefix = 0;
  private read = 0;
  constructor(private readonly decode: (ids: number[]) => string) {}

  /** Add one token; returns the text that became final (may be ""). */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.decode(this.ids.slice(this.prefix, this.read));
    const newText = this.decode(this.ids.slice(this.prefix));
    if (newText.length > prefixText.length && !newText.endsWith('\uFFFD')) {
      this.prefix = this.read;
      this.read = this.ids.length;
      return newText.slice(prefixText.length);
    }
    return '';
  }

  /** The text still held back (e.g. an incomplete character at the end of generation). */
  flush(): string {
    if (this.read === this.ids.length) return '';
    const prefixText = this.decode(this.ids.slice(this.prefix, this.read));
    const newText = this.decode(this.ids.slice(this.prefix));
    this.prefix = this.read = this.ids.length;
    return newText.length > prefixText.length ? newText.slice(prefixText.length) : '';
  }
}

/** Accumulated text with stop-string detection (vLLM semantics: the text ends before the stop string). */
export class StopStrings {
  private text = '';
  /** Set once a stop string was found: the length of the final text. */
  private end: number | null = null;
  private readonly maxLen: number;
  constructor(private readonly stops: readonly string[], private readonly includeStop = false) {
    this.maxLen = stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  get stopped(): boolean {
    return this.end !== null;
  }

  /** Append new text; returns true when a stop string is now complete (the text is then final). */
  append(piece: string): boolean {
    if (this.end !== null || piece.length === 0) return this.end !== null;
    const before = this.text.length;
    this.text += piece;
    if (this.maxLen === 0) return false;
    // Only occurrences that end in the new piece are new.
    const from = Math.max(0, before - this.maxLen + 1);
    let best: { at: number; len: number } | null = null;
    for (const s of this.stops) {
      const at = this.text.indexOf(s, from);
      if (at !== -1 && (best === null || at < best.at)) best = { at, len: s.length };
    }
    if (best) {
      this.end = this.includeStop ? best.at + best.len : best.at;
      return true;
    }
    return false;
  }

  /** The final text (after a stop, trimmed there). */
  get final(): string {
    return this.end === null ? this.text : this.text.slice(0, this.end);
  }

  /**
   * How much of the text can be streamed now: all of it after a stop, else up to the longest suffix
   * that is a proper prefix of some stop string (that suffix might become a stop string).
   */
  safeLength(): number {
    if (this.end !== null) return this.end;
    const t = this.text;
    const n = t.length;
    const last = t.charCodeAt(n - 1);
    let hold = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, n); k > hold; k--) {
        if (s.charCodeAt(k - 1) === last && t.startsWith(s.slice(0, k), n - k)) {
          hold = k;
          break;
        }
      }
    }
    return n - hold;
  }
}
