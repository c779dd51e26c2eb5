import { MedusaError } from '../../src/errors.js';

/**
 * Assert `fn` throws a MedusaError with `code` whose message contains every string in `parts` and
 * carries no raw stack trace.
 */
export function expectMedusa(fn: () => unknown, code: string, ...parts: string[]): MedusaError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(MedusaError);
  const me = caught as MedusaError;
  expect(me.code).toBe(code);
  for (const p of parts) expect(me.message).toContain(p);
  expect(me.message).not.toMatch(/\n\s+at /);
  return me;
}
