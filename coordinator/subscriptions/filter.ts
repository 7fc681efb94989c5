/**
 * Whether a subscription takes a feed event (docs/events.md,
 * "Subscriptions"). First the feed's own visibility rule (feed.ts
 * visibleTo) with the subscription's owner as the viewer, so that no
 * filter can match an event its owner may not read in the feed; then the
 * filter's fields, all of which must match. Pure: the worker calls it for
 * each (event, subscription) of a read.
 */
import { type FeedEvent, visibleTo } from "../db/queries/feed.js";
import type { ActiveSubscription } from "../db/queries/subscriptions.js";

/** The outcome word of a finalized job event: its exit status when the workload exited, else its reason. */
function outcomeOf(payload: Record<string, unknown>): unknown {
  return payload.reason === "workload_exited" ? payload.exit_status : payload.reason;
}

/** Whether `image` (a job's spec.image, "name:tag") is one of `wanted` ("name" or "name:tag"). */
function imageMatches(wanted: readonly string[], image: string | undefined): boolean {
  if (image === undefined) return false;
  const colon = image.lastIndexOf(":");
  const name = colon > 0 && !image.slice(colon).includes("/") ? image.slice(0, colon) : image;
  return wanted.includes(image) || wanted.includes(name);
}

/** Whether `s` takes `e`; `image` is the event's job's image, when it has a job. */
export function subscriptionTakes(s: ActiveSubscription, e: FeedEvent, image: string | undefined): boolean {
  if (!visibleTo({ kind: "user", userId: s.owner_id, admin: s.owner_admin }, {}, e)) return false;
  const f = s.filter;
  if (f.kinds.length === 0 ? e.kind === "host.health" : !f.kinds.includes(e.kind)) return false;
  for (const [k, v] of Object.entries(f.labels)) if (e.labels[k] !== v) return false;
  if (f.images.length > 0 && !imageMatches(f.images, image)) return false;
  if (f.owner_ids.length > 0 && (e.ownerId === null || !f.owner_ids.includes(e.ownerId))) return false;
  if (f.states.length > 0 && !f.states.includes(e.payload.state as string)) return false;
  if (f.outcomes.length > 0 && !f.outcomes.includes(outcomeOf(e.payload) as string)) return false;
  if (f.regressions_only && e.payload.regression !== true) return false;
  return true;
}
