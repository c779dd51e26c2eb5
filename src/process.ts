/**
 * Process-level settings for native speed: glibc allocator tuning applied by re-executing once.
 * Used by the CLI entry point and the benchmarks (which must run like the CLI).
 */
import { spawn } from 'node:child_process';
import { constants as osConstants } from 'node:os';

/**
 * Allocator settings that decide native-engine speed on this kind of VM (it hands out fresh memory slowly;
 * onnxruntime and PyTorch ran 3-5x faster with them in the design brief's measurements; on our own graphs the
 * difference was within noise, see docs/PERFORMANCE.md). glibc reads them only at process start, so the CLI
 * re-executes itself once with them set. MEDUSA_TRAIN_NO_REEXEC=1 turns this off.
 */
export const MALLOC_ENV: Readonly<Record<string, string>> = {
  MALLOC_MMAP_MAX_: '0',
  MALLOC_TRIM_THRESHOLD_: '68719476736',
  MALLOC_TOP_PAD_: '536870912',
};

/** Re-execute this script with MALLOC_ENV set (once); returns true when the current process is now only the parent. */
export function reexecWithAllocatorSettings(): boolean {
  if (process.env['MEDUSA_TRAIN_NO_REEXEC'] === '1' || process.env['MEDUSA_TRAIN_REEXEC'] === '1') return false;
  if (Object.entries(MALLOC_ENV).every(([k, v]) => process.env[k] === v)) return false;
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, ...MALLOC_ENV, MEDUSA_TRAIN_REEXEC: '1' },
  });
  // Ctrl-C reaches the child through the terminal's process group; a targeted SIGTERM/SIGHUP is passed on.
  process.on('SIGINT', () => {});
  for (const sig of ['SIGTERM', 'SIGHUP'] as const) process.on(sig, () => child.kill(sig));
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 128 + (osConstants.signals[signal] ?? 0) : 1)));
  child.on('error', (e) => {
    process.stderr.write(`cannot re-execute with allocator settings (${e.message}); set MEDUSA_TRAIN_NO_REEXEC=1\n`);
    process.exit(70);
  });
  return true;
}

/** In the re-executed child: exit if the parent disappears (e.g. killed with SIGKILL), never run orphaned. */
export function watchParent(): void {
  const parent = process.ppid;
  setInterval(() => {
    if (process.ppid !== parent) process.exit(137);
  }, 500).unref();
}

