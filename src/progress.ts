/**
 * Progress for long work: a cli-progress bar (done/total, tokens/s, ETA) when stderr is a terminal,
 * plain periodic log lines otherwise (CI logs, files, pipes). Used by the CLI only.
 */
import cliProgress from 'cli-progress';

export interface Progress {
  start(total: number, done: number): void;
  update(done: number, tokens: number): void;
  stop(): void;
}

export function createProgress(opts: { label: string; unit: string; isTTY: boolean; log: (line: string) => void; intervalMs?: number; enabled?: boolean }): Progress {
  if (opts.enabled === false) return { start() {}, update() {}, stop() {} };
  let t0 = 0;
  let startDone = 0;
  let total = 0;
  if (opts.isTTY) {
    const bar = new cliProgress.SingleBar(
      { format: `${opts.label} [{bar}] {value}/{total} ${opts.unit} | {tps} tok/s | ETA {eta_formatted}`, hideCursor: true, stream: process.stderr, etaBuffer: 50 },
      cliProgress.Presets.shades_classic,
    );
    return {
      start(t, d) {
        t0 = performance.now();
        total = t;
        startDone = d;
        bar.start(t, d, { tps: '0.0' });
      },
      update(d, tokens) {
        bar.update(d, { tps: (tokens / Math.max((performance.now() - t0) / 1000, 1e-9)).toFixed(1) });
      },
      stop() {
        bar.stop();
      },
    };
  }
  const interval = opts.intervalMs ?? 10_000;
  let last = 0;
  const line = (d: number, tokens: number, force: boolean): void => {
    const now = performance.now();
    if (!force && now - last < interval) return;
    last = now;
    const secs = (now - t0) / 1000;
    const rate = (d - startDone) / Math.max(secs, 1e-9);
    const eta = rate > 0 ? (total - d) / rate : NaN;
    const pct = total > 0 ? ((100 * d) / total).toFixed(1) : '100.0';
    opts.log(`${opts.label}: ${d}/${total} ${opts.unit} (${pct}%), ${(tokens / Math.max(secs, 1e-9)).toFixed(1)} tok/s, ETA ${Number.isFinite(eta) ? formatSeconds(eta) : '?'}`);
  };
  return {
    start(t, d) {
      t0 = performance.now();
      last = t0;
      total = t;
      startDone = d;
      opts.log(`${opts.label}: ${d}/${t} ${opts.unit} already done`);
    },
    update(d, tokens) {
      line(d, tokens, false);
    },
    stop() {},
  };
}

export function formatSeconds(s: number): string {
  if (s < 60) return `${s.toFixed(0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}
