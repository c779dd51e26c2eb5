/**
 * `medusa-train train` with `recipe: medusa2`: the heads and the backbone train together (MEDUSA-2).
 *
 * Setup: run folder, model + tokenizer (the loaded decoder stays the original, frozen model: the
 * trainable backbone adds LoRA adapters or tuned copies of the last layers beside it), datasets
 * (refused if distilled from another model; with `loss.lm_loss: kd` + `loss.teacher: topk` every
 * dataset must hold the teacher's top-k columns), eval split, heads (fresh, or from a MEDUSA-1 source
 * `medusa2.init_heads`, shape-checked), the trainable backbone, two AdamW optimizers (heads at
 * train.lr x heads_lr_multiplier, backbone at train.lr; the backbone's does not step during the heads
 * warmup, as torch skips parameters without a gradient). Run: micro-batches from the per-epoch plan
 * (a pure function of (seed, epoch)); the combined loss L_LM + lambda(t) * sum_k decay^k L_k with
 * exact gradients; global-norm clipping over every trainable tensor; AdamW; metrics JSONL; eval + the
 * base-quality gate and atomic checkpoints on their cadence. Clean up: final checkpoint, summary.json.
 * A NaN/Inf loss stops the run and keeps the last good checkpoint; `shouldStop` (SIGINT/SIGTERM)
 * writes a checkpoint and returns; a failing gate with `gate.action: fail` ends the run with E_TRAIN
 * after the checkpoint and summary.json are written.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { fail } from '../errors.js';
import { initBackend, currentBackend, type BackendChoice } from '../backend.js';
import { backboneSpecOf, configHash, saveResolvedConfig, type Medusa2Config, type TrainConfig } from '../config.js';
import { loadDecoder } from '../model/load.js';
import { decoderForward, type Decoder } from '../model/decoder.js';
import { disposeWeights } from '../model/weights.js';
import { disposeHeads, exportHeads, importHeads, initHeads, type HeadsShape, type MedusaHeads } from '../model/heads.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { iterateRecords, openDataset } from '../data/dataset.js';
import { countValid, loadExamples, padBatch, planEpoch, splitEval, type PaddedBatch, type TrainExample } from '../data/batches.js';
import { lrAt, warmupSteps } from '../train/schedule.js';
import { AdamW, adamwParamGroups } from '../train/optimizer.js';
import { clipGradNorm, globalGradNorm } from '../train/clip.js';
import { loadCheckpoint, saveCheckpoint } from '../train/checkpoint.js';
import { addStats, checkDatasetsMatchModel, checkResumeHash, emptyStats, prepareRunDir, summarise, truncateMetrics, type HeadMetrics } from '../train/run-common.js';
import { createTrainableBackbone, headsParams, type TrainableBackbone, type TrainableParam } from '../train/trainable-backbone.js';
import { headsSchedule, medusa2LossAndGrads, type Medusa2Batch } from '../train/medusa2-loss.js';
import { gateMetrics, gateVerdict, type GateMetrics, type GateVerdict } from '../train/gate.js';
import { openHeadsSource } from '../eval/heads-source.js';

/** The base-quality gate's figures at a step and its verdict against medusa2.gate. */
export interface GateResult extends GateMetrics {
  step: number;
  status: GateVerdict['status'];
  crossed: GateVerdict['crossed'];
  message: string;
}

export interface Medusa2Args {
  config: TrainConfig;
  commandLine: string[];
  resume: boolean;
  log: (line: string) => void;
  progress?: { start(total: number, done: number): void; update(done: number, tokens: number): void; stop(): void };
  shouldStop?: () => boolean;
}

export interface Medusa2Metrics {
  /** The combined loss L_LM + lambda * sum_k decay^k L_k (train; NaN for eval, whose LM side is the gate's). */
  loss: number;
  /** The LM term (0 during the heads warmup; NaN for eval). */
  lmLoss: number;
  /** The heads' weighted term sum_k decay^k L_k (lambda not applied). */
  headsLoss: number;
  heads: HeadMetrics[];
}

export interface Medusa2Summary {
  runDir: string;
  recipe: 'medusa2';
  steps: number;
  totalSteps: number;
  headsWarmupSteps: number;
  stopped: boolean;
  trainTokens: number;
  seconds: number;
  tokensPerSecond: number;
  backboneMode: 'lora' | 'full';
  /** Trainable backbone parameters (elements) and heads parameters. */
  trainableBackbone: number;
  trainableHeads: number;
  finalTrain: Medusa2Metrics | null;
  finalEval: Medusa2Metrics | null;
  /** The last gate check (the end of the run decides; intermediate evals only report). */
  gate: GateResult | null;
  checkpoint: string | null;
  backend: string;
}

/** Teacher top-k groups of one example, aligned with its loss mask (docs/DATASET.md): group j = j-th masked token. */
interface TeacherRows {
  ids: Int32Array;
  logprobs: Float32Array;
  k: number;
}

/**
 * The teacher top-k columns of every example (by TrainExample.key), cut to the masked tokens that
 * survive truncation to `maxSeqLen`. Datasets with different k are cut to the smallest k (each group
 * is sorted by probability, so its first k entries are the top k).
 */
function loadTeacherTopk(dirs: string[], maxSeqLen: number): { rows: Map<string, TeacherRows>; k: number } {
  const opened = dirs.map((d) => openDataset(d));
  const missing = opened.filter((ds) => ds.topk === 0);
  if (missing.length > 0) {
    fail('E_CONFIG', `loss.lm_loss: kd with loss.teacher: topk needs the teacher's top-k log-probabilities, but dataset ${missing.map((d) => d.dir).join(', ')} has none (topk 0). Distill it again with \`medusa-train distill --teacher-topk 20 ...\`, or set loss.teacher: frozen (runs the original model during training) or loss.lm_loss: ce.`);
  }
  const k = Math.min(...opened.map((ds) => ds.topk));
  const rows = new Map<string, TeacherRows>();
  opened.forEach((ds, di) => {
    for (const rec of iterateRecords(ds)) {
      const len = Math.min(rec.inputIds.length, maxSeqLen);
      let masked = 0;
      for (let p = 0; p < len; p++) if (rec.lossMask[p] === 1) masked++;
      const ids = new Int32Array(masked * k);
      const logprobs = new Float32Array(masked * k);
      const src = ds.topk;
      for (let j = 0; j < masked; j++) {
        ids.set(rec.teacherTopkIds!.subarray(j * src, j * src + k), j * k);
        logprobs.set(rec.teacherTopkLogprobs!.subarray(j * src, j * src + k), j * k);
      }
      rows.set(`${di}:${rec.id}`, { ids, logprobs, k });
    }
  });
  return { rows, k };
}

/**
 * The teacher's top-k of a padded batch, [B*T*k]: the group at flat position b*T + p is the teacher's
 * distribution that produced token p (computed from ids[b, ..p-1]), filled where token p is a masked
 * (generated) token; elsewhere ids 0 and log-probabilities -Infinity (never read: the LM loss runs
 * only at masked tokens).
 */
function teacherForBatch(pb: PaddedBatch, examples: TrainExample[], teacher: Map<string, TeacherRows>, k: number): { topkIds: Int32Array; topkLogprobs: Float32Array; k: number } {
  const topkIds = new Int32Array(pb.B * pb.T * k);
  const topkLogprobs = new Float32Array(pb.B * pb.T * k).fill(-Infinity);
  pb.exampleIndexes.forEach((ex, b) => {
    const e = examples[ex];
    const rows = teacher.get(e.key);
    if (!rows) fail('E_INTERNAL', `no teacher top-k for example ${e.key}`);
    let j = 0;
    for (let p = 0; p < e.inputIds.length; p++) {
      if (e.lossMask[p] !== 1) continue;
      const at = (b * pb.T + p) * k;
      topkIds.set(rows.ids.subarray(j * k, (j + 1) * k), at);
      topkLogprobs.set(rows.logprobs.subarray(j * k, (j + 1) * k), at);
      j++;
    }
  });
  return { topkIds, topkLogprobs, k };
}

function elements(params: TrainableParam[]): number {
  return params.reduce((n, p) => n + p.variable.size, 0);
}

export async function runMedusa2(a: Medusa2Args): Promise<Medusa2Summary> {
  const c = a.config;
  if (c.recipe !== 'medusa2') fail('E_CONFIG', `recipe: ${String(c.recipe)} is not handled by the MEDUSA-2 trainer`);
  if (c.model.engine === 'onnx') fail('E_CONFIG', 'model.engine: onnx cannot train the backbone (MEDUSA-2 needs tfjs autograd); set model.engine: tfjs or auto.');
  const m2 = c.medusa2;
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
    const useTopk = c.loss.lm_loss === 'kd' && c.loss.teacher === 'topk';
    const teacher = useTopk ? loadTeacherTopk(data.datasets.map((d) => d.dir), c.data.max_seq_len) : null;
    const { train, eval: evalSet } = splitEval(data.examples, { fraction: c.data.eval_fraction, max: c.data.eval_max, seed: c.run.seed });
    if (train.length === 0) fail('E_CONFIG', `data.train: no training conversations left (${data.examples.length} loaded, ${evalSet.length} held out for eval, ${data.droppedNoLabels} without labels).`);
    a.log(`data: ${train.length} train + ${evalSet.length} eval conversations (${data.truncated} truncated to ${c.data.max_seq_len} tokens, ${data.droppedNoLabels} dropped without labels)${teacher ? `, teacher top-${teacher.k}` : ''}`);
    const padId = decoder.config.padTokenId ?? tokenizer.padId ?? 0;
    const K = c.heads.num_heads;
    const trainLengths = train.map((e) => e.inputIds.length);
    const planOf = (epoch: number): number[][] => planEpoch(trainLengths, { batchSize: c.data.batch_size, seed: c.run.seed, epoch, shuffle: c.data.shuffle, groupByLength: c.data.group_by_length });
    const stepsPerEpoch = Math.ceil(planOf(0).length / c.train.grad_accum);
    const totalSteps = c.train.max_steps ?? c.train.epochs * stepsPerEpoch;
    const warmup = warmupSteps(totalSteps, c.train.warmup_ratio);
    const headsWarmup = Math.min(m2.heads_warmup_steps, totalSteps);
    a.log(`training: ${totalSteps} steps (${headsWarmup} heads-only, then joint; ${stepsPerEpoch} per epoch, batch ${c.data.batch_size} x accumulation ${c.train.grad_accum}), ${K} heads x ${c.heads.num_layers} layer(s), backbone ${m2.backbone.mode}, lm loss ${c.loss.lm_loss}${c.loss.lm_loss === 'kd' ? ` (teacher ${c.loss.teacher})` : ''}, heads schedule ${c.loss.heads_schedule}, backend ${currentBackend().detail}`);

    // --- heads: fresh, or from a MEDUSA-1 run / checkpoint / export ---
    const d = decoder.config.hiddenSize;
    const V = decoder.config.vocabSize;
    const shape: HeadsShape = { numHeads: K, numLayers: c.heads.num_layers, hiddenSize: d, vocabSize: V, lmHead: c.heads.lm_head };
    let heads: MedusaHeads | undefined;
    tf.tidy(() => {
      heads = initHeads(shape, decoder.weights.lmHead, c.run.seed);
    });
    cleanup.push(() => disposeHeads(heads!));
    if (m2.init_heads !== null && !resumeFrom) {
      const src = openHeadsSource(m2.init_heads, { dir: modelDir, configHash: folder.configHash, hiddenSize: d, vocabSize: V });
      const s = src.shape;
      if (s.numHeads !== K || s.numLayers !== c.heads.num_layers || s.lmHead !== c.heads.lm_head) {
        fail('E_CONFIG', `medusa2.init_heads: ${src.describe} holds ${s.numHeads} heads x ${s.numLayers} layer(s), lm_head ${s.lmHead}, but the config asks for ${K} x ${c.heads.num_layers}, lm_head ${c.heads.lm_head}; set heads.num_heads / heads.num_layers / heads.lm_head to match, or start from fresh heads (medusa2.init_heads: null).`);
      }
      importHeads(heads!, src.heads, src.describe);
      a.log(`heads: from ${src.describe} (matched by ${src.baseCheck})`);
    }

    // --- the trainable backbone and the optimizers ---
    const backbone: TrainableBackbone = createTrainableBackbone(decoder, backboneSpecOf(c), c.run.seed);
    cleanup.push(() => backbone.dispose());
    // Two optimizers with torch's param-group settings (heads lr x multiplier; no decay on biases and norms): the
    // backbone's does not step during the heads warmup, as torch skips parameters whose .grad is None.
    const headParams = headsParams(heads!);
    const groups = { weightDecay: c.train.weight_decay, headsLrMultiplier: m2.heads_lr_multiplier };
    const adam = { betas: c.train.betas as [number, number], eps: c.train.eps };
    const headsOpt = new AdamW(adamwParamGroups(headParams, groups), adam);
    cleanup.push(() => headsOpt.dispose());
    const backboneOpt = new AdamW(adamwParamGroups(backbone.params, groups), adam);
    cleanup.push(() => backboneOpt.dispose());
    const trainableBackbone = elements(backbone.params);
    const trainableHeads = elements(headParams);
    a.log(`trainable: backbone ${trainableBackbone} (${m2.backbone.mode}, ${backbone.params.length} tensors), heads ${trainableHeads}; heads lr x ${m2.heads_lr_multiplier}`);

    let step = 0;
    let epoch = 0;
    let nextBatch = 0;
    let trainTokens = 0;
    if (resumeFrom) {
      const ck = loadCheckpoint(resumeFrom);
      checkResumeHash(ck.state, hash, runDir);
      if (ck.state['recipe'] !== 'medusa2' || !ck.backbone) fail('E_CONFIG', `${resumeFrom} is not a MEDUSA-2 checkpoint (no backbone.safetensors); start a new run.name.`);
      importHeads(heads!, ck.heads, resumeFrom);
      backbone.importTensors(ck.backbone, resumeFrom);
      const split = splitOptimizer(ck.optimizer, headsOpt.names);
      headsOpt.importState({ step: ck.state['heads_optimizer_step'] as number, tensors: split.heads });
      backboneOpt.importState({ step: ck.state['backbone_optimizer_step'] as number, tensors: split.rest });
      step = ck.state['step'] as number;
      epoch = ck.state['epoch'] as number;
      nextBatch = ck.state['next_batch'] as number;
      trainTokens = (ck.state['train_tokens'] as number) ?? 0;
      truncateMetrics(path.join(runDir, 'metrics.jsonl'), step);
      a.log(`resumed from ${resumeFrom} at step ${step}`);
    } else {
      fs.rmSync(path.join(runDir, 'metrics.jsonl'), { force: true });
    }

    /** The loss's input for a padded batch of `examples` (teacher top-k or the frozen original's logits). */
    const lossBatch = (pb: PaddedBatch, examples: TrainExample[]): Medusa2Batch => {
      const base: Medusa2Batch = { ids: pb.ids, B: pb.B, T: pb.T, attention: pb.attention, lossMask: pb.lossMask, lengths: pb.lengths };
      if (c.loss.lm_loss !== 'kd') return base;
      if (teacher) return { ...base, teacher: teacherForBatch(pb, examples, teacher.rows, teacher.k) };
      const r = decoderForward(decoder, { ids: pb.ids, batch: pb.B, seqLen: pb.T, mask: pb.attention, logits: 'all' }); // the original model
      r.hidden.dispose();
      return { ...base, teacher: { logits: r.logits! } }; // [B, T, V]
    };
    const freeBatch = (b: Medusa2Batch): void => {
      if (b.teacher && 'logits' in b.teacher) b.teacher.logits.dispose();
    };
    // lambda(t): the heads-only warmup uses lambda_0 as it is (a schedule starting at 0 would leave the heads nothing to
    // learn from); the schedule then runs over the joint steps: t - warmup of total - warmup.
    const coefAt = (s: number): number => s < headsWarmup ? c.loss.heads_coefficient
      : c.loss.heads_coefficient * headsSchedule(c.loss.heads_schedule, s - headsWarmup, Math.max(totalSteps - headsWarmup, 1), c.loss.heads_schedule_fraction);

    // --- evaluation over the held-out split: the heads on the tuned backbone (no dropout, no backbone gradient);
    // the LM side (KL, agreement, perplexity against the original) is the gate's ---
    const evaluate = (s: number): Medusa2Metrics | null => {
      if (evalSet.length === 0) return null;
      const st = emptyStats(K);
      for (let i = 0; i < evalSet.length; i += c.data.batch_size) {
        const idx = Array.from({ length: Math.min(c.data.batch_size, evalSet.length - i) }, (_, j) => i + j);
        const pb = padBatch(evalSet, idx, padId);
        // trainBackbone false: the tuned backbone's forward runs outside the tape with hook(null); only the heads' (dropped) gradients
        const r = medusa2LossAndGrads(decoder, backbone, heads!, { ids: pb.ids, B: pb.B, T: pb.T, attention: pb.attention, lossMask: pb.lossMask, lengths: pb.lengths }, { lmLoss: c.loss.lm_loss, headsCoefficient: coefAt(s), decay: c.loss.decay, trainBackbone: false, dropoutSeed: 0 });
        for (const g of r.grads.values()) g.dispose();
        addStats(st, headsStats(r.heads));
      }
      return metricsOf(st, NaN, c.loss.decay, coefAt(s));
    };
    const gateCheck = async (s: number): Promise<GateResult | null> => {
      if (evalSet.length === 0) return null;
      const batches = function* (): Generator<PaddedBatch> {
        for (let i = 0; i < evalSet.length; i += c.data.batch_size) {
          yield padBatch(evalSet, Array.from({ length: Math.min(c.data.batch_size, evalSet.length - i) }, (_, j) => i + j), padId);
        }
      };
      // The hook may build tensors (full mode concatenates the trained pieces): everything of the check is released at its end.
      tf.engine().startScope();
      try {
        const g = await gateMetrics(decoder, { decoder, hook: backbone.hook(null) }, batches(), { maxPositions: m2.gate.max_positions });
        const v = gateVerdict(g, { maxKl: m2.gate.max_kl, minAgreement: m2.gate.min_agreement, maxPplRatio: m2.gate.max_ppl_ratio, action: m2.gate.action });
        return { step: s, ...g, status: v.status, crossed: v.crossed, message: v.message };
      } finally {
        tf.engine().endScope();
      }
    };

    // --- run ---
    const metricsFile = path.join(runDir, 'metrics.jsonl');
    const writeMetrics = (obj: Record<string, unknown>): void => fs.appendFileSync(metricsFile, `${JSON.stringify(obj)}\n`);
    let plan = planOf(epoch);
    let lastCheckpoint: string | null = resumeFrom;
    let finalTrain: Medusa2Metrics | null = null;
    let finalEval: Medusa2Metrics | null = null;
    let gate: GateResult | null = null;
    let stopped = false;
    const loopStart = performance.now();
    const tokensAtStart = trainTokens;
    const checkpoint = (): void => {
      const ho = headsOpt.exportState();
      const bo = backboneOpt.exportState();
      lastCheckpoint = saveCheckpoint(runDir, {
        step,
        heads: exportHeads(heads!),
        backbone: backbone.exportTensors(),
        optimizer: { ...ho.tensors, ...bo.tensors },
        state: {
          step, epoch, next_batch: nextBatch, recipe: 'medusa2', heads_optimizer_step: ho.step, backbone_optimizer_step: bo.step, optimizer_layout: 'medusa2',
          engine: 'tfjs', config_hash: hash, base_model_path: path.resolve(modelDir), base_model_config_sha256: folder.configHash, train_tokens: trainTokens,
          heads_shape: { num_heads: K, num_layers: c.heads.num_layers, lm_head: c.heads.lm_head, hidden_size: d, vocab_size: V },
          backbone_mode: m2.backbone.mode,
          ...(m2.backbone.mode === 'lora' ? { lora: { rank: m2.backbone.lora.rank, alpha: m2.backbone.lora.alpha, dropout: m2.backbone.lora.dropout, targets: [...m2.backbone.lora.targets] } } : { full_last_layers: m2.backbone.full_last_layers }),
          train_embeddings: m2.backbone.train_embeddings,
          created: new Date().toISOString(),
        },
      }, { keep: c.checkpoint.keep });
    };
    const writeSummary = (): Medusa2Summary => {
      const summary: Medusa2Summary = {
        runDir, recipe: 'medusa2', steps: step, totalSteps, headsWarmupSteps: headsWarmup, stopped, trainTokens, seconds: (performance.now() - t0) / 1000,
        tokensPerSecond: (trainTokens - tokensAtStart) / Math.max((performance.now() - loopStart) / 1000, 1e-9),
        backboneMode: m2.backbone.mode, trainableBackbone, trainableHeads, finalTrain, finalEval, gate, checkpoint: lastCheckpoint,
        backend: `tfjs autograd (backend ${currentBackend().detail})`,
      };
      fs.writeFileSync(path.join(runDir, 'summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
      return summary;
    };
    /**
     * After a gate check. Intermediate evals only report (a warning line when a threshold is crossed); at the
     * end, action warn logs a warning and action fail ends the run with E_TRAIN after the checkpoint and
     * summary.json are written.
     */
    const judgeGate = (g: GateResult | null, final: boolean): void => {
      if (!g || g.status === 'pass') return;
      if (!final || g.status === 'warn') {
        a.log(`warning: base-quality gate at step ${g.step}: ${g.message}`);
        return;
      }
      if (lastCheckpoint === null || path.basename(lastCheckpoint) !== `step-${String(step).padStart(8, '0')}`) checkpoint();
      writeSummary();
      fail('E_TRAIN', `the base-quality gate failed at the end of training (step ${g.step}): ${g.message}. The tuned backbone drifted too far from the original model; figures in ${path.join(runDir, 'summary.json')}, checkpoint ${lastCheckpoint}. Lower train.lr, use loss.lm_loss: kd, or relax medusa2.gate (or set medusa2.gate.action: warn).`);
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
            plan = planOf(epoch);
          }
          micro.push(plan[nextBatch++]);
        }
        const padded = micro.map((idx) => padBatch(train, idx, padId));
        for (const pb of padded) trainTokens += pb.lengths.reduce((x, y) => x + y, 0);
        const lr = lrAt(step, { lr: c.train.lr, kind: c.train.schedule, warmupSteps: warmup, totalSteps });
        const joint = step >= headsWarmup;
        const coef = coefAt(step);
        // per-step normalisation: each micro-batch's loss is a mean over the whole step's positions
        const norm = { lm: padded.reduce((x, pb) => x + lmPositions(pb), 0), heads: padded.map((pb) => countValid(pb, K)).reduce((x, v) => x.map((n, k) => n + v[k]), new Array<number>(K).fill(0)) };
        const st = emptyStats(K);
        let lmSum = 0;
        let lmCount = 0;
        let grads: Map<string, tf.Tensor> | null = null;
        try {
          for (const [m, pb] of padded.entries()) {
            const b = lossBatch(pb, train);
            try {
              const r = medusa2LossAndGrads(decoder, backbone, heads!, b, { lmLoss: c.loss.lm_loss, headsCoefficient: coef, decay: c.loss.decay, trainBackbone: joint, dropoutSeed: streamSeedOf(c.run.seed, step, m), norm });
              lmSum += r.lmLoss * r.lmValid;
              lmCount += r.lmValid;
              addStats(st, headsStats(r.heads));
              if (!grads) grads = r.grads;
              else {
                for (const [name, g] of r.grads) {
                  const prev = grads.get(name)!;
                  grads.set(name, tf.add(prev, g));
                  prev.dispose();
                  g.dispose();
                }
              }
            } finally {
              freeBatch(b);
            }
          }
          const metrics = metricsOf(st, lmCount > 0 ? lmSum / lmCount : 0, c.loss.decay, coef);
          const gradNorm = globalGradNorm(grads!);
          if (!Number.isFinite(metrics.loss) || !Number.isFinite(gradNorm)) {
            fail('E_TRAIN', `the loss became ${metrics.loss} (gradient norm ${gradNorm}) at step ${step + 1}. The run stopped without applying it; its last good checkpoint is ${lastCheckpoint ?? '(none yet)'}. Lower train.lr, set train.max_grad_norm, or check the data.`);
          }
          // clipping over every trainable tensor of this step (the backbone's only when it trains)
          let applied = grads!;
          if (c.train.max_grad_norm !== null) {
            applied = clipGradNorm(grads!, c.train.max_grad_norm).grads;
          }
          try {
            headsOpt.step(pick(applied, headsOpt.names), lr); // x heads_lr_multiplier through the group's lrScale
            if (joint) backboneOpt.step(pick(applied, backboneOpt.names), lr);
          } finally {
            if (applied !== grads) for (const g of applied.values()) g.dispose();
          }
          step++;
          finalTrain = metrics;
          const secs = (performance.now() - loopStart) / 1000;
          if (step % c.log.every === 0 || step === totalSteps) {
            writeMetrics({
              type: 'train', step, epoch, phase: joint ? 'joint' : 'heads_warmup', loss: metrics.loss, lm_loss: metrics.lmLoss, heads_loss: metrics.headsLoss, heads: metrics.heads,
              lambda: coef, lr, heads_lr: lr * m2.heads_lr_multiplier, grad_norm: gradNorm, tokens: trainTokens, tokens_per_s: (trainTokens - tokensAtStart) / Math.max(secs, 1e-9),
            });
          }
        } finally {
          if (grads) for (const g of (grads as Map<string, tf.Tensor>).values()) g.dispose();
        }
        const stopNow = a.shouldStop?.() ?? false;
        if (step % c.checkpoint.every === 0 || step === totalSteps || stopNow) checkpoint();
        if (step % c.eval.every === 0 || step === totalSteps) {
          finalEval = evaluate(step);
          gate = await gateCheck(step);
          if (finalEval) writeMetrics({ type: 'eval', step, heads_loss: finalEval.headsLoss, heads: finalEval.heads });
          if (gate) writeMetrics({ type: 'gate', ...gate });
          judgeGate(gate, step === totalSteps);
        }
        a.progress?.update(step, trainTokens - tokensAtStart);
        if (stopNow) {
          stopped = true;
          break;
        }
      }
    } finally {
      a.progress?.stop();
    }
    if (!finalEval && !stopped) {
      // e.g. resuming a run that had already finished
      finalEval = evaluate(step);
      gate = await gateCheck(step);
      judgeGate(gate, true);
    }
    return writeSummary();
  } finally {
    for (const f of cleanup.reverse()) f();
  }
}

/** Positions the LM term is computed at: t with t+1 a masked (generated) token. */
function lmPositions(pb: PaddedBatch): number {
  let n = 0;
  for (let b = 0; b < pb.B; b++) for (let t = 1; t < pb.lengths[b]; t++) if (pb.lossMask[b * pb.T + t] === 1) n++;
  return n;
}

/** A loss result's per-head figures as summable statistics (CE sums, counts, top-k counts). */
function headsStats(h: { loss: number; valid: number; correct: number[] }[]): { ceSum: number[]; valid: number[]; correct: number[][] } {
  return { ceSum: h.map((x) => (x.valid > 0 ? x.loss * x.valid : 0)), valid: h.map((x) => x.valid), correct: h.map((x) => x.correct) };
}

function metricsOf(st: ReturnType<typeof emptyStats>, lmLoss: number, decay: number, coef: number): Medusa2Metrics {
  const h = summarise(st, decay, 1);
  return { loss: lmLoss + coef * h.loss, lmLoss, headsLoss: h.loss, heads: h.heads };
}

/** A dropout seed per (run seed, step, micro-batch): a resumed run draws the same masks. */
function streamSeedOf(seed: number, step: number, micro: number): number {
  return (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) + Math.imul(step + 1, 0xc2b2ae35) + micro * 0x27d4eb2f) >>> 0;
}

function pick(grads: Map<string, tf.Tensor>, names: string[]): Map<string, tf.Tensor> {
  const out = new Map<string, tf.Tensor>();
  for (const n of names) {
    const g = grads.get(n);
    if (!g) fail('E_INTERNAL', `no gradient for ${n}`);
    out.set(n, g);
  }
  return out;
}

/** The checkpoint's optimizer tensors split into the heads' (exp_avg.<head name>) and the backbone's. */
function splitOptimizer(t: Record<string, { shape: number[]; data: Float32Array }>, headNames: string[]): { heads: typeof t; rest: typeof t } {
  const mine = new Set(headNames.flatMap((n) => [`exp_avg.${n}`, `exp_avg_sq.${n}`]));
  const heads: typeof t = {};
  const rest: typeof t = {};
  for (const [k, v] of Object.entries(t)) (mine.has(k) ? heads : rest)[k] = v;
  return { heads, rest };
}

export function formatMedusa2Summary(s: Medusa2Summary): string {
  const lines = [`${s.stopped ? 'stopped (rerun with --resume to continue)' : 'done'}: ${s.runDir}, step ${s.steps}/${s.totalSteps} (MEDUSA-2, backbone ${s.backboneMode}), ${s.trainTokens} tokens, ${s.tokensPerSecond.toFixed(0)} tok/s on ${s.backend}`];
  const show = (label: string, m: Medusa2Metrics | null): void => {
    if (!m) return;
    lines.push(Number.isNaN(m.lmLoss) ? `${label} heads loss ${m.headsLoss.toFixed(4)}` : `${label} loss ${m.loss.toFixed(4)} (lm ${m.lmLoss.toFixed(4)}, heads ${m.headsLoss.toFixed(4)})`);
    m.heads.forEach((h, k) => lines.push(`  head ${k}: loss ${h.loss.toFixed(4)}  top-1 ${(100 * h.acc[0]).toFixed(1)}%  top-5 ${(100 * h.acc[4]).toFixed(1)}%  (${h.valid} positions)`));
  };
  show('train (last step)', s.finalTrain);
  show('eval', s.finalEval);
  if (s.gate) {
    const g = s.gate;
    lines.push(`gate (step ${g.step}, ${g.positions} positions): ${g.status}: mean KL ${g.meanKl.toExponential(3)} nats, greedy agreement ${(100 * g.agreement).toFixed(1)}%, perplexity ${g.pplTuned.toFixed(3)} vs ${g.pplOriginal.toFixed(3)} (ratio ${g.pplRatio.toFixed(4)})${g.status === 'pass' ? '' : ` — ${g.message}`}`);
  }
  if (s.checkpoint) lines.push(`checkpoint: ${s.checkpoint}`);
  return lines.join('\n');
}
