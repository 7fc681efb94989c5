/**
 * The chaos benchmark's short run (issue #18; `npm run bench -- chaos` is
 * the long one, test/support/chaos.ts the run itself): a site of separate
 * processes (docs/site.md) runs at least 30 jobs of about 4 s (every fifth
 * on the simulated board) with a restart policy while each component,
 * PostgreSQL included, is SIGKILLed once (while jobs run where it strikes)
 * and started again 5 s later, then while the log server and the cache are
 * each down for 20 s. Every goal of the benchmark must hold.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { checkConsole, lineSum, runChaos, SHORT_KILLS, type ChaosResult } from "../support/chaos.js";

const RUN_MS = 40 * 60_000;

describe("the log check of the chaos run", () => {
  const lines = (ns: number[], label = "job j1", seed = 7) => ns.map((n) => `${label} line ${n} ${lineSum(seed, n)}\r\n`).join("");

  it("passes a console with every line once, in order, between other output", () => {
    const text = `SimBoard rev 1.0\r\n${lines([1, 2, 3])}TREADMILL_EXIT=0\r\n`;
    expect(checkConsole(text, { label: "job j1", seed: 7, lines: 3, complete: true })).toEqual({ missing: 0, repeated: 0, corrupt: 0, disordered: 0 });
  });

  it("finds a missing, a repeated, a foreign and a corrupt line", () => {
    const text = lines([1, 2, 2, 4]) + lines([3], "job j2") + "job j1 line 5 12345\r\n";
    expect(checkConsole(text, { label: "job j1", seed: 7, lines: 5, complete: true })).toMatchObject({ missing: 2, repeated: 1, corrupt: 2 });
  });

  it("lets an attempt cut short miss its tail and end in a torn line, but not repeat one", () => {
    expect(checkConsole(lines([1, 2]) + "job j1 line 3 12", { label: "job j1", seed: 7, lines: 5, complete: false })).toEqual({
      missing: 0,
      repeated: 0,
      corrupt: 0,
      disordered: 0,
    });
    expect(checkConsole(lines([1, 2, 1]), { label: "job j1", seed: 7, lines: 5, complete: false }).repeated).toBe(1);
  });
});

describe("a site whose every component is killed while jobs flow", () => {
  let result: ChaosResult;

  beforeAll(async () => {
    result = await runChaos({
      jobs: 30,
      lines: 200,
      jobMs: 4000,
      kills: SHORT_KILLS,
      killDownMs: 5000,
      outages: [
        { name: "log-server", downMs: 20_000 },
        { name: "image-cache", downMs: 20_000 },
      ],
      maxRestarts: 3,
      boardEvery: 5,
      baselineJobs: 0,
      serveTimeoutMs: 180_000,
      flowTimeoutMs: 240_000,
      finishTimeoutMs: 10 * 60_000,
      keepDir: false,
      progress: (line) => process.stderr.write(`chaos ${line}\n`),
    });
  }, RUN_MS);

  afterAll(() => {
    // What the run saw, for whoever reads the test's output.
    if (result !== undefined) process.stderr.write(`chaos result: ${JSON.stringify(result)}\n`);
  });

  it("kills each component once, PostgreSQL included, and brings every one back to serving", () => {
    expect(result.bounces.map((b) => b.name)).toEqual([...SHORT_KILLS, "log-server", "image-cache"]);
    expect(result.notBack).toEqual([]);
    expect(result.bounces.every((b) => b.backMs !== undefined)).toBe(true);
  });

  it("keeps jobs flowing: after each restart a job assigned since succeeds", () => {
    expect(result.bounces.filter((b) => b.flowMs === undefined).map((b) => b.name)).toEqual([]);
  });

  it("loses no job: every job SubmitJob accepted is finalized", () => {
    expect(result.notSubmitted).toBe(0);
    expect(result.submitted).toBeGreaterThanOrEqual(30);
    expect(result.lost).toEqual([]);
    expect(result.finished).toBe(result.submitted);
  });

  it("runs no workload twice within an attempt, nor in an attempt the job's record does not have", () => {
    expect(result.starts).toBeGreaterThanOrEqual(result.submitted);
    expect(result.runTwice).toEqual([]);
  });

  it("stores every job's log with each of its lines once, in order, and no attempt's log repeats a line", () => {
    expect(result.logProblems).toEqual([]);
    expect(result.logNotComplete).toEqual({});
  });

  it("fails no job by an outage: an attempt infrastructure ended is restarted by the policy, and every job succeeds", () => {
    expect(result.failed).toEqual([]);
  });
});
