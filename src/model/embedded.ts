/**
 * The committed structured base model (assets/structured-model/): a small Llama chat model that the
 * project trains itself on its own corpus (src/model/structured-corpus.ts,
 * scripts/build_structured_model.py, `npm run build:structured-model`). Shipped in the package, so
 * it is found from a clean clone (src/) and from the built package (dist/src/) alike.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { packagePath } from '../paths.js';

export const STRUCTURED_MODEL = { name: 'structured-llama-2m-v1', dir: ['assets', 'structured-model'] } as const;

/** Files a usable model folder must hold (weights, config, tokenizer with its chat template). */
export const STRUCTURED_MODEL_FILES = ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'] as const;

/**
 * Path of the committed structured model, after checking that its files are there (E_IO naming the
 * missing file and the fix otherwise). `root` overrides the package folder (for tests).
 */
export function structuredModelPath(root?: string): string {
  const dir = root === undefined ? packagePath(...STRUCTURED_MODEL.dir) : path.join(root, ...STRUCTURED_MODEL.dir);
  const missing = STRUCTURED_MODEL_FILES.filter((f) => !fs.existsSync(path.join(dir, f)));
  if (missing.length > 0) {
    fail(
      'E_IO',
      `The embedded structured model at ${dir} is incomplete: ${missing.join(', ')} missing. ` +
        'Reinstall medusa-train, or rebuild it from a clone with `npm run build:structured-model`.',
    );
  }
  const size = fs.statSync(path.join(dir, 'model.safetensors')).size;
  // A Git LFS pointer or a truncated checkout is a few hundred bytes, not megabytes of weights.
  if (size < 1024) {
    fail('E_IO', `${path.join(dir, 'model.safetensors')} is only ${size} bytes (a Git LFS pointer or a truncated checkout?). Fetch the real file or rebuild with \`npm run build:structured-model\`.`);
  }
  return dir;
}
