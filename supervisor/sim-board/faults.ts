/**
 * The simulated board's faults (issue #21), apart from its I/O so that they
 * can be tested alone: which fault a power-on meets, drawn from configured
 * rates with a seeded generator (the same seed gives the same faults), or
 * armed by a command for the next power-on.
 *
 * - `boot-fail`: the ROM finds the flash bad and halts; the boot pattern
 *   never comes (the board driver: HOST_START_FAILURE after its boot timeout);
 * - `hang`: the board stops in the middle of its boot and prints nothing
 *   more (the same, without an error message); commanded while the firmware
 *   runs, the firmware freezes instead;
 * - `drop-serial`: the serial line goes away a moment after the boot (the
 *   board driver ends the running job INTERNAL_ERROR: the host's failure).
 */

export type Fault = "boot-fail" | "hang" | "drop-serial";

export const FAULTS: readonly Fault[] = ["boot-fail", "hang", "drop-serial"];

/** Probabilities per power-on (each 0..1, their sum at most 1) and the generator's seed. */
export interface FaultRates {
  bootFailure: number;
  hang: number;
  serialDrop: number;
  /** Seed of the generator; the same seed draws the same faults. Default 1. */
  seed: number;
}

export const NO_FAULTS: FaultRates = { bootFailure: 0, hang: 0, serialDrop: 0, seed: 1 };

/** Checks a parsed JSON rates object (`faults.json`); throws naming every bad field at once. */
export function parseFaultRates(value: unknown): FaultRates {
  const v = (value ?? {}) as Record<string, unknown>;
  const problems: string[] = [];
  const rate = (name: "bootFailure" | "hang" | "serialDrop"): number => {
    const x = v[name] ?? 0;
    if (typeof x !== "number" || !(x >= 0 && x <= 1)) {
      problems.push(`faults ${name} must be a probability between 0 and 1`);
      return 0;
    }
    return x;
  };
  const rates = { bootFailure: rate("bootFailure"), hang: rate("hang"), serialDrop: rate("serialDrop"), seed: 1 };
  if (v.seed !== undefined) {
    if (!Number.isInteger(v.seed)) problems.push("faults seed must be an integer");
    else rates.seed = v.seed as number;
  }
  if (rates.bootFailure + rates.hang + rates.serialDrop > 1) problems.push("faults rates must add up to at most 1");
  for (const key of Object.keys(v)) {
    if (!["bootFailure", "hang", "serialDrop", "seed"].includes(key)) problems.push(`faults ${key} is not a known field`);
  }
  if (problems.length > 0) throw new Error(problems.join("; "));
  return rates;
}

/** A generator of numbers in [0, 1) from `seed` (mulberry32: small, fast, good enough for test faults). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The fault one power-on meets under `rates`, drawing one number from `random`; undefined: none. */
export function drawFault(rates: FaultRates, random: () => number): Fault | undefined {
  const x = random();
  if (x < rates.bootFailure) return "boot-fail";
  if (x < rates.bootFailure + rates.hang) return "hang";
  if (x < rates.bootFailure + rates.hang + rates.serialDrop) return "drop-serial";
  return undefined;
}
