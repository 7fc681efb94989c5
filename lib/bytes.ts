/** Byte counts as people read them: "512 bytes", "12 KiB", "1.5 GiB" (binary units). */
export function formatBytes(n: number | bigint): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 || Number.isInteger(v) ? v : v.toFixed(1)} ${units[u]}`;
}
