/**
 * Job files in the console (docs/job-files.md): on a job's page, the job as
 * the file `tml job get -o yaml` prints (to download, or to edit as a new
 * job), its re-run links both ways and a Re-run button (JobService.RerunJob);
 * on the submit page, a job file pasted or uploaded, read as
 * `tml job run -f` reads it (lib/job-file.ts), one job per combination of
 * its matrix. lib/job-file.ts and its YAML parser load on first use, so the
 * jobs list does not carry them.
 */
import type { Job } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { errorText } from "../api.js";
import { h, link, notice } from "../dom.js";
import { shortId } from "../format.js";
import type { PageContext } from "../main.js";

const jobFiles = () => import("../../../lib/job-file.js");

/** A request id; getRandomValues, not randomUUID: the console may be served over plain http. */
function requestId(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The job page's "Job file" section, appended to `main`; returns what the
 * page calls with each new state of the job.
 */
export function jobFileSection({ app, api, main }: Pick<PageContext, "app" | "api" | "main">, jobId: string): (job: Job) => void {
  const rerun = h("button", { type: "button", id: "rerun-job" }, "Re-run");
  const download = h("a", { class: "button", id: "download-job-file", download: `job-${jobId}.yaml`, href: "#" }, "Download");
  const edit = link(`/jobs/new?from=${encodeURIComponent(jobId)}`, "Edit as a new job");
  edit.className = "button";
  const links = h("p", { id: "job-reruns" });
  const status = h("div", { class: "status-area" });
  const file = h("code", {});
  main.append(
    h(
      "section",
      { "aria-labelledby": "job-file-title", id: "job-file-section" },
      h("div", { class: "page-head" }, h("h2", { id: "job-file-title" }, "Job file"), h("div", { class: "actions" }, rerun, download, edit)),
      links,
      status,
      h("pre", { class: "job-file", id: "job-file", tabindex: "0", "aria-label": "The job as a job file" }, file),
      h("p", { class: "hint" }, "Submit it again with tml job run -f FILE (secrets are placeholders: give them with --secret)."),
    ),
  );
  rerun.addEventListener("click", async () => {
    rerun.disabled = true;
    status.replaceChildren(notice("info", "Re-running…"));
    try {
      const res = await api.client(JobService).rerunJob({ jobId, requestId: requestId() }, { timeoutMs: 30_000 });
      app.navigate(`/jobs/${res.job?.id ?? ""}`);
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
      rerun.disabled = false;
    }
  });
  let shown = false;
  return (job) => {
    rerun.hidden = job.healthCheckId !== "";
    const jobLink = (id: string) => link(`/jobs/${id}`, h("code", { title: id }, shortId(id)));
    links.replaceChildren(
      ...(job.rerunOfJobId ? ["Re-run of ", jobLink(job.rerunOfJobId), ". "] : []),
      ...(job.rerunJobIds.length > 0 ? ["Re-runs: ", ...job.rerunJobIds.flatMap((id, i) => [i > 0 ? ", " : "", jobLink(id)]), "."] : []),
    );
    links.hidden = links.childNodes.length === 0;
    // A job's spec never changes: its file is made once.
    if (shown || !job.spec) return;
    shown = true;
    const spec = job.spec;
    void jobFiles().then(
      ({ fileOf }) => {
        const text = fileOf(spec, `job ${job.id}`);
        file.textContent = text;
        download.href = URL.createObjectURL(new Blob([text], { type: "application/yaml" }));
      },
      (err: unknown) => status.replaceChildren(notice("error", errorText(err))),
    );
  };
}

/**
 * The submit page's "Submit a job file" form: a file pasted or uploaded,
 * its variables (KEY=VALUE a line, as `--set`) and secrets (NAME=VALUE, as
 * `--secret`); a mistake shows under the file with its line. One job goes to
 * its page; a matrix's jobs are listed with links. `?from=JOB` fills it with
 * that job's file.
 */
export function jobFileForm({ app, api, signal, query }: Pick<PageContext, "app" | "api" | "signal" | "query">): HTMLElement {
  const text = h("textarea", { id: "submit-file", name: "file", rows: "14", spellcheck: "false", placeholder: "image: example/hello:latest\nhosts:\n  tags: {driver: process}" });
  const upload = h("input", { type: "file", id: "submit-file-upload", accept: ".yaml,.yml,application/yaml,text/yaml" });
  const variables = h("textarea", { id: "submit-file-set", rows: "2", spellcheck: "false", placeholder: "commit=abc123" });
  const secrets = h("textarea", { id: "submit-file-secrets", rows: "2", spellcheck: "false", placeholder: "API_TOKEN=..." });
  const error = h("p", { class: "field-error", id: "submit-file-error", hidden: true });
  text.setAttribute("aria-describedby", error.id);
  const status = h("div", { class: "status-area", id: "submit-file-status" });
  const submit = h("button", { type: "submit", class: "primary" }, "Submit job file");
  const form = h(
    "form",
    { class: "card submit", novalidate: true, "aria-labelledby": "submit-file-title" },
    h("h2", { id: "submit-file-title" }, "Submit a job file"),
    h("p", { class: "hint" }, "A job file as tml job run -f takes it (docs/job-files.md): paste it, or upload one."),
    status,
    h("div", { class: "field" }, h("label", { for: text.id }, "Job file"), text, error),
    h("div", { class: "field" }, h("label", { for: upload.id }, "Upload a file"), upload),
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, h("label", { for: variables.id }, "Variables"), variables, h("p", { class: "hint" }, "KEY=VALUE a line, for ${KEY}")),
      h("div", { class: "field" }, h("label", { for: secrets.id }, "Secrets"), secrets, h("p", { class: "hint" }, "NAME=VALUE a line, for ${secret:NAME}")),
    ),
    submit,
  );
  upload.addEventListener("change", async () => {
    const chosen = upload.files?.[0];
    if (chosen) text.value = await chosen.text();
  });
  const fail = (message: string) => {
    error.textContent = message;
    error.hidden = false;
    text.setAttribute("aria-invalid", "true");
    text.focus();
  };
  const requestIds: string[] = [];
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    text.removeAttribute("aria-invalid");
    status.replaceChildren();
    const { readJobFile } = await jobFiles();
    let found: ReturnType<typeof readJobFile>;
    try {
      found = readJobFile(text.value, { source: upload.files?.[0]?.name ?? "job file", set: pairs(variables.value), secrets: pairs(secrets.value) });
    } catch (err) {
      // A JobFileError says where; a bad variable or secret line what.
      if (err instanceof Error) return fail(err.message);
      throw err;
    }
    submit.disabled = true;
    const jobs = api.client(JobService);
    const submitted: { name: string; id: string }[] = [];
    try {
      for (const [i, j] of found.entries()) {
        // The same ids on a second click: a job already submitted is not submitted twice.
        requestIds[i] ??= requestId();
        const res = await jobs.submitJob({ spec: j.spec, requestId: requestIds[i] }, { timeoutMs: 30_000 });
        const name = Object.entries(j.matrix).map(([k, v]) => `${k}=${v}`).join(" ");
        submitted.push({ name, id: res.job?.id ?? "" });
      }
    } catch (err) {
      status.replaceChildren(notice("error", `${submitted.length} of ${found.length} submitted; then: ${errorText(err)}`));
      submit.disabled = false;
      return;
    }
    if (submitted.length === 1) return app.navigate(`/jobs/${submitted[0].id}`);
    status.replaceChildren(
      notice("info", `${submitted.length} jobs submitted.`),
      h("ul", { id: "submitted-jobs" }, ...submitted.map((s) => h("li", {}, link(`/jobs/${s.id}`, s.name || s.id)))),
    );
    submit.disabled = false;
  });
  const from = query.get("from");
  if (from) {
    void (async () => {
      try {
        const [{ fileOf }, res] = await Promise.all([jobFiles(), api.client(JobService).getJob({ jobId: from }, { signal, timeoutMs: 15_000 })]);
        if (res.job?.spec) text.value = fileOf(res.job.spec, `from job ${from}`);
      } catch (err) {
        status.replaceChildren(notice("error", errorText(err)));
      }
    })();
  }
  return form;
}

/** KEY=VALUE lines (blank lines skipped), as the tag syntax's pairs are read. */
function pairs(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => l.trim() !== "")) {
    const eq = line.indexOf("=");
    if (eq <= 0) throw new Error(`"${line}" is not KEY=VALUE`);
    out[line.slice(0, eq).trim()] = line.slice(eq + 1);
  }
  return out;
}
