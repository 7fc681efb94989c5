/**
 * The job page's artifacts and raw log downloads (docs/artifacts.md): the
 * files of the job's newest attempt with artifacts (ListJobArtifacts), each
 * a download link that reads the blob from its image store with the read
 * token of GetJobArtifactAccess and checks its sha256 (where the browser
 * offers WebCrypto: a secure context) before saving it; and one link per
 * log channel that saves the channel's whole log of the current attempt as
 * a file. Files are assembled in memory: fine for reports and logs, slow for
 * multi-GiB images (use `tml job artifacts` for those).
 */
import { type Job, JobState } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { type ListJobArtifactsResponse, JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { ImageStoreService } from "../../../gen/treadmill/image/v1/image_store_service_pb.js";
import { LogService } from "../../../gen/treadmill/log/v1/log_service_pb.js";
import { formatBytes } from "../../../lib/bytes.js";
import { errorText, type Api } from "../api.js";
import { h, notice, table } from "../dom.js";

/** Saves `parts` as a file named `name` (an object URL behind a download link, clicked). */
function save(parts: Uint8Array[], name: string, type: string): void {
  const url = URL.createObjectURL(new Blob(parts as BlobPart[], { type }));
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

async function sha256Hex(parts: Uint8Array[]): Promise<string | undefined> {
  if (!globalThis.crypto?.subtle) return undefined;
  const digest = await crypto.subtle.digest("SHA-256", await new Blob(parts as BlobPart[]).arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The section, and `update` to call with every change of the job. */
export function jobArtifacts(api: Api, jobId: string, channels: readonly string[], signal: AbortSignal): { element: HTMLElement; update(job: Job): void } {
  const jobs = api.client(JobService);
  const status = h("div", { class: "status-area", id: "artifacts-status" });
  const list = h("div", { id: "artifacts-list" }, h("p", { class: "muted" }, "Artifacts are listed when the job ends."));
  const rawLinks = h("p", { class: "actions", id: "raw-logs" });
  const element = h(
    "section",
    { "aria-labelledby": "artifacts-title" },
    h("h2", { id: "artifacts-title" }, "Artifacts"),
    status,
    list,
    h("h3", {}, "Raw log"),
    rawLinks,
  );
  let loadedFor = "";
  let attempt = 0;

  const download = async (listed: ListJobArtifactsResponse, name: string) => {
    const artifact = listed.artifacts.find((a) => a.name === name)!;
    status.replaceChildren(notice("info", `Downloading ${name}…`));
    try {
      const { access } = await jobs.getJobArtifactAccess({ jobId, attempt: listed.attempt }, { signal, timeoutMs: 15_000 });
      const where = access.find((a) => a.manifestDigest === artifact.manifestDigest);
      if (!where) throw new Error(`no store gives access to ${name}`);
      const token = where.readToken?.token ?? "";
      const parts: Uint8Array[] = [];
      for await (const chunk of api.remote(ImageStoreService, where.storeUrl, () => token).getBlob({ digest: artifact.digest }, { signal })) {
        parts.push(chunk.data);
      }
      const hex = await sha256Hex(parts);
      if (hex !== undefined && `sha256:${hex}` !== artifact.digest) throw new Error(`${name} does not match its digest: not saved`);
      save(parts, name.split("/").pop()!, artifact.mediaType);
      status.replaceChildren(notice("info", hex === undefined ? `Downloaded ${name} (not verified: this page is not a secure context).` : `Downloaded ${name}, verified.`));
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    }
  };

  const load = async (job: Job) => {
    try {
      const listed = await jobs.listJobArtifacts({ jobId }, { signal, timeoutMs: 15_000 });
      if (listed.artifacts.length === 0) {
        list.replaceChildren(h("p", { class: "muted" }, "This job has no artifacts."));
        return;
      }
      const headers = ["Name", "Size", "Digest"];
      const rows = listed.artifacts.map((a) => [
        h("a", { href: "#", class: "artifact-link", "data-name": a.name, onclick: (e: Event) => (e.preventDefault(), void download(listed, a.name)) }, a.name),
        formatBytes(a.sizeBytes),
        h("code", {}, a.digest.slice(0, 19)),
      ]);
      const shown = job.attempt === listed.attempt ? "" : ` (attempt ${listed.attempt})`;
      list.replaceChildren(table(`Artifacts${shown}`, headers, rows, { id: "artifacts-table" }));
    } catch (err) {
      list.replaceChildren(notice("error", errorText(err)));
    }
  };

  const downloadLog = async (channel: string) => {
    status.replaceChildren(notice("info", `Reading the ${channel} log…`));
    try {
      const access = await jobs.getJobLogAccess({ jobId }, { signal, timeoutMs: 15_000 });
      const token = access.readToken?.token ?? "";
      let last: unknown;
      for (const url of access.logServerUrls) {
        try {
          const parts: Uint8Array[] = [];
          for await (const m of api.remote(LogService, url, () => token).read({ jobId, attempt, channel, start: { case: "fromSeq", value: 1n }, follow: false }, { signal })) {
            if (m.payload.case === "frame") parts.push(m.payload.value.data);
          }
          save(parts, `${jobId}-${attempt}-${channel}.log`, "text/plain");
          status.replaceChildren();
          return;
        } catch (err) {
          last = err;
        }
      }
      throw last ?? new Error("the job has no log servers");
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    }
  };

  return {
    element,
    update(job) {
      attempt = job.attempt;
      if (job.logServerUrls.length > 0 && rawLinks.childElementCount === 0) {
        rawLinks.replaceChildren(
          ...channels.map((c) =>
            h("a", { href: "#", class: "button", id: `raw-log-${c}`, onclick: (e: Event) => (e.preventDefault(), void downloadLog(c)) }, `${c}.log`),
          ),
        );
      }
      // Artifacts are uploaded when an attempt ends: listed once the job is final (or a new attempt began).
      const key = `${job.attempt}/${job.state === JobState.FINALIZED}`;
      if ((job.state === JobState.FINALIZED || job.attempt > 1) && key !== loadedFor) {
        loadedFor = key;
        void load(job);
      }
    },
  };
}
