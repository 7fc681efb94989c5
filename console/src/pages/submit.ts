import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { HostRequirementsSchema, JobSpecSchema, ParameterSchema, type JobSpec } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { ImageService } from "../../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { errorText } from "../api.js";
import { h, notice } from "../dom.js";
import { parseDuration, parseTags } from "../format.js";
import type { PageContext } from "../main.js";
import { jobFileForm } from "./job-file.js";

const PARAMETER_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;

/** Which form field a server message is about: its field path's first part after `spec.`. */
const FIELD_OF: [RegExp, string][] = [
  [/^spec\.image\b/, "image"],
  [/^spec\.hosts\.tags\b/, "host-tags"],
  [/^spec\.hosts\.host_count\b/, "host-count"],
  [/^spec\.hosts\b/, "host-tags"],
  [/^spec\.priority\b/, "priority"],
  [/^spec\.job_timeout\b/, "job-timeout"],
  [/^spec\.queue_timeout\b/, "job-timeout"],
  [/^spec\.parameters\b/, "parameters"],
  [/^spec\.tags\b/, "job-tags"],
  [/^spec\.description\b/, "description"],
];

interface Field {
  id: string;
  input: HTMLInputElement | HTMLTextAreaElement;
  error: HTMLElement;
  wrap: HTMLElement;
}

/** The submit form: checked here first, then by SubmitJob, whose InvalidArgument shows under the field it names. */
export async function submitPage({ app, api, main, signal, query }: PageContext): Promise<void> {
  document.title = "Submit a job · Treadmill";
  const fields = new Map<string, Field>();
  const field = (id: string, label: string, input: HTMLInputElement | HTMLTextAreaElement, hint?: string): HTMLElement => {
    input.id = `submit-${id}`;
    input.name = id;
    const error = h("p", { class: "field-error", id: `submit-${id}-error`, hidden: true });
    const hintEl = hint ? h("p", { class: "hint", id: `submit-${id}-hint` }, hint) : null;
    input.setAttribute("aria-describedby", [hintEl?.id, error.id].filter(Boolean).join(" "));
    const wrap = h("div", { class: "field" }, h("label", { for: input.id }, label), input, hintEl, error);
    fields.set(id, { id, input, error, wrap });
    return wrap;
  };
  const setError = (id: string, message: string) => {
    const f = fields.get(id)!;
    f.error.textContent = message;
    f.error.hidden = false;
    f.input.setAttribute("aria-invalid", "true");
  };
  const clearErrors = () => {
    for (const f of fields.values()) {
      f.error.hidden = true;
      f.error.textContent = "";
      f.input.removeAttribute("aria-invalid");
    }
  };

  const images = h("datalist", { id: "submit-images" });
  const image = h("input", { list: "submit-images", required: true, autocomplete: "off", spellcheck: "false", value: query.get("image") ?? "" });
  const hostTags = h("input", { placeholder: "board=nrf52840dk arch=x86_64", spellcheck: "false" });
  const hostCount = h("input", { type: "number", min: "1", max: "64", value: "1", inputmode: "numeric" });
  const priority = h("input", { type: "number", min: "-100", max: "100", value: "0", inputmode: "numeric" });
  const jobTimeout = h("input", { placeholder: "e.g. 10m or 1h30m (default: the server's)", spellcheck: "false" });
  const parameters = h("textarea", { rows: "4", spellcheck: "false", placeholder: "script=echo hello\nsecret API_KEY=..." });
  const jobTags = h("input", { placeholder: "ci=pr-123", spellcheck: "false" });
  const description = h("input", { maxlength: "256" });
  const status = h("div", { class: "status-area" });
  const submit = h("button", { type: "submit", class: "primary" }, "Submit job");

  const form = h(
    "form",
    { class: "card submit", novalidate: true, "aria-labelledby": "submit-title" },
    h("h1", { id: "submit-title", tabindex: "-1" }, "Submit a job"),
    status,
    field("image", "Image", image, "name:tag from the catalog, or a manifest digest"),
    images,
    h(
      "div",
      { class: "row" },
      field("host-tags", "Host tags", hostTags, "key=value pairs every host must carry"),
      field("host-count", "Hosts", hostCount),
      field("priority", "Priority", priority),
    ),
    field("job-timeout", "Job timeout", jobTimeout),
    field("parameters", "Parameters", parameters, "One NAME=value per line; start a line with \"secret \" to hide its value."),
    h("div", { class: "row" }, field("job-tags", "Labels", jobTags, "key=value pairs, for filtering"), field("description", "Description", description)),
    submit,
  );

  const requestId = crypto.randomUUID();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    status.replaceChildren();
    let spec: JobSpec;
    try {
      spec = readForm();
    } catch (err) {
      if (err instanceof FieldError) {
        setError(err.field, err.message);
        fields.get(err.field)?.input.focus();
        return;
      }
      throw err;
    }
    submit.disabled = true;
    try {
      const res = await api.client(JobService).submitJob({ spec, requestId }, { timeoutMs: 30_000 });
      app.navigate(`/jobs/${res.job?.id ?? ""}`);
    } catch (err) {
      const message = errorText(err);
      const code = err instanceof ConnectError ? err.code : undefined;
      const target = code === Code.InvalidArgument || code === Code.NotFound ? FIELD_OF.find(([re]) => re.test(message))?.[1] : undefined;
      if (target === undefined && code === Code.NotFound) setError("image", message);
      if (target !== undefined) {
        setError(target, message);
        fields.get(target)?.input.focus();
      } else {
        status.replaceChildren(notice("error", message));
      }
      submit.disabled = false;
    }
  });

  function readForm(): JobSpec {
    const ref = image.value.trim();
    if (ref === "") throw new FieldError("image", "an image is required");
    const spec = create(JobSpecSchema, { image: ref, description: description.value.trim() });
    spec.hosts = create(HostRequirementsSchema, { tags: tagsOf("host-tags", hostTags.value), hostCount: intOf("host-count", hostCount.value, 1, 64) });
    spec.priority = intOf("priority", priority.value, -100, 100);
    if (jobTimeout.value.trim() !== "") {
      try {
        spec.jobTimeout = create(DurationSchema, { seconds: BigInt(parseDuration(jobTimeout.value)) });
      } catch (err) {
        throw new FieldError("job-timeout", (err as Error).message);
      }
    }
    spec.tags = tagsOf("job-tags", jobTags.value);
    const lines = parameters.value.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => l.trim() !== "");
    const seen = new Set<string>();
    for (const [i, raw] of lines.entries()) {
      const secret = raw.startsWith("secret ");
      const line = secret ? raw.slice(7) : raw;
      const eq = line.indexOf("=");
      const name = eq < 0 ? line.trim() : line.slice(0, eq).trim();
      if (eq < 0 || !PARAMETER_NAME.test(name)) throw new FieldError("parameters", `line ${i + 1}: expected NAME=value with NAME like [A-Za-z_][A-Za-z0-9_]*`);
      if (seen.has(name)) throw new FieldError("parameters", `line ${i + 1}: ${name} is repeated`);
      seen.add(name);
      spec.parameters.push(create(ParameterSchema, { name, value: line.slice(eq + 1), secret }));
    }
    return spec;
  }

  main.append(form, jobFileForm({ app, api, signal, query }));
  // Suggestions for the image field; the form works without them.
  try {
    const res = await api.client(ImageService).listImages({ pageSize: 200 }, { signal, timeoutMs: 15_000 });
    images.replaceChildren(...res.images.map((i) => h("option", { value: `${i.name}:${i.tag}` })));
  } catch {
    // No suggestions.
  }
}

class FieldError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

function tagsOf(field: string, text: string): Record<string, string> {
  try {
    return parseTags(text);
  } catch (err) {
    throw new FieldError(field, (err as Error).message);
  }
}

function intOf(field: string, text: string, min: number, max: number): number {
  const n = Number(text.trim() === "" ? "0" : text);
  if (!Number.isInteger(n) || n < min || n > max) throw new FieldError(field, `must be a whole number from ${min} to ${max}`);
  return n;
}
