/**
 * `medusa-train train` with `recipe: medusa1`: the backbone is frozen and only the Medusa heads train.
 *
 * Setup: run folder, model + tokenizer, datasets (refused if distilled from another model or
 * tokenizer), eval split, heads (fresh or from the latest checkpoint with --resume), AdamW, the
 * optional hidden-state cache (filled in one pass before training). Run: micro-batches from a
 * per-epoch plan that is a pure function of (seed, epoch); per-head loss with exact gradients;
 * clipping; AdamW; metrics JSONL; eval and atomic checkpoints on their cadence. Clean up: final
 * checkpoint, summary.json. A NaN/Inf loss stops the run and keeps the last good checkpoint;
 * `shouldStop` (SIGINT/SIGTERM) writes a checkpoint and returns.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { fail } from '../errors.js';
import { initBackend, currentBackend, type BackendChoice } from '../backend.js';
import { configHash, saveResolvedConfig, type TrainConfig } from '../config.js';
import { loadDecoder } from '../model/load.js';
import { disposeWeights, lmHeadReference } from '../model/weights.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { countValid, loadExamples, padBatch, planEpoch, splitEval, type PaddedBatch, type TrainExample } from '../data/batches.js';
import { hiddenCacheBytes, openHiddenCache, type HiddenCache } from '../data/hidden-cache.js';
import { addStats, checkDatasetsMatchModel, checkResumeHash, emptyStats, prepareRunDir, summarise, truncateMetrics, type HeadMetrics } from '../train/run-common.js';
import { lrAt, warmupSteps } from '../train/schedule.js';
import { createHeadsTrainer, type HeadsBatch, type HeadsTrainer } from '../engines/heads-trainer.js';
import { chooseBackbone, type Backbone } from '../engines/decoder-engine.js';
import { loadCheckpoint, saveCheckpoint } from '../train/checkpoint.js';

export interface Medusa1Args {
  config: TrainConfig;
  commandLine: string[];
  resume: boolean;
  log: (line: string) => void;
  progress?: { start(total: number, done: number): void; update(done: number, tokens: number): void; stop(): void };
  shouldStop?: () => boolean;
}

export type { HeadMetrics } from '../train/run-common.js';

export interface Medusa1Summary {
  runDir: string;
  steps: number;
  totalSteps: number;
  stopped: boolean;
  trainTokens: number;
  seconds: number;
  tokensPerSecond: number;
  finalTrain: { loss: number; heads: HeadMetrics[] } | null;
  finalEval: { loss: number; heads: HeadMetrics[] } | null;
  checkpoint: string | null;
  backend: string;
}

export async function runMedusa1(a: Medusa1Args): Promise<Medusa1Summary> {
  const c = a.config;
  if (c.recipe !== 'medusa1') fail('E_CONFIG', `recipe: ${String(c.recipe)} is not handled by the MEDUSA-1 trainer`);
  const t0 = performance.now();
  // --- setup: backend, run folder ---
  await initBackend(c.model.backend as BackendChoice);
  const modelDir = c.model.path ?? ensureEmbeddedModel();
  const runDir = path.join(c.run.dir, c.run.name); // run.name: the config's default is resolved when it is parsed
  const hash = configHash(c);
  const resumeFrom = prepareRunDir(runDir, a.resume);
  saveResolvedConfig(runDir, c, a.commandLine);
  a.log(`run: ${runDir}`);

  // --- model, tokenizer, data (everything below is released in the finally, on success or error) ---
  const cleanup: (() => void)[] = [];
  try {
    const { decoder, folder } = loadDecoder(modelDir);
    cleanup.push(() => disposeWeights(decoder.weights));
    const tokenizer = await loadTokenizer(modelDir);
    const data = loadExamples(c.data.train, { maxSeqLen: c.data.max_seq_len });
    checkDatasetsMatchModel(data.datasets, modelDir, folder.configHash, tokenizer.hash);
    const { train, eval: evalSet } = splitEval(data.examples, { fraction: c.data.eval_fraction, max: c.data.eval_max, seed: c.run.seed });
    if (train.length === 0) fail('E_CONFIG', `data.train: no training conversations left (${data.examples.length} loaded, ${evalSet.length} held out for eval, ${data.droppedNoLabels} without labels).`);
    a.log(`data: ${train.length} train + ${evalSet.length} eval conversations (${data.truncated} truncated to ${c.data.max_seq_len} tokens, ${data.droppedNoLabels} dropped without labels)`);
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const K = c.heads.num_heads;
    const trainLengths = train.map((e) => e.inputIds.length);
    const batchesPerEpoch = planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch: 0, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length }).length;
    const stepsPerEpoch = Math.ceil(batchesPerEpoch / c.train.grad_accum);
    const totalSteps = c.train.max_steps ?? c.train.epochs * stepsPerEpoch;
    const warmup = warmupSteps(totalSteps, c.train.warmup_ratio);
    a.log(`training: ${totalSteps} steps (${stepsPerEpoch} per epoch, batch ${c.data.batch_size} x accumulation ${c.train.grad_accum}), ${K} heads x ${c.heads.num_layers} layer(s), lm_head ${c.heads.lm_head}, backend ${currentBackend().detail}`);

    // --- engines: the frozen backbone's forward and the heads' training step ---
    const backbone = await chooseBackbone(c.model.engine, decoder, a.log);
    cleanup.push(() => backbone.dispose());
    const d = decoder.config.hiddenSize;
    const V = decoder.config.vocabSize;
    const baseLmHead = lmHeadReference(decoder.weights); // [V, d]
    const trainer: HeadsTrainer = await createHeadsTrainer(c.model.engine, {
      shape: { numHeads: K, numLayers: c.heads.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.heads.lm_head },
      baseLmHead, seed: c.run.seed, betas: c.train.betas as [number, number], eps: c.train.eps, weightDecay: c.train.weight_decay,
      decay: c.loss.decay, headsCoefficient: c.loss.heads_coefficient, chunkRows: c.loss.chunk_rows, maxGradNorm: c.train.max_grad_norm,
    });
    cleanup.push(() => trainer.dispose());
    a.log(`engines: backbone ${backbone.kind}; heads ${trainer.description}`);
    let step = 0;
    let epoch = 0;
    let nextBatch = 0;
    let trainTokens = 0;
    if (resumeFrom) {
      const ck = loadCheckpoint(resumeFrom);
      checkResumeHash(ck.state, hash, runDir);
      if (ck.state['optimizer_layout'] !== 'reference') fail('E_CONFIG', `${resumeFrom} holds optimizer state in an older layout; start a new run.`);
      trainer.importHeads(ck.heads, resumeFrom);
      trainer.importOptimizer({ step: ck.state['optimizer_step'] as number, tensors: ck.optimizer });
      step = ck.state['step'] as number;
      epoch = ck.state['epoch'] as number;
      nextBatch = ck.state['next_batch'] as number;
      trainTokens = (ck.state['train_tokens'] as number) ?? 0;
      truncateMetrics(path.join(runDir, 'metrics.jsonl'), step);
      a.log(`resumed from ${resumeFrom} at step ${step}`);
    } else {
      fs.rmSync(path.join(runDir, 'metrics.jsonl'), { force: true });
    }

    // --- hidden-state cache (filled once, before training) ---
    let cache: HiddenCache | null = null;
    const all: TrainExample[] = [...train, ...evalSet];
    if (c.train.cache_hidden_states !== 'none') {
      const lengths = all.map((e) => e.inputIds.length);
      const bytes = hiddenCacheBytes(lengths, decoder.config.hiddenSize, c.train.cache_dtype);
      const where = c.train.cache_hidden_states === 'disk' ? path.join(runDir, 'cache') : 'memory';
      a.log(`hidden-state cache: ${(bytes / 1024 ** 2).toFixed(1)} MiB (${c.train.cache_dtype}) in ${where}`);
      if (c.train.cache_hidden_states === 'memory' && bytes > os.totalmem() * 0.6) {
        fail('E_CONFIG', `train.cache_hidden_states: memory needs ${(bytes / 1024 ** 3).toFixed(1)} GiB, over 60% of this machine's RAM; use disk, f16, or none.`);
      }
      const fingerprint = createHash('sha256').update(JSON.stringify({ model: folder.configHash, data: data.datasets.map((d) => d.shardSha256), keys: all.map((e) => e.key), max: c.data.max_seq_len, seed: c.run.seed, split: [c.data.eval_fraction, c.data.eval_max] })).digest('hex');
      cleanup.push(() => cache?.close());
      cache = openHiddenCache({ kind: c.train.cache_hidden_states, dtype: c.train.cache_dtype, hiddenSize: decoder.config.hiddenSize, lengths, dir: where === 'memory' ? undefined : where, fingerprint });
      if (!cache.complete) {
        const order = lengths.map((_, i) => i).sort((x, y) => lengths[x] - lengths[y] || x - y);
        for (let s = 0; s < order.length; s += c.data.batch_size) {
          const idx = order.slice(s, s + c.data.batch_size);
          const pb = padBatch(all, idx, padId);
          const hd = await backboneHidden(backbone, pb); // [B*T, d]
          idx.forEach((ex, b) => cache!.put(ex, hd.slice(b * pb.T * d, (b * pb.T + lengths[ex]) * d)));
        }
        cache.finalize();
        a.log(`hidden-state cache filled (${all.length} conversations)`);
      }
    }
    /** The heads' input for a padded batch of `all`-indexes: hidden states [B*T, d] from the cache or the backbone. */
    const batchFor = async (pb: PaddedBatch, allIdx: number[]): Promise<HeadsBatch> => {
      let hidden: Float32Array;
      if (!cache) hidden = await backboneHidden(backbone, pb);
      else {
        hidden = new Float32Array(pb.B * pb.T * d);
        allIdx.forEach((ex, b) => hidden.set(cache!.get(ex), b * pb.T * d));
      }
      return { hidden, ids: pb.ids, lossMask: pb.lossMask, lengths: pb.lengths, T: pb.T };
    };

    // --- evaluation over the held-out split ---
    const evaluate = async (): Promise<{ loss: number; heads: HeadMetrics[] } | null> => {
      if (evalSet.length === 0) return null;
      const st = emptyStats(K);
      for (let s = 0; s < evalSet.length; s += c.data.batch_size) {
        const idx = Array.from({ length: Math.min(c.data.batch_size, evalSet.length - s) }, (_, i) => s + i);
        const pb = padBatch(evalSet, idx, padId);
        addStats(st, await trainer.evaluate(await batchFor(pb, idx.map((i) => train.length + i))));
      }
      return summarise(st, c.loss.decay, c.loss.heads_coefficient);
    };

    // --- run ---
    const metricsFile = path.join(runDir, 'metrics.jsonl');
    const writeMetrics = (obj: Record<string, unknown>): void => fs.appendFileSync(metricsFile, `${JSON.stringify(obj)}\n`);
    let plan = planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length });
    let lastCheckpoint: string | null = resumeFrom;
    let finalTrain: { loss: number; heads: HeadMetrics[] } | null = null;
    let finalEval: { loss: number; heads: HeadMetrics[] } | null = null;
    let stopped = false;
    const loopStart = performance.now();
    const tokensAtStart = trainTokens;
    const checkpoint = (): void => {
      const optState = trainer.exportOptimizer();
      lastCheckpoint = saveCheckpoint(runDir, {
        step,
        heads: trainer.exportHeads(),
        optimizer: optState.tensors,
        state: { step, epoch, next_batch: nextBatch, optimizer_step: optState.step, optimizer_layout: 'reference', engine: trainer.engine, config_hash: hash, base_model_path: path.resolve(modelDir), train_tokens: trainTokens, base_model_config_sha256: folder.configHash, heads_shape: { num_heads: K, num_layers: c.heads.num_layers, lm_head: c.heads.lm_head, hidden_size: d, vocab_size: V }, created: new Date().toISOString() },
      }, { keep: c.checkpoint.keep });
    };
    a.progress?.start(totalSteps, step);
    try {
      while (step < totalSteps) {
        // the micro-batches of this optimizer step
        const micro: number[][] = [];
        while (micro.length < c.train.grad_accum) {
          if (nextBatch >= plan.length) {
            if (micro.length > 0) break; // an epoch's last, shorter accumulation
            epoch++;
            nextBatch = 0;
            plan = planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length });
          }
          micro.push(plan[nextBatch++]);
        }
        const padded = micro.map((idx) => padBatch(train, idx, padId));
        const batches: HeadsBatch[] = [];
        for (let m = 0; m < padded.length; m++) {
          batches.push(await batchFor(padded[m], micro[m]));
          trainTokens += padded[m].lengths.reduce((x, y) => x + y, 0);
        }
        const lr = lrAt(step, { lr: c.train.lr, kind: c.train.schedule, warmupSteps: warmup, totalSteps });
        const r = await trainer.step(batches, lr);
        const metrics = summarise(r, c.loss.decay, c.loss.heads_coefficient);
        if (!r.applied || !Number.isFinite(metrics.loss)) {
          fail('E_TRAIN', `the loss became ${metrics.loss} (gradient norm ${r.gradNorm}) at step ${step + 1}. The run stopped without applying it; its last good checkpoint is ${lastCheckpoint ?? '(none yet)'}. Lower train.lr, set train.max_grad_norm, or check the data.`);
        }
        const clip = { norm: r.gradNorm };
        step++;
        finalTrain = metrics;
        const secs = (performance.now() - loopStart) / 1000;
        if (step % c.log.every === 0 || step === totalSteps) {
          writeMetrics({ type: 'train', step, epoch, loss: metrics.loss, heads: metrics.heads, lr, grad_norm: clip.norm, tokens: trainTokens, tokens_per_s: (trainTokens - tokensAtStart) / Math.max(secs, 1e-9) });
        }
        if (step % c.eval.every === 0 || step === totalSteps) {
          finalEval = await evaluate();
          if (finalEval) writeMetrics({ type: 'eval', step, loss: finalEval.loss, heads: finalEval.heads });
        }
        const stopNow = a.shouldStop?.() ?? false;
        if (step % c.checkpoint.every === 0 || step === totalSteps || stopNow) checkpoint();
        a.progress?.update(step, trainTokens - tokensAtStart);
        if (stopNow) {
          stopped = true;
          break;
        }
      }
    } finally {
      a.progress?.stop();
    }
    if (!finalEval && !stopped) finalEval = await evaluate(); // e.g. resuming a run that had already finished
    const seconds = (performance.now() - t0) / 1000;
    const summary: Medusa1Summary = {
      runDir, steps: step, totalSteps, stopped, trainTokens, seconds,
      tokensPerSecond: (trainTokens - tokensAtStart) / Math.max((performance.now() - loopStart) / 1000, 1e-9),
      finalTrain, finalEval, checkpoint: lastCheckpoint, backend: `heads ${trainer.engine}, backbone ${backbone.kind} (tfjs backend: ${currentBackend().detail})`,
    };
    fs.writeFileSync(path.join(runDir, 'summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
    return summary;
  } finally {
    for (const f of cleanup.reverse()) f();
  }
}

/** Final hidden states of a padded batch from the frozen backbone: [B*T, d] on the host. */
async function backboneHidden(backbone: Backbone, pb: PaddedBatch): Promise<Float32Array> {
  const r = await backbone.forward({ ids: pb.ids, batch: pb.B, seqLen: pb.T, mask: pb.attention, logits: 'none' });
  return r.hidden; // [B, T, d] = [B*T, d]
}

export function formatMedusa1Summary(s: Medusa1Summary): string {
  const lines = [`${s.stopped ? 'stopped (rerun with --resume to continue)' : 'done'}: ${s.runDir}, step ${s.steps}/${s.totalSteps}, ${s.trainTokens} tokens, ${s.tokensPerSecond.toFixed(0)} tok/s on ${s.backend}`];
  const show = (label: string, m: { loss: number; heads: HeadMetrics[] } | null): void => {
    if (!m) return;
    lines.push(`${label} loss ${m.loss.toFixed(4)}`);
    m.heads.forEach((h, k) => lines.push(`  head ${k}: loss ${h.loss.toFixed(4)}  top-1 ${(100 * h.acc[0]).toFixed(1)}%  top-5 ${(100 * h.acc[4]).toFixed(1)}%  (${h.valid} positions)`));
  };
  show('train (last step)', s.finalTrain);
  show('eval', s.finalEval);
  if (s.checkpoint) lines.push(`checkpoint: ${s.checkpoint}`);
  return lines.join('\n');
}
