/**
 * Backend choice for TensorFlow.js, and guards around the engine's known failure modes.
 *
 * `auto` tries native TensorFlow (@tensorflow/tfjs-node-gpu, then @tensorflow/tfjs-node: optional
 * packages that only install where their native library can be downloaded), then `wasm`
 * (XNNPACK, SIMD, one thread in Node), then the pure-JS `cpu` backend.
 *
 * The wasm backend reports some kernel failures (e.g. XNNPACK running out of the 4 GiB heap) only
 * as a console warning and leaves the output tensor unwritten. `engineGuard` turns any such
 * warning into a hard E_ENGINE error at the next `assertEngineHealthy()`.
 */
import * as tf from '@tensorflow/tfjs';
import { fail, describe } from './errors.js';

export type BackendChoice = 'auto' | 'native' | 'wasm' | 'cpu';
export const BACKEND_CHOICES: readonly BackendChoice[] = ['auto', 'native', 'wasm', 'cpu'];

export interface BackendInfo {
  /** tfjs backend name: 'tensorflow' (native), 'wasm' or 'cpu'. */
  name: string;
  /** What was loaded, e.g. "@tensorflow/tfjs-node-gpu" or "wasm (SIMD, 1 thread)". */
  detail: string;
  /** Largest total size of live tensors the backend can hold, in bytes (wasm: 4 GiB heap). */
  maxTensorBytes: number;
  /** Why the preferred backends were not used (empty when the first choice loaded). */
  skipped: string[];
}

/** The wasm backend's heap is 32-bit addressed. */
export const WASM_HEAP_BYTES = 4 * 1024 ** 3;

const NATIVE_PACKAGES = ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node'] as const;

let current: BackendInfo | undefined;

// Production mode: silences tfjs's console banners (e.g. the cpu backend's "install tfjs-node" notice).
tf.enableProdMode();

async function tryNative(skipped: string[]): Promise<BackendInfo | undefined> {
  for (const pkg of NATIVE_PACKAGES) {
    try {
      const spec: string = pkg; // a variable keeps TypeScript from requiring the optional package's types
      await import(spec);
      if (await tf.setBackend('tensorflow')) {
        await tf.ready();
        return { name: 'tensorflow', detail: pkg, maxTensorBytes: Number.MAX_SAFE_INTEGER, skipped };
      }
      skipped.push(`${pkg}: loaded but the 'tensorflow' backend did not initialise`);
    } catch (e) {
      skipped.push(`${pkg}: ${firstLine(describe(e))}`);
    }
  }
  return undefined;
}

async function tryWasm(skipped: string[]): Promise<BackendInfo | undefined> {
  try {
    await import('@tensorflow/tfjs-backend-wasm');
    if (await tf.setBackend('wasm')) {
      await tf.ready();
      installEngineGuard();
      shareIdentityDataOnWasm();
      return { name: 'wasm', detail: 'wasm (XNNPACK, SIMD, 1 thread)', maxTensorBytes: WASM_HEAP_BYTES, skipped };
    }
    skipped.push('wasm: the backend did not initialise');
  } catch (e) {
    skipped.push(`wasm: ${firstLine(describe(e))}`);
  }
  return undefined;
}

async function useCpu(skipped: string[]): Promise<BackendInfo> {
  if (!(await tf.setBackend('cpu'))) fail('E_BACKEND', 'The pure-JS cpu backend failed to initialise; reinstall with `npm ci`.');
  await tf.ready();
  return { name: 'cpu', detail: 'cpu (pure JavaScript, slow)', maxTensorBytes: Number.MAX_SAFE_INTEGER, skipped };
}

/**
 * Select and initialise the backend. Calling it again with the same choice is cheap; a different
 * choice switches backends (tensors made on the old backend must not be reused).
 */
export async function initBackend(choice: BackendChoice = 'auto'): Promise<BackendInfo> {
  if (!BACKEND_CHOICES.includes(choice)) {
    fail('E_USAGE', `Unknown backend '${String(choice)}'. Use one of: ${BACKEND_CHOICES.join(', ')}.`);
  }
  if (current && (choice === 'auto' || backendMatches(choice, current.name))) return current;
  const skipped: string[] = [];
  let info: BackendInfo | undefined;
  if (choice === 'native') {
    info = await tryNative(skipped);
    if (!info) {
      fail('E_BACKEND', `--backend native: no native TensorFlow could be loaded (${skipped.join('; ')}). ` +
        'Install @tensorflow/tfjs-node-gpu (CUDA) or @tensorflow/tfjs-node where their native download is reachable, or use --backend wasm.');
    }
  } else if (choice === 'wasm') {
    info = await tryWasm(skipped);
    if (!info) fail('E_BACKEND', `--backend wasm failed to load (${skipped.join('; ')}). Reinstall with \`npm ci\` or use --backend cpu.`);
  } else if (choice === 'cpu') {
    info = await useCpu(skipped);
  } else {
    info = (await tryNative(skipped)) ?? (await tryWasm(skipped)) ?? (await useCpu(skipped));
  }
  current = info;
  return info;
}

function backendMatches(choice: BackendChoice, name: string): boolean {
  return (choice === 'native' && name === 'tensorflow') || choice === name;
}

export function currentBackend(): BackendInfo {
  if (!current) fail('E_INTERNAL', 'initBackend() must be called before the engine is used.');
  return current;
}

function firstLine(s: string): string {
  const line = s.split('\n')[0] ?? s;
  return line.length > 200 ? `${line.slice(0, 200)}…` : line;
}

// ---------------------------------------------------------------------------------------------
// Engine guard: wasm kernel failures surface only as console warnings.

const engineWarnings: string[] = [];
let guardInstalled = false;
const ENGINE_FAILURE = /failed|out of memory|cannot allocate|abort|xnn_/i;

function installEngineGuard(): void {
  if (guardInstalled) return;
  guardInstalled = true;
  for (const method of ['warn', 'error'] as const) {
    const original = console[method].bind(console);
    console[method] = (...args: unknown[]): void => {
      const text = args.map((a) => String(a)).join(' ');
      if (ENGINE_FAILURE.test(text) && !text.startsWith('[medusa-train]')) engineWarnings.push(text);
      original(...args);
    };
  }
}

/** Throw E_ENGINE if the engine reported a failure since the last check (results would be garbage). */
export function assertEngineHealthy(where: string): void {
  if (engineWarnings.length === 0) return;
  const msgs = engineWarnings.splice(0, engineWarnings.length);
  fail('E_ENGINE', `The ${current?.name ?? 'tfjs'} engine reported a failure during ${where}: ${msgs.slice(0, 3).join(' | ')}. ` +
    'Its outputs cannot be trusted. This usually means the wasm heap (4 GiB) ran out: use a smaller batch or sequence length, ' +
    'or the native backend (--backend native).');
}

/** For tests: record a warning as if the engine had emitted it. */
export function _recordEngineWarningForTest(text: string): void {
  engineWarnings.push(text);
}

/**
 * tfjs keeps every tensor a gradient needs through engine.clone (the Identity kernel), and tfjs-wasm 4.22's
 * Identity copies the data: the whole forward under the tape is held twice (measured: about a quarter of a
 * MEDUSA-2 step's peak tensor memory on the 20M bench model). This registers, for the wasm backend only, an
 * Identity that shares the data with a reference count, as wasm's own Reshape and the cpu / webgl Identity
 * do (tensors are immutable in tfjs; nothing writes into a tensor's memory after it is made). Idempotent.
 * Registered whenever the wasm backend is selected, so every wasm run (MEDUSA-1, MEDUSA-2, decoding) gets it.
 */
function shareIdentityDataOnWasm(): void {
  const current = tf.getKernel('Identity', 'wasm');
  if (current?.kernelFunc === sharedIdentity) return;
  if (current) tf.unregisterKernel('Identity', 'wasm');
  tf.registerKernel({ kernelName: 'Identity', backendName: 'wasm', kernelFunc: sharedIdentity });
}

function sharedIdentity(args: { inputs: tf.NamedTensorInfoMap; backend: unknown }): tf.TensorInfo {
  const x = args.inputs.x as tf.TensorInfo;
  (args.backend as { incRef(dataId: object): void }).incRef(x.dataId);
  return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
}
