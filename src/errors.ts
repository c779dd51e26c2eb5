/**
 * One error type for everything the user can cause or fix. Each error has a stable `code`
 * (documented in docs/ARCHITECTURE.md), an exit code for the CLI, and a message that names the
 * file, key or tensor, the limit that was crossed, and the fix.
 */

export type ErrorCode =
  | 'E_USAGE' // bad command-line arguments
  | 'E_CONFIG' // bad config.json / YAML / option values
  | 'E_IO' // a file or folder is missing or unreadable
  | 'E_SAFETENSORS' // a malformed or unsupported safetensors file
  | 'E_MODEL' // a model folder that does not match what it claims (missing/extra/misshaped tensors)
  | 'E_UNSUPPORTED' // an architecture, dtype or feature we do not support
  | 'E_TOKENIZER' // tokenizer.json / tokenizer_config.json / chat template problems
  | 'E_BACKEND' // a backend that cannot be loaded or cannot hold the model
  | 'E_ENGINE' // the engine failed in a way that would make results wrong (e.g. wasm heap exhausted)
  | 'E_TRAIN' // training diverged (NaN/Inf loss) or cannot continue
  | 'E_INTERNAL'; // a bug: please report

const EXIT_CODES: Record<ErrorCode, number> = {
  E_USAGE: 2,
  E_CONFIG: 3,
  E_IO: 4,
  E_SAFETENSORS: 5,
  E_MODEL: 6,
  E_UNSUPPORTED: 7,
  E_TOKENIZER: 8,
  E_BACKEND: 9,
  E_ENGINE: 10,
  E_TRAIN: 11,
  E_INTERNAL: 70,
};

export class MedusaError extends Error {
  readonly code: ErrorCode;
  readonly exitCode: number;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MedusaError';
    this.code = code;
    this.exitCode = EXIT_CODES[code];
  }
}

export function fail(code: ErrorCode, message: string, cause?: unknown): never {
  throw new MedusaError(code, message, cause === undefined ? undefined : { cause });
}

export function isMedusaError(e: unknown): e is MedusaError {
  return e instanceof MedusaError;
}

/** Best-effort message of an unknown thrown value, for wrapping errors from dependencies. */
export function describe(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}
