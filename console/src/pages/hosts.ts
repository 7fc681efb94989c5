import { create } from "@bufbuild/protobuf";
import { FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import {
  DriverKindSchema,
  HostAdminState,
  HostAdminStateSchema,
  HostHealth,
  HostHealthSchema,
  HostSchema,
  type Host,
} from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostChangeKind, HostService } from "../../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { errorText, keepWatching } from "../api.js";
import { h, link, notice, tableRow } from "../dom.js";
import { enumWord, healthTone, iso, shortId, tagsText, when } from "../format.js";
import type { PageContext } from "../main.js";

const HEADERS = ["Host", "Status", "Health", "Admin state", "Driver", "Site", "Tags", "Current jobs", "Last seen", "Actions"];
const HEALTHS = HostHealthSchema.values.filter((v) => v.number !== HostHealth.UNSPECIFIED).map((v) => ({ value: v.number, word: enumWord(HostHealthSchema, v.number) }));

/** Hosts, live (WatchHosts), filtered by health (`?health=quarantined`), each linking to its page; admins drain and enable them (UpdateHost). */
export function hostsPage({ app, api, main, signal, query }: PageContext): void {
  document.title = "Hosts · Treadmill";
  const hosts = api.client(HostService);
  const admin = api.session.current?.admin ?? false;
  const live = h("span", { class: "live", role: "status" }, "connecting…");
  const status = h("div", { class: "status-area" });
  const tbody = h("tbody", {});
  const wanted = HEALTHS.find((x) => x.word === query.get("health"));
  const healthSelect = h("select", { id: "filter-health", name: "health" }, h("option", { value: "" }, "any"), ...HEALTHS.map((x) => h("option", { value: x.word }, x.word)));
  healthSelect.value = wanted?.word ?? "";
  healthSelect.addEventListener("change", () => app.navigate(`/hosts${healthSelect.value ? `?health=${encodeURIComponent(healthSelect.value)}` : ""}`));
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Hosts"), live),
    h("form", { class: "filters", role: "search", "aria-label": "Filter hosts", onsubmit: (e) => e.preventDefault() }, h("div", { class: "field" }, h("label", { for: "filter-health" }, "Health"), healthSelect)),
    status,
    h(
      "div",
      { class: "table-wrap" },
      h("table", { id: "hosts-table", class: "cards" }, h("caption", { class: "visually-hidden" }, "Hosts"), h("thead", {}, h("tr", {}, ...HEADERS.map((t) => h("th", { scope: "col" }, t)))), tbody),
    ),
  );

  const byId = new Map<string, Host>();
  let frame = 0;
  const redraw = () => {
    frame = 0;
    const rows = [...byId.values()].sort((a, b) => a.name.localeCompare(b.name)).map(row);
    tbody.replaceChildren(...(rows.length > 0 ? rows : [h("tr", {}, h("td", { colspan: String(HEADERS.length) }, wanted ? `No ${wanted.word} hosts.` : "No hosts."))]));
  };

  const setAdminState = async (host: Host, state: HostAdminState) => {
    try {
      const res = await hosts.updateHost(
        {
          hostId: host.id,
          host: create(HostSchema, { adminState: state, adminStateReason: state === HostAdminState.ENABLED ? "" : "drained from the web console" }),
          updateMask: create(FieldMaskSchema, { paths: ["admin_state", "admin_state_reason"] }),
        },
        { timeoutMs: 15_000 },
      );
      if (res.host) byId.set(res.host.id, res.host);
      status.replaceChildren(notice("info", `${host.name} is now ${enumWord(HostAdminStateSchema, state)}.`));
      frame ||= requestAnimationFrame(redraw);
    } catch (err) {
      status.replaceChildren(notice("error", `${host.name}: ${errorText(err)}`));
    }
  };

  const row = (host: Host) => {
    const enabled = host.adminState === HostAdminState.ENABLED;
    const action = !admin
      ? ""
      : h(
          "button",
          {
            type: "button",
            class: enabled ? "" : "primary",
            "aria-label": `${enabled ? "Drain" : "Enable"} ${host.name}`,
            onclick: () => void setAdminState(host, enabled ? HostAdminState.DRAINING : HostAdminState.ENABLED),
          },
          enabled ? "Drain" : "Enable",
        );
    return tableRow(
      HEADERS,
      [
        link(`/hosts/${encodeURIComponent(host.name)}`, h("strong", { title: host.id }, host.name)),
        h("span", { class: `badge ${host.online ? "tone-ok" : "tone-bad"}` }, host.online ? "online" : "offline"),
        h("span", { title: host.healthReason }, h("span", { class: `badge ${healthTone(host.health)}` }, enumWord(HostHealthSchema, host.health)), host.healthReason ? h("span", { class: "muted" }, ` ${host.healthReason}`) : null),
        [enumWord(HostAdminStateSchema, host.adminState), host.adminStateReason ? ` (${host.adminStateReason})` : ""].join(""),
        enumWord(DriverKindSchema, host.driverKind),
        host.site,
        tagsText(host.tags),
        h("span", {}, ...host.currentJobIds.flatMap((id, i) => [i > 0 ? ", " : "", link(`/jobs/${id}`, h("code", { title: id }, shortId(id)))])),
        h("time", { datetime: iso(host.lastSeenTime) }, when(host.lastSeenTime)),
        action,
      ],
      { id: `host-${host.id}`, "data-host": host.name, "data-online": String(host.online), "data-health": enumWord(HostHealthSchema, host.health) },
    );
  };

  void keepWatching(
    signal,
    (s) => hosts.watchHosts({ filter: { health: wanted?.value ?? HostHealth.UNSPECIFIED } }, { signal: s }),
    (change, fresh) => {
      if (fresh) byId.clear();
      if (change.kind === HostChangeKind.DELETED && change.host) byId.delete(change.host.id);
      else if (change.host) byId.set(change.host.id, change.host);
      frame ||= requestAnimationFrame(redraw);
    },
    (ok, detail) => {
      live.textContent = ok ? "live" : (detail ?? "disconnected");
      live.classList.toggle("off", !ok);
    },
  );
}
