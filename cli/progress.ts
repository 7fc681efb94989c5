/**
 * A transfer progress bar: bytes done of the total, rate and time left. On a
 * terminal it redraws one line (at most 10 times a second); elsewhere (CI
 * logs, tests) it prints a plain line at most once a second, so logs stay
 * readable.
 */
import type { Writable } from "node:stream";

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export interface ProgressBar {
  /** Bytes done so far (absolute, including a resumed prefix). */
  update(done: number): void;
  /** The transfer finished: final line. */
  done(message?: string): void;
  /** The transfer stopped: leave the line as it is and end it. */
  stop(): void;
}

export function progressBar(options: {
  label: string;
  total: number;
  stream: Writable & { isTTY?: boolean; columns?: number };
  /** Bytes already present when the transfer started (not counted in the rate). */
  startAt?: number;
  now?: () => number;
}): ProgressBar {
  const { label, total, stream } = options;
  const now = options.now ?? Date.now;
  const tty = stream.isTTY === true;
  const started = now();
  // Samples of (time, bytes) over the last few seconds, for the rate.
  const samples: [number, number][] = [[started, options.startAt ?? 0]];
  let lastDraw = 0;
  let last = options.startAt ?? 0;
  let ended = false;

  const rate = (): number => {
    const [t0, b0] = samples[0];
    const [t1, b1] = samples[samples.length - 1];
    return t1 > t0 ? ((b1 - b0) * 1000) / (t1 - t0) : 0;
  };

  const text = (): string => {
    const r = rate();
    const pct = total > 0 ? Math.floor((last * 100) / total) : 100;
    const left = r > 0 && total > last ? `, ${formatDuration(((total - last) * 1000) / r)} left` : "";
    const figures = `${formatBytes(last)} / ${formatBytes(total)} (${pct}%), ${formatBytes(Math.round(r))}/s${left}`;
    if (!tty) return `${label}: ${figures}`;
    const width = 24;
    const filled = total > 0 ? Math.min(width, Math.floor((last * width) / total)) : width;
    return `${label} [${"#".repeat(filled)}${"-".repeat(width - filled)}] ${figures}`;
  };

  const draw = (force: boolean) => {
    const t = now();
    if (!force && t - lastDraw < (tty ? 100 : 1000)) return;
    lastDraw = t;
    if (tty) {
      const line = text().slice(0, Math.max(20, (stream.columns ?? 100) - 1));
      stream.write(`\r\u001b[2K${line}`);
    } else {
      stream.write(`${text()}\n`);
    }
  };

  return {
    update(done) {
      if (ended) return;
      last = done;
      const t = now();
      samples.push([t, done]);
      while (samples.length > 2 && t - samples[0][0] > 5000) samples.shift();
      draw(false);
    },
    done(message) {
      if (ended) return;
      ended = true;
      const elapsed = now() - started;
      const summary = message ?? `${label}: ${formatBytes(total)} in ${formatDuration(elapsed)}`;
      stream.write(tty ? `\r\u001b[2K${summary}\n` : `${summary}\n`);
    },
    stop() {
      if (ended) return;
      ended = true;
      if (tty) stream.write("\n");
    },
  };
}
