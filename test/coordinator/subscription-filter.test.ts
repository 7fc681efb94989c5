import { describe, expect, it } from "@jest/globals";
import type { FeedEvent } from "../../coordinator/db/queries/feed.js";
import type { ActiveSubscription, StoredFilter } from "../../coordinator/db/queries/subscriptions.js";
import { subscriptionTakes } from "../../coordinator/subscriptions/filter.js";

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
});
