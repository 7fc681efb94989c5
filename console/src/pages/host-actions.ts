import { HostHealth, type Host } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import { HealthService } from "../../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { errorText, type Api } from "../api.js";
import { h, notice } from "../dom.js";

/**
 * An admin's health actions on a host (HealthService): run its checks now,
 * quarantine it, return it to service, retire it; `changed` reloads the page's
 * view of it. Retiring asks first: there is no way back.
 */
export function hostActions(api: Api, host: Host, status: HTMLElement, changed: () => void): HTMLElement {
  const health = api.client(HealthService);
  const reason = h("input", { id: "health-reason", name: "reason", maxlength: "1024", placeholder: "why (shown on the host and in its timeline)" });
  const act = (label: string, run: () => Promise<unknown>, done: string, options: { danger?: boolean; confirm?: string } = {}) =>
    h(
      "button",
      {
        type: "button",
        class: options.danger ? "danger" : "",
        onclick: async (event: Event) => {
          if (options.confirm && !window.confirm(options.confirm)) return;
          const button = event.currentTarget as HTMLButtonElement;
          button.disabled = true;
          try {
            await run();
            status.replaceChildren(notice("info", done));
            changed();
          } catch (err) {
            status.replaceChildren(notice("error", `${host.name}: ${errorText(err)}`));
          } finally {
            button.disabled = false;
          }
        },
      },
      label,
    );
  const retired = host.health === HostHealth.RETIRED;
  return h(
    "section",
    { "aria-labelledby": "host-actions-title", id: "host-actions" },
    h("h2", { id: "host-actions-title" }, "Health actions"),
    retired
      ? h("p", { class: "muted" }, "This host is retired: it runs no job again.")
      : h(
          "div",
          { class: "filters" },
          h("div", { class: "field" }, h("label", { for: "health-reason" }, "Reason"), reason),
          act("Run health checks", () => health.runHealthCheck({ hostId: host.id }, { timeoutMs: 15_000 }), `${host.name}'s health checks are queued.`),
          act("Quarantine", () => health.quarantineHost({ hostId: host.id, reason: reason.value.trim() }, { timeoutMs: 15_000 }), `${host.name} is quarantined.`),
          act("Return to service", () => health.returnHost({ hostId: host.id }, { timeoutMs: 15_000 }), `${host.name} is returned to service.`),
          act("Retire", () => health.retireHost({ hostId: host.id, reason: reason.value.trim() }, { timeoutMs: 15_000 }), `${host.name} is retired.`, {
            danger: true,
            confirm: `Retire ${host.name} for good? Its history is kept, but it runs no job again.`,
          }),
        ),
  );
}
