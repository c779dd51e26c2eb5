/**
 * A small typed builder for ONNX graphs over onnx-proto (the ONNX protobuf definitions), used by the
 * native engines (graphs run with onnxruntime-node) and by the ONNX export. Leaf module.
 *
 * Tensors in graphs are float32 unless said otherwise; weights become initializers (raw little-endian
 * data). `serialize()` gives the ModelProto bytes that onnxruntime's InferenceSession accepts.
 */
import onnxProto from 'onnx-proto';
import { fail } from '../errors.js';

const onnx = onnxProto.onnx;

export const ONNX_OPSET = 17;
export const ONNX_IR_VERSION = 8;

export type ElemType = 'float32' | 'int64' | 'int32' | 'uint8' | 'bool';
const ELEM: Record<ElemType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  uint8: onnx.TensorProto.DataType.UINT8,
  bool: onnx.TensorProto.DataType.BOOL,
};

/** Bytes per element of each type. */
export const ELEM_BYTES: Record<ElemType, number> = { float32: 4, int64: 8, int32: 4, uint8: 1, bool: 1 };

/** A dimension: a fixed size or a symbolic name (dynamic). */
export type Dim = number | string;

export type AttrValue = number | string | number[] | { floats: number[] } | { ints: number[] } | { float: number } | { tensor: { type: ElemType; dims: number[]; data: ArrayLike<number> } };

export class GraphBuilder {
  private readonly nodes: InstanceType<typeof onnx.NodeProto>[] = [];
  private readonly initializers: InstanceType<typeof onnx.TensorProto>[] = [];
  private readonly inputs: InstanceType<typeof onnx.ValueInfoProto>[] = [];
  private readonly outputs: InstanceType<typeof onnx.ValueInfoProto>[] = [];
  private readonly names = new Set<string>();
  private counter = 0;

  constructor(readonly name: string) {}

  /** A fresh value name with a readable prefix. */
  fresh(prefix: string): string {
    let n: string;
    do n = `${prefix}_${this.counter++}`;
    while (this.names.has(n));
    this.names.add(n);
    return n;
  }

  private claim(name: string): string {
    if (this.names.has(name)) fail('E_INTERNAL', `ONNX graph ${this.name}: the name ${name} is used twice`);
    this.names.add(name);
    return name;
  }

  input(name: string, type: ElemType, shape: Dim[]): string {
    this.inputs.push(valueInfo(this.claim(name), type, shape));
    return name;
  }

  output(name: string, type: ElemType, shape: Dim[]): void {
    this.outputs.push(valueInfo(name, type, shape));
  }

  /** A constant tensor stored in the model (weights). float32 data is written raw, little-endian. */
  initializer(name: string, type: ElemType, dims: number[], data: ArrayLike<number> | BigInt64Array): string {
    this.initializers.push(tensorProto(this.claim(name), type, dims, data));
    return name;
  }

  /**
   * A weight stored outside the model file (ONNX external data): the TensorProto carries name, type
   * and dims, data_location = EXTERNAL and the external_data entries {location, offset, length}; the
   * caller writes the bytes (raw little-endian) to `location`, a path relative to the model file.
   */
  externalInitializer(name: string, type: ElemType, dims: number[], ext: { location: string; offset: number; length: number }): string {
    const n = dims.reduce((a, b) => a * b, 1);
    const bytes = n * ELEM_BYTES[type];
    if (ext.length !== bytes) fail('E_INTERNAL', `ONNX initializer ${name}: external length ${ext.length} bytes for dims [${dims}] (${bytes} bytes)`);
    const entry = (key: string, value: string) => onnx.StringStringEntryProto.create({ key, value });
    this.initializers.push(
      onnx.TensorProto.create({
        name: this.claim(name),
        dataType: ELEM[type],
        dims,
        dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
        externalData: [entry('location', ext.location), entry('offset', String(ext.offset)), entry('length', String(ext.length))],
      }),
    );
    return name;
  }

  /** A scalar or small constant. */
  constant(type: ElemType, dims: number[], data: ArrayLike<number>, prefix = 'const'): string {
    const name = this.fresh(prefix); // fresh() has already claimed the name
    this.initializers.push(tensorProto(name, type, dims, data));
    return name;
  }

  /** Add a node; returns its output names (fresh unless given). */
  node(op: string, inputs: string[], opts: { outputs?: number | string[]; attrs?: Record<string, AttrValue>; domain?: string; name?: string } = {}): string[] {
    const outs = Array.isArray(opts.outputs) ? opts.outputs.map((o) => this.claim(o)) : Array.from({ length: opts.outputs ?? 1 }, () => this.fresh(op.toLowerCase()));
    const attribute = Object.entries(opts.attrs ?? {}).map(([k, v]) => attributeProto(k, v));
    this.nodes.push(onnx.NodeProto.create({ opType: op, input: inputs, output: outs, attribute, domain: opts.domain ?? '', name: opts.name ?? this.fresh(`n_${op}`) }));
    return outs;
  }

  /** One-output node. */
  op(op: string, inputs: string[], attrs?: Record<string, AttrValue>): string {
    return this.node(op, inputs, { attrs })[0];
  }

  build(): InstanceType<typeof onnx.ModelProto> {
    const graph = onnx.GraphProto.create({ name: this.name, node: this.nodes, initializer: this.initializers, input: this.inputs, output: this.outputs });
    return onnx.ModelProto.create({
      irVersion: ONNX_IR_VERSION,
      opsetImport: [onnx.OperatorSetIdProto.create({ domain: '', version: ONNX_OPSET })],
      producerName: 'medusa-train',
      graph,
    });
  }

  serialize(): Uint8Array {
    return onnx.ModelProto.encode(this.build()).finish();
  }
}

function valueInfo(name: string, type: ElemType, shape: Dim[]): InstanceType<typeof onnx.ValueInfoProto> {
  const dim = shape.map((d) => (typeof d === 'number' ? onnx.TensorShapeProto.Dimension.create({ dimValue: d }) : onnx.TensorShapeProto.Dimension.create({ dimParam: d })));
  return onnx.ValueInfoProto.create({ name, type: onnx.TypeProto.create({ tensorType: onnx.TypeProto.Tensor.create({ elemType: ELEM[type], shape: onnx.TensorShapeProto.create({ dim }) }) }) });
}

function tensorProto(name: string, type: ElemType, dims: number[], data: ArrayLike<number> | BigInt64Array): InstanceType<typeof onnx.TensorProto> {
  const n = dims.reduce((a, b) => a * b, 1);
  if (data.length !== n) fail('E_INTERNAL', `ONNX initializer ${name}: ${data.length} values for dims [${dims}]`);
  let raw: Uint8Array;
  if (type === 'float32') raw = new Uint8Array(Float32Array.from(data as ArrayLike<number>).buffer);
  else if (type === 'int64') raw = new Uint8Array((data instanceof BigInt64Array ? data : BigInt64Array.from(Array.from(data as ArrayLike<number>, (x) => BigInt(x)))).buffer);
  else if (type === 'int32') raw = new Uint8Array(Int32Array.from(data as ArrayLike<number>).buffer);
  else raw = Uint8Array.from(data as ArrayLike<number>);
  return onnx.TensorProto.create({ name, dataType: ELEM[type], dims, rawData: raw });
}

function attributeProto(name: string, v: AttrValue): InstanceType<typeof onnx.AttributeProto> {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof v === 'number') return Number.isInteger(v) ? onnx.AttributeProto.create({ name, type: T.INT, i: v }) : onnx.AttributeProto.create({ name, type: T.FLOAT, f: v });
  if (typeof v === 'string') return onnx.AttributeProto.create({ name, type: T.STRING, s: new TextEncoder().encode(v) });
  if (Array.isArray(v)) return onnx.AttributeProto.create({ name, type: T.INTS, ints: v });
  if ('floats' in v) return onnx.AttributeProto.create({ name, type: T.FLOATS, floats: v.floats });
  if ('ints' in v) return onnx.AttributeProto.create({ name, type: T.INTS, ints: v.ints });
  if ('float' in v) return onnx.AttributeProto.create({ name, type: T.FLOAT, f: v.float });
  return onnx.AttributeProto.create({ name, type: T.TENSOR, t: tensorProto(`${name}_value`, v.tensor.type, v.tensor.dims, v.tensor.data) });
}
