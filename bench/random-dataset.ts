/**
 * The training benchmarks' model and data (bench/train.ts, bench/medusa2.ts): BENCH_20M (seed 1) in `dir/model`,
 * and a distilled dataset in `dir/data` of random conversations (a 32-token prompt, the rest assistant tokens,
 * random ids in the tokenizer's range), optionally with a teacher top-k per assistant token (ids spread over the
 * range, log-probabilities 0.5, 0.25, ... so their mass stays below 1).
 */
import * as path from 'node:path';
import { BENCH_20M, writeTinyModel } from '../src/model/tiny.js';
import { openModelFolder } from '../src/model/load.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { DatasetWriter, type DistilledRecord } from '../src/data/dataset.js';
import { Rng } from '../src/model/sampling.js';

const PROMPT = 32;

export async function writeBenchModelAndData(dir: string, o: { conversations: number; seqLen: number; teacherTopk: number }): Promise<{ model: string; dataset: string }> {
  const model = path.join(dir, 'model');
  writeTinyModel(model, { ...BENCH_20M, seed: 1 });
  const meta = { base_model_config_sha256: openModelFolder(model).configHash, tokenizer_sha256: (await loadTokenizer(model)).hash };
  const rng = new Rng(1);
  const K = o.teacherTopk;
  const recs: DistilledRecord[] = Array.from({ length: o.conversations }, (_, i) => {
    const ids = Array.from({ length: o.seqLen }, () => 5 + Math.floor(rng.next() * 500));
    const rec: DistilledRecord = {
      id: `b${i}`, sourceIndex: i, inputIds: ids, lossMask: ids.map((_, j) => (j < PROMPT ? 0 : 1)), turnRoles: ['user', 'assistant'],
      turnStarts: [0, PROMPT], turnEnds: [PROMPT, o.seqLen], truncated: false,
    };
    if (K > 0) {
      const masked = o.seqLen - PROMPT;
      const tIds = new Int32Array(masked * K); // [masked, K]
      const tLp = new Float32Array(masked * K); // [masked, K]
      for (let j = 0; j < masked; j++) {
        for (let r = 0; r < K; r++) {
          tIds[j * K + r] = 5 + ((ids[PROMPT + j] + r * 37) % 500);
          tLp[j * K + r] = Math.log(0.5 / 2 ** r);
        }
      }
      rec.teacherTopkIds = tIds;
      rec.teacherTopkLogprobs = tLp;
    }
    return rec;
  });
  const dataset = path.join(dir, 'data');
  const w = DatasetWriter.open(dataset, { meta, topk: K, mode: 'new' });
  w.appendShard(recs, [], [], recs.length);
  w.finish({});
  return { model, dataset };
}
