/**
 * LoRA merge (src/train/lora-merge.ts): W' = W + (alpha/r) B A on the host, checked exactly on a hand-made
 * example, and end to end: the merged model's logits (merged weights written and loaded into our decoder)
 * equal the adapter model's logits (base decoder + a separate adapter path x A^T B^T (alpha/r), tfjs ops)
 * to 1e-5, on an untied Llama and a tied Qwen2 with biases (lm_head adapted: the merge unties it).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { decoderForward, type Decoder, type ForwardHook } from '../src/model/decoder.js';
import { loadDecoder } from '../src/model/load.js';
import { writeTinyModel } from '../src/model/tiny.js';
import { disposeWeights } from '../src/model/weights.js';
import { Rng } from '../src/model/sampling.js';
import { openSafetensorsFolder, readTensorF32, writeSafetensors, type WriteTensor } from '../src/io/safetensors.js';
import { checkAdapters, loraMergeTable, mergeLora, mergeOne, type HostTensor, type LoraMergeSpec } from '../src/train/lora-merge.js';
import { expectMedusa } from './helpers/errors.js';
import { adapterHook, randomAdapters } from './helpers/lora.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-lora-merge-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

beforeAll(async () => {
  await initBackend('cpu');
});

test('hand-made 2x3 example: W + (alpha/r) B A exactly', () => {
  const W = Float32Array.from([1, 2, 3, 4, 5, 6]); // [2, 3]
  const A = Float32Array.from([1, 0, -1]); // [1, 3]
  const B = Float32Array.from([2, -0.5]); // [2, 1]
  // alpha 4, r 1: scale 4; B A = [[2, 0, -2], [-0.5, 0, 0.5]]
  expect(Array.from(mergeOne(W, A, B, 2, 3, 1, 4))).toEqual([9, 2, -5, 2, 5, 8]);
  // rank 2: B A = [[1*1 + 2*0, 1*0 + 2*1, 1*1 + 2*1], ...] with A = [[1,0,1],[0,1,1]], B = [[1,2],[3,-1]]
  const A2 = Float32Array.from([1, 0, 1, 0, 1, 1]);
  const B2 = Float32Array.from([1, 2, 3, -1]);
  // B A = [[1, 2, 3], [3, -1, 2]]; scale 0.5
  expect(Array.from(mergeOne(W, A2, B2, 2, 3, 2, 0.5))).toEqual([1.5, 3, 4.5, 5.5, 4.5, 7]);
});

function logitsOf(decoder: Decoder, ids: number[], B: number, T: number, hook?: ForwardHook): Float32Array {
  const { hidden, logits } = decoderForward(decoder, { ids, batch: B, seqLen: T, logits: 'all', hook });
  const data = logits!.dataSync() as Float32Array;
  hidden.dispose();
  logits!.dispose();
  return data;
}

describe.each([
  { name: 'llama (untied)', opts: { architecture: 'LlamaForCausalLM' as const, tieWordEmbeddings: false, seed: 1 }, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'] },
  { name: 'qwen2 (tied, q/k/v bias)', opts: { architecture: 'Qwen2ForCausalLM' as const, tieWordEmbeddings: true, seed: 2 }, targets: ['q_proj', 'v_proj', 'down_proj', 'lm_head'] },
  { name: 'llama (tied, no lm_head adapter)', opts: { architecture: 'LlamaForCausalLM' as const, tieWordEmbeddings: true, seed: 3 }, targets: ['k_proj', 'o_proj', 'up_proj'] },
])('merged model = adapter model: $name', ({ name, opts, targets }) => {
  test('logits within 1e-5', () => {
    const baseDir = path.join(tmp, `base-${opts.seed}`);
    writeTinyModel(baseDir, { ...opts, initStd: 0.1 });
    const { decoder, folder } = loadDecoder(baseDir);
    const c = decoder.config;
    const spec: LoraMergeSpec = { rank: 4, alpha: 8, targets };
    const rows = loraMergeTable(c, spec);
    expect(rows).toHaveLength(c.numLayers * targets.filter((t) => t !== 'lm_head').length + (targets.includes('lm_head') ? 1 : 0));
    const adapters = randomAdapters(rows, spec.rank, opts.seed);

    // Merge on the host, from the base model's file.
    const shards = openSafetensorsFolder(baseDir);
    const read = (n: string): HostTensor => {
      const info = shards.tensors.get(n === 'lm_head.weight' && c.tieWordEmbeddings ? 'model.embed_tokens.weight' : n)!;
      return { shape: info.shape.slice(), data: readTensorF32(info) };
    };
    const { merged, untiedLmHead } = mergeLora(read, adapters, c, spec, `${name} adapters`);
    expect(untiedLmHead).toBe(c.tieWordEmbeddings && targets.includes('lm_head'));
    expect([...merged.keys()].sort()).toEqual(rows.map((r) => r.base).sort());

    // Write the merged model: every base tensor, the merged ones replaced (+ lm_head.weight when untied).
    const outDir = path.join(tmp, `merged-${opts.seed}`);
    fs.mkdirSync(outDir);
    const tensors: Record<string, WriteTensor> = {};
    for (const [n, info] of shards.tensors) tensors[n] = { dtype: 'F32', shape: info.shape.slice(), data: merged.get(n)?.data ?? readTensorF32(info) };
    if (untiedLmHead) tensors['lm_head.weight'] = { dtype: 'F32', shape: [c.vocabSize, c.hiddenSize], data: merged.get('lm_head.weight')!.data };
    writeSafetensors(path.join(outDir, 'model.safetensors'), tensors, { format: 'pt' });
    fs.writeFileSync(path.join(outDir, 'config.json'), JSON.stringify({ ...folder.rawConfig, tie_word_embeddings: c.tieWordEmbeddings && !untiedLmHead }));
    const mergedModel = loadDecoder(outDir).decoder;

    const B = 2;
    const T = 7;
    const rng = new Rng(99);
    const ids = Array.from({ length: B * T }, () => Math.floor(rng.next() * c.vocabSize));
    const adapter = adapterHook(rows, adapters, spec);
    const want = logitsOf(decoder, ids, B, T, adapter.hook);
    adapter.dispose();
    const got = logitsOf(mergedModel, ids, B, T);
    const plain = logitsOf(decoder, ids, B, T);
    let maxDiff = 0;
    let adapterEffect = 0;
    for (let i = 0; i < want.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(want[i] - got[i]));
      adapterEffect = Math.max(adapterEffect, Math.abs(want[i] - plain[i]));
    }
    expect(maxDiff).toBeLessThan(1e-5);
    expect(adapterEffect).toBeGreaterThan(1e-2); // the adapters do change the model: the comparison means something
    disposeWeights(decoder.weights);
    disposeWeights(mergedModel.weights);
  });
});

describe('adapter tensors are checked against the table', () => {
  let decoder: Decoder;
  beforeAll(() => {
    const dir = path.join(tmp, 'check');
    writeTinyModel(dir, { architecture: 'LlamaForCausalLM', tieWordEmbeddings: false });
    decoder = loadDecoder(dir).decoder;
  });
  afterAll(() => disposeWeights(decoder.weights));
  const spec: LoraMergeSpec = { rank: 2, alpha: 4, targets: ['q_proj', 'lm_head'] };

  test('the literal names (PEFT) and shapes', () => {
    const c = decoder.config;
    const rows = loraMergeTable(c, spec);
    expect(rows.map((r) => [r.nameA, r.nameB, r.base, r.outDim, r.inDim])).toEqual([
      ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', 'model.layers.0.self_attn.q_proj.weight', 64, 64],
      ['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight', 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight', 'model.layers.1.self_attn.q_proj.weight', 64, 64],
      ['base_model.model.lm_head.lora_A.weight', 'base_model.model.lm_head.lora_B.weight', 'lm_head.weight', c.vocabSize, 64],
    ]);
    const all = loraMergeTable(c, { rank: 1, alpha: 1, targets: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'up_proj', 'v_proj'] });
    expect(all.slice(0, 6).map((r) => [r.base, r.outDim, r.inDim])).toEqual([
      ['model.layers.0.self_attn.k_proj.weight', 32, 64],
      ['model.layers.0.self_attn.v_proj.weight', 32, 64],
      ['model.layers.0.self_attn.o_proj.weight', 64, 64],
      ['model.layers.0.mlp.gate_proj.weight', 128, 64],
      ['model.layers.0.mlp.up_proj.weight', 128, 64],
      ['model.layers.0.mlp.down_proj.weight', 64, 128],
    ]);
  });

  test('missing, unknown, misshaped and non-finite tensors are named', () => {
    const c = decoder.config;
    const good = randomAdapters(loraMergeTable(c, spec), 2, 5);
    expect(() => checkAdapters(good, c, spec, 'ck/backbone.safetensors')).not.toThrow();
    const bad = { ...good };
    delete bad['base_model.model.lm_head.lora_B.weight'];
    bad['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'] = { shape: [3, 64], data: new Float32Array(192) };
    bad['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'] = { shape: [2, 64], data: new Float32Array(128) };
    bad['model.layers.0.self_attn.q_proj.weight'] = { shape: [64, 64], data: new Float32Array(4096) };
    const nan = new Float32Array(good['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'].data);
    nan[5] = NaN;
    bad['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'] = { shape: [64, 2], data: nan };
    const e = expectMedusa(() => checkAdapters(bad, c, spec, 'ck/backbone.safetensors'), 'E_MODEL', 'ck/backbone.safetensors', 'rank 2 on q_proj, lm_head');
    expect(e.message).toContain('tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape [3, 64], expected [2, 64]');
    expect(e.message).toContain('tensor base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight element 5 is NaN');
    expect(e.message).toContain(`missing tensor base_model.model.lm_head.lora_B.weight (expected shape [${c.vocabSize}, 2])`);
    expect(e.message).toContain('unexpected tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight (not an adapter of the recorded targets/rank)');
    expect(e.message).toContain('unexpected tensor model.layers.0.self_attn.q_proj.weight (not a PEFT adapter name');
    // A base tensor of the wrong shape (another model) is refused by name too.
    const wrongBase = () => ({ shape: [64, 32], data: new Float32Array(2048) });
    expectMedusa(() => mergeLora(wrongBase, good, c, spec, 'x'), 'E_MODEL', 'model.layers.0.self_attn.q_proj.weight is [64, 32]');
    expectMedusa(() => loraMergeTable(c, { rank: 0, alpha: 1, targets: ['q'] }, 'state.json'), 'E_CONFIG', 'state.json', 'rank must be', 'unknown target "q"');
  });
});
