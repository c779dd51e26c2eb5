/**
 * The medusa-train command line (the executable is src/bin.ts). The only module that prints for the
 * user's commands; only it and bin.ts end the process: everything below throws MedusaError, which `main` turns into a
 * one-line message and the error's exit code.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MedusaError, isMedusaError, describe } from './errors.js';
import { BACKEND_CHOICES, initBackend, type BackendChoice } from './backend.js';
import { modelInfo, formatInfo, formatCount } from './recipes/info.js';
import { runTiny } from './recipes/tiny.js';
import { runGenerate, formatGenerate } from './recipes/generate.js';
import { runServe } from './recipes/serve.js';
import { runDistill, formatDistillSummary } from './recipes/distill.js';
import { createProgress } from './progress.js';
import { loadTrainConfig } from './config.js';
import { runMedusa1, formatMedusa1Summary } from './recipes/medusa1.js';
import { runMedusa2, formatMedusa2Summary } from './recipes/medusa2.js';
import { runDemo } from './recipes/demo.js';
import { runExport } from './recipes/export.js';
import { runEval, formatEval } from './recipes/eval.js';
import { writeRunReport } from './report/run-report.js';
import { planRun, formatPlan } from './plan/plan.js';
import { ensureEmbeddedModel } from './model/tiny.js';
import { PROMPT_FORMATS, type PromptFormat } from './data/prompts.js';
import { VERSION } from './version.js';

function intArg(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${name} must be an integer in [${min}, ${max}].`);
    return n;
  };
}

function numArg(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min || n > max) throw new InvalidArgumentError(`${name} must be a number in [${min}, ${max}].`);
    return n;
  };
}

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}

const defaultIo: Io = { out: (s) => process.stdout.write(`${s}\n`), err: (s) => process.stderr.write(`${s}\n`) };

function backendOption(): Option {
  return new Option('--backend <name>', 'compute backend: auto (native TensorFlow if installed, else wasm, else cpu), native, wasm or cpu')
    .choices([...BACKEND_CHOICES])
    .default('auto');
}

async function selectBackend(choice: BackendChoice, io: Io, quiet: boolean): Promise<void> {
  const info = await initBackend(choice);
  if (!quiet) io.err(`backend: ${info.detail}${info.skipped.length > 0 && choice === 'auto' ? ` (skipped: ${info.skipped.join('; ')})` : ''}`);
}

export function buildProgram(io: Io = defaultIo): Command {
  const program = new Command();
  program
    .name('medusa-train')
    .description('Train Medusa heads on existing LLMs and export them to the runtimes that serve them.')
    .version(VERSION)
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.err(s.trimEnd()) })
    .showHelpAfterError('(run with --help for usage)');

  program
    .command('info')
    .description('Describe a Hugging Face model folder: architecture, parameters, dtype, memory per backend')
    .argument('<model-dir>', 'Hugging Face model folder (config.json + *.safetensors)')
    .option('--context <tokens>', 'context length for the memory estimate', intArg('--context', 1, 16_777_216), 2048)
    .option('--json', 'print JSON')
    .action((dir: string, o: { context: number; json?: boolean }) => {
      const r = modelInfo(dir, o.context);
      io.out(o.json ? JSON.stringify(r, null, 2) : formatInfo(r));
    });

  program
    .command('generate')
    .description('Generate text with a model (greedy or sampled), printing tokens/s')
    .option('--model <dir>', 'Hugging Face model folder; default: the embedded tiny model (random weights, built on first use)')
    .option('--prompt <text>', 'prompt text; repeat for a batch', collect, [] as string[])
    .option('--prompt-file <file>', 'prompts, one per line (added to --prompt)')
    .option('--chat', "render each prompt as a user turn with the model's chat template")
    .option('--system <text>', 'system message for --chat')
    .option('--max-new-tokens <n>', 'new tokens per prompt', intArg('--max-new-tokens', 1, 1_000_000), 64)
    .option('--temperature <t>', 'sampling temperature; 0 = greedy', numArg('--temperature', 0, 100), 0)
    .option('--top-p <p>', 'nucleus sampling mass (1 = off)', numArg('--top-p', 1e-9, 1), 1)
    .option('--top-k <k>', 'keep the k most likely tokens (0 = off)', intArg('--top-k', 0, 1_000_000), 0)
    .option('--seed <n>', 'random seed for sampling', intArg('--seed', 0, 2 ** 32 - 1), 0)
    .option('--no-eos', 'do not stop at end-of-sequence tokens')
    .addOption(new Option('--backbone-engine <name>', 'who runs the model (auto = onnxruntime when it loads, else tfjs)').choices(['auto', 'tfjs', 'onnx']).default('auto'))
    .option('--medusa <folder>', 'decode with Medusa heads and their medusa_choices.json: a training run (latest checkpoint), a checkpoint, or a medusa / medusa-v2 / vllm export folder; greedy at --temperature 0, typical acceptance above')
    .option('--posterior-threshold <eps>', 'with --medusa at temperature > 0: typical acceptance eps (accept p(x) > min(eps, delta * exp(-H)))', numArg('--posterior-threshold', 0, 1), 0.09)
    .option('--posterior-alpha <delta>', 'with --medusa at temperature > 0: typical acceptance delta', numArg('--posterior-alpha', 0, 100), 0.3)
    .addOption(new Option('--base-token <how>', "with --medusa at temperature > 0: each step's first token drawn from the typical set (seeded), or the argmax (the reference's fast path)").choices(['typical', 'argmax']).default('typical'))
    .option('--json', 'print JSON')
    .addOption(backendOption())
    .action(async (o: { medusa?: string; posteriorThreshold: number; posteriorAlpha: number; baseToken: 'typical' | 'argmax'; model?: string; prompt: string[]; promptFile?: string; chat?: boolean; system?: string; maxNewTokens: number; temperature: number; topP: number; topK: number; seed: number; eos: boolean; backboneEngine: 'auto' | 'tfjs' | 'onnx'; json?: boolean; backend: BackendChoice }) => {
      await selectBackend(o.backend, io, !!o.json);
      const prompts = [...o.prompt];
      if (o.promptFile) prompts.push(...readPromptFile(o.promptFile));
      const r = await runGenerate({
        model: o.model, prompts, chat: !!o.chat, system: o.system, maxNewTokens: o.maxNewTokens,
        temperature: o.temperature, topP: o.topP, topK: o.topK, seed: o.seed, stopAtEos: o.eos, backboneEngine: o.backboneEngine, medusa: o.medusa,
        posteriorThreshold: o.posteriorThreshold, posteriorAlpha: o.posteriorAlpha, baseToken: o.baseToken,
        log: (s) => { if (!o.json) io.err(s); },
      });
      io.out(o.json ? JSON.stringify(r, null, 2) : formatGenerate(r));
    });

  program
    .command('serve')
    .description('Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) with batching')
    .option('--model <dir>', 'Hugging Face model folder; default: the embedded tiny model (random weights, built on first use)')
    .option('--host <addr>', 'address to bind', '127.0.0.1')
    .option('--port <n>', 'port to listen on (0 = any free port)', intArg('--port', 0, 65535), 8000)
    .option('--served-model-name <name>', "the model id clients pass as 'model' (default: the model folder's name)")
    .option('--max-batch <n>', 'most requests generated together in one batch', intArg('--max-batch', 1, 4096), 8)
    .option('--max-queue <n>', 'most requests waiting for a batch (more get 503 + Retry-After)', intArg('--max-queue', 0, 1_000_000), 256)
    .option('--max-new-tokens-limit <n>', 'most new tokens per request (also the default of chat requests, within the context)', intArg('--max-new-tokens-limit', 1, 1_000_000), 4096)
    .addOption(new Option('--backbone-engine <name>', 'who runs the model (auto = onnxruntime when it loads, else tfjs)').choices(['auto', 'tfjs', 'onnx']).default('auto'))
    .option('--medusa <folder>', 'decode every request with Medusa heads and their medusa_choices.json (a training run, a checkpoint, or a medusa / medusa-v2 / vllm export folder), one request at a time: --max-batch does not apply; greedy at temperature 0, typical acceptance above')
    .option('--posterior-threshold <eps>', 'with --medusa: typical acceptance eps', numArg('--posterior-threshold', 0, 1), 0.09)
    .option('--posterior-alpha <delta>', 'with --medusa: typical acceptance delta', numArg('--posterior-alpha', 0, 100), 0.3)
    .addOption(backendOption())
    .action(async (o: { model?: string; host: string; port: number; servedModelName?: string; maxBatch: number; maxQueue: number; maxNewTokensLimit: number; backboneEngine: 'auto' | 'tfjs' | 'onnx'; medusa?: string; posteriorThreshold: number; posteriorAlpha: number; backend: BackendChoice }) => {
      await selectBackend(o.backend, io, false);
      const server = await runServe({
        model: o.model, host: o.host, port: o.port, servedModelName: o.servedModelName,
        maxBatch: o.maxBatch, maxQueue: o.maxQueue, maxNewTokensLimit: o.maxNewTokensLimit, backboneEngine: o.backboneEngine,
        medusa: o.medusa, posteriorThreshold: o.posteriorThreshold, posteriorAlpha: o.posteriorAlpha, log: (s) => io.err(s),
      });
      io.err(`serving ${server.modelName}`);
      io.err(`listening on ${server.url}`);
      // Run until SIGINT/SIGTERM: the first closes gracefully (queued requests get 503, the running
      // batch finishes), a second one stops at once.
      await new Promise<void>((resolve, reject) => {
        let signals = 0;
        const onSignal = (sig: NodeJS.Signals): void => {
          signals++;
          io.err(signals === 1 ? `${sig}: shutting down after the requests in flight (signal again to stop now)` : `${sig}: stopping now`);
          server.close({ force: signals > 1 }).then(() => {
            process.off('SIGINT', onSignal);
            process.off('SIGTERM', onSignal);
            resolve();
          }, reject);
        };
        process.on('SIGINT', onSignal);
        process.on('SIGTERM', onSignal);
      });
      io.err('server closed');
    });

  program
    .command('distill')
    .description("Self-distillation: regenerate every assistant turn of a prompt set with the base model, into a resumable Arrow dataset")
    .requiredOption('--input <file>', 'prompt file (ShareGPT JSON/JSONL, OpenAI messages JSONL, {"prompt"} JSONL, text, Parquet); repeat for several', collect, [] as string[])
    .requiredOption('--out <dir>', 'dataset folder; rerunning the same command resumes it')
    .addOption(new Option('--format <name>', 'input format').choices([...PROMPT_FORMATS]).default('auto'))
    .option('--model <dir>', "the base model folder (weights for --engine local; tokenizer, template and config for --engine openai); default: the embedded tiny model")
    .addOption(new Option('--engine <name>', 'who generates: the embedded backbone, or OpenAI-compatible servers').choices(['local', 'openai']).default('local'))
    .option('--url <base>', 'OpenAI-compatible base URL (e.g. http://127.0.0.1:8000); repeat to spread requests round-robin', collect, [] as string[])
    .option('--served-model <name>', "model name on the server (default: the first of GET /v1/models)")
    .option('--in-flight <n>', 'openai engine: requests in flight', intArg('--in-flight', 1, 1024), 16)
    .option('--timeout <seconds>', 'openai engine: per-request timeout', numArg('--timeout', 0.001, 86400), 600)
    .option('--retries <n>', 'openai engine: retries per request (network errors, timeouts, 429, 5xx)', intArg('--retries', 0, 100), 4)
    .option('--backoff-ms <ms>', 'openai engine: first retry delay, doubled each retry', intArg('--backoff-ms', 0, 600_000), 500)
    .option('--temperature <t>', 'sampling temperature (0 = greedy)', numArg('--temperature', 0, 100), 0.3)
    .option('--top-p <p>', 'nucleus sampling mass (1 = off)', numArg('--top-p', 1e-9, 1), 1)
    .option('--top-k <k>', 'keep the k most likely tokens (0 = off)', intArg('--top-k', 0, 1_000_000), 0)
    .option('--seed <n>', 'sampling seed (each conversation and turn gets its own stream)', intArg('--seed', 0, 2 ** 32 - 1), 0)
    .option('--max-new-tokens <n>', 'most tokens per assistant turn', intArg('--max-new-tokens', 1, 1_000_000), 512)
    .option('--max-total-tokens <n>', "most tokens per conversation (capped at the model's context)", intArg('--max-total-tokens', 2, 16_777_216), 2048)
    .option('--batch-size <n>', 'local engine: rows generated together', intArg('--batch-size', 1, 1024), 8)
    .addOption(new Option('--backbone-engine <name>', 'local engine: who runs the model (auto = onnxruntime when it loads, else tfjs)').choices(['auto', 'tfjs', 'onnx']).default('auto'))
    .option('--shard-size <n>', 'conversations per dataset shard (the unit of resume)', intArg('--shard-size', 1, 100_000), 64)
    .option('--teacher-topk <k>', "local engine: store the teacher's top-k log-probabilities at each generated token (for MEDUSA-2 distillation)", intArg('--teacher-topk', 0, 1024), 0)
    .option('--limit <n>', 'only the first n conversations', intArg('--limit', 1, 1e12))
    .option('--overwrite', 'start the dataset again instead of resuming')
    .option('--no-progress', 'no progress bar or progress lines')
    .option('--json', 'print the summary as JSON')
    .addOption(backendOption())
    .action(async (o: {
      input: string[]; out: string; format: PromptFormat; model?: string; engine: 'local' | 'openai'; url: string[]; servedModel?: string; inFlight: number;
      timeout: number; retries: number; backoffMs: number; temperature: number; topP: number; topK: number; seed: number; maxNewTokens: number;
      maxTotalTokens: number; batchSize: number; backboneEngine: 'auto' | 'tfjs' | 'onnx'; shardSize: number; teacherTopk: number; limit?: number; overwrite?: boolean; progress: boolean; json?: boolean; backend: BackendChoice;
    }) => {
      if (o.engine === 'local') await selectBackend(o.backend, io, false);
      const model = o.model ?? ensureEmbeddedModel();
      if (!o.model) io.err(`model: the embedded tiny model at ${model}`);
      const s = await withStopSignals(io, 'finishing the current shard, then stopping', (shouldStop) => runDistill({
          inputs: o.input, format: o.format, out: o.out, model, engine: o.engine, urls: o.url, servedModel: o.servedModel, inFlight: o.inFlight,
          timeoutMs: o.timeout * 1000, retries: o.retries, backoffMs: o.backoffMs,
          sampling: { temperature: o.temperature, topP: o.topP, topK: o.topK }, seed: o.seed, maxNewTokens: o.maxNewTokens, maxTotalTokens: o.maxTotalTokens,
          batchSize: o.batchSize, backboneEngine: o.backboneEngine, shardSize: o.shardSize, topk: o.teacherTopk, limit: o.limit, overwrite: !!o.overwrite,
          log: (line) => io.err(line),
          progress: createProgress({ label: 'distill', unit: 'conversations', isTTY: !!process.stderr.isTTY && !o.json, log: (line) => io.err(line), enabled: o.progress }),
          shouldStop,
        }));
      io.out(o.json ? JSON.stringify(s, null, 2) : formatDistillSummary(s));
    });

  program
    .command('train')
    .description('Train Medusa heads from a YAML config (recipe: medusa1 = frozen backbone, heads only; medusa2 = backbone (LoRA or last layers) and heads jointly, with a base-quality gate)')
    .option('--config <file>', 'YAML config (see docs/CONFIG.md and configs/); without it, the defaults')
    .option('--set <key=value>', 'override one config key, e.g. --set train.lr=2e-3 (repeatable)', collect, [] as string[])
    .option('--resume', "continue the run from its latest checkpoint (same training settings)")
    .option('--no-progress', 'no progress bar or progress lines')
    .option('--json', 'print the summary as JSON')
    .option('--no-plan', 'skip the start-of-run estimate (disk, memory, time from a short probe of the step)')
    .action(async (o: { config?: string; set: string[]; resume?: boolean; progress: boolean; json?: boolean; plan: boolean }) => {
      const { config } = loadTrainConfig(o.config ?? null, o.set);
      if (o.plan) io.err(formatPlan(await planRun(config, { log: (line) => io.err(line) })));
      const run = {
        commandLine: ['medusa-train', ...process.argv.slice(2)], resume: !!o.resume, log: (line: string) => io.err(line),
        progress: createProgress({ label: 'train', unit: 'steps', isTTY: !!process.stderr.isTTY && !o.json, log: (line) => io.err(line), enabled: o.progress }),
      };
      const stopping = 'finishing the current step, writing a checkpoint, then stopping';
      if (config.recipe === 'medusa2') {
        const s = await withStopSignals(io, stopping, (shouldStop) => runMedusa2({ ...run, config, shouldStop })).catch(async (e: unknown) => {
          // a failed base-quality gate ends the run after its checkpoint and summary.json: the report shows why
          const runDir = path.join(config.run.dir, config.run.name);
          if (isMedusaError(e) && e.code === 'E_TRAIN' && fs.existsSync(path.join(runDir, 'summary.json'))) await reportAfter(io, runDir, true);
          throw e;
        });
        io.out(o.json ? JSON.stringify(s, null, 2) : formatMedusa2Summary(s));
        await reportAfter(io, s.runDir, !!o.json);
        return;
      }
      const s = await withStopSignals(io, stopping, (shouldStop) => runMedusa1({ ...run, config, shouldStop }));
      io.out(o.json ? JSON.stringify(s, null, 2) : formatMedusa1Summary(s));
      await reportAfter(io, s.runDir, !!o.json);
    });

  program
    .command('plan')
    .description('Before a run: estimate the disk (datasets, hidden-state cache, checkpoints), peak memory and time of a training config from a short probe of its real step, and whether it fits this machine')
    .option('--config <file>', 'YAML config (see docs/CONFIG.md and configs/); without it, the defaults')
    .option('--set <key=value>', 'override one config key, e.g. --set data.batch_size=8 (repeatable)', collect, [] as string[])
    .option('--no-probe', 'disk only: no probe of the step (no memory or time estimate)')
    .option('--json', 'print the report as JSON')
    .action(async (o: { config?: string; set: string[]; probe: boolean; json?: boolean }) => {
      const { config } = loadTrainConfig(o.config ?? null, o.set);
      const r = await planRun(config, { probe: o.probe, log: (line) => io.err(line) });
      io.out(o.json ? JSON.stringify(r, null, 2) : formatPlan(r));
    });

  program
    .command('demo')
    .description('The whole toolkit on the embedded structured model, no downloads: distill prompts, train MEDUSA-1 heads, evaluate them (trees, Medusa vs plain decoding), export them')
    .option('--out <dir>', 'where the datasets, run, eval report and exports go (rerun to resume)', 'runs/demo')
    .option('--quick', 'a shortened variant (fewer training prompts, fewer epochs and budgets), as CI runs it; use its own --out')
    .option('--no-progress', 'no progress bar or progress lines')
    .action(async (o: { out: string; quick?: boolean; progress: boolean }) => {
      const s = await withStopSignals(io, 'stopping after the current shard or step (rerun to resume)', (shouldStop) =>
        runDemo({ out: o.out, quick: !!o.quick, log: (line) => io.err(line), shouldStop, progress: (label, unit) => createProgress({ label, unit, isTTY: !!process.stderr.isTTY, log: (line) => io.err(line), enabled: o.progress }) }));
      io.out(s);
    });

  program
    .command('export')
    .description('Export trained heads to a runtime layout (medusa = reference/TGI/TensorRT-LLM, medusa-v2, vllm, onnx), verified before it reports success')
    .requiredOption('--run <dir>', 'a run folder (its latest checkpoint), a checkpoint folder (checkpoints/step-N), or an export to convert')
    .addOption(new Option('--format <target>', 'target layout').choices(['medusa', 'medusa-v2', 'vllm', 'onnx', 'hf']).makeOptionMandatory())
    .requiredOption('--out <dir>', 'output folder (must not exist or be empty, unless --force)')
    .addOption(new Option('--dtype <dtype>', "tensor dtype (default: the base model's)").choices(['f32', 'f16', 'bf16']))
    .option('--base-model <dir>', "the base model folder, when the run's recorded one moved (its config.json must be unchanged)")
    .option('--force', 'replace an existing output folder (only after the new export verified)')
    .option('--json', 'print the report as JSON')
    .action(async (o: { run: string; format: 'medusa' | 'medusa-v2' | 'vllm' | 'onnx' | 'hf'; out: string; dtype?: 'f32' | 'f16' | 'bf16'; baseModel?: string; force?: boolean; json?: boolean }) => {
      // --format hf verifies the merged model with a decoder forward: on the fastest available tfjs backend
      if (o.format === 'hf') await selectBackend('auto', io, !!o.json);
      const r = await runExport({ run: o.run, format: o.format, out: o.out, dtype: o.dtype, force: !!o.force, baseModel: o.baseModel, log: (line) => io.err(line) });
      io.out(o.json ? JSON.stringify(r, null, 2) : `exported ${r.tensors} tensors (${r.dtype}) to ${r.out} in the ${r.format} layout: ${r.files.join(', ')}; verified on ${r.verifiedPositions} positions, max |logit difference| ${r.maxAbsDiff}`);
    });

  program
    .command('eval')
    .description("Per-head accuracy of a trained run on held-out data, and candidate trees fitted to it (writes medusa_choices.json)")
    .requiredOption('--run <dir>', 'the run folder (its latest checkpoint is evaluated)')
    .option('--data <dir>', 'a distilled dataset to evaluate on, all of it (repeatable); default: the run\'s held-out split', collect, [] as string[])
    .option('--budgets <list>', 'tree node budgets', (v: string) => v.split(',').map((x) => intArg('--budgets', 1, 1024)(x.trim())), [4, 8, 16, 32, 64])
    .option('--choose <n>', 'budget written as medusa_choices.json (default: the largest)', intArg('--choose', 1, 1024))
    .option('--speed <prompts>', 'also measure Medusa greedy decoding against plain greedy decoding on this many prompts', intArg('--speed', 1, 100000))
    .option('--live <prompts>', "also measure the heads' top-1..10 accuracy on the base model's own greedy decoding of this many prompts (held-out, or from --prompt-file)", intArg('--live', 1, 100000))
    .option('--prompt-file <file>', 'prompts for --live, one per line, rendered with the chat template when the model has one (implies --live; default: all its lines)')
    .option('--new-tokens <n>', 'tokens generated per prompt for --speed and --live', intArg('--new-tokens', 1, 100000), 64)
    .option('--json', 'print the report as JSON')
    .action(async (o: { run: string; data: string[]; budgets: number[]; choose?: number; speed?: number; live?: number; promptFile?: string; newTokens: number; json?: boolean }) => {
      const livePromptTexts = o.promptFile ? readPromptFile(o.promptFile) : undefined;
      const r = await runEval({ run: o.run, data: o.data, budgets: o.budgets, choose: o.choose, speedPrompts: o.speed, speedNewTokens: o.newTokens, livePrompts: o.live, livePromptTexts, log: (line) => io.err(line) });
      io.out(o.json ? JSON.stringify(r, null, 2) : formatEval(r));
      await reportAfter(io, o.run, !!o.json);
    });

  program
    .command('report')
    .description("Write a run's report: one self-contained HTML file (loss and accuracy curves, eval tables, tokens per step against tree size, summary, config) and its charts as SVG beside it")
    .requiredOption('--run <dir>', 'the run folder (metrics.jsonl; summary.json, config.yaml and eval/*.json when present)')
    .option('--out <file>', 'the HTML file (default: <run>/report.html); the SVGs go beside it as <name>-<chart>.svg')
    .option('--json', 'print the written files as JSON')
    .action(async (o: { run: string; out?: string; json?: boolean }) => {
      const r = await writeRunReport(o.run, { out: o.out });
      if (o.json) io.out(JSON.stringify(r, null, 2));
      else io.out([`report: ${r.html}`, `charts: ${r.svgs.join(', ')}`, ...r.notes.map((n) => `note: ${n}`)].join('\n'));
    });

  program
    .command('tiny')
    .description('Write a tiny model folder (random weights, real tokenizer and chat template) for tests and demos')
    .requiredOption('--out <dir>', 'folder to create (must not exist or be empty)')
    .option('--arch <name>', 'llama, mistral, qwen2 or qwen3', 'llama')
    .addOption(new Option('--preset <name>', 'tiny (64 hidden, 2 layers) or 20m (the ~20M-parameter benchmark shape)').choices(['tiny', '20m']).default('tiny'))
    .option('--hidden <n>', 'hidden size', intArg('--hidden', 2, 65536))
    .option('--layers <n>', 'decoder layers', intArg('--layers', 1, 1024))
    .option('--heads <n>', 'attention heads', intArg('--heads', 1, 1024))
    .option('--kv-heads <n>', 'key/value heads (GQA)', intArg('--kv-heads', 1, 1024))
    .option('--ff <n>', 'MLP intermediate size', intArg('--ff', 1, 262144))
    .option('--vocab <n>', 'vocabulary size (>= the tiny tokenizer\'s)', intArg('--vocab', 1, 1_048_576))
    .option('--dtype <dtype>', 'f32, bf16 or f16', 'f32')
    .option('--tied', 'tie lm_head to the embeddings')
    .option('--untied', 'separate lm_head')
    .option('--seed <n>', 'weight seed', intArg('--seed', 0, 2 ** 32 - 1), 0)
    .action((o: { out: string; arch: string; preset: 'tiny' | '20m'; hidden?: number; layers?: number; heads?: number; kvHeads?: number; ff?: number; vocab?: number; dtype: string; tied?: boolean; untied?: boolean; seed: number }) => {
      if (o.tied && o.untied) throw new MedusaError('E_USAGE', 'Give at most one of --tied and --untied.');
      const r = runTiny({ ...o, tied: o.tied ? true : o.untied ? false : undefined });
      io.out(`wrote ${r.out}: ${formatCount(r.parameters)} parameters, vocab ${r.vocabSize}`);
    });

  return program;
}

/**
 * Run `work` with SIGINT/SIGTERM turned into a stop request it polls; a second signal exits at once
 * (the run stays resumable: datasets and checkpoints are written atomically).
 */
async function withStopSignals<T>(io: Io, what: string, work: (shouldStop: () => boolean) => Promise<T>): Promise<T> {
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals): void => {
    signals++;
    if (signals > 1) {
      io.err(`${sig}: stopping now; rerun the same command to resume`);
      process.exit(130);
    }
    io.err(`${sig}: ${what} (signal again to stop now)`);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    return await work(() => signals > 0);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/**
 * After train or eval: write the run's report and print where it is (to stderr under --json, whose stdout
 * is the JSON). The command's own work is done and saved, so a failure here is a warning, not an error.
 */
async function reportAfter(io: Io, runDir: string, json: boolean): Promise<void> {
  try {
    const r = await writeRunReport(runDir);
    (json ? io.err : io.out)(`report: ${r.html} (charts: ${r.svgs.length} SVG files beside it)`);
  } catch (e) {
    io.err(`warning: the run report was not written: ${isMedusaError(e) ? e.message : describe(e)} (retry with \`medusa-train report --run ${runDir}\`)`);
  }
}

function readPromptFile(file: string): string[] {
  if (!fs.existsSync(file)) throw new MedusaError('E_IO', `--prompt-file ${file} does not exist.`);
  return fs.readFileSync(file, 'utf8').split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
}

/** Run the CLI; returns the exit code (0 on success). */
export async function main(argv: string[], io: Io = defaultIo): Promise<number> {
  const program = buildProgram(io);
  try {
    await program.parseAsync(argv, { from: 'user' });
    return 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      return e.exitCode === 0 ? 0 : 2; // help/version exit 0; usage errors (already printed) exit 2
    }
    if (isMedusaError(e)) {
      io.err(`error [${e.code}]: ${e.message}`);
      return e.exitCode;
    }
    io.err(`internal error: ${describe(e)}\n${e instanceof Error ? e.stack ?? '' : ''}\nThis is a bug in medusa-train; please report it with the command line above.`);
    return 70;
  }
}
