/**
 * `export --format hf` from MEDUSA-2 checkpoints built here with saveCheckpoint (LoRA and full mode): the
 * folder's files, config.json and tokenizer copied byte for byte, merged weights (logits of the reloaded
 * export vs the adapter model computed apart, W + alpha/r B A as a separate tfjs path, to 1e-5), the heads
 * in medusa/ readable by generate --medusa's reader against the exported model, tied lm_head untied,
 * bf16 rounding, and refusals that leave nothing behind.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../src/backend.js';
import { openHeadsSource } from '../src/eval/heads-source.js';
import { openSafetensorsFolder, readHeader, readTensorF32, f32ToBf16Bits } from '../src/io/safetensors.js';
import { sha256File } from '../src/io/hash.js';
import { decoderForward, type Decoder, type ForwardHook } from '../src/model/decoder.js';
import { exportHeads, initHeads, disposeHeads } from '../src/model/heads.js';
import { loadDecoder } from '../src/model/load.js';
import { Rng } from '../src/model/sampling.js';
import { writeTinyModel, type TinyModelOptions } from '../src/model/tiny.js';
import { disposeWeights } from '../src/model/weights.js';
import { HF_HEADS_DIR, runExport } from '../src/recipes/export.js';
import { saveCheckpoint } from '../src/train/checkpoint.js';
import { loraMergeTable, type LoraMergeSpec } from '../src/train/lora-merge.js';
import { createTrainableBackbone, type BackboneSpec } from '../src/train/trainable-backbone.js';
import { adapterHook, randomAdapters } from './helpers/lora.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-export-hf-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
beforeAll(async () => {
  await initBackend('cpu');
});

const log = (): void => {};
let n = 0;

/** A base model, and a MEDUSA-2 run with one checkpoint whose backbone tensors are `backbone` (made from the base decoder). */
function makeRun(opts: Partial<TinyModelOptions>, spec: BackboneSpec, tensors: (decoder: Decoder) => Record<string, { shape: number[]; data: Float32Array }>) {
  const id = n++;
  const baseDir = path.join(tmp, `base-${id}`);
  writeTinyModel(baseDir, { initStd: 0.1, ...opts });
  const { decoder, folder } = loadDecoder(baseDir);
  const backbone = tensors(decoder);
  const shape = { numHeads: 2, numLayers: 1, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize, lmHead: 'per_head' as const };
  const h = initHeads(shape, decoder.weights.lmHead, 3);
  const heads = exportHeads(h);
  disposeHeads(h);
  const runDir = path.join(tmp, `run-${id}`);
  saveCheckpoint(
    runDir,
    {
      step: 4,
      heads,
      optimizer: {},
      backbone,
      state: {
        step: 4,
        recipe: 'medusa2',
        heads_shape: { num_heads: 2, num_layers: 1, hidden_size: shape.hiddenSize, vocab_size: shape.vocabSize, lm_head: 'per_head' },
        base_model_config_sha256: folder.configHash,
        base_model_path: baseDir,
        backbone_mode: spec.mode,
        ...(spec.mode === 'lora' ? { lora: { rank: spec.rank, alpha: spec.alpha, dropout: spec.dropout, targets: spec.targets } } : { full_last_layers: spec.lastLayers }),
        train_embeddings: spec.trainEmbeddings,
      },
    },
    { keep: 1 },
  );
  return { baseDir, decoder, runDir, backbone, heads };
}

function logits(decoder: Decoder, hook?: ForwardHook): Float32Array {
  const rng = new Rng(5);
  const ids = Array.from({ length: 2 * 6 }, () => Math.floor(rng.next() * decoder.config.vocabSize));
  const { hidden, logits: l } = decoderForward(decoder, { ids, batch: 2, seqLen: 6, logits: 'all', hook });
  const data = Float32Array.from(l!.dataSync() as Float32Array);
  hidden.dispose();
  l!.dispose();
  return data;
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

describe.each([
  { name: 'llama, untied, all linear targets', opts: { architecture: 'LlamaForCausalLM' as const, tieWordEmbeddings: false }, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'] },
  { name: 'qwen2, tied, lm_head adapted', opts: { architecture: 'Qwen2ForCausalLM' as const, tieWordEmbeddings: true }, targets: ['q_proj', 'v_proj', 'lm_head'] },
])('LoRA run: $name', ({ opts, targets }) => {
  test('the hf folder: files, config, merged weights = adapter model to 1e-5, heads beside it', async () => {
    const spec: LoraMergeSpec = { rank: 4, alpha: 8, targets };
    let rows: ReturnType<typeof loraMergeTable> = [];
    const run = makeRun(opts, { mode: 'lora', rank: 4, alpha: 8, dropout: 0, targets, trainEmbeddings: false }, (d) => {
      rows = loraMergeTable(d.config, spec);
      return randomAdapters(rows, 4, 17);
    });
    const out = path.join(tmp, `out-${n}`);
    const lines: string[] = [];
    const r = await runExport({ run: run.runDir, format: 'hf', out, force: false, log: (l) => lines.push(l) });
    expect(r.format).toBe('hf');
    expect(r.dtype).toBe('f32');
    expect(r.maxAbsDiff).toBeLessThanOrEqual(r.bound);
    const tied = opts.tieWordEmbeddings;
    const copied = ['generation_config.json', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json'];
    expect(fs.readdirSync(out).sort()).toEqual(['config.json', HF_HEADS_DIR, 'model.safetensors', ...copied].sort());
    for (const f of copied) expect([f, fs.readFileSync(path.join(out, f)).equals(fs.readFileSync(path.join(run.baseDir, f)))]).toEqual([f, true]);
    const baseCfg = JSON.parse(fs.readFileSync(path.join(run.baseDir, 'config.json'), 'utf8')) as Record<string, unknown>;
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    // A tied model with an lm_head adapter is untied (the embedding lookup was not adapted); otherwise config.json is the base's.
    expect(cfg).toEqual({ ...baseCfg, tie_word_embeddings: false });
    if (!tied) expect(fs.readFileSync(path.join(out, 'config.json')).equals(fs.readFileSync(path.join(run.baseDir, 'config.json')))).toBe(true);
    const names = [...openSafetensorsFolder(out).tensors.keys()];
    expect(names).toContain('lm_head.weight');
    expect(lines.some((l) => l.includes('tie_word_embeddings false'))).toBe(tied);

    // The adapter model, computed apart from the export's code.
    const adapter = adapterHook(rows, run.backbone, spec);
    const want = logits(run.decoder, adapter.hook);
    adapter.dispose();
    const exported = loadDecoder(out).decoder;
    const got = logits(exported, undefined);
    expect(maxDiff(want, got)).toBeLessThan(1e-5);
    expect(maxDiff(want, logits(run.decoder))).toBeGreaterThan(1e-2); // the adapters matter

    // Heads: the medusa layout in medusa/, naming this folder as its base; generate --medusa's reader accepts it with the exported model.
    const headsDir = path.join(out, HF_HEADS_DIR);
    expect(fs.readdirSync(headsDir).sort()).toEqual(['config.json', 'medusa_lm_head.safetensors']);
    expect(JSON.parse(fs.readFileSync(path.join(headsDir, 'config.json'), 'utf8'))).toEqual({ medusa_num_heads: 2, medusa_num_layers: 1, base_model_name_or_path: out, hidden_size: 64, vocab_size: run.decoder.config.vocabSize });
    const hs = openHeadsSource(headsDir, { dir: out, configHash: sha256File(path.join(out, 'config.json')), hiddenSize: 64, vocabSize: run.decoder.config.vocabSize });
    expect(hs.baseCheck).toBe('config-sha256');
    // the exported model folder itself is accepted as a heads source (its heads are found in medusa/)
    const top = openHeadsSource(out, { dir: out, configHash: sha256File(path.join(out, 'config.json')), hiddenSize: 64, vocabSize: run.decoder.config.vocabSize });
    expect(top.dir).toBe(headsDir);
    expect(top.heads).toEqual(hs.heads);
    const header = readHeader(path.join(headsDir, 'medusa_lm_head.safetensors'));
    for (const [name, t] of Object.entries(run.heads)) expect([name, Array.from(readTensorF32(header.tensors.get(name)!)).every((v, i) => v === t.data[i])]).toEqual([name, true]);
    disposeWeights(exported.weights);
    disposeWeights(run.decoder.weights);
  });
});

test('full mode: the tuned tensors replace the base ones bit for bit; bf16 rounds every value', async () => {
  let tunedNames: string[] = [];
  const run = makeRun({ architecture: 'LlamaForCausalLM', tieWordEmbeddings: false }, { mode: 'full', lastLayers: 1, trainEmbeddings: false }, (d) => {
    const tb = createTrainableBackbone(d, { mode: 'full', lastLayers: 1, trainEmbeddings: false }, 0);
    const t = tb.exportTensors();
    tb.dispose();
    const rng = new Rng(8);
    for (const x of Object.values(t)) for (let i = 0; i < x.data.length; i++) x.data[i] += 0.05 * (2 * rng.next() - 1);
    tunedNames = Object.keys(t);
    return t;
  });
  expect(tunedNames).toContain('model.layers.1.self_attn.q_proj.weight');
  expect(tunedNames).toContain('model.norm.weight');
  const out = path.join(tmp, 'full-f32');
  await runExport({ run: run.runDir, format: 'hf', out, force: false, log });
  const exported = openSafetensorsFolder(out).tensors;
  const base = openSafetensorsFolder(run.baseDir).tensors;
  expect([...exported.keys()].sort()).toEqual([...base.keys()].sort());
  for (const [name, info] of exported) {
    const want = run.backbone[name]?.data ?? readTensorF32(base.get(name)!);
    expect([name, Array.from(readTensorF32(info)).every((v, i) => v === want[i])]).toEqual([name, true]);
  }
  expect(fs.readFileSync(path.join(out, 'config.json')).equals(fs.readFileSync(path.join(run.baseDir, 'config.json')))).toBe(true);

  const outBf16 = path.join(tmp, 'full-bf16');
  const r = await runExport({ run: run.runDir, format: 'hf', out: outBf16, dtype: 'bf16', force: false, log });
  expect(r.dtype).toBe('bf16');
  const q = openSafetensorsFolder(outBf16).tensors.get('model.layers.1.self_attn.q_proj.weight')!;
  expect(q.dtype).toBe('BF16');
  const got = readTensorF32(q);
  const src = run.backbone['model.layers.1.self_attn.q_proj.weight'].data;
  const bits = new Uint32Array(1);
  const f = new Float32Array(bits.buffer);
  for (let i = 0; i < src.length; i++) {
    bits[0] = f32ToBf16Bits(src[i]) << 16;
    if (got[i] !== f[0]) throw new Error(`element ${i}: ${got[i]} is not ${src[i]} rounded to bf16 (${f[0]})`);
  }
  expect(readHeader(path.join(outBf16, HF_HEADS_DIR, 'medusa_lm_head.safetensors')).tensors.get('0.0.linear.weight')!.dtype).toBe('BF16');
  disposeWeights(run.decoder.weights);
});

test('a damaged backbone file or a MEDUSA-1 checkpoint is refused and nothing is left under --out', async () => {
  const spec: LoraMergeSpec = { rank: 2, alpha: 2, targets: ['q_proj'] };
  const run = makeRun({ architecture: 'LlamaForCausalLM', tieWordEmbeddings: false }, { mode: 'lora', rank: 2, alpha: 2, dropout: 0, targets: ['q_proj'], trainEmbeddings: false }, (d) => {
    const a = randomAdapters(loraMergeTable(d.config, spec), 2, 1);
    a['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'] = { shape: [64, 3], data: new Float32Array(192) };
    return a;
  });
  const out = path.join(tmp, 'refused');
  await expect(runExport({ run: run.runDir, format: 'hf', out, force: false, log })).rejects.toMatchObject({
    code: 'E_MODEL',
    message: expect.stringContaining('tensor base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight has shape [64, 3], expected [64, 2]'),
  });
  expect(fs.existsSync(out)).toBe(false);
  expect(fs.readdirSync(tmp).filter((f) => f.startsWith('.refused'))).toEqual([]);
  disposeWeights(run.decoder.weights);

  // A MEDUSA-1 checkpoint (no recipe medusa2) keeps the existing refusal.
  const m1 = makeRun({ architecture: 'LlamaForCausalLM', tieWordEmbeddings: false }, { mode: 'full', lastLayers: 1, trainEmbeddings: false }, () => ({}));
  const st = JSON.parse(fs.readFileSync(path.join(m1.runDir, 'checkpoints', 'step-00000004', 'state.json'), 'utf8')) as { state: Record<string, unknown> };
  st.state['recipe'] = 'medusa1';
  fs.writeFileSync(path.join(m1.runDir, 'checkpoints', 'step-00000004', 'state.json'), JSON.stringify(st));
  await expect(runExport({ run: m1.runDir, format: 'hf', out, force: false, log })).rejects.toMatchObject({ code: 'E_UNSUPPORTED', message: expect.stringContaining('MEDUSA-1') });
  disposeWeights(m1.decoder.weights);
});
