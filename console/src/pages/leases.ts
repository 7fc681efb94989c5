import { durationFromMs, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { type Lease, LeaseKind, LeaseService, LeaseState, type CalendarHost, type GetLeaseCalendarResponse } from "../../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { spanText } from "../../../lib/figures.js";
import { errorText, type Api } from "../api.js";
import { h, link, notice, pager, tableRow } from "../dom.js";
import { iso, leaseHosts, leaseStatus, leaseTone, parseDuration, parseTags, shortId, when } from "../format.js";
import type { App, PageContext } from "../main.js";

const HEADERS = ["Lease", "State", "Owner", "Hosts", "Starts", "Ends", "Description"];
const PAGE_SIZE = 50;
const HOUR_MS = 3_600_000;

/**
 * The leases list (ListLeases: the user's own; an admin's `?all=1`:
 * everyone's), newest first, with a form to reserve hosts by tags; each
 * lease links to its page, which holds the new lease's keepalive.
 */
export async function leasesPage({ app, api, main, signal, query }: PageContext): Promise<void> {
  document.title = "Leases · Treadmill";
  const leases = api.client(LeaseService);
  const admin = api.session.current?.admin ?? false;
  const all = admin && query.get("all") === "1";
  const allBox = h("input", { type: "checkbox", id: "filter-all", checked: all });
  allBox.addEventListener("change", () => app.navigate(`/leases${allBox.checked ? "?all=1" : ""}`));
  const status = h("div", { class: "status-area" });
  const tbody = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "Load older leases");
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Leases"), h("div", { class: "actions" }, link("/leases/calendar", "Timeline of the next 48 hours"))),
    reserveForm(app, api, {}),
    admin ? h("div", { class: "filters" }, h("label", { for: "filter-all" }, allBox, "Every user's leases")) : "",
    status,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "leases-table", class: "cards" },
        h("caption", { class: "visually-hidden" }, "Leases, newest first"),
        h("thead", {}, h("tr", {}, ...HEADERS.map((t) => h("th", { scope: "col" }, t)))),
        tbody,
      ),
    ),
    more,
  );
  let shown = 0;
  const load = pager(more, status, signal, async (pageToken) => {
    const res = await leases.listLeases({ pageSize: PAGE_SIZE, pageToken, allUsers: all }, { signal, timeoutMs: 20_000 });
    if (shown === 0 && res.leases.length === 0) tbody.append(h("tr", {}, h("td", { colspan: String(HEADERS.length) }, "No leases.")));
    for (const lease of res.leases) tbody.append(leaseRow(lease));
    shown += res.leases.length;
    return res.nextPageToken;
  });
  await load();
}

function leaseRow(lease: Lease): HTMLTableRowElement {
  return tableRow(
    HEADERS,
    [
      link(`/leases/${lease.id}`, h("code", { title: lease.id }, shortId(lease.id))),
      h("span", { class: `badge ${leaseTone(lease)}` }, leaseStatus(lease)),
      lease.ownerUsername || shortId(lease.ownerUserId),
      leaseHosts(lease),
      h("time", { datetime: iso(lease.startTime) }, when(lease.startTime)),
      h("time", { datetime: iso(lease.endTime) }, when(lease.endTime)),
      lease.kind === LeaseKind.HOLD ? `hold of job ${shortId(lease.heldJobId)}` : lease.description,
    ],
    { "data-lease-id": lease.id, "data-state": leaseStatus(lease) },
  );
}

/**
 * A form that reserves hosts (CreateLease): by tags and a count, or the one
 * host named by `hostName` (the host page's "Reserve"); for a duration, now
 * or from a local time. On success it opens the lease's page.
 */
export function reserveForm(app: App, api: Api, { hostName }: { hostName?: string }): HTMLElement {
  const status = h("div", { class: "status-area" });
  const tags = h("input", { id: "reserve-tags", name: "tags", placeholder: "board=nrf52840dk" });
  const count = h("input", { id: "reserve-count", name: "count", type: "number", min: "1", max: "64", value: "1" });
  const duration = h("input", { id: "reserve-for", name: "for", value: "1h", required: true });
  const start = h("input", { id: "reserve-at", name: "at", type: "datetime-local" });
  const image = h("input", { id: "reserve-image", name: "image", placeholder: "none: the hosts as they are" });
  const field = (id: string, label: string, input: HTMLElement, hint?: string) =>
    h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("p", { class: "hint" }, hint) : null);
  const form = h(
    "form",
    { class: "filters", id: "reserve-form", "aria-label": hostName ? `Reserve ${hostName}` : "Reserve hosts" },
    hostName ? null : field("reserve-tags", "Host tags", tags),
    hostName ? null : field("reserve-count", "Hosts", count),
    field("reserve-for", "For", duration, "90m, 2h, 1h30m"),
    field("reserve-at", "Starting", start, "empty: now"),
    field("reserve-image", "Image", image),
    h("button", { type: "submit", class: "primary" }, "Reserve"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button")!;
    button.disabled = true;
    try {
      const seconds = parseDuration(duration.value);
      const request = {
        hosts: hostName ? undefined : { tags: parseTags(tags.value), hostCount: Number(count.value) || 1 },
        hostNames: hostName ? [hostName] : [],
        duration: durationFromMs(seconds * 1000),
        startTime: start.value ? timestampFromMs(new Date(start.value).getTime()) : undefined,
        image: image.value.trim(),
        // getRandomValues, not randomUUID: the console may be served over plain http.
        requestId: Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join(""),
        description: "reserved from the web console",
      };
      const { lease } = await api.client(LeaseService).createLease(request, { timeoutMs: 30_000 });
      if (lease) app.navigate(`/leases/${lease.id}`);
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      button.disabled = false;
    }
  });
  return h(
    "section",
    { "aria-labelledby": "reserve-title", id: "reserve" },
    h("h2", { id: "reserve-title" }, hostName ? `Reserve ${hostName}` : "Reserve hosts"),
    h("p", { class: "hint" }, "The lease's page keeps it alive while it is open; closed, the lease ends after its grace period (5 minutes by default). `tml reserve` does the same from a terminal."),
    form,
    status,
  );
}

/**
 * The next hours of the hosts' calendar (GetLeaseCalendar): a row per host,
 * its leases and running jobs as bars over a time axis, each bar a link to
 * its lease or job; filtered by tags (`?tag=k=v`) and a window (`?hours=`).
 */
export async function calendarPage({ app, api, main, signal, query }: PageContext): Promise<void> {
  document.title = "Timeline · Treadmill";
  const hours = [24, 48, 72, 168].includes(Number(query.get("hours"))) ? Number(query.get("hours")) : 48;
  const tagInput = h("input", { id: "calendar-tags", name: "tag", placeholder: "key=value", value: query.get("tag") ?? "" });
  const hoursSelect = h("select", { id: "calendar-hours", name: "hours" }, ...[24, 48, 72, 168].map((n) => h("option", { value: String(n) }, n === 168 ? "7 days" : `${n} hours`)));
  hoursSelect.value = String(hours);
  const filters = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter hosts" },
    h("div", { class: "field" }, h("label", { for: "calendar-tags" }, "Host tags"), tagInput),
    h("div", { class: "field" }, h("label", { for: "calendar-hours" }, "Window"), hoursSelect),
    h("button", { type: "submit" }, "Show"),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    if (tagInput.value.trim()) q.set("tag", tagInput.value.trim());
    if (hoursSelect.value !== "48") q.set("hours", hoursSelect.value);
    app.navigate(`/leases/calendar${q.size > 0 ? `?${q}` : ""}`);
  });
  const status = h("div", { class: "status-area" });
  const chart = h("div", { class: "calendar", id: "calendar" });
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Timeline"), h("div", { class: "actions" }, link("/leases", "Leases"))),
    filters,
    status,
    chart,
    h(
      "p",
      { class: "hint" },
      h("span", { class: "cal-key cal-lease-active" }), " active lease ",
      h("span", { class: "cal-key cal-lease-booked" }), " booked lease ",
      h("span", { class: "cal-key cal-job" }), " job",
    ),
  );
  try {
    const from = Date.now();
    const calendar = await api
      .client(LeaseService)
      .getLeaseCalendar({ hosts: { tags: parseTags(tagInput.value) }, from: timestampFromMs(from), to: timestampFromMs(from + hours * HOUR_MS) }, { signal, timeoutMs: 30_000 });
    chart.replaceChildren(...calendarRows(calendar));
  } catch (err) {
    if (!signal.aborted) status.replaceChildren(notice("error", errorText(err)));
  }
}

/** The chart's axis and rows; bars placed by percentage of the window. */
function calendarRows(calendar: GetLeaseCalendarResponse): HTMLElement[] {
  if (!calendar.from || !calendar.to) return [];
  const from = timestampMs(calendar.from);
  const to = timestampMs(calendar.to);
  const span = to - from;
  const at = (ms: number) => `${(((Math.min(Math.max(ms, from), to) - from) / span) * 100).toFixed(3)}%`;
  const axis = h("div", { class: "cal-row cal-axis", "aria-hidden": "true" }, h("span", { class: "cal-host" }));
  const track = h("div", { class: "cal-track" });
  const step = span <= 72 * HOUR_MS ? 6 * HOUR_MS : 24 * HOUR_MS;
  const first = new Date(from);
  first.setMinutes(0, 0, 0);
  for (let t = first.getTime() + HOUR_MS; t < to; t += HOUR_MS) {
    const d = new Date(t);
    if ((d.getHours() * HOUR_MS) % step !== 0) continue;
    const label = d.getHours() === 0 ? d.toLocaleDateString(undefined, { weekday: "short", day: "numeric" }) : `${String(d.getHours()).padStart(2, "0")}:00`;
    track.append(h("span", { class: "cal-tick", style: `left: ${at(t)}` }, label));
  }
  axis.append(track);
  if (calendar.hosts.length === 0) return [h("p", { class: "muted" }, "No hosts match.")];
  return [axis, ...calendar.hosts.map((host) => hostRow(host, at))];
}

function hostRow(host: CalendarHost, at: (ms: number) => string): HTMLElement {
  const track = h("div", { class: "cal-track" });
  for (const entry of host.entries) {
    if (!entry.startTime || !entry.endTime) continue;
    const start = timestampMs(entry.startTime);
    const end = timestampMs(entry.endTime);
    const lease = entry.kind === "lease";
    const kind = lease ? (entry.leaseState === LeaseState.ACTIVE ? "cal-lease-active" : "cal-lease-booked") : "cal-job";
    const what = lease ? `lease ${entry.leaseState === LeaseState.ACTIVE ? "active" : "booked"}` : "job";
    const label = `${what}${entry.ownerUsername ? ` of ${entry.ownerUsername}` : ""}, ${when(entry.startTime)} to ${when(entry.endTime)} (${spanText(end - start)})`;
    const left = at(start);
    const width = `calc(${at(end)} - ${left})`;
    const attrs = { class: `cal-bar ${kind}`, style: `left: ${left}; width: ${width}`, title: label, "aria-label": label, "data-kind": entry.kind, "data-id": entry.id };
    track.append(entry.id ? h("a", { ...attrs, href: lease ? `/leases/${entry.id}` : `/jobs/${entry.id}` }) : h("span", { ...attrs, role: "img" }));
  }
  return h("div", { class: "cal-row", "data-host": host.hostName }, h("span", { class: "cal-host" }, link(`/hosts/${encodeURIComponent(host.hostName)}`, host.hostName)), track);
}
