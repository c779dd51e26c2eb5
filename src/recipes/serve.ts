/**
 * `medusa-train serve`: load a model folder (or the embedded tiny model) and its tokenizer, and start
 * the OpenAI-compatible server over it (src/serve/server.ts). With `--medusa`, requests are decoded
 * one at a time with Medusa heads (src/serve/medusa-engine.ts). The returned handle's `close` stops
 * the server and frees the weights.
 */
import * as path from 'node:path';
import { currentBackend } from '../backend.js';
import { loadDecoder } from '../model/load.js';
import { disposeWeights } from '../model/weights.js';
import { ensureEmbeddedModel } from '../model/tiny.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { chooseBackbone } from '../engines/decoder-engine.js';
import { startBackboneGeneration } from '../engines/backbone-generate.js';
import { startServer, type ServerHandle } from '../serve/server.js';
import type { Engine } from '../serve/scheduler.js';
import { medusaEngine } from '../serve/medusa-engine.js';
import { disposeHeads, type MedusaHeads } from '../model/heads.js';
import { headsOnTfjs, openHeadsSource } from '../eval/heads-source.js';
import { TYPICAL_DEFAULTS } from '../eval/acceptance.js';
import { chooseProposer, type HeadsProposer } from '../engines/heads-proposer.js';

export interface ServeArgs {
  model?: string;
  host: string;
  port: number;
  /** Default: the model folder's name. */
  servedModelName?: string;
  maxBatch: number;
  maxQueue: number;
  maxNewTokensLimit: number;
  /** Who runs the model: auto = onnxruntime when it loads, else tfjs. */
  backboneEngine?: 'auto' | 'tfjs' | 'onnx';
  /**
   * A training run, checkpoint, or medusa / medusa-v2 / vllm export folder: decode every request with
   * its Medusa heads and tree, one request at a time (maxBatch does not apply), greedy at temperature
   * 0 and typical acceptance above.
   */
  medusa?: string;
  /** Typical acceptance eps / delta with --medusa (defaults 0.09 / 0.3). */
  posteriorThreshold?: number;
  posteriorAlpha?: number;
  log: (line: string) => void;
}

export interface ServeHandle extends ServerHandle {
  modelName: string;
  modelDir: string;
}

export async function runServe(a: ServeArgs): Promise<ServeHandle> {
  const dir = a.model ?? ensureEmbeddedModel();
  if (!a.model) a.log(`model: the embedded tiny model (random weights) at ${dir}`);
  const t0 = performance.now();
  const { decoder, report, folder } = loadDecoder(dir);
  let heads: MedusaHeads | null = null;
  let proposer: HeadsProposer | null = null;
  const freeHeads = (): void => {
    proposer?.dispose();
    proposer = null;
    if (heads) disposeHeads(heads);
    heads = null;
  };
  try {
    if (report.unexpected.length > 0) a.log(`warning: ${report.unexpected.length} tensor(s) in ${dir} are not used: ${report.unexpected.slice(0, 5).join(', ')}`);
    const tokenizer = await loadTokenizer(dir);
    const modelName = a.servedModelName ?? path.basename(path.resolve(dir));
    a.log(`loaded ${modelName} (${decoder.config.architecture}, context ${decoder.config.maxPositionEmbeddings}) on ${currentBackend().name} in ${(performance.now() - t0).toFixed(0)} ms`);
    const backbone = await chooseBackbone(a.backboneEngine ?? 'auto', decoder, a.log);
    a.log(`backbone engine: ${backbone.kind}`);
    let server: ServerHandle;
    try {
      let engine: Engine = (_model, prompts, o) => startBackboneGeneration(backbone, prompts, o);
      let maxBatch = a.maxBatch;
      let medusa: Record<string, unknown> | undefined;
      if (a.medusa !== undefined) {
        const src = openHeadsSource(a.medusa, { dir, configHash: folder.configHash, hiddenSize: decoder.config.hiddenSize, vocabSize: decoder.config.vocabSize });
        for (const n of src.notes) a.log(n);
        heads = headsOnTfjs(src, decoder);
        const posteriorThreshold = a.posteriorThreshold ?? TYPICAL_DEFAULTS.posteriorThreshold;
        const posteriorAlpha = a.posteriorAlpha ?? TYPICAL_DEFAULTS.posteriorAlpha;
        // The heads run where the backbone runs: onnxruntime with the onnx backbone (tfjs if it cannot load), else tfjs.
        proposer = await chooseProposer(backbone.kind === 'onnx' ? 'auto' : 'tfjs', heads, { log: a.log });
        engine = medusaEngine({ backbone, proposer, choices: src.choices, topk: src.topk, posteriorThreshold, posteriorAlpha, log: a.log });
        a.log('with --medusa, requests are decoded one at a time (batch 1; --max-batch does not apply); the others wait in the queue (--max-queue)');
        maxBatch = 1;
        medusa = { heads: src.describe, num_heads: src.shape.numHeads, tree_nodes: src.choices.length, posterior_threshold: posteriorThreshold, posterior_alpha: posteriorAlpha };
        a.log(`medusa: ${src.describe} (heads on ${proposer.kind}), ${src.choices.length}-node tree${src.choicesFile ? ` from ${src.choicesFile}` : ' (chain)'}; greedy at temperature 0, typical acceptance (eps ${posteriorThreshold}, delta ${posteriorAlpha}) above`);
      }
      server = await startServer({
        decoder, tokenizer, modelName, host: a.host, port: a.port,
        maxBatch, maxQueue: a.maxQueue, maxNewTokensLimit: a.maxNewTokensLimit, log: a.log,
        engine, medusa,
      });
    } catch (e) {
      backbone.dispose();
      throw e;
    }
    return {
      ...server,
      modelName,
      modelDir: dir,
      close: async (o) => {
        await server.close(o);
        backbone.dispose();
        freeHeads();
        disposeWeights(decoder.weights); // idempotent
      },
    };
  } catch (e) {
    freeHeads();
    disposeWeights(decoder.weights);
    throw e;
  }
}
