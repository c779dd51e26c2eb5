import { initBackend, assertEngineHealthy, _recordEngineWarningForTest, currentBackend } from '../src/backend.js';
import { MedusaError } from '../src/errors.js';

describe('backend selection', () => {
  test('auto loads native TensorFlow if installed, else wasm, and says why it skipped the others', async () => {
    const info = await initBackend('auto');
    expect(['tensorflow', 'wasm']).toContain(info.name);
    if (info.name === 'wasm') {
      expect(info.skipped.join('\n')).toContain('@tensorflow/tfjs-node-gpu');
      expect(info.maxTensorBytes).toBe(4 * 1024 ** 3);
    }
    expect(currentBackend()).toBe(info);
  });

  test('forced cpu and wasm work; native fails with an actionable error when absent', async () => {
    expect((await initBackend('cpu')).name).toBe('cpu');
    expect((await initBackend('wasm')).name).toBe('wasm');
    let native: unknown;
    try {
      native = await initBackend('native');
    } catch (e) {
      native = e;
    }
    if (native instanceof MedusaError) {
      expect(native.code).toBe('E_BACKEND');
      expect(native.message).toContain('--backend wasm');
    } else {
      expect((native as { name: string }).name).toBe('tensorflow');
    }
  });

  test('an engine failure warning becomes a hard E_ENGINE error', async () => {
    await initBackend('wasm');
    expect(() => assertEngineHealthy('a test')).not.toThrow();
    _recordEngineWarningForTest('XNNPACK failed to allocate 123 bytes');
    expect(() => assertEngineHealthy('a test')).toThrow(expect.objectContaining({ code: 'E_ENGINE' }));
    expect(() => assertEngineHealthy('a test')).not.toThrow();
  });

  test('unknown backend names are usage errors', async () => {
    await expect(initBackend('gpu' as never)).rejects.toMatchObject({ code: 'E_USAGE' });
  });
});

test('on wasm, a clone (what autograd saves for the backward) shares its data instead of copying it, and outlives the original', async () => {
  const tf = await import('@tensorflow/tfjs');
  await initBackend('wasm');
  const x = tf.tensor1d([1, 2, 3]);
  const y = tf.clone(x);
  expect((y as unknown as { dataId: object }).dataId).toBe((x as unknown as { dataId: object }).dataId);
  x.dispose();
  expect(Array.from(y.dataSync())).toEqual([1, 2, 3]);
  y.dispose();
});
