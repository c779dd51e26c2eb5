/**
 * Crash-safe file writes: write to a temporary name beside the target, fsync, rename over the
 * target, fsync the folder. A crash at any moment leaves either the old file or the new one under
 * the final name, never a half-written one.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Make renames in `dir` durable; best effort (not every platform can fsync a directory). */
export function fsyncDir(dir: string): void {
  try {
    const fd = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    /* not supported here */
  }
}

/**
 * Write `parts` (produced lazily, in order) to `file` atomically. On any failure the temporary file
 * is removed and the original error is rethrown for the caller to wrap with its own message.
 */
export function writeFileAtomic(file: string, parts: Iterable<Uint8Array>, tmpSuffix = `.tmp-${process.pid}`): void {
  const tmp = `${file}${tmpSuffix}`;
  let fd: number | undefined;
  try {
    fd = fs.openSync(tmp, 'w');
    for (const part of parts) {
      let done = 0;
      while (done < part.length) done += fs.writeSync(fd, part, done, Math.min(1 << 26, part.length - done));
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, file);
  } catch (e) {
    if (fd !== undefined) {
      try {
        fs.closeSync(fd);
      } catch {
        /* already failing */
      }
    }
    try {
      fs.unlinkSync(tmp);
    } catch {
      /* may not exist */
    }
    throw e;
  }
  fsyncDir(path.dirname(file));
}
