/** Files shipped with the package (configs/, data/), found from this module's location in src/ or dist/src/. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fail } from './errors.js';

let root: string | undefined;

/** The package's root folder (the one whose package.json is named medusa-train). */
export function packageRoot(): string {
  if (root) return root;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        if ((JSON.parse(fs.readFileSync(pj, 'utf8')) as { name?: string }).name === 'medusa-train') return (root = dir);
      } catch {
        /* keep looking */
      }
    }
    dir = path.dirname(dir);
  }
  return fail('E_INTERNAL', 'cannot find the medusa-train package folder (package.json) above the code');
}

export function packagePath(...parts: string[]): string {
  return path.join(packageRoot(), ...parts);
}
