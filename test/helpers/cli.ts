import { main } from '../../src/cli.js';

export interface Run { code: number; out: string; err: string }

/** Run the CLI in-process, capturing what it prints. */
export async function run(...argv: string[]): Promise<Run> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await main(argv, { out: (s) => out.push(s), err: (s) => err.push(s) });
  return { code, out: out.join('\n'), err: err.join('\n') };
}
