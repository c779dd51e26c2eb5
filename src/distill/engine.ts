/**
 * Generation engines for self-distillation. An engine turns prompt token ids into the base model's
 * continuation; the distill recipe drives conversations turn by turn and batches requests across them.
 */

export interface GenerationRequest {
  /** The conversation so far, rendered with the chat template and ending with the generation prompt. */
  promptIds: number[];
  maxNewTokens: number;
  /** Sampling stream seed for this (conversation, turn): results do not depend on batching. */
  seed: number;
}

export interface GenerationOutput {
  /** Generated ids, including the end-of-turn id when one ended the turn. */
  tokens: number[];
  finish: 'eos' | 'length';
  /** Teacher top-k per generated token (local engine with topk > 0): [tokens.length * k]. */
  topkIds?: Int32Array;
  topkLogprobs?: Float32Array;
}

export type GenerationResult = GenerationOutput | { error: string };

export interface DistillEngine {
  /** e.g. "local" or "openai". */
  readonly name: string;
  /** Human-readable description for logs and dataset metadata. */
  readonly description: string;
  generate(requests: GenerationRequest[]): Promise<GenerationResult[]>;
  close(): Promise<void>;
}

export function isError(r: GenerationResult): r is { error: string } {
  return (r as { error?: string }).error !== undefined;
}
