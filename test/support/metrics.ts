/** Reading a server's Prometheus text (tests and benchmarks). */

/** The values of the series `names` (with any labels) on `url`/metrics; NaN for one that is missing. */
export async function metricValues<N extends string>(url: string, names: readonly N[]): Promise<Record<N, number>> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const out = {} as Record<N, number>;
  for (const name of names) out[name] = Number(new RegExp(`^${name}\\{[^}]*\\} (\\S+)$`, "m").exec(text)?.[1] ?? NaN);
  return out;
}
