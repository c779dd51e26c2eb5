import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML, { isMap, isScalar } from 'yaml';
import { CONFIG_KEYS, configHash, configKeys, loadTrainConfig, saveResolvedConfig, shellQuote, suggest, type TrainConfig } from '../src/config.js';
import { MedusaError } from '../src/errors.js';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const CONFIGS = path.join(ROOT, 'configs');
const TRAIN = 'data.train=[runs/x]';

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medusa-config-'));
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

function write(name: string, text: string): string {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, text);
  return file;
}

function configError(fn: () => unknown): MedusaError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MedusaError);
    return e as MedusaError;
  }
  throw new Error('expected an error');
}

/** The `  - path: problem` lines of an E_CONFIG message. */
function problemLines(e: MedusaError): string[] {
  return e.message.split('\n').filter((l) => l.startsWith('  - '));
}

describe('defaults', () => {
  test('defaults resolve (data.train filled in by --set)', () => {
    const { config, yamlText } = loadTrainConfig(null, [TRAIN]);
    const expected: TrainConfig = {
      recipe: 'medusa1',
      run: { name: 'medusa1-tiny', dir: 'runs', seed: 0 },
      model: { path: null, backend: 'auto', engine: 'auto' },
      data: { train: ['runs/x'], eval_fraction: 0.05, eval_max: 256, max_seq_len: 2048, batch_size: 4, shuffle: true, group_by_length: true },
      heads: { num_heads: 3, num_layers: 1, lm_head: 'per_head' },
      loss: { decay: 0.8, heads_coefficient: 1.0, chunk_rows: 512 },
      train: {
        epochs: 1, max_steps: null, lr: 1e-3, weight_decay: 0, betas: [0.9, 0.999], eps: 1e-8, schedule: 'cosine', warmup_ratio: 0.1,
        grad_accum: 1, max_grad_norm: 1.0, cache_hidden_states: 'none', cache_dtype: 'f16',
      },
      checkpoint: { every: 200, keep: 3 },
      eval: { every: 200 },
      log: { every: 1 },
    };
    expect(config).toEqual(expected);
    expect(Object.keys(config)).toEqual(['recipe', 'run', 'model', 'data', 'heads', 'loss', 'train', 'checkpoint', 'eval', 'log']);
    expect(yamlText).toMatch(/^# medusa-train \d+\.\d+\.\d+ resolved training config, written \d{4}-\d\d-\d\dT/);
    expect(YAML.parse(yamlText)).toEqual(config);
  });

  test('defaults alone report only the empty data.train, at data.train', () => {
    const e = configError(() => loadTrainConfig(null, []));
    expect(e.code).toBe('E_CONFIG');
    expect(e.exitCode).toBe(3);
    const lines = problemLines(e);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^ {2}- data\.train: must list at least one dataset folder .*medusa-train distill/);
  });

  test('an empty file, and empty sections, mean defaults', () => {
    expect(loadTrainConfig(write('empty.yaml', ''), [TRAIN]).config).toEqual(loadTrainConfig(null, [TRAIN]).config);
    const f = write('sections.yaml', 'heads:\n  # num_heads: 5\ntrain:\n');
    expect(loadTrainConfig(f, [TRAIN, 'heads.num_heads=5']).config.heads.num_heads).toBe(5);
  });

  test('run.name defaults to <recipe>-<model folder basename>', () => {
    expect(loadTrainConfig(null, [TRAIN, 'model.path=models/Qwen2.5-0.5B-Instruct/']).config.run.name).toBe('medusa1-Qwen2.5-0.5B-Instruct');
    expect(loadTrainConfig(null, [TRAIN, 'model.path=m/x', 'run.name=mine']).config.run.name).toBe('mine');
  });
});

describe('configs/', () => {
  const files = fs.readdirSync(CONFIGS).filter((f) => f.endsWith('.yaml'));

  test('the documented recipes are there', () => {
    expect(files.sort()).toEqual(['demo.yaml', 'llama-3.1-8b.yaml', 'medusa2-tiny.yaml', 'qwen2.5-0.5b.yaml', 'tiny.yaml', 'vicuna-7b.yaml']);
  });

  test.each(files)('%s loads, validates, and lists every key with a comment', (name) => {
    const file = path.join(CONFIGS, name);
    const { config } = loadTrainConfig(file, []);
    expect(config.recipe).toBe(name.startsWith('medusa2') ? 'medusa2' : 'medusa1');
    expect(config.data.train.length).toBeGreaterThan(0);
    // Every key is written out (the files are user-facing documentation), each with a comment above it.
    const doc = YAML.parseDocument(fs.readFileSync(file, 'utf8'));
    for (const key of configKeys(config.recipe)) {
      const segs = key.split('.');
      expect([key, doc.hasIn(segs)]).toEqual([key, true]);
      const parent = segs.length === 1 ? doc.contents : doc.getIn(segs.slice(0, -1), true);
      expect(isMap(parent)).toBe(true);
      if (!isMap(parent)) continue;
      const i = parent.items.findIndex((p) => isScalar(p.key) && p.key.value === segs[segs.length - 1]);
      const pair = parent.items[i];
      // yaml attaches the comment above a mapping's first key to the mapping (or the document).
      const comment = (isScalar(pair.key) ? pair.key.commentBefore : undefined) ?? (i === 0 ? (parent.commentBefore ?? (segs.length === 1 ? doc.commentBefore : undefined)) : undefined);
      expect([key, typeof comment === 'string' && comment.trim().length > 0]).toEqual([key, true]);
    }
  });

  test('tiny.yaml is the fast pipeline recipe', () => {
    const { config: c } = loadTrainConfig(path.join(CONFIGS, 'tiny.yaml'), []);
    expect(c.model.path).toBeNull();
    expect(c.data.train).toEqual(['runs/tiny-distill']);
    expect([c.data.max_seq_len, c.data.batch_size, c.heads.num_heads, c.heads.num_layers, c.train.lr, c.train.epochs]).toEqual([256, 4, 3, 1, 1e-3, 2]);
    expect([c.train.cache_hidden_states, c.checkpoint.every, c.eval.every]).toEqual(['memory', 20, 20]);
    expect(c.run.name).toBe('medusa1-tiny');
  });

  test('the large models need the native backend; the 128k-vocabulary one shares the lm_head', () => {
    const load = (n: string) => loadTrainConfig(path.join(CONFIGS, n), []).config;
    expect(load('llama-3.1-8b.yaml').model.backend).toBe('native');
    expect(load('llama-3.1-8b.yaml').heads.lm_head).toBe('shared');
    expect(load('vicuna-7b.yaml').model.backend).toBe('native');
    expect(load('vicuna-7b.yaml').heads.lm_head).toBe('per_head');
    expect(load('qwen2.5-0.5b.yaml').heads.lm_head).toBe('per_head');
  });

  test('docs/CONFIG.md documents every key', () => {
    const doc = fs.readFileSync(path.join(ROOT, 'docs', 'CONFIG.md'), 'utf8');
    for (const key of [...CONFIG_KEYS, ...configKeys('medusa2')]) expect([key, doc.includes(`\`${key}\``)]).toEqual([key, true]);
  });
});

describe('--set overrides', () => {
  test('numbers, booleans, lists, null and strings', () => {
    const { config } = loadTrainConfig(null, [
      TRAIN,
      'train.lr=2e-3',
      'heads.num_heads=4',
      'data.shuffle=false',
      'train.betas=[0.8, 0.99]',
      'data.train=[runs/a, "runs/b c"]',
      'train.max_grad_norm=null',
      'train.max_steps=100',
      'model.path=models/My Model',
      'run.name="123"',
      'heads.lm_head=shared',
    ]);
    expect(config.train.lr).toBe(2e-3);
    expect(config.heads.num_heads).toBe(4);
    expect(config.data.shuffle).toBe(false);
    expect(config.train.betas).toEqual([0.8, 0.99]);
    expect(config.data.train).toEqual(['runs/a', 'runs/b c']);
    expect(config.train.max_grad_norm).toBeNull();
    expect(config.train.max_steps).toBe(100);
    expect(config.model.path).toBe('models/My Model');
    expect(config.run.name).toBe('123');
    expect(config.heads.lm_head).toBe('shared');
    // The resolved type is precise: enums are literal unions, betas a pair, nullable keys say so.
    const lm: 'per_head' | 'shared' = config.heads.lm_head;
    const back: TrainConfig['heads']['lm_head'] = 'shared';
    const betas: [number, number] = config.train.betas;
    const steps: number | null = config.train.max_steps;
    const name: string = config.run.name;
    const recipe: TrainConfig['recipe'] = 'medusa1';
    expect([lm, back, betas.length, steps, name, recipe]).toEqual(['shared', 'shared', 2, 100, '123', 'medusa1']);
  });

  test('overrides apply over the file, later ones win, and missing sections are created', () => {
    const f = write('c.yaml', 'data:\n  train: [runs/d]\ntrain:\n  lr: 0.01\n');
    const { config } = loadTrainConfig(f, ['train.lr=0.02', 'train.lr=0.03', 'heads.num_layers=2', 'checkpoint.keep=1']);
    expect(config.train.lr).toBe(0.03);
    expect(config.heads.num_layers).toBe(2);
    expect(config.checkpoint.keep).toBe(1);
    expect(config.data.train).toEqual(['runs/d']);
  });

  test('a path through a value that is not a section is an error naming it', () => {
    const e = configError(() => loadTrainConfig(null, [TRAIN, 'train.lr.x=1', 'recipe.a=2']));
    expect(e.code).toBe('E_CONFIG');
    const lines = problemLines(e);
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^ {2}- train\.lr: --set train\.lr\.x=1 goes through train\.lr, which holds a value \(a number in \(0, 1\]\), not a section; set train\.lr itself instead$/);
    expect(lines[1]).toMatch(/^ {2}- recipe: --set recipe\.a=2 goes through recipe, which holds a value/);
    // The same for values written in the file.
    const f = write('c.yaml', 'data:\n  train: [runs/x]\nheads:\n  num_heads: 4\n');
    const fromFile = problemLines(configError(() => loadTrainConfig(f, ['heads.num_heads.x=1', 'data.train.a=1'])));
    expect(fromFile).toEqual([
      '  - heads.num_heads: --set heads.num_heads.x=1 goes through heads.num_heads, which is the number 4, not a section; set heads.num_heads itself instead',
      '  - data.train: --set data.train.a=1 goes through data.train, which is a list ["runs/x"], not a section; set data.train itself instead',
    ]);
  });

  test('malformed --set options are reported', () => {
    const e = configError(() => loadTrainConfig(null, [TRAIN, 'train.lr', '=3', 'run.name={a: 1}', 'run.name=[1, 2']));
    const lines = problemLines(e);
    expect(lines).toHaveLength(4);
    expect(lines[0]).toMatch(/--set train\.lr: expected key=value/);
    expect(lines[1]).toMatch(/--set =3: "" is not a key path/);
    expect(lines[2]).toMatch(/run\.name: --set run\.name=\{a: 1\}: the value is a mapping/);
    expect(lines[3]).toMatch(/run\.name: --set run\.name=\[1, 2: the value is not valid YAML/);
  });

  test('"__proto__" is an unknown key, never the prototype', () => {
    const e = configError(() => loadTrainConfig(null, [TRAIN, '__proto__.polluted=1']));
    expect(problemLines(e)[0]).toMatch(/^ {2}- __proto__: unknown key.*\(from --set __proto__\.polluted=1\)$/);
    expect(({} as Record<string, unknown>)['polluted']).toBeUndefined();
  });
});

describe('problems', () => {
  test('every problem of a file and its overrides in ONE E_CONFIG error, each with its path', () => {
    const f = write(
      'bad.yaml',
      [
        'recipe: medusa1',
        'run:',
        '  seed: -1',
        'heads:',
        '  num_hedas: 4', // unknown key with a typo
        '  lm_head: shard', // bad enum
        'train:',
        '  lr: fast', // wrong type
        '  warmup_ratio: 1.5', // out of range
        '  epochs: 2.5', // not an integer
        '  betas: [0.9, 1]', // list element out of range
        'data:',
        '  train: []', // empty
        '  shuffle: yes', // YAML 1.2: a string
        'lr: 3', // right key, wrong place
        '',
      ].join('\n'),
    );
    const e = configError(() => loadTrainConfig(f, ['train.lrr=2e-3', 'log.every=0']));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message.split('\n')[0]).toBe(`${f} has 12 problems:`);
    expect(e.message).toMatch(/docs\/CONFIG\.md/);
    const lines = problemLines(e);
    const expected = [
      /^ {2}- run\.seed: -1 is out of range; expected an integer in \[0, 4294967295\] \(line 3\)$/,
      /^ {2}- heads\.num_hedas: unknown key; did you mean num_heads\? \(line 5\)$/,
      /^ {2}- heads\.lm_head: "shard" is not allowed; expected one of per_head \| shared \(did you mean shared\?\) \(line 6\)$/,
      /^ {2}- train\.lr: expected a number in \(0, 1\], got the string "fast" \(line 8\)$/,
      /^ {2}- train\.warmup_ratio: 1\.5 is out of range; expected a number in \[0, 1\] \(line 9\)$/,
      /^ {2}- train\.epochs: 2\.5 is not an integer; expected an integer in \[1, 1000\] \(line 10\)$/,
      /^ {2}- train\.betas\[1\]: 1 is out of range; train\.betas must be a list \[beta1, beta2\], each in \[0, 1\) \(line 11\)$/,
      /^ {2}- train\.lrr: unknown key; did you mean lr\? \(from --set train\.lrr=2e-3\)$/,
      /^ {2}- data\.train: must list at least one dataset folder written by `medusa-train distill/,
      /^ {2}- data\.shuffle: expected true or false, got the string "yes" \(line 14\)$/,
      /^ {2}- log\.every: 0 is out of range; expected an integer >= 1 \(from --set log\.every=0\)$/,
      /^ {2}- lr: unknown key here; did you mean train\.lr\? \(line 15\)$/,
    ];
    expect(lines).toHaveLength(expected.length);
    for (const re of expected) expect(lines.filter((l) => re.test(l))).toHaveLength(1);
  });

  test('a recipe that does not exist', () => {
    const e = configError(() => loadTrainConfig(null, [TRAIN, 'recipe=medusa-2']));
    expect(problemLines(e)).toEqual(['  - recipe: "medusa-2" is not allowed; expected one of medusa1 | medusa2 (did you mean medusa2?) (from --set recipe=medusa-2)']);
  });

  test('a section that is not a mapping, and a list given as a string', () => {
    const f = write('c.yaml', 'heads: 3\ndata:\n  train: runs/x\n');
    const lines = problemLines(configError(() => loadTrainConfig(f, [])));
    expect(lines).toEqual([
      '  - data.train: expected a list of dataset folders, e.g. [runs/my-distill], got the string "runs/x" (write it as a list: [runs/x]) (line 3)',
      '  - heads: must be a section (a mapping of keys), got the number 3 (line 1)',
    ]);
  });

  test('unknown sections and keys far from any known one list the allowed keys', () => {
    const f = write('c.yaml', 'data:\n  train: [x]\noptimizer:\n  lr: 1\nheads:\n  zzzzzz: 1\n');
    const lines = problemLines(configError(() => loadTrainConfig(f, [])));
    expect(lines).toHaveLength(2);
    expect(lines.some((l) => l.startsWith('  - optimizer: unknown key; the keys of the top level are recipe, run, model, data, heads, loss, train, checkpoint, eval, log (line 3)'))).toBe(true);
    expect(lines.some((l) => l.startsWith('  - heads.zzzzzz: unknown key; the keys of heads are num_heads, num_layers, lm_head (line 6)'))).toBe(true);
  });

  test('values at the edges of their ranges', () => {
    const ok = loadTrainConfig(null, [TRAIN, 'data.eval_fraction=0', 'data.eval_max=0', 'data.eval_fraction=0.5', 'loss.decay=1', 'train.betas=[0, 0.999999]', 'train.max_grad_norm=1e-6', 'train.max_steps=null']);
    expect(ok.config.data.eval_fraction).toBe(0.5);
    const e = configError(() =>
      loadTrainConfig(null, [TRAIN, 'data.eval_fraction=0.51', 'loss.decay=0', 'train.lr=0', 'train.eps=1', 'train.max_steps=0', 'train.max_grad_norm=0', 'heads.num_heads=17', 'data.max_seq_len=7', 'train.lr=.inf', 'run.name=a/b']),
    );
    const lines = problemLines(e);
    expect(lines.map((l) => l.split(':')[0])).toEqual([
      '  - run.name',
      '  - data.eval_fraction',
      '  - data.max_seq_len',
      '  - heads.num_heads',
      '  - loss.decay',
      '  - train.max_steps',
      '  - train.lr',
      '  - train.eps',
      '  - train.max_grad_norm',
    ]);
    expect(lines[0]).toMatch(/"a\/b" is not valid; expected a folder name/);
    expect(lines[6]).toMatch(/train\.lr: expected a number in \(0, 1\], got Infinity \(from --set train\.lr=\.inf\)/);
  });

  test('YAML syntax errors name file:line:col', () => {
    const f = write('syntax.yaml', 'data:\n  train: [runs/x\nheads:\n  num_heads: 3\n');
    const e = configError(() => loadTrainConfig(f, []));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toMatch(new RegExp(`${f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:\\d+:\\d+: `));
    const dup = write('dup.yaml', 'train:\n  lr: 1\n  lr: 2\n');
    expect(configError(() => loadTrainConfig(dup, [])).message).toContain(`${dup}:3:3: Map keys must be unique`);
  });

  test('the top level must be a mapping; missing, oversized files', () => {
    expect(configError(() => loadTrainConfig(write('list.yaml', '- a\n- b\n'), [])).message).toMatch(/top level must be a mapping of sections/);
    const missing = configError(() => loadTrainConfig(path.join(tmp, 'nope.yaml'), []));
    expect(missing.code).toBe('E_IO');
    expect(missing.message).toContain('nope.yaml');
    const big = write('big.yaml', `# ${'x'.repeat(1024 * 1024)}\n`);
    const e = configError(() => loadTrainConfig(big, []));
    expect(e.code).toBe('E_CONFIG');
    expect(e.message).toMatch(/over the 1048576-byte limit/);
  });

  test('unknown-key suggestions use a small edit distance', () => {
    expect(suggest('num_hedas', ['num_heads', 'num_layers', 'lm_head'])).toBe('num_heads');
    expect(suggest('learning_rate', ['lr', 'eps'])).toBeNull();
    expect(suggest('max-seq-len', ['max_seq_len', 'batch_size'])).toBe('max_seq_len');
    expect(suggest('Epochs', ['epochs'])).toBe('epochs');
  });
});

describe('saving and hashing', () => {
  test('saveResolvedConfig writes config.yaml that loads back to the same config, and command.txt', () => {
    const { config } = loadTrainConfig(path.join(CONFIGS, 'qwen2.5-0.5b.yaml'), ['train.lr=2e-3', 'run.name=it\'s mine', 'train.max_grad_norm=null', 'train.eps=1e-12']);
    const runDir = path.join(tmp, 'runs', 'r1');
    const argv = ['medusa-train', 'train', '--config', 'configs/qwen2.5-0.5b.yaml', '--set', 'train.lr=2e-3', '--set', "run.name=it's mine", '--set', 'x=a b', ''];
    saveResolvedConfig(runDir, config, argv);
    const text = fs.readFileSync(path.join(runDir, 'config.yaml'), 'utf8');
    expect(text).toMatch(/^# medusa-train \d+\.\d+\.\d+ resolved training config, written \d{4}-\d\d-\d\dT[\d:.]+Z\n/);
    expect(loadTrainConfig(path.join(runDir, 'config.yaml'), []).config).toEqual(config);
    expect(fs.readFileSync(path.join(runDir, 'command.txt'), 'utf8')).toBe(
      "medusa-train train --config configs/qwen2.5-0.5b.yaml --set train.lr=2e-3 --set 'run.name=it'\\''s mine' --set 'x=a b' ''\n",
    );
    expect(fs.readdirSync(runDir).sort()).toEqual(['command.txt', 'config.yaml']); // no temp files left
  });

  test('every config in configs/ round-trips through the saved YAML', () => {
    for (const name of fs.readdirSync(CONFIGS).filter((f) => f.endsWith('.yaml'))) {
      const { config, yamlText } = loadTrainConfig(path.join(CONFIGS, name), []);
      const dir = path.join(tmp, name);
      saveResolvedConfig(dir, config, ['medusa-train', 'train', '--config', `configs/${name}`]);
      expect(loadTrainConfig(path.join(dir, 'config.yaml'), []).config).toEqual(config);
      expect(loadTrainConfig(write(`${name}.resolved.yaml`, yamlText), []).config).toEqual(config);
    }
  });

  test('shellQuote', () => {
    expect(shellQuote('train.lr=2e-3')).toBe('train.lr=2e-3');
    expect(shellQuote('a b')).toBe("'a b'");
    expect(shellQuote('')).toBe("''");
    expect(shellQuote('$HOME')).toBe("'$HOME'");
  });

  test('configHash changes with lr, not with run.name, run.dir, checkpoint or logging cadence', () => {
    const base = loadTrainConfig(null, [TRAIN]).config;
    const h = configHash(base);
    expect(h).toMatch(/^[0-9a-f]{64}$/);
    expect(configHash(loadTrainConfig(null, [TRAIN]).config)).toBe(h);
    expect(configHash(loadTrainConfig(null, [TRAIN, 'train.lr=2e-3']).config)).not.toBe(h);
    expect(configHash(loadTrainConfig(null, [TRAIN, 'heads.num_heads=4']).config)).not.toBe(h);
    expect(configHash(loadTrainConfig(null, [TRAIN, 'data.train=[runs/y]']).config)).not.toBe(h);
    for (const same of ['run.name=other', 'run.dir=elsewhere', 'checkpoint.every=7', 'checkpoint.keep=9', 'log.every=3']) {
      expect([same, configHash(loadTrainConfig(null, [TRAIN, same]).config)]).toEqual([same, h]);
    }
    // Key order does not matter (canonical JSON), and the config is not modified.
    const reordered = Object.fromEntries(Object.entries(base).reverse()) as TrainConfig;
    expect(Object.keys(reordered)[0]).toBe('log');
    expect(configHash(reordered)).toBe(h);
    expect(base.run.name).toBe('medusa1-tiny');
    // A custom exclusion list.
    expect(configHash(base, [])).not.toBe(h);
    expect(configHash(loadTrainConfig(null, [TRAIN, 'train.lr=0.5']).config, ['train.lr', ...['run.name', 'run.dir', 'log.every', 'checkpoint.every', 'checkpoint.keep']])).toBe(
      configHash(base, ['train.lr', 'run.name', 'run.dir', 'log.every', 'checkpoint.every', 'checkpoint.keep']),
    );
  });
});
