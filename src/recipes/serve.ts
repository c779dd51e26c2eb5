/**
 * `medusa-train serve`: load a model folder (or the embedded tiny model) and its tokenizer, and start
 * the OpenAI-compatible server over it (src/serve/server.ts). The returned handle's `close` stops
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
  const { decoder, report } = loadDecoder(dir);
  try {
    if (report.unexpected.length > 0) a.log(`warning: ${report.unexpected.length} tensor(s) in ${dir} are not used: ${report.unexpected.slice(0, 5).join(', ')}`);
    const tokenizer = await loadTokenizer(dir);
    const modelName = a.servedModelName ?? path.basename(path.resolve(dir));
    a.log(`loaded ${modelName} (${decoder.config.architecture}, context ${decoder.config.maxPositionEmbeddings}) on ${currentBackend().name} in ${(performance.now() - t0).toFixed(0)} ms`);
    const backbone = await chooseBackbone(a.backboneEngine ?? 'auto', decoder, a.log);
    a.log(`backbone engine: ${backbone.kind}`);
    let server: ServerHandle;
    try {
      server = await startServer({
        decoder, tokenizer, modelName, host: a.host, port: a.port,
        maxBatch: a.maxBatch, maxQueue: a.maxQueue, maxNewTokensLimit: a.maxNewTokensLimit, log: a.log,
        engine: (_model, prompts, o) => startBackboneGeneration(backbone, prompts, o),
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
        disposeWeights(decoder.weights); // idempotent
      },
    };
  } catch (e) {
    disposeWeights(decoder.weights);
    throw e;
  }
}
