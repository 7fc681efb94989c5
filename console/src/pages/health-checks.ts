import { create } from "@bufbuild/protobuf";
import type { Client } from "@connectrpc/connect";
import { durationFromMs, durationMs, FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import { type HealthCheck, HealthCheckSchema, HealthService } from "../../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { DriverKind, DriverKindSchema } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import { ParameterSchema } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { spanText } from "../../../lib/figures.js";
import { errorText } from "../api.js";
import { h, notice, tableRow } from "../dom.js";
import { enumWord, parseDuration, parseTags, tagsText } from "../format.js";
import type { PageContext } from "../main.js";

const HEADERS = ["Check", "Image", "Hosts", "Runs", "Quarantine after", "Return", "Timeout", "Actions"];
/** The paths UpdateHealthCheck changes from the form: all of them. */
const PATHS = ["name", "image", "parameters", "timeout", "host_tags", "driver_kind", "interval", "every_jobs", "quarantine_after_failures", "return_needs_admin", "description"];

/**
 * Health checks (HealthService): every user reads them; admins define,
 * change and delete them with the form (the server checks every field; its
 * InvalidArgument shows above the form, naming the field).
 */
export async function healthChecksPage({ api, main, signal }: PageContext): Promise<void> {
  document.title = "Health checks · Treadmill";
  const checks = api.client(HealthService);
  const admin = api.session.current?.admin ?? false;
  const status = h("div", { class: "status-area" });
  const tbody = h("tbody", {});
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Health checks")),
    h(
      "p",
      { class: "hint" },
      "A host runs the checks whose selector matches it: when it first registers, on each check's schedule, after every N of its jobs, after an infrastructure failure and when returned to service. A failed check quarantines it (docs/health.md).",
    ),
    status,
    h(
      "div",
      { class: "table-wrap" },
      h("table", { id: "health-checks", class: "cards" }, h("caption", { class: "visually-hidden" }, "Health checks"), h("thead", {}, h("tr", {}, ...HEADERS.map((t) => h("th", { scope: "col" }, t)))), tbody),
    ),
  );

  const form = admin ? checkForm(checks, status, () => void load()) : undefined;
  if (form) main.append(form.element);

  const load = async () => {
    try {
      const all: HealthCheck[] = [];
      let pageToken = "";
      do {
        const res = await checks.listHealthChecks({ pageSize: 500, pageToken }, { signal, timeoutMs: 15_000 });
        all.push(...res.healthChecks);
        pageToken = res.nextPageToken;
      } while (pageToken !== "");
      tbody.replaceChildren(...(all.length > 0 ? all.map(row) : [h("tr", {}, h("td", { colspan: String(HEADERS.length) }, "No health checks."))]));
    } catch (err) {
      if (!signal.aborted) status.replaceChildren(notice("error", errorText(err)));
    }
  };

  const remove = async (check: HealthCheck) => {
    if (!window.confirm(`Delete the health check ${check.name}? Its past jobs stay.`)) return;
    try {
      await checks.deleteHealthCheck({ healthCheckId: check.id }, { timeoutMs: 15_000 });
      status.replaceChildren(notice("info", `Health check ${check.name} deleted.`));
      await load();
    } catch (err) {
      status.replaceChildren(notice("error", `${check.name}: ${errorText(err)}`));
    }
  };

  const row = (check: HealthCheck) =>
    tableRow(
      HEADERS,
      [
        h("span", {}, h("strong", {}, check.name), check.description ? h("div", { class: "muted" }, check.description) : null),
        h("code", {}, check.image),
        [tagsText(check.hostTags) || "every host", check.driverKind ? `(${enumWord(DriverKindSchema, check.driverKind)})` : ""].filter(Boolean).join(" "),
        runsText(check),
        `${check.quarantineAfterFailures || 3} infrastructure failures`,
        check.returnNeedsAdmin ? "by an admin" : "by itself",
        check.timeout ? spanText(durationMs(check.timeout)) : "10m",
        admin
          ? h(
              "span",
              { class: "row" },
              h("button", { type: "button", "aria-label": `Edit ${check.name}`, onclick: () => form?.edit(check) }, "Edit"),
              h("button", { type: "button", class: "danger", "aria-label": `Delete ${check.name}`, onclick: () => void remove(check) }, "Delete"),
            )
          : "",
      ],
      { "data-check": check.name },
    );

  await load();
}

/** When a check runs, besides registration, infrastructure failures and returns to service. */
function runsText(check: HealthCheck): string {
  const parts: string[] = [];
  if (check.interval && durationMs(check.interval) > 0) parts.push(`every ${spanText(durationMs(check.interval))}`);
  if (check.everyJobs > 0) parts.push(`after every ${check.everyJobs} jobs`);
  return parts.length > 0 ? parts.join(", ") : "on events only";
}

/** The admin's form: creates a check, or changes the one being edited. */
function checkForm(checks: Client<typeof HealthService>, status: HTMLElement, saved: () => void): { element: HTMLElement; edit(check: HealthCheck): void } {
  const input = (id: string, attrs: Record<string, string> = {}) => h("input", { id: `check-${id}`, name: id, spellcheck: "false", ...attrs });
  const name = input("name", { required: "", placeholder: "boot-smoke" });
  const image = input("image", { required: "", placeholder: "checks/boot:1" });
  const tags = input("tags", { placeholder: "board=nrf52840dk site=lab-a" });
  const driver = h("select", { id: "check-driver", name: "driver" }, h("option", { value: "0" }, "any"), ...DriverKindSchema.values.filter((v) => v.number !== 0).map((v) => h("option", { value: String(v.number) }, enumWord(DriverKindSchema, v.number))));
  const timeout = input("timeout", { placeholder: "10m" });
  const interval = input("interval", { placeholder: "e.g. 6h (empty: not on a schedule)" });
  const everyJobs = input("every-jobs", { type: "number", min: "0", value: "0", inputmode: "numeric" });
  const quarantineAfter = input("quarantine-after", { type: "number", min: "1", max: "100", value: "3", inputmode: "numeric" });
  const needsAdmin = h("input", { id: "check-needs-admin", name: "needs-admin", type: "checkbox" });
  const parameters = h("textarea", { id: "check-parameters", name: "parameters", rows: "3", spellcheck: "false", placeholder: "script=echo ok" });
  const description = input("description", { maxlength: "256" });
  const title = h("h2", { id: "check-form-title" }, "New health check");
  const submit = h("button", { type: "submit", class: "primary" }, "Create check");
  const cancel = h("button", { type: "button", hidden: true }, "Cancel");
  const field = (label: string, el: HTMLElement) => h("div", { class: "field" }, h("label", { for: el.id }, label), el);
  let editing: HealthCheck | undefined;

  const element = h(
    "form",
    { class: "card submit", id: "check-form", "aria-labelledby": "check-form-title", novalidate: true },
    title,
    h("div", { class: "row" }, field("Name", name), field("Image", image)),
    h("div", { class: "row" }, field("Host tags", tags), field("Driver", driver)),
    h("div", { class: "row" }, field("Timeout", timeout), field("Interval", interval), field("After every N jobs", everyJobs)),
    h("div", { class: "row" }, field("Quarantine after N infrastructure failures", quarantineAfter), h("div", { class: "field" }, h("span", { class: "hint" }, "Return to service"), h("label", {}, needsAdmin, "a passing retry waits for an admin"))),
    field("Parameters (name=value, one a line)", parameters),
    field("Description", description),
    h("div", { class: "row" }, submit, cancel),
  );

  const reset = () => {
    editing = undefined;
    element.reset();
    title.textContent = "New health check";
    submit.textContent = "Create check";
    cancel.hidden = true;
  };
  cancel.addEventListener("click", reset);

  const read = (): HealthCheck => {
    const seconds = (text: string) => (text.trim() === "" ? undefined : durationFromMs(parseDuration(text) * 1000));
    return create(HealthCheckSchema, {
      name: name.value.trim(),
      image: image.value.trim(),
      hostTags: parseTags(tags.value),
      driverKind: Number(driver.value) as DriverKind,
      timeout: seconds(timeout.value),
      interval: seconds(interval.value),
      everyJobs: Number(everyJobs.value || "0"),
      quarantineAfterFailures: Number(quarantineAfter.value || "0"),
      returnNeedsAdmin: needsAdmin.checked,
      parameters: parameters.value
        .split("\n")
        .map((line) => line.trim())
        .filter((line) => line !== "")
        .map((line, i) => {
          const eq = line.indexOf("=");
          if (eq <= 0) throw new Error(`parameters line ${i + 1}: "${line.slice(0, 40)}" is not name=value`);
          return create(ParameterSchema, { name: line.slice(0, eq), value: line.slice(eq + 1) });
        }),
      description: description.value.trim(),
    });
  };

  element.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const check = read();
      if (editing) {
        await checks.updateHealthCheck({ healthCheckId: editing.id, healthCheck: check, updateMask: create(FieldMaskSchema, { paths: PATHS }) }, { timeoutMs: 15_000 });
        status.replaceChildren(notice("info", `Health check ${check.name} changed.`));
      } else {
        await checks.createHealthCheck({ healthCheck: check }, { timeoutMs: 15_000 });
        status.replaceChildren(notice("info", `Health check ${check.name} created.`));
      }
      reset();
      saved();
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      submit.disabled = false;
    }
  });

  return {
    element,
    edit(check) {
      editing = check;
      name.value = check.name;
      image.value = check.image;
      tags.value = tagsText(check.hostTags);
      driver.value = String(check.driverKind ?? DriverKind.UNSPECIFIED);
      timeout.value = check.timeout ? `${Math.round(durationMs(check.timeout) / 1000)}s` : "";
      interval.value = check.interval && durationMs(check.interval) > 0 ? `${Math.round(durationMs(check.interval) / 1000)}s` : "";
      everyJobs.value = String(check.everyJobs);
      quarantineAfter.value = String(check.quarantineAfterFailures || 3);
      needsAdmin.checked = check.returnNeedsAdmin;
      parameters.value = check.parameters.map((p) => `${p.name}=${p.value}`).join("\n");
      description.value = check.description;
      title.textContent = `Change ${check.name}`;
      submit.textContent = "Save check";
      cancel.hidden = false;
      name.focus();
    },
  };
}
