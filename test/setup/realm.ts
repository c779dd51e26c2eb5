/**
 * Jest runs each test file in a vm realm whose typed-array constructors are not the ones of the realm where
 * onnxruntime-node's native binding creates its output arrays, so onnxruntime-common's `data instanceof
 * Float32Array` check rejects every session output ("A float32 tensor's data must be type of Float32Array").
 * Let this realm's typed-array constructors recognise arrays of any realm by their tag. Plain Node has one
 * realm: production code needs nothing of this.
 */
const ctors = [Float32Array, Float64Array, Int8Array, Uint8Array, Int16Array, Uint16Array, Int32Array, Uint32Array, BigInt64Array, BigUint64Array];
for (const C of ctors) {
  const tag = `[object ${C.name}]`;
  Object.defineProperty(C, Symbol.hasInstance, { configurable: true, value: (x: unknown) => ArrayBuffer.isView(x) && Object.prototype.toString.call(x) === tag });
}
export {};
