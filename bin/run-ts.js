// Runs a TypeScript entry point of this package through tsx, resolved from the
// package itself, so that the bins work from any working directory.
import { register } from "tsx/esm/api";

register();

/** Imports `relative` (a path from the package root) as the program. */
export async function runTs(relative) {
  await import(new URL(`../${relative}`, import.meta.url).href);
}
