/** Prints one figure beside its baseline and their ratio, one aligned line. */
export function report(name: string, value: number, unit: string, baseline?: { name: string; value: number }): void {
  const v = `${fmt(value)} ${unit}`;
  if (!baseline) {
    process.stdout.write(`${name.padEnd(48)} ${v.padStart(16)}\n`);
    return;
  }
  const ratio = baseline.value === 0 ? "n/a" : `${((value / baseline.value) * 100).toFixed(1)}%`;
  process.stdout.write(
    `${name.padEnd(48)} ${v.padStart(16)}   baseline ${baseline.name}: ${fmt(baseline.value)} ${unit}   ratio ${ratio}\n`,
  );
}

function fmt(n: number): string {
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

/** The p-th percentile (0-100) of samples. */
export function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
