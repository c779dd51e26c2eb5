/**
 * onnxruntime-node for the native engines: lazy loading (a broken install only matters to the engine
 * that needs it), an availability probe that runs a trivial graph, and session creation with the
 * project's settings: intra-op threads = `threads` ?? os.cpus().length, one inter-op thread,
 * sequential execution, all graph optimisations, warnings off (errors only).
 *
 * MEDUSA_TRAIN_DISABLE_ORT=1 (or true/yes) makes onnxruntime count as unavailable: the `auto` heads
 * engine falls back to tfjs and says so. Tests can inject a loader (setOrtLoaderForTests).
 */
import * as os from 'node:os';
import type * as OrtTypes from 'onnxruntime-node';
import { describe, fail } from '../errors.js';
import { GraphBuilder } from '../io/onnx.js';

export type Ort = typeof OrtTypes;
export type OrtSession = OrtTypes.InferenceSession;
export type OrtTensor = OrtTypes.Tensor;

export const DISABLE_ORT_ENV = 'MEDUSA_TRAIN_DISABLE_ORT';

type Loader = () => Promise<Ort>;

const defaultLoader: Loader = async () => {
  const mod = (await import('onnxruntime-node')) as Ort & { default?: Ort };
  // onnxruntime-node is CommonJS: its named exports may only be on `default` depending on the loader.
  return typeof mod.InferenceSession === 'function' ? mod : (mod.default as Ort);
};

let loader: Loader = defaultLoader;
let probed: Promise<{ ok: boolean; reason?: string; ort?: Ort }> | null = null;

/** Replace how onnxruntime-node is loaded (null: the real module). Clears the cached probe. */
export function setOrtLoaderForTests(l: Loader | null): void {
  loader = l ?? defaultLoader;
  probed = null;
}

export function disabledByEnv(): boolean {
  const v = process.env[DISABLE_ORT_ENV];
  return v !== undefined && /^(1|true|yes|on)$/i.test(v.trim());
}

/**
 * Whether onnxruntime-node loads and runs a trivial graph (x -> Sigmoid(x W) on a 2x3 input checked
 * against the expected values). Cached per process (the env variable is read every time).
 */
export async function probeOrt(): Promise<{ ok: boolean; reason?: string; ort?: Ort }> {
  if (disabledByEnv()) return { ok: false, reason: `disabled by ${DISABLE_ORT_ENV}=${process.env[DISABLE_ORT_ENV]}` };
  probed ??= (async () => {
    let ort: Ort;
    try {
      ort = await loader();
    } catch (e) {
      return { ok: false, reason: `onnxruntime-node failed to load: ${firstLine(describe(e))}` };
    }
    try {
      const g = new GraphBuilder('probe');
      g.input('x', 'float32', ['n', 3]);
      g.initializer('w', 'float32', [3, 2], [1, 2, 3, 4, 5, 6]);
      const y = g.op('MatMul', ['x', 'w']);
      g.node('Sigmoid', [y], { outputs: ['y'] });
      g.output('y', 'float32', ['n', 2]);
      const session = await ort.InferenceSession.create(g.serialize(), { intraOpNumThreads: 1, interOpNumThreads: 1, logSeverityLevel: 3 });
      try {
        const r = await session.run({ x: new ort.Tensor('float32', Float32Array.from([1, 0, 0, 0, 1, -1]), [2, 3]) });
        const got = Array.from(r['y'].data as Float32Array);
        const want = [1, 2, 3 - 5, 4 - 6].map((z) => 1 / (1 + Math.exp(-z)));
        if (got.length !== 4 || got.some((v, i) => !(Math.abs(v - want[i]) < 1e-6))) return { ok: false, reason: `onnxruntime-node computed a wrong result in its self-test (${got.join(', ')})` };
      } finally {
        await session.release();
      }
      return { ok: true, ort };
    } catch (e) {
      return { ok: false, reason: `onnxruntime-node failed its self-test: ${firstLine(describe(e))}` };
    }
  })();
  return probed;
}

/** The intra-op thread count a session gets. */
export function ortThreads(threads?: number): number {
  return threads ?? Math.max(1, os.cpus().length);
}

/** An InferenceSession over a serialized model with the project's settings. */
export async function createSession(ort: Ort, model: Uint8Array, threads: number, what: string): Promise<OrtSession> {
  try {
    return await ort.InferenceSession.create(model, {
      intraOpNumThreads: threads,
      interOpNumThreads: 1,
      executionMode: 'sequential',
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3,
    });
  } catch (e) {
    fail('E_ENGINE', `onnxruntime could not create the ${what} session: ${firstLine(describe(e))}`, e);
  }
}

/** onnxruntime-node's version, for descriptions. */
export function ortVersion(ort: Ort): string {
  const v = (ort.env as { versions?: { node?: string; common?: string } }).versions;
  return v?.node ?? v?.common ?? 'unknown version';
}

function firstLine(s: string): string {
  return s.split('\n')[0];
}
