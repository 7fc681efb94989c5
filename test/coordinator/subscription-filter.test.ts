import { describe, expect, it } from "@jest/globals";
import type { FeedEvent } from "../../coordinator/db/queries/feed.js";
import type { ActiveSubscription, StoredFilter } from "../../coordinator/db/queries/subscriptions.js";
import { SubscriptionIndex, subscriptionTakes } from "../../coordinator/subscriptions/filter.js";

const ALICE = "01a25117-0000-7000-8000-00000000000a";
const BOB = "01a25117-0000-7000-8000-00000000000b";

function sub(filter: Partial<StoredFilter>, owner = ALICE, admin = false): ActiveSubscription {
  return {
    id: "s",
    name: "s",
    secret: "whsec_x",
    created_at: new Date(0),
    owner_id: owner,
    owner_admin: admin,
    filter: { kinds: [], labels: {}, images: [], owner_ids: [], states: [], outcomes: [], regressions_only: false, ...filter },
    destinations: [],
  };
}

function event(e: Partial<FeedEvent> & { payload?: Record<string, unknown> }): FeedEvent {
  return {
    cursor: 1n,
    audience: "owner",
    at: new Date(1),
    kind: "job.state",
    jobId: "j",
    hostId: null,
    leaseId: null,
    ownerId: ALICE,
    labels: {},
    ...e,
    payload: { schema: "treadmill.event.v1", kind: e.kind ?? "job.state", ...e.payload },
  };
}

describe("which events a subscription takes", () => {
  it("never takes another user's private event, whatever the filter, and takes it for an admin", () => {
    const alices = event({ labels: { team: "red" } });
    expect(subscriptionTakes(sub({ labels: { team: "red" } }, BOB), alices, "img:v1")).toBe(false);
    expect(subscriptionTakes(sub({ owner_ids: [ALICE] }, BOB), alices, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ labels: { team: "red" } }, ALICE), alices, undefined)).toBe(true);
    expect(subscriptionTakes(sub({ owner_ids: [ALICE] }, BOB, true), alices, undefined)).toBe(true);
  });

  it("takes host health only when named, and every other kind by default", () => {
    const health = event({ kind: "host.health", audience: "users", ownerId: null, jobId: null });
    expect(subscriptionTakes(sub({}), health, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ kinds: ["host.health"] }, ALICE, true), health, undefined)).toBe(true);
    expect(subscriptionTakes(sub({}), event({ kind: "job.stage" }), undefined)).toBe(true);
    expect(subscriptionTakes(sub({ kinds: ["job.state"] }), event({ kind: "job.stage" }), undefined)).toBe(false);
  });

  it("matches images by name or name:tag, states, outcomes and the regression flag", () => {
    const finalized = event({ payload: { state: "finalized", reason: "workload_exited", exit_status: "failure" } });
    expect(subscriptionTakes(sub({ images: ["tock/ci"] }), finalized, "tock/ci:v2")).toBe(true);
    expect(subscriptionTakes(sub({ images: ["tock/ci:v1"] }), finalized, "tock/ci:v2")).toBe(false);
    expect(subscriptionTakes(sub({ images: ["tock/ci"] }), finalized, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ states: ["finalized"] }), finalized, undefined)).toBe(true);
    expect(subscriptionTakes(sub({ states: ["queued"] }), finalized, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ outcomes: ["failure"] }), finalized, undefined)).toBe(true);
    expect(subscriptionTakes(sub({ outcomes: ["success", "canceled"] }), finalized, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ outcomes: ["canceled"] }), event({ payload: { state: "finalized", reason: "canceled" } }), undefined)).toBe(true);
    expect(subscriptionTakes(sub({ regressions_only: true }), finalized, undefined)).toBe(false);
    expect(subscriptionTakes(sub({ regressions_only: true }), event({ kind: "job.results", payload: { regression: true } }), undefined)).toBe(true);
  });

  it("the index answers what testing every subscription would, in the same order", () => {
    // A small seeded generator: the same cases on every run.
    let seed = 7;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)];
    const kinds = ["job.state", "job.stage", "job.results", "host.health", "lease.state"];
    const labelPool: Record<string, string>[] = [{}, { team: "red" }, { team: "blue" }, { team: "red", board: "a" }, { board: "a" }, { board: "b", team: "blue" }];
    const subs: ActiveSubscription[] = Array.from({ length: 300 }, (_, i) => ({
      ...sub(
        {
          kinds: rand(3) === 0 ? [] : [pick(kinds), ...(rand(2) === 0 ? [pick(kinds)] : [])],
          labels: pick(labelPool),
          states: rand(3) === 0 ? ["finalized"] : [],
          images: rand(5) === 0 ? ["tock/ci"] : [],
        },
        pick([ALICE, BOB]),
        rand(10) === 0,
      ),
      id: `s${i}`,
      created_at: new Date(rand(3)),
    }));
    const index = new SubscriptionIndex(subs);
    let taken = 0;
    for (let i = 0; i < 500; i++) {
      const e = event({
        kind: pick(kinds),
        at: new Date(rand(3)),
        ownerId: pick([ALICE, BOB, null]),
        audience: pick(["owner", "users", "admins"] as const),
        labels: pick([...labelPool, { team: "red", board: "b" }, { other: "x" }]),
        payload: { state: pick(["finalized", "running"]) },
      });
      const image = pick(["tock/ci:v1", "other:v1", undefined]);
      const expected = subs.filter((s) => e.at >= s.created_at && subscriptionTakes(s, e, image)).map((s) => s.id);
      expect(index.matching(e, image).map((s) => s.id)).toEqual(expected);
      taken += expected.length;
    }
    // The cases are not all empty.
    expect(taken).toBeGreaterThan(500);
  });
});
