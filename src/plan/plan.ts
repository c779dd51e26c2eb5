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
 * building blocks: medusa1 = the backbone engine's forward (chooseBackbone) + the heads trainer's step
 * and evaluate (createHeadsTrainer); medusa2 = medusa2LossAndGrads on the trainable backbone + clipping +
 * AdamW (joint steps; heads-only steps for a heads warmup and evals). Each part is called once, untimed,
 * on epoch 0's largest padded batch (largest B x T: the memory peak at the run's worst case, and the
 * warm-up), then once on each of the run's first `probeSteps` micro-batches in its order, timed.
 *
 * Memory model (stated in the report): peak RSS = RSS after loading (runtime + weights + engines +
 * optimizer state) + the in-memory hidden-state cache + the probe's transient growth (peak RSS during
 * the probe, from /proc/self/status VmHWM after resetting it, minus RSS before it) scaled by
 * (run's largest B x T) / (probe B x T) (1 when the probe used the run's largest batch).
 *
 * Time model (stated in the report): each part's seconds per call = a + b x padded tokens, fitted by least
 * squares over the timed calls (a covers per-call overheads that dominate small batches), summed over
 * every micro-batch of the run's actual batch plans (planEpoch for each epoch the steps reach), plus the
 * measured setup, the cache fill (the forward over the cached batches), the evaluations at eval.every and
 * the checkpoint writes at checkpoint.every (a write + fsync of the checkpoint's size, timed).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { initBackend, currentBackend, WASM_HEAP_BYTES, type BackendChoice } from '../backend.js';
import { backboneSpecOf, type Medusa2Config, type TrainConfig } from '../config.js';
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
import { createTrainableBackbone, headsParams, type TrainableBackbone } from '../train/trainable-backbone.js';
import { medusa2LossAndGrads, type Medusa2Batch } from '../train/medusa2-loss.js';
import { AdamW, adamwParamGroups } from '../train/optimizer.js';
import { clipGradNorm } from '../train/clip.js';
import { fsyncDir, writeFileAtomic } from '../io/atomic.js';

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
  /** Timed probe calls per part (the run's first batches), at most (default 8). */
  probeSteps?: number;
  /** Stop timing a part after this many seconds once two calls are timed (default 2). */
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
    /** Per part: seconds per call = perCall + perToken x padded tokens, fitted over the timed calls. */
    probe: { part: string; calls: number; points: { tokens: number; secondsPerCall: number }[]; perCall: number; perToken: number }[];
    setupSeconds: number;
    cacheFillSeconds: number;
    trainSeconds: number;
    secondsPerStep: number;
    evalSeconds: number;
    evals: number;
    checkpointSeconds: number;
    checkpoints: number;
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

/**
 * One untimed warm-up call (on the run's largest batch: it also sets the memory peak), then each of
 * `points` (a call on one of the run's own batches, `tokens` padded tokens) once, timed, as the run meets
 * them (distinct shapes: engines that plan per shape pay that as the run does), stopping after `seconds`
 * once two are timed; a + b x tokens fitted by least squares (the proportional model when the fit is not
 * positive or the sizes do not differ).
 */
async function timePart(part: string, warmup: () => Promise<void> | void, points: { tokens: number; call: () => Promise<void> | void }[], seconds: number, sample: () => void): Promise<PlanReportTimePart> {
  await warmup();
  sample();
  const measured: { tokens: number; secondsPerCall: number }[] = [];
  const t0 = performance.now();
  for (const pt of points) {
    const t = performance.now();
    await pt.call();
    measured.push({ tokens: pt.tokens, secondsPerCall: (performance.now() - t) / 1000 });
    sample();
    if (measured.length >= 2 && (performance.now() - t0) / 1000 >= seconds) break;
  }
  const n = measured.length;
  const mx = measured.reduce((a, m) => a + m.tokens, 0) / n;
  const my = measured.reduce((a, m) => a + m.secondsPerCall, 0) / n;
  const sxx = measured.reduce((a, m) => a + (m.tokens - mx) ** 2, 0);
  const sxy = measured.reduce((a, m) => a + (m.tokens - mx) * (m.secondsPerCall - my), 0);
  let perToken = sxx > 0 ? sxy / sxx : 0;
  let perCall = my - perToken * mx;
  if (!(sxx > 0) || perToken <= 0 || perCall < 0) {
    perToken = my / mx;
    perCall = 0;
  }
  return { part, calls: n, points: measured, perCall, perToken };
}
type PlanReportTimePart = NonNullable<PlanReport['time']>['probe'][number];

/**
 * Seconds to write one checkpoint of `bytes` the way saveCheckpoint does (files written and fsynced, then
 * renamed, folder fsynced): timed on at most 64 MiB in a temporary file in `dir`, scaled linearly, file removed.
 */
function checkpointWriteSeconds(dir: string, bytes: number): number {
  const probeBytes = Math.max(1, Math.min(bytes, 64 * MiB));
  const file = path.join(dir, `.medusa-plan-probe-${process.pid}`);
  const t0 = performance.now();
  try {
    writeFileAtomic(file, [new Uint8Array(probeBytes)]);
    fsyncDir(dir);
  } catch {
    return 0; // not writable here: the disk check reports the space; the time is left out
  } finally {
    fs.rmSync(file, { force: true });
  }
  return ((performance.now() - t0) / 1000) * (bytes / probeBytes);
}

/** Seconds of `part` over calls on batches of these padded tokens. */
function costOf(p: PlanReportTimePart, batches: number[]): number {
  return batches.reduce((a, n) => a + p.perCall + p.perToken * n, 0);
}

/** Padded tokens of the micro-batches of every optimizer step of the run, epoch 0's largest batch and its plan. */
function runBatches(c: TrainConfig, trainLengths: number[]): { stepsPerEpoch: number; totalSteps: number; perStep: number[][]; maxB: number; maxT: number; largest: number[]; first: number[][] } {
  const planOf = (epoch: number): number[][] => planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length });
  let plan = planOf(0);
  const stepsPerEpoch = Math.ceil(plan.length / c.train.grad_accum);
  const totalSteps = c.train.max_steps ?? c.train.epochs * stepsPerEpoch;
  const padded = (idx: number[]): number => idx.length * Math.max(...idx.map((i) => trainLengths[i]));
  let largest = plan[0];
  for (const b of plan) if (padded(b) > padded(largest)) largest = b;
  // the recipes' micro-batch walk: an epoch's last accumulation may be shorter
  const perStep: number[][] = [];
  let epoch = 0;
  let next = 0;
  for (let s = 0; s < totalSteps; s++) {
    const micro: number[] = [];
    while (micro.length < c.train.grad_accum) {
      if (next >= plan.length) {
        if (micro.length > 0) break;
        epoch++;
        next = 0;
        plan = planOf(epoch);
      }
      micro.push(padded(plan[next++]));
    }
    perStep.push(micro);
  }
  return { stepsPerEpoch, totalSteps, perStep, maxB: largest.length, maxT: Math.max(...largest.map((i) => trainLengths[i])), largest, first: planOf(0) };
}

/** Padded tokens of each batch in the order the eval / cache passes make them. */
function passBatches(lengths: number[], batchSize: number, sorted: boolean): number[] {
  const order = lengths.map((_, i) => i);
  if (sorted) order.sort((x, y) => lengths[x] - lengths[y] || x - y);
  const out: number[] = [];
  for (let s = 0; s < order.length; s += batchSize) {
    const idx = order.slice(s, s + batchSize);
    out.push(idx.length * Math.max(...idx.map((i) => lengths[i])));
  }
  return out;
}

function headsElements(s: HeadsShape): number {
  return headTensorTable(s).reduce((n, r) => n + r.shape.reduce((a, x) => a * x, 1), 0);
}

export async function planRun(c: TrainConfig, o: PlanOptions = {}): Promise<PlanReport> {
  const log = o.log ?? ((): void => {});
  const probe = o.probe ?? true;
  const probeSteps = o.probeSteps ?? 8;
  const probeSeconds = o.probeSeconds ?? 2;
  const t0 = performance.now();
  const rssStart = process.memoryUsage.rss();
  await initBackend(c.model.backend as BackendChoice);
  const modelDir = c.model.path ?? ensureEmbeddedModel();
  const runDir = path.join(c.run.dir, c.run.name);
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
    const microBatches = rb.perStep.flat();
    const paddedTokens = microBatches.reduce((a, x) => a + x, 0);

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

    // --- probe: the recipe's step on the run's largest batch (memory, time) and one short row (time) ---
    const pb = padBatch(train, rb.largest, padId);
    // the timed points: the run's own first micro-batches, in its order
    const first = rb.first.slice(0, probeSteps).map((idx) => padBatch(train, idx, padId));
    const probeTokens = pb.B * pb.T;
    const evalBatches = passBatches(evalSet.map((e) => e.inputIds.length), c.data.batch_size, false);
    const evalTokens = evalBatches.reduce((a, x) => a + x, 0);
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
      const forwardOf = async (b: PaddedBatch): Promise<HeadsBatch> => {
        const hidden = (await bb.forward({ ids: b.ids, batch: b.B, seqLen: b.T, mask: b.attention, logits: 'none' })).hidden; // [B*T, d]
        return { hidden, ids: b.ids, lossMask: b.lossMask, lengths: b.lengths, T: b.T };
      };
      const inputs: HeadsBatch[] = [];
      const cached = cacheWhere !== 'none';
      const stepOf = async (hb: HeadsBatch): Promise<void> => void (await trainer.step([hb], c.train.lr));
      // as the run calls them: with a cache, the forwards in one pass (the fill) and then the steps; without,
      // forward then step per batch (two engines in turn: e.g. onnxruntime's spinning thread pools cost there)
      let train: PlanReportTimePart;
      if (cached) {
        const forward = await timePart('backbone forward (the cache fill)', async () => void (inputs[0] = await forwardOf(pb)), first.map((b, i) => ({ tokens: b.B * b.T, call: async () => void (inputs[i + 1] = await forwardOf(b)) })), probeSeconds, tracker.sample);
        train = await timePart('heads step (hidden states from the cache)', () => stepOf(inputs[0]), inputs.slice(1).map((hb) => ({ tokens: hb.ids.length, call: () => stepOf(hb) })), probeSeconds, tracker.sample);
        parts = [forward, train];
        cacheFillSeconds = costOf(forward, passBatches(allLengths, c.data.batch_size, true));
      } else {
        train = await timePart('backbone forward + heads step', async () => stepOf(inputs[0] = await forwardOf(pb)), first.map((b, i) => ({ tokens: b.B * b.T, call: async () => stepOf(inputs[i + 1] = await forwardOf(b)) })), probeSeconds, tracker.sample);
        parts = [train];
      }
      const ev = await timePart('heads evaluate', async () => void (await trainer.evaluate(inputs[0])), inputs.slice(1).map((hb) => ({ tokens: hb.ids.length, call: async () => void (await trainer.evaluate(hb)) })), probeSeconds, tracker.sample);
      parts.push(ev);
      trainSeconds = costOf(train, microBatches);
      // without a cache an eval batch is a forward + the heads' evaluate: counted at the forward + step rate (an upper bound)
      evalSeconds = evals * costOf(cached ? ev : train, evalBatches);
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
      setupSeconds = (performance.now() - t0) / 1000;
      rssLoaded = process.memoryUsage.rss();
      tracker = peakTracker();
      // the loss input is built per call, as the recipe does per step (the frozen teacher's forward included)
      const stepOnce = (pbatch: PaddedBatch, joint: boolean): void => {
        const lb = medusa2ProbeBatch(c, decoder, pbatch, notes);
        try {
          stepOn(lb.batch, joint);
        } finally {
          lb.free();
        }
      };
      const stepOn = (batch: Medusa2Batch, joint: boolean): void => {
        const r = medusa2LossAndGrads(decoder, backbone!, heads!, batch, { lmLoss: c.loss.lm_loss, headsCoefficient: c.loss.heads_coefficient, decay: c.loss.decay, trainBackbone: joint, dropoutSeed: 1 });
        const clipped = c.train.max_grad_norm === null ? r.grads : clipGradNorm(r.grads, c.train.max_grad_norm).grads;
        const pick = (names: string[]): Map<string, tf.Tensor> => new Map(names.map((n) => [n, clipped.get(n)!]));
        headsOpt.step(pick(headsOpt.names), c.train.lr);
        if (joint) backboneOpt.step(pick(backboneOpt.names), c.train.lr);
        if (clipped !== r.grads) for (const g of clipped.values()) g.dispose();
        for (const g of r.grads.values()) g.dispose();
      };
      const headsWarmup = Math.min(m2.heads_warmup_steps, rb.totalSteps);
      const points = (joint: boolean) => first.map((b) => ({ tokens: b.B * b.T, call: () => stepOnce(b, joint) }));
      const joint = await timePart('joint step (teacher + medusa2LossAndGrads + clip + AdamW)', () => stepOnce(pb, true), points(true), probeSeconds, tracker.sample);
      parts = [joint];
      let warm = joint;
      if (headsWarmup > 0 || evals > 0) {
        warm = await timePart('heads-only step', () => stepOnce(pb, false), points(false), probeSeconds, tracker.sample);
        parts.push(warm);
      }
      trainSeconds = costOf(warm, rb.perStep.slice(0, headsWarmup).flat()) + costOf(joint, rb.perStep.slice(headsWarmup).flat());
      // an eval = the heads' forward on the tuned backbone + the gate's two forwards: about a heads-only step plus as much again
      evalSeconds = evals * 2 * costOf(warm, evalBatches);
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
    const checkpoints = Math.floor(rb.totalSteps / c.checkpoint.every) + (rb.totalSteps % c.checkpoint.every === 0 ? 0 : 1);
    const checkpointSeconds = checkpoints * checkpointWriteSeconds(machine.at, perCheckpoint);
    const totalSeconds = setupSeconds + cacheFillSeconds + trainSeconds + evalSeconds + checkpointSeconds;
    report.time = {
      model: `each part's seconds per call = a + b x padded tokens, fitted over the run's first batches, each timed once after a warm-up on its largest (${parts.map((p) => `${p.part}: ${(p.perCall * 1e3).toFixed(2)} ms + ${(p.perToken * 1e6).toFixed(2)} us/token, ${p.calls} timed calls`).join('; ')}), summed over the run's ${microBatches.length} micro-batches (${paddedTokens} padded tokens over ${rb.totalSteps} steps${cacheWhere !== 'none' ? '; the backbone only for the cache fill' : ''}) + measured setup + ${evals} eval(s) of ${evalTokens} padded tokens + ${checkpoints} checkpoint write(s) (a ${mib(Math.min(perCheckpoint, 64 * MiB))} write + fsync timed in ${machine.at}, scaled to ${mib(perCheckpoint)})`,
      probe: parts, setupSeconds, cacheFillSeconds, trainSeconds, secondsPerStep: trainSeconds / Math.max(rb.totalSteps, 1), evalSeconds, evals, checkpointSeconds, checkpoints, totalSeconds,
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
  addNote(notes, `probe: teacher top-${k} groups with synthetic values (same shapes as the dataset's)`);
  return { batch: { ...base, teacher: { topkIds, topkLogprobs, k } }, free: () => {} };
}

function addNote(notes: string[], note: string): void {
  if (!notes.includes(note)) notes.push(note);
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
    L.push(`  time: about ${secs(r.time.totalSeconds)} = setup ${secs(r.time.setupSeconds)}${r.time.cacheFillSeconds > 0 ? ` + cache fill ${secs(r.time.cacheFillSeconds)}` : ''} + ${r.data.totalSteps} steps x ${r.time.secondsPerStep.toFixed(3)} s + ${r.time.evals} eval(s) ${secs(r.time.evalSeconds)} + ${r.time.checkpoints} checkpoint(s) ${secs(r.time.checkpointSeconds)}`);
    L.push(`    model: ${r.time.model}`);
  }
  for (const n of r.notes) L.push(`  note: ${n}`);
  L.push(r.fits ? '  fits this machine' : `  DOES NOT FIT:\n${r.problems.map((p) => `    - ${p}`).join('\n')}`);
  return L.join('\n');
}
