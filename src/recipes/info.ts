/**
 * `medusa-train info <model-dir>`: what the model is and whether it fits each backend.
 * Reads config.json and safetensors headers only; no weights are loaded.
 */
import * as os from 'node:os';
import { inspectModelFolder } from '../model/load.js';
import { parameterCount, type DecoderConfig } from '../model/config.js';
import { estimateMemory, type MemoryEstimate } from '../model/memory.js';
import { WASM_HEAP_BYTES } from '../backend.js';

export interface InfoReport {
  dir: string;
  architecture: string;
  parameters: number;
  dtypesOnDisk: Record<string, number>;
  configHash: string;
  config: DecoderConfig;
  memory: MemoryEstimate;
  fits: { wasm: boolean; cpu: boolean; native: boolean };
  unexpectedTensors: string[];
  ignoredTensors: string[];
}

export function modelInfo(dir: string, contextTokens?: number): InfoReport {
  const { folder, report } = inspectModelFolder(dir);
  const c = folder.config;
  const memory = estimateMemory(c, Math.min(contextTokens ?? 2048, c.maxPositionEmbeddings));
  const ram = os.totalmem();
  return {
    dir,
    architecture: c.architecture,
    parameters: parameterCount(c),
    dtypesOnDisk: report.dtypes,
    configHash: folder.configHash,
    config: c,
    memory,
    fits: { wasm: memory.totalBytes <= WASM_HEAP_BYTES, cpu: memory.totalBytes <= ram * 0.8, native: memory.totalBytes <= ram * 0.8 },
    unexpectedTensors: report.unexpected,
    ignoredTensors: report.ignored,
  };
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

export function formatInfo(r: InfoReport): string {
  const c = r.config;
  const m = r.memory;
  const rope = c.ropeScaling.type === 'none' ? 'none' : JSON.stringify(c.ropeScaling);
  const lines = [
    `model         ${r.dir}`,
    `architecture  ${r.architecture}`,
    `parameters    ${formatCount(r.parameters)} (${r.parameters.toLocaleString('en-US')})${c.tieWordEmbeddings ? ', tied embeddings' : ''}`,
    `dtype         on disk ${Object.entries(r.dtypesOnDisk).map(([k, v]) => `${k} x${v}`).join(', ')}${c.torchDtype ? ` (torch_dtype ${c.torchDtype})` : ''}; computed in float32`,
    `shape         ${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads} heads (kv ${c.numKvHeads}, head_dim ${c.headDim}), ffn ${c.intermediateSize}, vocab ${c.vocabSize}`,
    `attention     ${[c.qkvBias ? 'q/k/v bias' : '', c.oBias ? 'o bias' : '', c.qkNorm ? 'q/k norm' : '', c.slidingWindow ? `sliding window ${c.slidingWindow}` : ''].filter(Boolean).join(', ') || 'plain'}`,
    `rope          theta ${c.ropeTheta}, scaling ${rope}, max positions ${c.maxPositionEmbeddings}`,
    `eos ids       ${c.eosTokenIds.join(', ') || '(none)'}`,
    `memory        float32 at ${m.contextTokens} tokens of context: weights ${formatBytes(m.weightsBytes)} + KV cache ${formatBytes(m.kvCacheBytes)} + activations ~${formatBytes(m.activationBytes)} = ${formatBytes(m.totalBytes)}`,
    `  wasm        ${r.fits.wasm ? 'fits' : 'does NOT fit'} in the 4 GiB wasm heap${r.fits.wasm ? '' : ': use --backend native (@tensorflow/tfjs-node-gpu or tfjs-node)'}`,
    `  cpu/native  ${r.fits.cpu ? 'fits' : 'does NOT fit'} in ${formatBytes(os.totalmem())} of RAM`,
    `config hash   sha256:${r.configHash.slice(0, 16)}…`,
  ];
  if (r.unexpectedTensors.length > 0) lines.push(`warning       ${r.unexpectedTensors.length} tensor(s) not used by ${r.architecture}: ${r.unexpectedTensors.slice(0, 5).join(', ')}${r.unexpectedTensors.length > 5 ? ', …' : ''}`);
  return lines.join('\n');
}
