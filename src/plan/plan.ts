/**
 * `medusa-train plan` (and the estimate `train` prints at its start): before a run, what it will need —
 * disk (the datasets already on disk, the hidden-state cache, the checkpoints), peak memory and time —
 * and whether that fits this machine.
 *
 * Disk is counted exactly: dataset folders by their files' sizes, the hidden-state cache by
 * hiddenCacheBytes over the very examples the recipe caches (train + eval split), checkpoints as
 * `checkpoint.keep` x (heads + both AdamW moments [+ the trainable backbone and its moments]) in f32.
 *
 * Memory and time come from a short probe of the recipe's real step, built from the recipes' own
 * building blocks on the run's largest padded batch (largest B x T of epoch 0, so activations are
 * measured at the run's worst case): medusa1 = the backbone engine's forward (chooseBackbone) + the
 * heads trainer's step and evaluate (createHeadsTrainer); medusa2 = medusa2LossAndGrads on the
 * trainable backbone + clipping + AdamW (joint steps; heads-only steps when there is a heads warmup).
 * One untimed warm-up call, then timed calls until `probeSteps` or `probeSeconds` is reached.
 *
 * Memory model (stated in the report): peak RSS = RSS after loading (runtime + weights + engines +
 * optimizer state) + the in-memory hidden-state cache + the probe's transient growth (peak RSS during
 * the probe, from /proc/self/status VmHWM after resetting it, minus RSS before it) scaled by
 * (run's largest B x T) / (probe B x T) (1 when the probe used the run's largest batch).
 *
 * Time model (stated in the report): seconds per padded token, measured per part (backbone forward,
 * heads step, heads evaluate; medusa2 joint and heads-only steps), times the padded tokens of every
 * micro-batch of the run's actual batch plans (planEpoch for each epoch the steps reach), plus the
 * measured setup, the cache fill (forward rate x the cached tokens) and the evaluations at eval.every.
 * Checkpoint writes are not counted.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { initBackend, currentBackend, WASM_HEAP_BYTES, type BackendChoice } from '../backend.js';
import type { Medusa2Config, TrainConfig } from '../config.js';
import { loadDecoder } from '../model/load.js';
import { parameterCount } from '../model/config.js';
import { decoderForward, type Decoder } from '../model/decoder.js';
import { disposeWeights, lmHeadReference } from '../model/weights.js';
import { disposeHeads, headTensorTable, initHeads, type HeadsShape, type MedusaHeads } from '../model/heads.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { openDataset } from '../data/dataset.js';
import { loadExamples, padBatch, planEpoch, splitEval, type PaddedBatch } from '../data/batches.js';
import { hiddenCacheBytes } from '../data/hidden-cache.js';
import { checkDatasetsMatchModel } from '../train/run-common.js';
import { createHeadsTrainer, type HeadsBatch } from '../engines/heads-trainer.js';
import { chooseBackbone } from '../engines/decoder-engine.js';
import { createTrainableBackbone, headsParams, type BackboneSpec, type TrainableBackbone } from '../train/trainable-backbone.js';
import { medusa2LossAndGrads, type Medusa2Batch } from '../train/medusa2-loss.js';
import { AdamW, adamwParamGroups } from '../train/optimizer.js';
import { clipGradNorm } from '../train/clip.js';

/** The machine's limits (measured unless given: tests fake them). */
export interface MachineLimits {
  freeDiskBytes: number;
  totalMemBytes: number;
  /** Memory available to a new process (os.freemem: MemAvailable on Linux). */
  freeMemBytes: number;
}

export interface PlanOptions {
  /** Run the probe (default true); without it only disk is estimated. */
  probe?: boolean;
  /** Timed probe calls per part, at most (default 3). */
  probeSteps?: number;
  /** Stop timing a part after this many seconds once one call is timed (default 2). */
  probeSeconds?: number;
  machine?: Partial<MachineLimits>;
  log?: (line: string) => void;
}

export interface PlanDataset {
  dir: string;
  bytes: number;
  rows: number;
}

export interface PlanReport {
  recipe: 'medusa1' | 'medusa2';
  modelDir: string;
  model: { parameters: number; hiddenSize: number; vocabSize: number; layers: number };
  backend: string;
  data: {
    datasets: PlanDataset[];
    trainConversations: number;
    evalConversations: number;
    /** Real tokens of the train split. */
    trainTokens: number;
    stepsPerEpoch: number;
    totalSteps: number;
    /** Largest padded batch of the run, B x T. */
    maxBatch: { B: number; T: number };
    /** Padded tokens (B x T summed) over every micro-batch of the run. */
    paddedTokens: number;
  };
  disk: {
    /** Already on disk (read, not written). */
    datasetsBytes: number;
    hiddenCache: { where: 'none' | 'memory' | 'disk'; bytes: number };
    /** checkpoint.keep checkpoints of `perCheckpoint` bytes. */
    checkpoints: { keep: number; perCheckpoint: number; bytes: number };
    /** Written by the run into run.dir: disk cache + checkpoints. */
    newBytes: number;
    /** Where free space was measured (run.dir or its nearest existing parent). */
    measuredAt: string;
    freeBytes: number;
  };
  memory: null | {
    model: string;
    rssStartBytes: number;
    rssLoadedBytes: number;
    probePeakBytes: number;
    probeTokens: number;
    scale: number;
    cacheBytes: number;
    peakBytes: number;
    totalBytes: number;
    freeBytes: number;
    /** How peak was measured: 'VmHWM' or 'rss samples'. */
    peakSource: string;
  };
  time: null | {
    model: string;
    probe: { part: string; calls: number; tokens: number; seconds: number; secondsPerToken: number }[];
    setupSeconds: number;
    cacheFillSeconds: number;
    trainSeconds: number;
    secondsPerStep: number;
    evalSeconds: number;
    evals: number;
    totalSeconds: number;
  };
  /** Extra facts or caveats (e.g. synthetic teacher values in the probe). */
  notes: string[];
  fits: boolean;
  /** Why it does not fit (empty when it fits). */
  problems: string[];
}

const MiB = 1024 ** 2;

/** Sum of file sizes under a folder (recursively). */
function folderBytes(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) n += folderBytes(p);
    else if (e.isFile()) n += fs.statSync(p).size;
  }
  return n;
}

/** Free bytes on the filesystem of `dir` (or its nearest existing parent). */
export function freeDiskAt(dir: string): { at: string; bytes: number } {
  let at = path.resolve(dir);
  while (!fs.existsSync(at) && path.dirname(at) !== at) at = path.dirname(at);
  const s = fs.statfsSync(at);
  return { at, bytes: s.bavail * s.bsize };
}

function machineLimits(runDir: string, o: Partial<MachineLimits> | undefined): MachineLimits & { at: string } {
  const disk = o?.freeDiskBytes === undefined ? freeDiskAt(runDir) : { at: path.resolve(runDir), bytes: o.freeDiskBytes };
  return { at: disk.at, freeDiskBytes: disk.bytes, totalMemBytes: o?.totalMemBytes ?? os.totalmem(), freeMemBytes: o?.freeMemBytes ?? os.freemem() };
}

/** Peak RSS tracking: VmHWM (reset through /proc/self/clear_refs) on Linux, else the largest sampled RSS. */
function peakTracker(): { sample(): void; peak(): number; source: string } {
  let resettable = false;
  try {
    fs.writeFileSync('/proc/self/clear_refs', '5');
    resettable = true;
  } catch {
    /* not Linux or not allowed: sample instead */
  }
  let sampled = process.memoryUsage.rss();
  const hwm = (): number => {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  };
  return {
    sample: () => void (sampled = Math.max(sampled, process.memoryUsage.rss())),
    peak: () => Math.max(sampled, resettable ? hwm() : 0),
    source: resettable ? 'VmHWM' : 'rss samples',
  };
}

/** Time `call` once untimed (warm-up), then up to `steps` times within about `seconds`. */
async function timeCalls(part: string, tokens: number, steps: number, seconds: number, sample: () => void, call: () => Promise<void> | void): Promise<PlanReportTimePart> {
  await call();
  sample();
  let calls = 0;
  const t0 = performance.now();
  while (calls < steps) {
    await call();
    sample();
    calls++;
    if ((performance.now() - t0) / 1000 >= seconds) break;
  }
  const s = (performance.now() - t0) / 1000;
  return { part, calls, tokens: tokens * calls, seconds: s, secondsPerToken: s / (tokens * calls) };
}
type PlanReportTimePart = NonNullable<PlanReport['time']>['probe'][number];

/** Padded tokens of the micro-batches of every optimizer step of the run, and the largest batch. */
function runBatches(c: TrainConfig, trainLengths: number[]): { stepsPerEpoch: number; totalSteps: number; perStep: number[]; maxB: number; maxT: number; largest: number[] } {
  const planOf = (epoch: number): number[][] => planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length });
  let plan = planOf(0);
  const stepsPerEpoch = Math.ceil(plan.length / c.train.grad_accum);
  const totalSteps = c.train.max_steps ?? c.train.epochs * stepsPerEpoch;
  const padded = (idx: number[]): number => idx.length * Math.max(...idx.map((i) => trainLengths[i]));
  let largest = plan[0];
  for (const b of plan) if (padded(b) > padded(largest)) largest = b;
  // the recipes' micro-batch walk: an epoch's last accumulation may be shorter
  const perStep: number[] = [];
  let epoch = 0;
  let next = 0;
  for (let s = 0; s < totalSteps; s++) {
    let tokens = 0;
    let m = 0;
    while (m < c.train.grad_accum) {
      if (next >= plan.length) {
        if (m > 0) break;
        epoch++;
        next = 0;
        plan = planOf(epoch);
      }
      tokens += padded(plan[next++]);
      m++;
    }
    perStep.push(tokens);
  }
  return { stepsPerEpoch, totalSteps, perStep, maxB: largest.length, maxT: Math.max(...largest.map((i) => trainLengths[i])), largest };
}

/** Padded tokens of the batches in the order the eval / cache passes make them. */
function passTokens(lengths: number[], batchSize: number, sorted: boolean): number {
  const order = lengths.map((_, i) => i);
  if (sorted) order.sort((x, y) => lengths[x] - lengths[y] || x - y);
  let n = 0;
  for (let s = 0; s < order.length; s += batchSize) {
    const idx = order.slice(s, s + batchSize);
    n += idx.length * Math.max(...idx.map((i) => lengths[i]));
  }
  return n;
}

/** MEDUSA-2's backbone spec from the config (the same mapping as the recipe's). */
function backboneSpecOf(c: Medusa2Config): BackboneSpec {
  const b = c.medusa2.backbone;
  return b.mode === 'lora'
    ? { mode: 'lora', rank: b.lora.rank, alpha: b.lora.alpha, dropout: b.lora.dropout, targets: [...b.lora.targets], trainEmbeddings: b.train_embeddings }
    : { mode: 'full', lastLayers: b.full_last_layers, trainEmbeddings: b.train_embeddings };
}

function headsElements(s: HeadsShape): number {
  return headTensorTable(s).reduce((n, r) => n + r.shape.reduce((a, x) => a * x, 1), 0);
}

export async function planRun(c: TrainConfig, o: PlanOptions = {}): Promise<PlanReport> {
  const log = o.log ?? ((): void => {});
  const probe = o.probe ?? true;
  const probeSteps = o.probeSteps ?? 3;
  const probeSeconds = o.probeSeconds ?? 2;
  const t0 = performance.now();
  const rssStart = process.memoryUsage.rss();
  await initBackend(c.model.backend as BackendChoice);
  const modelDir = c.model.path ?? ensureEmbeddedModel();
  const runName = c.run.name ?? `${c.recipe}-${path.basename(path.resolve(modelDir))}`;
  const runDir = path.join(c.run.dir, runName);
  const machine = machineLimits(runDir, o.machine);
  const notes: string[] = [];
  const problems: string[] = [];
  const cleanup: (() => void)[] = [];
  try {
    // --- model and data, as the recipes load them (datasets from another model are refused here too) ---
    const { decoder, folder } = loadDecoder(modelDir);
    cleanup.push(() => disposeWeights(decoder.weights));
    const tokenizer = await loadTokenizer(modelDir);
    for (const dir of c.data.train) {
      if (!fs.existsSync(dir)) fail('E_CONFIG', `data.train: ${dir} does not exist; distill it first (medusa-train distill --input <prompts> --out ${dir}).`);
    }
    const data = loadExamples(c.data.train, { maxSeqLen: c.data.max_seq_len });
    checkDatasetsMatchModel(data.datasets, modelDir, folder.configHash, tokenizer.hash);
    const { train, eval: evalSet } = splitEval(data.examples, { fraction: c.data.eval_fraction, max: c.data.eval_max, seed: c.run.seed });
    if (train.length === 0) fail('E_CONFIG', `data.train: no training conversations left (${data.examples.length} loaded, ${evalSet.length} held out for eval).`);
    const datasets = data.datasets.map((d) => ({ dir: d.dir, bytes: folderBytes(d.dir), rows: d.rows }));
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const K = c.heads.num_heads;
    const d = decoder.config.hiddenSize;
    const V = decoder.config.vocabSize;
    const trainLengths = train.map((e) => e.inputIds.length);
    const allLengths = [...trainLengths, ...evalSet.map((e) => e.inputIds.length)];
    const rb = runBatches(c, trainLengths);
    const paddedTokens = rb.perStep.reduce((a, x) => a + x, 0);

    // --- disk ---
    const cacheWhere = c.recipe === 'medusa1' ? c.train.cache_hidden_states : 'none';
    const cacheBytes = cacheWhere === 'none' ? 0 : hiddenCacheBytes(allLengths, d, c.train.cache_dtype);
    const shape: HeadsShape = { numHeads: K, numLayers: c.heads.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.heads.lm_head };
    let trainable = headsElements(shape);
    let backbone: TrainableBackbone | null = null;
    if (c.recipe === 'medusa2') {
      backbone = createTrainableBackbone(decoder, backboneSpecOf(c), c.run.seed);
      cleanup.push(() => backbone!.dispose());
      trainable += backbone.params.reduce((n, p) => n + p.variable.size, 0);
    }
    const perCheckpoint = 3 * 4 * trainable; // f32 tensors + AdamW exp_avg + exp_avg_sq
    const ckBytes = c.checkpoint.keep * perCheckpoint;
    const newBytes = ckBytes + (cacheWhere === 'disk' ? cacheBytes : 0);
    if (newBytes > machine.freeDiskBytes) {
      problems.push(`disk: the run writes ${mib(newBytes)} (${cacheWhere === 'disk' ? `hidden-state cache ${mib(cacheBytes)} + ` : ''}${c.checkpoint.keep} checkpoints x ${mib(perCheckpoint)}) but ${machine.at} has ${mib(machine.freeDiskBytes)} free; free space, lower checkpoint.keep${cacheWhere === 'disk' ? ', or use train.cache_hidden_states: none / cache_dtype: f16' : ''}.`);
    }

    const report: PlanReport = {
      recipe: c.recipe, modelDir, backend: currentBackend().detail,
      model: { parameters: parameterCount(decoder.config), hiddenSize: d, vocabSize: V, layers: decoder.config.numLayers },
      data: { datasets, trainConversations: train.length, evalConversations: evalSet.length, trainTokens: trainLengths.reduce((a, x) => a + x, 0), stepsPerEpoch: rb.stepsPerEpoch, totalSteps: rb.totalSteps, maxBatch: { B: rb.maxB, T: rb.maxT }, paddedTokens },
      disk: { datasetsBytes: datasets.reduce((a, x) => a + x.bytes, 0), hiddenCache: { where: cacheWhere, bytes: cacheBytes }, checkpoints: { keep: c.checkpoint.keep, perCheckpoint, bytes: ckBytes }, newBytes, measuredAt: machine.at, freeBytes: machine.freeDiskBytes },
      memory: null, time: null, notes, fits: true, problems,
    };
    if (!probe) {
      notes.push('no probe: memory and time not estimated');
      report.fits = problems.length === 0;
      return report;
    }

    // --- probe: the recipe's step on the run's largest batch ---
    const pb = padBatch(train, rb.largest, padId);
    const probeTokens = pb.B * pb.T;
    const evalTokens = passTokens(evalSet.map((e) => e.inputIds.length), c.data.batch_size, false);
    const evals = evalSet.length === 0 ? 0 : Math.floor(rb.totalSteps / c.eval.every) + (rb.totalSteps % c.eval.every === 0 ? 0 : 1);
    let parts: PlanReportTimePart[];
    let rssLoaded: number;
    let tracker: ReturnType<typeof peakTracker>;
    let trainSeconds: number;
    let evalSeconds: number;
    let cacheFillSeconds = 0;
    let setupSeconds: number;
    if (c.recipe === 'medusa1') {
      const bb = await chooseBackbone(c.model.engine, decoder, log);
      cleanup.push(() => bb.dispose());
      const trainer = await createHeadsTrainer(c.model.engine, {
        shape, baseLmHead: lmHeadReference(decoder.weights), seed: c.run.seed, betas: c.train.betas as [number, number], eps: c.train.eps, weightDecay: c.train.weight_decay,
        decay: c.loss.decay, headsCoefficient: c.loss.heads_coefficient, chunkRows: c.loss.chunk_rows, maxGradNorm: c.train.max_grad_norm,
      });
      cleanup.push(() => trainer.dispose());
      setupSeconds = (performance.now() - t0) / 1000;
      rssLoaded = process.memoryUsage.rss();
      tracker = peakTracker();
      let hidden: Float32Array = new Float32Array(0);
      const forward = await timeCalls('backbone forward', probeTokens, probeSteps, probeSeconds, tracker.sample, async () => {
        hidden = (await bb.forward({ ids: pb.ids, batch: pb.B, seqLen: pb.T, mask: pb.attention, logits: 'none' })).hidden; // [B*T, d]
      });
      const hb: HeadsBatch = { hidden, ids: pb.ids, lossMask: pb.lossMask, lengths: pb.lengths, T: pb.T };
      const step = await timeCalls('heads step', probeTokens, probeSteps, probeSeconds, tracker.sample, async () => void (await trainer.step([hb], c.train.lr)));
      const ev = await timeCalls('heads evaluate', probeTokens, probeSteps, probeSeconds, tracker.sample, async () => void (await trainer.evaluate(hb)));
      parts = [forward, step, ev];
      const cached = cacheWhere !== 'none';
      cacheFillSeconds = cached ? forward.secondsPerToken * passTokens(allLengths, c.data.batch_size, true) : 0;
      trainSeconds = paddedTokens * (step.secondsPerToken + (cached ? 0 : forward.secondsPerToken));
      evalSeconds = evals * evalTokens * (ev.secondsPerToken + (cached ? 0 : forward.secondsPerToken));
    } else {
      const m2 = c.medusa2;
      let heads: MedusaHeads | undefined;
      tf.tidy(() => {
        heads = initHeads(shape, decoder.weights.lmHead, c.run.seed);
      });
      cleanup.push(() => disposeHeads(heads!));
      const groups = { weightDecay: c.train.weight_decay, headsLrMultiplier: m2.heads_lr_multiplier };
      const adam = { betas: c.train.betas as [number, number], eps: c.train.eps };
      const headsOpt = new AdamW(adamwParamGroups(headsParams(heads!), groups), adam);
      cleanup.push(() => headsOpt.dispose());
      const backboneOpt = new AdamW(adamwParamGroups(backbone!.params, groups), adam);
      cleanup.push(() => backboneOpt.dispose());
      const batch = medusa2ProbeBatch(c, decoder, pb, notes);
      cleanup.push(() => batch.free());
      setupSeconds = (performance.now() - t0) / 1000;
      rssLoaded = process.memoryUsage.rss();
      tracker = peakTracker();
      const stepOnce = (joint: boolean): void => {
        const r = medusa2LossAndGrads(decoder, backbone!, heads!, batch.batch, { lmLoss: c.loss.lm_loss, headsCoefficient: c.loss.heads_coefficient, decay: c.loss.decay, trainBackbone: joint, dropoutSeed: 1 });
        const clipped = c.train.max_grad_norm === null ? r.grads : clipGradNorm(r.grads, c.train.max_grad_norm).grads;
        const pick = (names: string[]): Map<string, tf.Tensor> => new Map(names.map((n) => [n, clipped.get(n)!]));
        headsOpt.step(pick(headsOpt.names), c.train.lr);
        if (joint) backboneOpt.step(pick(backboneOpt.names), c.train.lr);
        if (clipped !== r.grads) for (const g of clipped.values()) g.dispose();
        for (const g of r.grads.values()) g.dispose();
      };
      const headsWarmup = Math.min(m2.heads_warmup_steps, rb.totalSteps);
      const joint = await timeCalls('joint step (medusa2LossAndGrads + clip + AdamW)', probeTokens, probeSteps, probeSeconds, tracker.sample, () => stepOnce(true));
      parts = [joint];
      let warm = joint;
      if (headsWarmup > 0 || evals > 0) {
        warm = await timeCalls('heads-only step', probeTokens, probeSteps, probeSeconds, tracker.sample, () => stepOnce(false));
        parts.push(warm);
      }
      let warmTokens = 0;
      for (let s = 0; s < headsWarmup; s++) warmTokens += rb.perStep[s];
      trainSeconds = warmTokens * warm.secondsPerToken + (paddedTokens - warmTokens) * joint.secondsPerToken;
      // an eval = the heads' forward on the tuned backbone + the gate's two forwards: about a heads-only step plus as much again
      evalSeconds = evals * evalTokens * 2 * warm.secondsPerToken;
    }
    const peak = tracker.peak();
    const probeGrowth = Math.max(0, peak - rssLoaded);
    const runTokens = rb.maxB * rb.maxT;
    const scale = runTokens / probeTokens;
    const memCache = cacheWhere === 'memory' ? cacheBytes : 0;
    const peakBytes = rssLoaded + memCache + probeGrowth * scale;
    report.memory = {
      model: `peak RSS = RSS after loading (runtime + weights + engines: ${mib(rssLoaded)}) + in-memory hidden-state cache (${mib(memCache)}) + the probe's growth over it (${mib(probeGrowth)} at B x T = ${pb.B} x ${pb.T}) x ${scale.toFixed(2)} (the run's largest B x T = ${rb.maxB} x ${rb.maxT} over the probe's)`,
      rssStartBytes: rssStart, rssLoadedBytes: rssLoaded, probePeakBytes: peak, probeTokens, scale, cacheBytes: memCache, peakBytes,
      totalBytes: machine.totalMemBytes, freeBytes: machine.freeMemBytes, peakSource: tracker.source,
    };
    if (peakBytes > machine.freeMemBytes) {
      problems.push(`memory: the run needs about ${mib(peakBytes)} at its peak but ${mib(machine.freeMemBytes)} is available (${mib(machine.totalMemBytes)} total); lower data.batch_size or data.max_seq_len${cacheWhere === 'memory' ? ', or use train.cache_hidden_states: disk' : ''}.`);
    }
    const wasmPart = rssLoaded - rssStart + probeGrowth * scale;
    if (currentBackend().name === 'wasm' && wasmPart > WASM_HEAP_BYTES) {
      problems.push(`memory: about ${mib(wasmPart)} of weights and activations, over the wasm backend's ${mib(WASM_HEAP_BYTES)} heap; lower data.batch_size or data.max_seq_len, or use the native backend.`);
    }
    const totalSeconds = setupSeconds + cacheFillSeconds + trainSeconds + evalSeconds;
    report.time = {
      model: `seconds per padded token of each part (probe: ${parts.map((p) => `${p.part} ${(p.secondsPerToken * 1e6).toFixed(2)} us/token over ${p.calls} call(s)`).join('; ')}) x the padded tokens of the run's batches (${paddedTokens} over ${rb.totalSteps} steps${cacheWhere !== 'none' ? ', the backbone only for the cache fill' : ''}) + measured setup + ${evals} eval(s) of ${evalTokens} padded tokens; checkpoint writes not counted`,
      probe: parts, setupSeconds, cacheFillSeconds, trainSeconds, secondsPerStep: trainSeconds / Math.max(rb.totalSteps, 1), evalSeconds, evals, totalSeconds,
    };
    report.fits = problems.length === 0;
    return report;
  } finally {
    for (const f of cleanup.reverse()) f();
  }
}

/**
 * The probe's MEDUSA-2 loss input: the padded batch plus the teacher the config's LM loss reads — the frozen
 * original's logits (decoderForward, as the recipe), or top-k groups of the dataset's k with synthetic values
 * (same shapes, hence the same cost; the recipe's top-k loader is private to it).
 */
function medusa2ProbeBatch(c: Medusa2Config, decoder: Decoder, pb: PaddedBatch, notes: string[]): { batch: Medusa2Batch; free(): void } {
  const base: Medusa2Batch = { ids: pb.ids, B: pb.B, T: pb.T, attention: pb.attention, lossMask: pb.lossMask, lengths: pb.lengths };
  if (c.loss.lm_loss !== 'kd') return { batch: base, free: () => {} };
  if (c.loss.teacher === 'frozen') {
    const r = decoderForward(decoder, { ids: pb.ids, batch: pb.B, seqLen: pb.T, mask: pb.attention, logits: 'all' });
    r.hidden.dispose();
    notes.push('probe: the frozen teacher\'s logits are computed once (the recipe computes them every step; not in the time estimate)');
    return { batch: { ...base, teacher: { logits: r.logits! } }, free: () => r.logits!.dispose() };
  }
  const k = Math.min(...c.data.train.map((dir) => openDataset(dir).topk));
  if (k === 0) fail('E_CONFIG', `loss.lm_loss: kd with loss.teacher: topk needs the teacher's top-k log-probabilities, but a dataset of data.train has none; distill with --teacher-topk, or set loss.teacher: frozen or loss.lm_loss: ce.`);
  const n = pb.B * pb.T;
  const topkIds = new Int32Array(n * k);
  const topkLogprobs = new Float32Array(n * k).fill(-Infinity);
  for (let p = 0; p < n; p++) {
    if (pb.lossMask[p] !== 1) continue;
    for (let j = 0; j < k; j++) {
      topkIds[p * k + j] = (pb.ids[p] + j) % decoder.config.vocabSize;
      topkLogprobs[p * k + j] = Math.log((k - j) / ((k * (k + 1)) / 2)) - 0.01; // a proper distribution with a small rest
    }
  }
  notes.push(`probe: teacher top-${k} groups with synthetic values (same shapes as the dataset's)`);
  return { batch: { ...base, teacher: { topkIds, topkLogprobs, k } }, free: () => {} };
}

function mib(n: number): string {
  return n >= 1024 ** 3 ? `${(n / 1024 ** 3).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`;
}

function secs(s: number): string {
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function formatPlan(r: PlanReport): string {
  const L: string[] = [];
  L.push(`plan: ${r.recipe} on ${r.modelDir} (${(r.model.parameters / 1e6).toFixed(2)}M parameters), backend ${r.backend}`);
  L.push(`  data: ${r.data.trainConversations} train + ${r.data.evalConversations} eval conversations, ${r.data.trainTokens} train tokens; ${r.data.totalSteps} steps (${r.data.stepsPerEpoch} per epoch), largest batch ${r.data.maxBatch.B} x ${r.data.maxBatch.T}`);
  L.push(`  disk: datasets ${mib(r.disk.datasetsBytes)} (on disk); hidden-state cache ${r.disk.hiddenCache.where === 'none' ? 'none' : `${mib(r.disk.hiddenCache.bytes)} in ${r.disk.hiddenCache.where}`}; checkpoints ${r.disk.checkpoints.keep} x ${mib(r.disk.checkpoints.perCheckpoint)}; the run writes ${mib(r.disk.newBytes)}, ${mib(r.disk.freeBytes)} free at ${r.disk.measuredAt}`);
  if (r.memory) {
    L.push(`  memory: peak about ${mib(r.memory.peakBytes)} (${mib(r.memory.freeBytes)} available of ${mib(r.memory.totalBytes)})`);
    L.push(`    model: ${r.memory.model}`);
  }
  if (r.time) {
    L.push(`  time: about ${secs(r.time.totalSeconds)} = setup ${secs(r.time.setupSeconds)}${r.time.cacheFillSeconds > 0 ? ` + cache fill ${secs(r.time.cacheFillSeconds)}` : ''} + ${r.data.totalSteps} steps x ${r.time.secondsPerStep.toFixed(3)} s + ${r.time.evals} eval(s) ${secs(r.time.evalSeconds)}`);
    L.push(`    model: ${r.time.model}`);
  }
  for (const n of r.notes) L.push(`  note: ${n}`);
  L.push(r.fits ? '  fits this machine' : `  DOES NOT FIT:\n${r.problems.map((p) => `    - ${p}`).join('\n')}`);
  return L.join('\n');
}
