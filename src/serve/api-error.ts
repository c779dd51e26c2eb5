/**
 * HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. Everything a
 * client can cause is an ApiError with its status; anything else becomes a 500 `server_error`.
 */
import { describe, isMedusaError } from '../errors.js';

/** As OpenAI: every 4xx is an invalid_request_error, every 5xx a server_error. */
export type ApiErrorType = 'invalid_request_error' | 'server_error';

export interface ApiErrorBody {
  error: { message: string; type: ApiErrorType; param: string | null; code: string | null };
}

export class ApiError extends Error {
  readonly status: number;
  readonly type: ApiErrorType;
  readonly param: string | null;
  readonly code: string | null;
  /** Extra response headers (e.g. Retry-After, Allow). */
  readonly headers: Record<string, string>;
  constructor(status: number, message: string, o: { type?: ApiErrorType; param?: string | null; code?: string | null; headers?: Record<string, string> } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = o.type ?? (status >= 500 ? 'server_error' : 'invalid_request_error');
    this.param = o.param ?? null;
    this.code = o.code ?? null;
    this.headers = o.headers ?? {};
  }
  body(): ApiErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** 400 naming the offending field. */
export function badRequest(param: string | null, message: string, code: string | null = null): ApiError {
  return new ApiError(400, message, { param, code });
}

/** A failure inside the engine as the 500 its requests get (ApiErrors, e.g. a 503 at shutdown, as they are). */
export function internalError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  const what = isMedusaError(e) ? `[${e.code}] ${e.message}` : describe(e);
  return new ApiError(500, `internal error during generation: ${what}`, { type: 'server_error', code: 'internal_error' });
}

/**
 * Any thrown value as an ApiError: ApiErrors as they are; tokenizer / chat-template errors (caused by
 * the request's text or messages) and usage errors as 400; everything else as a 500 whose message
 * names the failure (never a stack). For errors while reading a request.
 */
export function toApiError(e: unknown, param: string | null = null): ApiError {
  if (e instanceof ApiError) return e;
  if (isMedusaError(e) && (e.code === 'E_TOKENIZER' || e.code === 'E_USAGE')) return badRequest(param, e.message);
  return internalError(e);
}
