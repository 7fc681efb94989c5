import {
  type Delivery,
  DeliveryState,
  DeliveryStateSchema,
  type Destination,
  EmailMode,
  type Subscription,
  SubscriptionService,
} from "../../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { errorText, type Api } from "../api.js";
import { facts, h, link, notice, pager, table, tableRow } from "../dom.js";
import { enumWord, iso, parseTags, shortId, tagsText, when } from "../format.js";
import type { App, PageContext } from "../main.js";

const HEADERS = ["Subscription", "State", "Destinations", "Filter"];
const DELIVERY_HEADERS = ["Queued", "Event", "Kind", "State", "Attempts", "Code", "Error", ""];
const PAGE_SIZE = 50;

function destinationText(d: Destination): string {
  if (d.target.case === "webhook") return d.target.value.url;
  if (d.target.case === "email") return `email ${d.target.value.to.join(", ")}${d.target.value.mode === EmailMode.DIGEST ? " (digest)" : ""}`;
  return "";
}

function filterText(s: Subscription): string {
  const f = s.filter;
  if (!f) return "every event";
  const parts = [
    f.kinds.length > 0 ? `kind ${f.kinds.join(" or ")}` : "",
    Object.keys(f.labels).length > 0 ? `labels ${tagsText(f.labels)}` : "",
    f.images.length > 0 ? `image ${f.images.join(" or ")}` : "",
    f.ownerUserIds.length > 0 ? `owner ${f.ownerUserIds.map(shortId).join(" or ")}` : "",
    f.states.length > 0 ? `state ${f.states.join(" or ")}` : "",
    f.outcomes.length > 0 ? `outcome ${f.outcomes.join(" or ")}` : "",
    f.regressionsOnly ? "regressions only" : "",
  ].filter((p) => p !== "");
  return parts.length === 0 ? "every event" : parts.join(", ");
}

function stateBadge(s: Subscription): HTMLElement {
  if (s.enabled) return h("span", { class: "badge tone-ok" }, "enabled");
  return h("span", { class: "badge tone-bad" }, s.disabledReason !== "" ? "disabled by the coordinator" : "disabled");
}

/** The notice an owner sees when the coordinator disabled a subscription, with the way back. */
function disabledNotice(app: App, api: Api, s: Subscription): HTMLElement | null {
  if (s.enabled || s.disabledReason === "") return null;
  const enable = h("button", { type: "button", "data-enable": s.id }, "Enable again");
  enable.addEventListener("click", async () => {
    enable.disabled = true;
    try {
      await api.client(SubscriptionService).updateSubscription({ id: s.id, enabled: true }, { timeoutMs: 15_000 });
      app.navigate(window.location.pathname + window.location.search, { replace: true });
    } catch (err) {
      enable.replaceWith(notice("error", errorText(err)));
    }
  });
  return h(
    "div",
    { class: "notice error", role: "alert", "data-disabled-subscription": s.id },
    h("p", {}, "Subscription ", h("strong", {}, s.name), ` was disabled on ${when(s.disableTime)}: ${s.disabledReason}.`),
    enable,
  );
}

/**
 * The user's subscriptions (`/subscriptions`): each with its state and the
 * coordinator's notice when it disabled one, a form to subscribe a
 * webhook (its secret is shown once, here), and links to each delivery log.
 */
export async function subscriptionsPage({ app, api, main, signal }: PageContext): Promise<void> {
  document.title = "Subscriptions · Treadmill";
  const subs = api.client(SubscriptionService);
  const status = h("div", { class: "status-area" });
  const notices = h("div", { id: "subscription-notices" });
  const list = h("div", { id: "subscriptions-list" });
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Subscriptions")),
    h("p", { class: "hint" }, "Events of the feed sent to a webhook or by email; docs/events.md says how to verify a webhook request."),
    notices,
    createForm(api, status),
    status,
    list,
  );
  try {
    const { subscriptions } = await subs.listSubscriptions({}, { signal, timeoutMs: 20_000 });
    notices.replaceChildren(...subscriptions.map((s) => disabledNotice(app, api, s)).filter((n): n is HTMLElement => n !== null));
    list.replaceChildren(
      subscriptions.length === 0
        ? h("p", {}, "No subscriptions.")
        : table(
            "Subscriptions, newest first",
            HEADERS,
            subscriptions.map((s) => [link(`/subscriptions/${s.id}`, s.name), stateBadge(s), s.destinations.map(destinationText).join(" · "), filterText(s)]),
            { id: "subscriptions-table", class: "cards" },
          ),
    );
  } catch (err) {
    status.replaceChildren(notice("error", errorText(err)));
  }
}

/** A form that subscribes a webhook (CreateSubscription) and shows its secret once. */
function createForm(api: Api, status: HTMLElement): HTMLElement {
  const name = h("input", { id: "sub-name", name: "name", required: true, placeholder: "ci-results" });
  const url = h("input", { id: "sub-url", name: "url", type: "url", required: true, placeholder: "https://ci.example.org/treadmill" });
  const labels = h("input", { id: "sub-labels", name: "labels", placeholder: "project=tock" });
  const states = h("input", { id: "sub-states", name: "states", placeholder: "finalized" });
  const field = (id: string, label: string, input: HTMLElement) => h("div", { class: "field" }, h("label", { for: id }, label), input);
  const form = h(
    "form",
    { class: "filters", id: "subscription-form", "aria-label": "Subscribe a webhook" },
    field("sub-name", "Name", name),
    field("sub-url", "Webhook URL", url),
    field("sub-labels", "Job labels", labels),
    field("sub-states", "States", states),
    h("button", { type: "submit", class: "primary" }, "Subscribe"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button")!;
    button.disabled = true;
    try {
      const res = await api.client(SubscriptionService).createSubscription(
        {
          name: name.value.trim(),
          filter: { labels: parseTags(labels.value), states: states.value.split(/[\s,]+/).filter((s) => s !== "") },
          destinations: [{ target: { case: "webhook", value: { url: url.value.trim() } } }],
        },
        { timeoutMs: 20_000 },
      );
      status.replaceChildren(
        h(
          "div",
          { class: "notice info", role: "status", id: "subscription-secret" },
          h("p", {}, "Subscribed. Its signing secret, shown this once: ", h("code", {}, res.secret)),
          link(`/subscriptions/${res.subscription!.id}`, "Open its delivery log"),
        ),
      );
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function deliveryRow(api: Api, d: Delivery, status: HTMLElement, reload: () => void): HTMLTableRowElement {
  const redeliver = h("button", { type: "button", "data-redeliver": d.id }, "Redeliver");
  redeliver.addEventListener("click", async () => {
    redeliver.disabled = true;
    try {
      await api.client(SubscriptionService).redeliver({ deliveryId: d.id }, { timeoutMs: 15_000 });
      reload();
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
      redeliver.disabled = false;
    }
  });
  const tone = d.state === DeliveryState.DELIVERED ? "tone-ok" : d.state === DeliveryState.FAILED ? "tone-bad" : "tone-wait";
  const attempts = d.attempts.map((a) => `${when(a.time)}: ${a.responseCode || "-"} ${a.error || "ok"}`).join("\n");
  return tableRow(
    DELIVERY_HEADERS,
    [
      h("time", { datetime: iso(d.createTime) }, when(d.createTime)),
      h("code", { title: d.id }, d.eventId),
      d.eventKind,
      h("span", { class: `badge ${tone}` }, enumWord(DeliveryStateSchema, d.state)),
      h("span", { title: attempts }, String(d.attemptCount)),
      d.responseCode === 0 ? "-" : String(d.responseCode),
      d.error || "-",
      redeliver,
    ],
    { "data-delivery-id": d.id },
  );
}

/**
 * One subscription (`/subscriptions/ID`): its filter and destinations, the
 * coordinator's notice if it disabled it, test, enable/disable and delete,
 * and its delivery log (newest first, each attempt in the row's title)
 * with a Redeliver button per delivery.
 */
export async function subscriptionPage({ app, api, main, signal, params }: PageContext): Promise<void> {
  const id = params[0];
  document.title = `Subscription ${shortId(id)} · Treadmill`;
  const subs = api.client(SubscriptionService);
  const status = h("div", { class: "status-area" });
  let s: Subscription;
  try {
    s = (await subs.getSubscription({ id }, { signal, timeoutMs: 20_000 })).subscription!;
  } catch (err) {
    main.append(h("h1", { tabindex: "-1" }, "Subscription"), notice("error", errorText(err)));
    return;
  }
  const reload = () => app.navigate(`/subscriptions/${id}`, { replace: true });
  const action = (label: string, run: () => Promise<unknown>, attrs: Record<string, string> = {}) => {
    const b = h("button", { type: "button", ...attrs }, label);
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await run();
        reload();
      } catch (err) {
        status.replaceChildren(notice("error", errorText(err)));
        b.disabled = false;
      }
    });
    return b;
  };
  const tbody = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "Load older deliveries");
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", { tabindex: "-1" }, "Subscription ", h("code", {}, s.name)),
      stateBadge(s),
      h(
        "div",
        { class: "actions" },
        action("Send a test event", () => subs.testSubscription({ id }, { timeoutMs: 15_000 }), { id: "test-subscription" }),
        action(s.enabled ? "Disable" : "Enable", () => subs.updateSubscription({ id, enabled: !s.enabled }, { timeoutMs: 15_000 })),
        action("Delete", async () => {
          await subs.deleteSubscription({ id }, { timeoutMs: 15_000 });
          app.navigate("/subscriptions");
        }, { class: "danger" }),
      ),
    ),
    disabledNotice(app, api, s) ?? "",
    status,
    facts([
      ["ID", h("code", {}, s.id)],
      ["Filter", filterText(s)],
      ["Destinations", s.destinations.map(destinationText).join(" · ")],
      ["Group", s.groupName],
      ["Failing since", s.failingSince ? when(s.failingSince) : ""],
      ["Created", when(s.createTime)],
    ]),
    h("h2", {}, "Delivery log"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "deliveries-table", class: "cards" },
        h("caption", { class: "visually-hidden" }, "Deliveries, newest first"),
        h("thead", {}, h("tr", {}, ...DELIVERY_HEADERS.map((t) => h("th", { scope: "col" }, t)))),
        tbody,
      ),
    ),
    more,
  );
  let shown = 0;
  const load = pager(more, status, signal, async (pageToken) => {
    const res = await subs.listDeliveries({ subscriptionId: id, pageSize: PAGE_SIZE, pageToken }, { signal, timeoutMs: 20_000 });
    if (shown === 0 && res.deliveries.length === 0) tbody.append(h("tr", {}, h("td", { colspan: String(DELIVERY_HEADERS.length) }, "No deliveries yet.")));
    for (const d of res.deliveries) tbody.append(deliveryRow(api, d, status, reload));
    shown += res.deliveries.length;
    return res.nextPageToken;
  });
  await load();
}
