/**
 * Hugging Face model folders: config.json (+ generation_config.json), model.safetensors or sharded
 * model-0000x-of-0000y.safetensors with model.safetensors.index.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fail } from '../errors.js';
import { readJsonFile, readJsonIfExists } from '../io/json.js';
import { sha256File } from '../io/hash.js';
import { openSafetensorsFolder, type ShardedModel } from '../io/safetensors.js';
import { parseDecoderConfig, type DecoderConfig } from './config.js';
import { checkTensorSet, loadDecoderWeights, type LoadReport } from './weights.js';
import { makeDecoder, type Decoder } from './decoder.js';
import { checkFitsBackend } from './memory.js';
import { currentBackend } from '../backend.js';

export interface ModelFolder {
  dir: string;
  config: DecoderConfig;
  rawConfig: Record<string, unknown>;
  generationConfig: Record<string, unknown> | undefined;
  shards: ShardedModel;
  /** sha256 of config.json's bytes: identifies the base model in datasets and runs. */
  configHash: string;
}

export function openModelFolder(dir: string): ModelFolder {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    fail('E_IO', `Model folder ${dir} does not exist. Pass a Hugging Face model folder (config.json + *.safetensors), or create a tiny one with \`medusa-train tiny --out <dir>\`.`);
  }
  const configPath = path.join(dir, 'config.json');
  if (!fs.existsSync(configPath)) fail('E_IO', `${configPath} is missing: ${dir} is not a Hugging Face model folder.`);
  const raw = readJsonFile(configPath);
  const genPath = path.join(dir, 'generation_config.json');
  const gen = readJsonIfExists(genPath);
  const config = parseDecoderConfig(raw, configPath, gen);
  const shards = openSafetensorsFolder(dir);
  const configHash = sha256File(configPath);
  return { dir, config, rawConfig: raw as Record<string, unknown>, generationConfig: gen as Record<string, unknown> | undefined, shards, configHash };
}

/** Open the folder, check the tensor set and that the model fits the backend, and load the weights onto it. */
export function loadDecoder(dir: string): { decoder: Decoder; folder: ModelFolder; report: LoadReport } {
  const folder = openModelFolder(dir);
  const backend = currentBackend();
  checkFitsBackend(folder.config, backend.name, backend.maxTensorBytes, dir);
  const { weights, report } = loadDecoderWeights(folder.shards, folder.config, dir);
  return { decoder: makeDecoder(folder.config, weights), folder, report };
}

/** Check a folder without loading weights (for `info`). */
export function inspectModelFolder(dir: string): { folder: ModelFolder; report: LoadReport } {
  const folder = openModelFolder(dir);
  return { folder, report: checkTensorSet(folder.shards, folder.config, dir) };
}
