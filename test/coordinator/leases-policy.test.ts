import { describe, expect, it } from "@jest/globals";
import { daysOf, decide, graceProblem, hostHoursOn, hostHoursOver, humanDuration, limitsFor, parseOverrides, renewEveryMs } from "../../coordinator/leases/policy.js";
import { loadCoordinatorConfig } from "../../coordinator/config.js";

const at = (iso: string) => new Date(iso);
const facts = { started: false, over: false, pastDeadline: false, silent: false };

describe("lease policy", () => {
  it("counts host-hours per UTC day, an ended lease up to its end", () => {
    const span = { starts_at: at("2026-12-07T22:00:00Z"), ends_at: at("2026-12-08T03:00:00Z"), host_count: 2 };
    expect(daysOf(span.starts_at, span.ends_at).map((d) => d.toISOString())).toEqual(["2026-12-07T00:00:00.000Z", "2026-12-08T00:00:00.000Z"]);
    expect(hostHoursOn(at("2026-12-07T00:00:00Z"), [span])).toBe(4);
    expect(hostHoursOn(at("2026-12-08T00:00:00Z"), [span])).toBe(6);
  });

  it("finds the first day a new lease would pass the host-hours limit, and none when it fits", () => {
    const others = [{ starts_at: at("2026-12-08T00:00:00Z"), ends_at: at("2026-12-08T10:00:00Z"), host_count: 4 }];
    const proposed = { starts_at: at("2026-12-07T20:00:00Z"), ends_at: at("2026-12-08T02:00:00Z"), host_count: 1 };
    // 4 hours on the 7th; 2 more beside the others' 40 on the 8th.
    expect(hostHoursOver(proposed, others, 42)).toBeUndefined();
    expect(hostHoursOver(proposed, others, 41)).toEqual({ day: at("2026-12-08T00:00:00Z"), hours: 42 });
    expect(hostHoursOver({ ...proposed, host_count: 3 }, others, 11)).toEqual({ day: at("2026-12-07T00:00:00Z"), hours: 12 });
  });

  it("ends a lease not active by its deadline UNSERVED, an active one past its end EXPIRED, a silent one LOST, in that order", () => {
    expect(decide({ state: "waiting", ...facts, pastDeadline: true, silent: true })).toBe("unserved");
    expect(decide({ state: "requested", ...facts, pastDeadline: true })).toBe("unserved");
    expect(decide({ state: "active", ...facts, over: true, silent: true, pastDeadline: true })).toBe("expired");
    expect(decide({ state: "active", ...facts, silent: true })).toBe("lost");
    expect(decide({ state: "waiting", ...facts, started: true, silent: true })).toBe("lost");
  });

  it("releases a hold whose held job has ended, unless it is already past its end", () => {
    expect(decide({ state: "active", ...facts, heldJobEnded: true, silent: true })).toBe("held-job-ended");
    expect(decide({ state: "active", ...facts, heldJobEnded: true, over: true })).toBe("expired");
    expect(decide({ state: "active", ...facts, heldJobEnded: false })).toBe("none");
  });

  it("books a requested lease again, activates a waiting one whose start came, and leaves the rest", () => {
    expect(decide({ state: "requested", ...facts })).toBe("book");
    expect(decide({ state: "waiting", ...facts, started: true })).toBe("activate");
    expect(decide({ state: "waiting", ...facts })).toBe("none");
    expect(decide({ state: "active", ...facts, started: true })).toBe("none");
    expect(decide({ state: "ended", ...facts, over: true, silent: true })).toBe("none");
  });

  it("renews a keepalive stream at the configured interval, at most a third of the grace period", () => {
    expect(renewEveryMs(300_000, { leaseKeepaliveIntervalMs: 10_000 })).toBe(10_000);
    expect(renewEveryMs(9_000, { leaseKeepaliveIntervalMs: 10_000 })).toBe(3_000);
  });

  it("bounds the grace period by the policy and says durations as people read them", () => {
    const config = loadCoordinatorConfig({ env: {}, argv: [] });
    expect(graceProblem(5 * 60_000, config)).toBeUndefined();
    expect(graceProblem(1000, config)).toBe("grace_period must be between 30s and 1h");
    expect([humanDuration(300), humanDuration(45_000), humanDuration(90 * 60_000), humanDuration(2 * 3600_000)]).toEqual(["300ms", "45s", "1h30m", "2h"]);
  });
  it("reads per-selector overrides and refuses malformed ones at start, naming each", () => {
    expect(parseOverrides(["board=big&site=lab-a;max-duration=2h;max-host-hours-per-day=4"]).overrides).toEqual([
      { tags: { board: "big", site: "lab-a" }, maxDurationMs: 7_200_000, maxHostHoursPerDay: 4 },
    ]);
    expect(() => loadCoordinatorConfig({ env: {}, argv: ["--lease-policy-overrides", "board;max-duration=soon,x=y;colour=red"] })).toThrow(
      [
        'lease-policy-overrides: "board;max-duration=soon": tag "board" is not key=value',
        'lease-policy-overrides: "board;max-duration=soon": names no tag',
        'lease-policy-overrides: "board;max-duration=soon": max-duration must be a duration like 2h',
        'lease-policy-overrides: "x=y;colour=red": "colour" is not one of max-duration, max-concurrent, max-host-hours-per-day',
      ].join("\n"),
    );
  });

  it("takes a selector's limits from the first override whose tags it includes, else the global ones", () => {
    const config = loadCoordinatorConfig({ env: {}, argv: [] });
    const overrides = parseOverrides(["board=big;max-concurrent=1", "board=big&site=a;max-duration=1h"]).overrides;
    expect(limitsFor({ board: "big", site: "a" }, overrides, config)).toMatchObject({ maxConcurrent: 1, maxDurationMs: config.leaseMaxDurationMs, scope: { board: "big" } });
    expect(limitsFor({ board: "small" }, overrides, config)).toMatchObject({ maxConcurrent: 10, scope: null, source: "lease policy" });
  });
});
