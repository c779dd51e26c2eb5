/** Reading untrusted JSON files with a size limit and errors that name the file. */
import * as fs from 'node:fs';
import { fail, describe } from '../errors.js';

/** Config-like JSON files (config.json, tokenizer_config.json, index files) are small; tokenizer.json can be tens of MB. */
export const JSON_LIMITS = { maxConfigBytes: 16 * 1024 * 1024, maxTokenizerBytes: 512 * 1024 * 1024 } as const;

export function readJsonFile(file: string, maxBytes: number = JSON_LIMITS.maxConfigBytes): unknown {
  let size: number;
  try {
    size = fs.statSync(file).size;
  } catch (e) {
    fail('E_IO', `Cannot read ${file}: ${describe(e)}. Check the path.`);
  }
  if (size > maxBytes) fail('E_CONFIG', `${file} is ${size} bytes, over the limit of ${maxBytes} bytes for this kind of file; is it the right file?`);
  const text = fs.readFileSync(file, 'utf8');
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    fail('E_CONFIG', `${file} is not valid JSON (${describe(e)}). Re-download or fix the file.`);
  }
}

export function readJsonIfExists(file: string, maxBytes?: number): unknown {
  return fs.existsSync(file) ? readJsonFile(file, maxBytes) : undefined;
}
