/** `medusa-train tiny`: write a tiny model folder (random weights) of any supported architecture. */
import { fail } from '../errors.js';
import { BENCH_20M, TINY_ARCH_ALIASES, writeTinyModel, type TinyModelOptions } from '../model/tiny.js';

export interface TinyArgs {
  out: string;
  arch: string;
  preset: 'tiny' | '20m';
  hidden?: number;
  layers?: number;
  heads?: number;
  kvHeads?: number;
  ff?: number;
  vocab?: number;
  dtype: string;
  tied?: boolean;
  seed: number;
}

export function runTiny(a: TinyArgs): { out: string; parameters: number; vocabSize: number; options: Partial<TinyModelOptions> } {
  const architecture = TINY_ARCH_ALIASES[a.arch.toLowerCase()];
  if (!architecture) fail('E_USAGE', `--arch ${a.arch} is not one of ${Object.keys(TINY_ARCH_ALIASES).join(', ')}.`);
  const dtype = a.dtype.toUpperCase();
  if (dtype !== 'F32' && dtype !== 'BF16' && dtype !== 'F16') fail('E_USAGE', `--dtype ${a.dtype} is not one of f32, bf16, f16.`);
  if (a.preset !== 'tiny' && a.preset !== '20m') fail('E_USAGE', `--preset ${String(a.preset)} is not one of tiny, 20m.`);
  const options: Partial<TinyModelOptions> = {
    ...(a.preset === '20m' ? BENCH_20M : {}),
    architecture,
    dtype,
    seed: a.seed,
    ...(a.hidden !== undefined ? { hiddenSize: a.hidden } : {}),
    ...(a.layers !== undefined ? { numLayers: a.layers } : {}),
    ...(a.heads !== undefined ? { numHeads: a.heads } : {}),
    ...(a.kvHeads !== undefined ? { numKvHeads: a.kvHeads } : {}),
    ...(a.ff !== undefined ? { intermediateSize: a.ff } : {}),
    ...(a.vocab !== undefined ? { vocabSize: a.vocab } : {}),
    ...(a.tied !== undefined ? { tieWordEmbeddings: a.tied } : {}),
  };
  const r = writeTinyModel(a.out, options);
  return { out: a.out, ...r, options };
}
