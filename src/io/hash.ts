/** Content hashes of files (identities of base models, configs, datasets). */
import * as fs from 'node:fs';
import { createHash } from 'node:crypto';

/** sha256 (hex) of a file's bytes, read in 1 MiB blocks. */
export function sha256File(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}
