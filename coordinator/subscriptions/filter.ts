/**
 * Whether a subscription takes a feed event (docs/events.md,
 * "Subscriptions"). First the feed's own visibility rule (feed.ts
 * visibleTo) with the subscription's owner as the viewer, so that no
 * filter can match an event its owner may not read in the feed; then the
 * filter's fields, all of which must match. Pure: the worker asks a
 * SubscriptionIndex, which calls it on the few subscriptions an event's
 * kind and labels leave.
 */
import { FEED_KINDS, type FeedEvent, visibleTo } from "../db/queries/feed.js";
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

/**
 * The subscriptions of one version, indexed so that an event is tested only
 * against those that can take it: by kind, then by one label the filter
 * requires (its first), since a filter with labels takes only events that
 * carry each. With 1,000 subscriptions on 100 label values, an event is
 * tested against 10, not 1,000. `matching` answers exactly what testing
 * every subscription with `subscriptionTakes` would, in the same order.
 */
export class SubscriptionIndex {
  /** Per kind: subscriptions without labels, and those with, by their first label ("key\0value"). */
  private readonly byKind = new Map<string, { open: number[]; labelled: Map<string, number[]> }>();

  constructor(readonly subscriptions: readonly ActiveSubscription[]) {
    const kinds = new Set<string>(FEED_KINDS);
    for (const s of subscriptions) for (const k of s.filter.kinds) kinds.add(k);
    for (const k of kinds) this.byKind.set(k, { open: [], labelled: new Map() });
    subscriptions.forEach((s, i) => {
      // No kinds: every kind but host.health (subscriptionTakes' rule).
      const kinds = s.filter.kinds.length > 0 ? s.filter.kinds : FEED_KINDS.filter((k) => k !== "host.health");
      const first = Object.entries(s.filter.labels)[0];
      for (const k of new Set(kinds)) {
        const slot = this.byKind.get(k)!;
        if (!first) slot.open.push(i);
        else {
          const key = `${first[0]}\0${first[1]}`;
          const list = slot.labelled.get(key);
          if (list) list.push(i);
          else slot.labelled.set(key, [i]);
        }
      }
    });
  }

  /** The subscriptions that take `e` (created before it), in their order; `image` as for subscriptionTakes. */
  matching(e: FeedEvent, image: string | undefined): ActiveSubscription[] {
    const slot = this.byKind.get(e.kind);
    if (!slot) return [];
    let positions = slot.open;
    if (slot.labelled.size > 0) {
      const lists = [slot.open];
      for (const [k, v] of Object.entries(e.labels)) {
        const list = slot.labelled.get(`${k}\0${v}`);
        if (list) lists.push(list);
      }
      if (lists.length > 1) positions = lists.flat().sort((a, b) => a - b);
    }
    const out: ActiveSubscription[] = [];
    for (const i of positions) {
      const s = this.subscriptions[i];
      if (e.at >= s.created_at && subscriptionTakes(s, e, image)) out.push(s);
    }
    return out;
  }
}
