/**
 * How lengths of time and shares read for people, the same in `tml` and the
 * web console (a host's statistics, HostService.GetHostStats).
 */

/** A length of time as "45s", "12m", "3h20m" or "6d4h" (to the nearest minute from a minute up). */
export function spanText(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 24) return m % 60 === 0 ? `${h}h` : `${h}h${m % 60}m`;
  return h % 24 === 0 ? `${Math.floor(h / 24)}d` : `${Math.floor(h / 24)}d${h % 24}h`;
}

/** A share (0 to 1) as a percentage with one decimal: "25.0%". */
export function percentText(share: number): string {
  return `${(share * 100).toFixed(1)}%`;
}
