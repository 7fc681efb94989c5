import { durationFromMs, durationMs } from "@bufbuild/protobuf/wkt";
import { type Lease, LeaseEndReason, LeaseEndReasonSchema, type LeaseEvent, LeaseEventKindSchema, LeaseKind, LeaseService, LeaseState } from "../../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { spanText } from "../../../lib/figures.js";
import { errorText, keepWatching } from "../api.js";
import { facts, h, link, notice, table } from "../dom.js";
import { enumWord, iso, leaseHosts, leaseStatus, leaseTone, parseDuration, shortId, when } from "../format.js";
import type { PageContext } from "../main.js";

/** Why a lease ended, as its holder reads it: the reason, and the coordinator's message when it says more. */
function endText(lease: Lease): string {
  const reason = enumWord(LeaseEndReasonSchema, lease.endReason) || "ended";
  const message = lease.statusMessage;
  const said = message === "" ? reason : message.toLowerCase().startsWith(reason) ? message : `${reason}: ${message}`;
  const returned = lease.endReason === LeaseEndReason.RELEASED || lease.endReason === LeaseEndReason.EXPIRED ? "; its hosts were reset and returned" : "";
  return `Ended: ${said}${returned}.`;
}

/**
 * One lease (`/leases/ID`): its state live (WatchLease), its hosts with the
 * job running on each and links to that job's console and host control,
 * its timeline, and extend, release (its holder) and revoke (admins). While
 * its holder has the page open the page is the lease's keepalive, as
 * `tml reserve` is: a lease reserved here ends after its grace period once
 * no page and no `tml` holds it.
 */
export async function leasePage({ api, main, signal, params }: PageContext): Promise<void> {
  const leaseId = params[0];
  document.title = `Lease ${shortId(leaseId)} · Treadmill`;
  const leases = api.client(LeaseService);
  const me = api.session.current;

  const badge = h("span", { class: "badge", id: "lease-state", role: "status" }, "loading…");
  const status = h("div", { class: "status-area" });
  const ended = h("div", { id: "lease-end" });
  const keepalive = h("p", { class: "hint", id: "lease-keepalive", hidden: true });
  const details = h("section", { "aria-labelledby": "lease-details-title" }, h("h2", { id: "lease-details-title" }, "Details"));
  const hostsSection = h("section", { "aria-labelledby": "lease-hosts-title" }, h("h2", { id: "lease-hosts-title" }, "Hosts"));
  const timelineList = h("ol", { class: "timeline", id: "lease-timeline" });
  const timeline = h("section", { "aria-labelledby": "lease-timeline-title" }, h("h2", { id: "lease-timeline-title" }, "Timeline"), timelineList);
  const extendBy = h("input", { id: "extend-by", name: "by", value: "1h", size: "6", "aria-label": "Extend by" });
  const extend = h("button", { type: "button", id: "extend-lease" }, "Extend");
  const release = h("button", { type: "button", class: "danger", id: "release-lease" }, "Release");
  const reason = h("input", { id: "revoke-reason", name: "reason", placeholder: "why (shown to the holder)", "aria-label": "Reason to revoke" });
  const revoke = h("button", { type: "button", class: "danger", id: "revoke-lease" }, "Revoke");
  const holderActions = h("div", { class: "actions", id: "lease-actions", hidden: true }, extendBy, extend, release);
  const adminActions = h("div", { class: "filters", id: "lease-admin", hidden: true }, h("div", { class: "field" }, reason), revoke);
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Lease ", h("code", {}, leaseId)), badge, holderActions),
    adminActions,
    status,
    ended,
    keepalive,
    h("div", { class: "columns" }, details, h("div", {}, hostsSection, timeline)),
  );

  let lease: Lease | undefined;
  const seen = new Set<string>();
  const addEvents = (events: LeaseEvent[]) => {
    for (const e of events) {
      const key = `${iso(e.time)}|${e.kind}|${e.hostId}|${e.message}`;
      if (seen.has(key)) continue;
      seen.add(key);
      timelineList.append(
        h(
          "li",
          { "data-kind": enumWord(LeaseEventKindSchema, e.kind) },
          h("time", { datetime: iso(e.time) }, when(e.time)),
          " ",
          h("strong", {}, enumWord(LeaseEventKindSchema, e.kind)),
          e.message ? h("div", { class: "muted" }, e.message) : null,
        ),
      );
    }
  };
  const show = (next: Lease) => {
    lease = next;
    const isHolder = next.ownerUserId === me?.userId;
    const open = next.state !== LeaseState.ENDED;
    badge.textContent = leaseStatus(next);
    badge.className = `badge ${leaseTone(next)}`;
    badge.dataset.state = leaseStatus(next);
    holderActions.hidden = !open || !(isHolder || me?.admin);
    adminActions.hidden = !open || !me?.admin || isHolder;
    ended.replaceChildren(open ? "" : notice(next.endReason === LeaseEndReason.RELEASED || next.endReason === LeaseEndReason.EXPIRED ? "info" : "error", endText(next)));
    keepalive.hidden = !open || !isHolder;
    keepalive.textContent = `This page keeps the lease alive while it is open; closed, the lease ends after ${next.gracePeriod ? spanText(durationMs(next.gracePeriod)) : "its grace period"} unless \`tml reserve\` or \`tml lease renew\` keeps it.`;
    details.replaceChildren(
      details.firstChild!,
      facts([
        ["State", [leaseStatus(next), next.statusMessage && open ? ` (${next.statusMessage})` : ""].join("")],
        ["Holder", next.ownerUsername || next.ownerUserId],
        ["Kind", next.kind === LeaseKind.HOLD ? h("span", {}, "hold of failed job ", link(`/jobs/${next.heldJobId}`, h("code", {}, shortId(next.heldJobId)))) : "reservation"],
        ["Hosts", leaseHosts(next)],
        ["Image", next.image || "none (bare)"],
        ["Starts", h("time", { datetime: iso(next.startTime) }, when(next.startTime))],
        ["Ends", h("time", { datetime: iso(next.endTime), id: "lease-ends" }, when(next.endTime))],
        ["Deadline", next.deadline ? h("time", { datetime: iso(next.deadline) }, when(next.deadline)) : ""],
        ["Grace period", next.gracePeriod ? spanText(durationMs(next.gracePeriod)) : ""],
        ["Last keepalive", next.keepaliveTime ? h("time", { datetime: iso(next.keepaliveTime) }, when(next.keepaliveTime)) : ""],
        ["Description", next.description],
      ]),
    );
    const rows = next.leaseHosts.map((host) => [
      link(`/hosts/${encodeURIComponent(host.hostName || host.hostId)}`, host.hostName || host.hostId),
      host.jobId ? link(`/jobs/${host.jobId}`, h("code", { title: host.jobId }, shortId(host.jobId))) : h("span", { class: "muted" }, "none"),
      host.jobId && open
        ? h(
            "span",
            { class: "row" },
            h("a", { href: `/jobs/${host.jobId}/console`, class: "button", "aria-label": `Console of ${host.hostName}` }, "Console"),
            h("a", { href: `/jobs/${host.jobId}`, class: "button", "aria-label": `Control ${host.hostName}` }, "Control"),
          )
        : "",
    ]);
    const hostsTable =
      rows.length === 0
        ? h("p", { class: "muted" }, "No hosts booked yet.")
        : table("Hosts of the lease", ["Host", "Job running", ""], rows, { id: "lease-hosts" });
    if (rows.length > 0 && open && next.leaseHosts.every((x) => !x.jobId) && next.state === LeaseState.ACTIVE) {
      hostsSection.replaceChildren(hostsSection.firstChild!, hostsTable, h("p", { class: "hint" }, `No job runs in it: \`tml job run --lease ${next.id} IMAGE\` starts one.`));
    } else hostsSection.replaceChildren(hostsSection.firstChild!, hostsTable);
  };

  const act = async (button: HTMLButtonElement, run: () => Promise<{ lease?: Lease }>, done: (l: Lease) => string) => {
    button.disabled = true;
    try {
      const res = await run();
      if (res.lease) {
        show(res.lease);
        status.replaceChildren(notice("info", done(res.lease)));
      }
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      button.disabled = false;
    }
  };
  extend.addEventListener("click", () => {
    let seconds: number;
    try {
      seconds = parseDuration(extendBy.value);
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
      return;
    }
    const requestId = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
    void act(extend, () => leases.extendLease({ leaseId, by: durationFromMs(seconds * 1000), requestId }, { timeoutMs: 15_000 }), (l) => `Extended: it now ends ${when(l.endTime)}.`);
  });
  release.addEventListener("click", () => {
    if (!window.confirm("Release this lease? Its jobs are canceled and its hosts reset.")) return;
    void act(release, () => leases.releaseLease({ leaseId }, { timeoutMs: 15_000 }), () => "Released.");
  });
  revoke.addEventListener("click", () => {
    void act(revoke, () => leases.revokeLease({ leaseId, reason: reason.value.trim() }, { timeoutMs: 15_000 }), () => "Revoked.");
  });

  try {
    const res = await leases.getLease({ leaseId }, { signal, timeoutMs: 15_000 });
    if (res.lease) {
      show(res.lease);
      addEvents(res.lease.timeline);
    }
  } catch (err) {
    if (!signal.aborted) status.replaceChildren(notice("error", errorText(err)));
    badge.textContent = "";
    return;
  }
  if (!lease || lease.state === LeaseState.ENDED) return;
  const watching = new AbortController();
  signal.addEventListener("abort", () => watching.abort(), { once: true });
  const holder = lease.ownerUserId === me?.userId;
  let streamTrouble = false;
  await keepWatching(
    watching.signal,
    (s) => leases.watchLease({ leaseId, keepalive: holder }, { signal: s }),
    (change) => {
      if (!change.lease) return;
      show(change.lease);
      addEvents(change.events);
      if (change.lease.state === LeaseState.ENDED) watching.abort();
    },
    (ok, detail) => {
      if (!ok && detail) {
        streamTrouble = true;
        status.replaceChildren(notice("error", detail));
      } else if (ok && streamTrouble) {
        streamTrouble = false;
        status.replaceChildren();
      }
    },
  );
}
