/** `recipe: medusa2`: its keys, defaults, errors with YAML paths, --set on nested keys, and what MEDUSA-1 configs refuse. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML from 'yaml';
import { CONFIG_KEYS, MEDUSA2_ONLY_KEYS, configHash, configKeys, loadTrainConfig, saveResolvedConfig, type Medusa2Config, type TrainConfig } from '../src/config.js';
import { MedusaError } from '../src/errors.js';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const M2 = ['recipe=medusa2', 'data.train=[runs/x]'];

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-config2-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const write = (name: string, text: string): string => (fs.writeFileSync(path.join(tmp, name), text), path.join(tmp, name));

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    expect((e as MedusaError).code).toBe('E_CONFIG');
    return (e as MedusaError).message.split('\n').filter((l) => l.startsWith('  - '));
  }
  throw new Error('expected an E_CONFIG error');
}

function m2(config: TrainConfig): Medusa2Config {
  if (config.recipe !== 'medusa2') throw new Error('expected a medusa2 config');
  return config;
}

describe('recipe: medusa2', () => {
  test('defaults: the contract values, the medusa2 section after loss, run name medusa2-<model>', () => {
    const c = m2(loadTrainConfig(null, M2).config);
    expect(Object.keys(c)).toEqual(['recipe', 'run', 'model', 'data', 'heads', 'loss', 'medusa2', 'train', 'checkpoint', 'eval', 'log']);
    expect(c.run.name).toBe('medusa2-tiny');
    expect(c.loss).toEqual({ decay: 0.8, heads_coefficient: 0.2, chunk_rows: 512, lm_loss: 'kd', teacher: 'topk', heads_schedule: 'sine', heads_schedule_fraction: 0.3 });
    expect(c.medusa2).toEqual({
      init_heads: null,
      heads_warmup_steps: 0,
      backbone: { mode: 'lora', lora: { rank: 8, alpha: 16, dropout: 0, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] }, full_last_layers: 1, train_embeddings: false },
      heads_lr_multiplier: 4,
      gate: { action: 'fail', max_kl: 0.05, min_agreement: 0.9, max_ppl_ratio: 1.1, max_positions: 4096 },
    });
    // The rest is MEDUSA-1's.
    const c1 = loadTrainConfig(null, ['data.train=[runs/x]']).config;
    expect([c.train, c.heads, c.data, c.model]).toEqual([c1.train, c1.heads, c1.data, c1.model]);
  });

  test('--set reaches nested keys; a nested section can be written empty', () => {
    const c = m2(
      loadTrainConfig(null, [
        ...M2,
        'medusa2.backbone.mode=full',
        'medusa2.backbone.full_last_layers=2',
        'medusa2.backbone.lora.targets=[q_proj, lm_head]',
        'medusa2.backbone.lora.rank=4',
        'medusa2.gate.action=warn',
        'medusa2.init_heads=runs/m1',
        'loss.lm_loss=ce',
        'loss.heads_schedule=sine_warmup',
      ]).config,
    );
    expect(c.medusa2.backbone.mode).toBe('full');
    expect(c.medusa2.backbone.full_last_layers).toBe(2);
    expect(c.medusa2.backbone.lora).toEqual({ rank: 4, alpha: 16, dropout: 0, targets: ['q_proj', 'lm_head'] });
    expect(c.medusa2.gate.action).toBe('warn');
    expect(c.medusa2.init_heads).toBe('runs/m1');
    expect([c.loss.lm_loss, c.loss.heads_schedule]).toEqual(['ce', 'sine_warmup']);
    const f = write('e.yaml', 'recipe: medusa2\ndata:\n  train: [runs/x]\nmedusa2:\n  backbone:\n    lora:\n  gate:\n');
    expect(loadTrainConfig(f, []).config).toEqual(loadTrainConfig(null, M2).config);
  });

  test('every problem in one error, at its YAML path with its line or --set', () => {
    const f = write(
      'bad.yaml',
      [
        'recipe: medusa2',
        'model:',
        '  engine: onnx',
        'data:',
        '  train: [runs/x]',
        'loss:',
        '  lm_loss: mse',
        'medusa2:',
        '  backbone:',
        '    lora:',
        '      rnk: 4',
        '      targets: [q_proj, q_proj]',
        '  gate:',
        '    min_agreement: 2',
        'train:',
        '  cache_hidden_states: memory',
        '',
      ].join('\n'),
    );
    const lines = problems(() => loadTrainConfig(f, ['medusa2.backbone.lora.targets.x=1', 'medusa2.heads_warmup_steps=-1']));
    const expected = [
      /^ {2}- loss\.lm_loss: "mse" is not allowed; expected one of kd \| ce \(line 7\)$/,
      /^ {2}- medusa2\.backbone\.lora\.rnk: unknown key; did you mean rank\? \(line 11\)$/,
      /^ {2}- medusa2\.backbone\.lora\.targets: a list \["q_proj","q_proj"\] is not valid; expected a non-empty list of distinct names from q_proj, .*lm_head \(line 12\)$/,
      /^ {2}- medusa2\.gate\.min_agreement: 2 is out of range; expected a number in \[0, 1\] \(line 14\)$/,
      /^ {2}- medusa2\.heads_warmup_steps: -1 is out of range; expected an integer >= 0 \(from --set medusa2\.heads_warmup_steps=-1\)$/,
      /^ {2}- model\.engine: "onnx" cannot train MEDUSA-2: .*tfjs engine .*set model\.engine: tfjs or auto .*\(line 3\)$/,
      /^ {2}- train\.cache_hidden_states: "memory" cannot be used with MEDUSA-2: .*set train\.cache_hidden_states: none \(line 16\)$/,
      /^ {2}- medusa2\.backbone\.lora\.targets: --set medusa2\.backbone\.lora\.targets\.x=1 goes through medusa2\.backbone\.lora\.targets, which is a list .*not a section/,
    ];
    expect(lines).toHaveLength(expected.length);
    for (const re of expected) expect([re.source, lines.filter((l) => re.test(l)).length]).toEqual([re.source, 1]);
  });

  test('nested keys that hold values, unknown nested sections, suggestions', () => {
    const lines = problems(() => loadTrainConfig(null, [...M2, 'medusa2.gate.max_kl.x=1', 'medusa2.lora.rank=3', 'lm_loss=kd', 'medusa2.backbone=3']));
    expect(lines).toEqual([
      '  - medusa2.backbone: must be a section (a mapping of keys), got the number 3 (from --set medusa2.backbone=3)',
      '  - medusa2.lora: unknown key; the keys of medusa2 are init_heads, heads_warmup_steps, backbone, heads_lr_multiplier, gate (from --set medusa2.lora.rank=3)',
      '  - lm_loss: unknown key here; did you mean loss.lm_loss? (from --set lm_loss=kd)',
      '  - medusa2.gate.max_kl: --set medusa2.gate.max_kl.x=1 goes through medusa2.gate.max_kl, which holds a value (a number > 0), not a section; set medusa2.gate.max_kl itself instead',
    ]);
  });

  test('a medusa1 config refuses the medusa2-only keys, naming the recipe', () => {
    const lines = problems(() => loadTrainConfig(null, ['data.train=[runs/x]', 'loss.teacher=frozen', 'medusa2.gate.max_kl=1']));
    expect(lines).toEqual([
      '  - loss.teacher: only a recipe: medusa2 config has this key (MEDUSA-2 joint training); set recipe: medusa2, or remove it (from --set loss.teacher=frozen)',
      '  - medusa2: only a recipe: medusa2 config has this key (MEDUSA-2 joint training); set recipe: medusa2, or remove it (from --set medusa2.gate.max_kl=1)',
    ]);
    // ... while onnx and hidden-state caching stay fine for medusa1.
    expect(loadTrainConfig(null, ['data.train=[runs/x]', 'model.engine=onnx', 'train.cache_hidden_states=disk']).config.model.engine).toBe('onnx');
  });

  test('medusa1 configs and their hash are what they were (no new keys)', () => {
    const c1 = loadTrainConfig(null, ['data.train=[runs/x]']).config;
    expect(Object.keys(c1)).not.toContain('medusa2');
    expect(Object.keys(c1.loss)).toEqual(['decay', 'heads_coefficient', 'chunk_rows']);
    expect(CONFIG_KEYS.filter((k) => k.startsWith('medusa2') || k.startsWith('loss.'))).toEqual(['loss.decay', 'loss.heads_coefficient', 'loss.chunk_rows']);
    expect(configKeys('medusa2').filter((k) => !CONFIG_KEYS.includes(k))).toEqual(MEDUSA2_ONLY_KEYS);
    expect(MEDUSA2_ONLY_KEYS).toContain('medusa2.backbone.lora.targets');
    // The medusa2 keys change the hash of a medusa2 config.
    const h = configHash(loadTrainConfig(null, M2).config);
    expect(configHash(loadTrainConfig(null, [...M2, 'medusa2.backbone.lora.rank=4']).config)).not.toBe(h);
    expect(configHash(loadTrainConfig(null, [...M2, 'medusa2.gate.max_kl=0.1']).config)).not.toBe(h);
    expect(configHash(loadTrainConfig(null, [...M2, 'run.name=x']).config)).toBe(h);
  });

  test('configs/medusa2-tiny.yaml: the structured model, LoRA, and it round-trips through the saved YAML', () => {
    const file = path.join(ROOT, 'configs', 'medusa2-tiny.yaml');
    const c = m2(loadTrainConfig(file, []).config);
    expect(c.model.path).toBe('assets/structured-model');
    expect(fs.existsSync(path.join(ROOT, c.model.path ?? '', 'config.json'))).toBe(true);
    expect(c.medusa2.backbone.mode).toBe('lora');
    expect(c.train.cache_hidden_states).toBe('none');
    expect(c.run.name).toBe('medusa2-structured-model');
    const dir = path.join(tmp, 'run');
    saveResolvedConfig(dir, c, ['medusa-train', 'train', '--config', file]);
    const text = fs.readFileSync(path.join(dir, 'config.yaml'), 'utf8');
    expect(loadTrainConfig(path.join(dir, 'config.yaml'), []).config).toEqual(c);
    // Nested keys get their comment in the saved file too.
    const doc = YAML.parseDocument(text);
    const lora = doc.getIn(['medusa2', 'backbone', 'lora'], true);
    expect(YAML.isMap(lora)).toBe(true);
    expect(text).toMatch(/# LoRA alpha: the adapter is scaled by alpha \/ rank; a number in \(0, 1000000\]\n\s+alpha: 16/);
    expect(text).toMatch(/targets: \[q_proj, k_proj, v_proj, o_proj\]/);
  });
});
