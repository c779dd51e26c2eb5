/**
 * One request's row: turns the tokens the scheduler hands it into text deltas and a finish reason,
 * and tells its sink (the HTTP response) about them.
 *
 * Finish rules, per row: a stop token (eos unless ignore_eos, plus stop_token_ids) -> "stop" (the
 * token is kept in token_ids, its text is not part of the text); a stop string in the text -> "stop"
 * (text trimmed before it, or after it with include_stop_str_in_output); max_tokens -> "length".
 */
import type { Tokenizer } from '../data/tokenizer.js';
import { ApiError, internalError } from './api-error.js';
import type { GenerationRequest } from './protocol.js';
import type { Job } from './scheduler.js';
import { IncrementalDetokenizer, StopStrings } from './text.js';

export type FinishReason = 'stop' | 'length';

export interface RowSink {
  /** The row's batch started (`rows` requests in it). */
  start(rows: number): void;
  /** New text (possibly "") and the token that produced it; `finish` set on the row's last token. */
  delta(text: string, tokenId: number, finish: FinishReason | null): void;
  /** The row cannot complete. */
  error(e: ApiError): void;
}

export class RowJob implements Job {
  readonly tokens: number[] = [];
  finish: FinishReason | null = null;
  failed: ApiError | null = null;
  /** The client left: nothing more to compute or send. */
  cancelled = false;
  /** Rows in the batch this job ran in (0 until it starts). */
  batchRows = 0;
  private readonly detok: IncrementalDetokenizer;
  private readonly stops: StopStrings;
  private sent = 0;

  constructor(readonly request: GenerationRequest, tokenizer: Tokenizer, private readonly sink: RowSink) {
    const skip = request.skipSpecialTokens;
    const V = tokenizer.vocabSize;
    // Ids the model has but the tokenizer does not (padded embedding rows) have no text.
    const decodable = (id: number): boolean => id < V && tokenizer.idToToken(id) !== undefined;
    this.detok = new IncrementalDetokenizer((ids) => tokenizer.decode(ids.filter(decodable), { skipSpecialTokens: skip }));
    this.stops = new StopStrings(request.stop, request.includeStopStr);
  }

  get promptIds(): number[] { return this.request.promptIds; }
  get maxTokens(): number { return this.request.maxTokens; }
  get temperature(): number { return this.request.temperature; }
  get topP(): number { return this.request.topP; }
  get topK(): number { return this.request.topK; }
  get seed(): number | null { return this.request.seed; }
  get stopTokenIds(): ReadonlySet<number> { return this.request.stopTokenIds; }
  get done(): boolean {
    return this.finish !== null || this.failed !== null || this.cancelled;
  }
  /** The text so far (final once finished). */
  get text(): string {
    return this.stops.final;
  }

  start(rows: number): void {
    this.batchRows = rows;
    this.sink.start(rows);
  }

  token(id: number): void {
    if (this.done) return;
    this.tokens.push(id);
    let finish: FinishReason | null = null;
    if (this.request.stopTokenIds.has(id)) finish = 'stop';
    else if (this.stops.append(this.detok.push(id))) finish = 'stop';
    if (finish === null && this.tokens.length >= this.request.maxTokens) finish = 'length';
    // At the end, text held back for an incomplete character is released (and may complete a stop string).
    if (finish !== null && !this.stops.stopped && this.stops.append(this.detok.flush())) finish = 'stop';
    const final = this.stops.final;
    // Streams get text as soon as it is safe; other rows only need the final text.
    const upto = finish !== null ? final.length : this.request.stream ? this.stops.safeLength() : 0;
    const delta = upto > this.sent ? final.slice(this.sent, upto) : '';
    this.sent = Math.max(this.sent, upto);
    this.finish = finish;
    this.sink.delta(delta, id, finish);
  }

  fail(e: unknown): void {
    if (this.done) return;
    this.failed = internalError(e);
    this.sink.error(this.failed);
  }

  cancel(): void {
    this.cancelled = true;
  }
}
