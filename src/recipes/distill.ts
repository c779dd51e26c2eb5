/**
 * `medusa-train distill`: self-distillation. The base model regenerates every assistant turn of a
 * prompt set (user turns fed one at a time, in the model's own chat template), and the result is
 * written as a resumable Arrow dataset whose loss mask is 1 exactly on the generated tokens.
 *
 * Flow: read prompts -> open (or resume) the dataset -> for each shard-sized chunk of conversations,
 * generate turn by turn with the engine (batched across the chunk's conversations) -> append the
 * shard atomically -> accounting. A rerun of the same command continues after the last complete
 * shard; every (conversation, turn) samples from its own seeded stream and chunks are fixed by the
 * input order, so a resumed dataset equals an uninterrupted one.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { loadDecoder, openModelFolder } from '../model/load.js';
import { disposeWeights } from '../model/weights.js';
import { streamSeed, type SamplingParams } from '../model/sampling.js';
import { loadTokenizer, type Tokenizer } from '../data/tokenizer.js';
import { readPrompts, type PromptConversation, type PromptFormat } from '../data/prompts.js';
import { DatasetWriter, type DistilledRecord, type FailureRecord, type SkipRecord } from '../data/dataset.js';
import { ConversationBuilder } from '../distill/conversation.js';
import { createLocalEngine } from '../distill/local-engine.js';
import { chooseBackbone } from '../engines/decoder-engine.js';
import { createOpenAIEngine, type OpenAIStats } from '../distill/openai-engine.js';
import { isError, type DistillEngine, type GenerationRequest } from '../distill/engine.js';

export interface DistillArgs {
  inputs: string[];
  format: PromptFormat;
  out: string;
  /** Model folder: the local engine's weights; for the openai engine, the served model's tokenizer, template and config. */
  model: string;
  engine: 'local' | 'openai';
  urls: string[];
  servedModel?: string;
  inFlight: number;
  timeoutMs: number;
  retries: number;
  backoffMs: number;
  sampling: SamplingParams;
  seed: number;
  maxNewTokens: number;
  maxTotalTokens: number;
  batchSize: number;
  /** Local engine: which backbone engine generates (auto = onnxruntime when it loads). */
  backboneEngine: 'auto' | 'tfjs' | 'onnx';
  shardSize: number;
  topk: number;
  limit?: number;
  overwrite: boolean;
  log: (line: string) => void;
  progress?: DistillProgress;
  /** Polled between shards: stop cleanly (the dataset stays resumable). */
  shouldStop?: () => boolean;
}

export interface DistillProgress {
  start(total: number, done: number): void;
  update(done: number, generatedTokens: number): void;
  stop(): void;
}

export interface DistillSummary {
  out: string;
  input: number;
  written: number;
  failed: number;
  skipped: number;
  truncated: number;
  generatedTokens: number;
  seconds: number;
  tokensPerSecond: number;
  resumedFrom: number;
  complete: boolean;
  failures: FailureRecord[];
  skips: SkipRecord[];
  engine: string;
  openai?: OpenAIStats;
}

export const DISTILL_LIMITS = { maxShardSize: 100_000, maxBatchSize: 1024, maxInFlight: 1024, maxTopk: 1024 } as const;

function checkArgs(a: DistillArgs): void {
  const bad: string[] = [];
  if (a.inputs.length === 0) bad.push('--input: give at least one prompt file');
  if (!Number.isInteger(a.shardSize) || a.shardSize < 1 || a.shardSize > DISTILL_LIMITS.maxShardSize) bad.push(`--shard-size must be in [1, ${DISTILL_LIMITS.maxShardSize}]`);
  if (!Number.isInteger(a.batchSize) || a.batchSize < 1 || a.batchSize > DISTILL_LIMITS.maxBatchSize) bad.push(`--batch-size must be in [1, ${DISTILL_LIMITS.maxBatchSize}]`);
  if (!Number.isInteger(a.inFlight) || a.inFlight < 1 || a.inFlight > DISTILL_LIMITS.maxInFlight) bad.push(`--in-flight must be in [1, ${DISTILL_LIMITS.maxInFlight}]`);
  if (!Number.isInteger(a.topk) || a.topk < 0 || a.topk > DISTILL_LIMITS.maxTopk) bad.push(`--teacher-topk must be in [0, ${DISTILL_LIMITS.maxTopk}]`);
  if (a.topk > 0 && a.engine !== 'local') bad.push('--teacher-topk needs the local engine (OpenAI-compatible servers do not return full distributions)');
  if (a.engine === 'openai' && a.urls.length === 0) bad.push('--url: the openai engine needs at least one base URL');
  if (!Number.isInteger(a.maxNewTokens) || a.maxNewTokens < 1) bad.push('--max-new-tokens must be a positive integer');
  if (!Number.isInteger(a.maxTotalTokens) || a.maxTotalTokens < 2) bad.push('--max-total-tokens must be an integer >= 2');
  if (bad.length > 0) fail('E_USAGE', `distill: ${bad.join('; ')}`);
}

export async function runDistill(a: DistillArgs): Promise<DistillSummary> {
  checkArgs(a);
  const t0 = performance.now();
  // --- setup: model folder, tokenizer, template ---
  const folder = openModelFolder(a.model);
  const tokenizer = await loadTokenizer(a.model);
  const template = tokenizer.chatTemplate;
  if (!template) fail('E_TOKENIZER', `${a.model}/tokenizer_config.json has no chat_template; distill renders conversations in the model's own template.`);
  const maxTotal = Math.min(a.maxTotalTokens, folder.config.maxPositionEmbeddings);
  const eosIds = [...new Set([...folder.config.eosTokenIds, ...tokenizer.eosIds])];
  if (eosIds.length === 0) fail('E_CONFIG', `${a.model}: no eos token id in generation_config.json, config.json or tokenizer_config.json; generation could not stop at the end of a turn.`);
  const padId = folder.config.padTokenId ?? tokenizer.padId ?? eosIds[0];

  // --- prompts ---
  const prompts = await readPrompts(a.inputs, { format: a.format });
  const conversations = a.limit !== undefined ? prompts.conversations.slice(0, a.limit) : prompts.conversations;
  a.log(`prompts: ${prompts.conversations.length} conversations, ${prompts.skipped.length} rows skipped, from ${prompts.files.map((f) => `${f.path} (${f.format})`).join(', ')}`);

  // --- engine ---
  let generatedTokens = 0;
  let engine: DistillEngine;
  let openaiStats: OpenAIStats | undefined;
  let unload = (): void => {};
  let localBackbone = '';
  if (a.engine === 'local') {
    const { decoder } = loadDecoder(a.model);
    const backbone = await chooseBackbone(a.backboneEngine, decoder, a.log);
    localBackbone = backbone.kind;
    unload = () => {
      backbone.dispose();
      disposeWeights(decoder.weights);
    };
    engine = createLocalEngine({ backbone, sampling: a.sampling, eosIds, padId, batchSize: a.batchSize, topk: a.topk, onTokens: (n) => { generatedTokens += n; } });
  } else {
    const oe = createOpenAIEngine({
      urls: a.urls, model: a.servedModel, inFlight: a.inFlight, timeoutMs: a.timeoutMs, retries: a.retries, backoffMs: a.backoffMs,
      sampling: a.sampling, tokenizer, vocabSize: folder.config.vocabSize, endOfTurnId: tokenizer.eosIds[0] ?? eosIds[0], log: a.log, onTokens: (n) => { generatedTokens += n; },
    });
    try {
      a.log(`served model: ${await oe.resolveModel()}`);
    } catch (e) {
      fail('E_IO', `openai engine: ${(e as Error).message}`);
    }
    engine = oe;
    openaiStats = oe.stats;
  }
  a.log(`engine: ${engine.description}`);

  // --- dataset (resume unless --overwrite) ---
  const templateDate = resumeTemplateDate(a.out, a.overwrite) ?? new Date().toISOString().slice(0, 10);
  const meta: Record<string, string> = {
    format_version: '1',
    base_model: path.resolve(a.model),
    base_model_config_sha256: folder.configHash,
    architecture: folder.config.architecture,
    tokenizer_sha256: tokenizer.hash,
    chat_template: template,
    template_date: templateDate,
    sampling: JSON.stringify({ temperature: a.sampling.temperature, top_p: a.sampling.topP, top_k: a.sampling.topK, seed: a.seed, max_new_tokens: a.maxNewTokens, max_total_tokens: maxTotal }),
    engine: a.engine,
    engine_detail: a.engine === 'local' ? `local batch ${a.batchSize}` : `openai ${a.urls.join(' ')} in-flight ${a.inFlight}`,
    // float results differ slightly between backbone engines, so a dataset is resumed on the one it started with
    local_backbone: localBackbone,
    local_batch_size: a.engine === 'local' ? String(a.batchSize) : '',
    shard_size: String(a.shardSize),
    teacher_topk: String(a.topk),
    sources: JSON.stringify(prompts.files.map((f) => ({ path: path.resolve(f.path), format: f.format, rows: f.rows }))),
    sources_sha256: JSON.stringify(prompts.files.map((f) => f.sha256)),
    created_by: 'medusa-train distill',
  };
  const writer = DatasetWriter.open(a.out, {
    meta, topk: a.topk, mode: a.overwrite ? 'overwrite' : 'resume', ignoreOnResume: ['base_model', 'engine_detail', 'sources', 'created_by'],
  });
  for (const o of writer.orphansRemoved) a.log(`removed ${o} (left by an interrupted run)`);
  const resumedFrom = writer.nextIndex;
  if (resumedFrom > 0) a.log(`resuming ${a.out} at conversation ${resumedFrom} (${writer.written} written, ${writer.failures.length} failed so far)`);



  // --- run: one shard per chunk of conversations ---
  const recordedSkips = new Set(writer.skipped.map((s) => `${s.file}\u0000${s.row}`));
  let pendingSkips: SkipRecord[] = prompts.skipped.filter((s) => !recordedSkips.has(`${s.file}\u0000${s.row}`));
  const todo = conversations.filter((c) => c.index >= writer.nextIndex);
  a.progress?.start(conversations.length, conversations.length - todo.length);
  let truncated = 0;
  let stopped = false;
  try {
    // Chunks are fixed by absolute index (floor(index / shard_size)), so a resumed run forms the same chunks.
    const chunks: PromptConversation[][] = [];
    for (const conv of todo) {
      const last = chunks[chunks.length - 1];
      if (last && Math.floor(last[0].index / a.shardSize) === Math.floor(conv.index / a.shardSize)) last.push(conv);
      else chunks.push([conv]);
    }
    let done = conversations.length - todo.length;
    for (const chunk of chunks) {
      if (a.shouldStop?.()) {
        stopped = true;
        break;
      }
      const { records, failures } = await distillChunk(chunk, { tokenizer, template, templateSource: tokenizer.chatTemplateSource, templateDate, engine, seed: a.seed, maxNewTokens: a.maxNewTokens, maxTotal, topk: a.topk });
      truncated += records.filter((r) => r.truncated).length;
      writer.appendShard(records, failures, pendingSkips, chunk[chunk.length - 1].index + 1);
      pendingSkips = [];
      done += chunk.length;
      a.progress?.update(done, generatedTokens);
    }
    if (!stopped && pendingSkips.length > 0) writer.appendShard([], [], pendingSkips, writer.nextIndex);
  } catch (e) {
    writer.close();
    throw e;
  } finally {
    a.progress?.stop();
    await engine.close();
    unload();
  }
  const seconds = (performance.now() - t0) / 1000;
  const complete = !stopped && writer.nextIndex >= (conversations.length > 0 ? conversations[conversations.length - 1].index + 1 : 0);
  const summary: DistillSummary = {
    out: a.out,
    input: conversations.length + prompts.skipped.length,
    written: writer.written,
    failed: writer.failures.length,
    skipped: writer.skipped.length,
    truncated,
    generatedTokens,
    seconds,
    tokensPerSecond: generatedTokens / Math.max(seconds, 1e-9),
    resumedFrom,
    complete,
    failures: [...writer.failures],
    skips: [...writer.skipped],
    engine: engine.description,
    openai: openaiStats,
  };
  if (complete) {
    if (summary.written + summary.failed + summary.skipped !== summary.input) {
      fail('E_INTERNAL', `distill accounting does not add up: written ${summary.written} + failed ${summary.failed} + skipped ${summary.skipped} != input ${summary.input}`);
    }
    writer.finish({ input: summary.input, written: summary.written, failed: summary.failed, skipped: summary.skipped, truncated, generated_tokens: generatedTokens });
  } else {
    writer.close();
  }
  return summary;
}

/** The template date of an existing dataset (kept on resume so templates render identically). */
function resumeTemplateDate(out: string, overwrite: boolean): string | undefined {
  if (overwrite) return undefined;
  const manifest = path.join(out, 'manifest.json');
  if (!fs.existsSync(manifest)) return undefined;
  try {
    const m = JSON.parse(fs.readFileSync(manifest, 'utf8')) as { meta?: Record<string, string> };
    return m.meta?.['template_date'];
  } catch {
    return undefined; // the writer reports a broken manifest properly
  }
}

interface ChunkArgs {
  tokenizer: Tokenizer;
  template: string;
  templateSource: string;
  templateDate: string;
  engine: DistillEngine;
  seed: number;
  maxNewTokens: number;
  maxTotal: number;
  topk: number;
}

interface ConvState {
  conv: PromptConversation;
  builder: ConversationBuilder;
  /** Next message to feed. */
  next: number;
  turn: number;
  done: boolean;
  failure: string | null;
  topkIds: number[];
  topkLogprobs: number[];
}

/** Regenerate every assistant turn of the chunk's conversations, turn by turn, batching across conversations. */
async function distillChunk(chunk: PromptConversation[], c: ChunkArgs): Promise<{ records: DistilledRecord[]; failures: FailureRecord[] }> {
  const now = new Date(`${c.templateDate}T00:00:00Z`);
  const states: ConvState[] = [];
  const failures: FailureRecord[] = [];
  for (const conv of chunk) {
    try {
      states.push({ conv, builder: new ConversationBuilder(c.tokenizer, c.template, c.templateSource, now), next: 0, turn: 0, done: false, failure: null, topkIds: [], topkLogprobs: [] });
    } catch (e) {
      failures.push({ index: conv.index, id: conv.id, reason: (e as Error).message });
    }
  }
  for (;;) {
    const requests: GenerationRequest[] = [];
    const waiting: ConvState[] = [];
    for (const st of states) {
      if (st.done || st.failure) continue;
      try {
        const req = advance(st, c);
        if (req) {
          requests.push(req);
          waiting.push(st);
        }
      } catch (e) {
        st.failure = (e as Error).message;
      }
    }
    if (requests.length === 0) break;
    const results = await c.engine.generate(requests);
    results.forEach((r, i) => {
      const st = waiting[i];
      if (isError(r)) {
        st.failure = `turn ${st.turn}: ${r.error}`;
        return;
      }
      try {
        const endedByEos = r.finish === 'eos';
        st.builder.addGenerated(r.tokens, endedByEos);
        if (c.topk > 0 && r.topkIds && r.topkLogprobs) {
          for (const x of r.topkIds) st.topkIds.push(x);
          for (const x of r.topkLogprobs) st.topkLogprobs.push(x);
        }
        st.turn++;
        if (!endedByEos) st.done = true; // a reply cut off by the length limit ends the conversation
      } catch (e) {
        st.failure = (e as Error).message;
      }
    });
  }
  const records: DistilledRecord[] = [];
  for (const st of states) {
    const b = st.builder.result();
    if (!st.failure && !b.mask.includes(1)) st.failure = 'no assistant tokens were generated';
    if (st.failure) {
      failures.push({ index: st.conv.index, id: st.conv.id, reason: st.failure });
      continue;
    }
    records.push({
      id: st.conv.id,
      sourceIndex: st.conv.index,
      inputIds: b.ids,
      lossMask: b.mask,
      turnRoles: b.turnRoles,
      turnStarts: b.turnStarts,
      turnEnds: b.turnEnds,
      truncated: b.truncated,
      ...(c.topk > 0 ? { teacherTopkIds: Int32Array.from(st.topkIds), teacherTopkLogprobs: Float32Array.from(st.topkLogprobs) } : {}),
    });
  }
  records.sort((x, y) => x.sourceIndex - y.sourceIndex);
  failures.sort((x, y) => x.index - y.index);
  return { records, failures };
}

/**
 * Feed the conversation's next system/user messages; return the generation request for the next
 * assistant turn, or null when the conversation is finished.
 */
function advance(st: ConvState, c: ChunkArgs): GenerationRequest | null {
  const msgs = st.conv.messages;
  while (st.next < msgs.length) {
    const m = msgs[st.next];
    st.next++;
    if (m.role === 'assistant') continue; // original answers are regenerated, never used
    const answerNext = m.role === 'user';
    if (answerNext && st.builder.peekLength(m, true) + 1 > c.maxTotal) {
      if (st.turn === 0) throw new Error(`the first prompt does not fit max_total_tokens (${c.maxTotal}) with room for one generated token`);
      st.builder.truncated = true;
      st.done = true;
      return null;
    }
    st.builder.addMessage(m, answerNext);
    if (answerNext) {
      const room = c.maxTotal - st.builder.ids.length;
      return {
        promptIds: [...st.builder.ids],
        maxNewTokens: Math.min(c.maxNewTokens, room),
        seed: streamSeed(streamSeed(c.seed, st.conv.index), st.turn),
      };
    }
  }
  st.done = true;
  return null;
}

export function formatDistillSummary(s: DistillSummary): string {
  const lines = [
    `${s.complete ? 'done' : 'stopped (rerun the same command to resume)'}: ${s.out}`,
    `accounting: ${s.written} written + ${s.failed} failed + ${s.skipped} skipped = ${s.written + s.failed + s.skipped} of ${s.input} input${s.complete ? '' : ' (incomplete)'}`,
    `generated ${s.generatedTokens} tokens this run in ${s.seconds.toFixed(1)} s (${s.tokensPerSecond.toFixed(1)} tok/s); ${s.truncated} conversation(s) truncated by the length limits`,
  ];
  if (s.openai) lines.push(`openai engine: ${s.openai.requests} requests, ${s.openai.attempts} attempts (${s.openai.retried} retries), ${s.openai.failed} failed; per URL ${Object.entries(s.openai.byUrl).map(([u, v]) => `${u} ok ${v.ok} errors ${v.errors}`).join(', ')}`);
  const reasons = new Map<string, number>();
  for (const f of s.failures) reasons.set(f.reason, (reasons.get(f.reason) ?? 0) + 1);
  for (const [r, n] of reasons) lines.push(`  failed x${n}: ${r}`);
  const skipReasons = new Map<string, number>();
  for (const k of s.skips) skipReasons.set(k.reason.replace(/\d+/g, 'N'), (skipReasons.get(k.reason.replace(/\d+/g, 'N')) ?? 0) + 1);
  for (const [r, n] of skipReasons) lines.push(`  skipped x${n}: ${r}`);
  return lines.join('\n');
}
