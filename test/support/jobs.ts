/**
 * Fixtures of the tests that run jobs (the coordinator's, conformance,
 * interop, end to end): catalog images inserted directly, job specs, waiting
 * on database state with a deadline, and scripted supervisors attached to a
 * test coordinator.
 */
import { createHash, randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Sql } from "postgres";
import { type JobSpecSchema, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { CoordinatorConfig } from "../../coordinator/config.js";
import { QCOW2_MEDIA_TYPE, ROOTFS_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { ScriptedSupervisor, type ScriptedSupervisorOptions } from "./scripted-supervisor.js";
import type { TestCoordinator } from "./coordinator.js";
import { waitUntil } from "./wait.js";
export { codeOf } from "./codes.js";
export { waitUntil } from "./wait.js";

export const ROOTFS = ROOTFS_MEDIA_TYPE;
export const QCOW2 = QCOW2_MEDIA_TYPE;

/** Short intervals so that tests do not wait long; generous enough for a loaded machine. */
export const FAST: Partial<CoordinatorConfig> = {
  graceMs: 200,
  supervisorHeartbeatMs: 400,
  jobSweepIntervalMs: 50,
  replicaHeartbeatMs: 500,
  schedulerAgingMs: 0,
};

/** Inserts an image into the catalog (the catalog service is another engineer's). */
export async function insertImage(
  sql: Sql,
  options: { name?: string; tag?: string; ownerId?: string | null; visibility?: string; mediaTypes?: string[]; locations?: unknown[] } = {},
): Promise<{ ref: string; digest: string }> {
  const name = options.name ?? `img-${randomUUID().slice(0, 8)}`;
  const tag = options.tag ?? "v1";
  const digest = `sha256:${createHash("sha256").update(randomUUID()).digest("hex")}`;
  await sql`
    insert into images (name, tag, digest, media_types, owner_id, visibility, locations)
    values (${name}, ${tag}, ${digest}, ${options.mediaTypes ?? [ROOTFS]}, ${options.ownerId ?? null},
      ${options.visibility ?? "public"}, ${sql.json((options.locations ?? [{ service: randomUUID(), url: "http://store.invalid:1", site: "" }]) as never)})`;
  return { ref: `${name}:${tag}`, digest };
}

export type SpecInit = MessageInitShape<typeof JobSpecSchema>;

export interface JobDbRow {
  id: string;
  state: string;
  stage: string | null;
  reason: string | null;
  exit_status: string | null;
  exit_code: number | null;
  attempt: number;
  stop_reason: string | null;
}

export async function jobRow(sql: Sql, id: string): Promise<JobDbRow> {
  const [row] = await sql<JobDbRow[]>`
    select id, state, stage, reason, exit_status, exit_code, attempt, stop_reason from jobs where id = ${id}`;
  return row;
}

/** Waits until the job is in `state` (and returns its row). */
export function jobInState(sql: Sql, id: string, state: string, timeoutMs?: number): Promise<JobDbRow> {
  return waitUntil(async () => {
    const row = await jobRow(sql, id);
    return row?.state === state ? row : undefined;
  }, `job ${id} to be ${state}`, timeoutMs);
}

/** A scripted supervisor for `host`, attached to `c` (or the urls given). */
export async function attach(
  c: TestCoordinator | { url: string },
  host: { id: string; credential: string },
  options: Partial<ScriptedSupervisorOptions> = {},
): Promise<ScriptedSupervisor> {
  const s = new ScriptedSupervisor({ urls: [c.url], credential: host.credential, hostId: host.id, mode: "manual", ...options });
  await s.connect();
  return s;
}

/**
 * A host of its own that runs a probe job to completion, attached to `c`
 * (its supervisor pushed on `open`): once the probe is finalized, a
 * scheduling pass has run after everything submitted before it, so "still
 * queued" is a real outcome, not a pass that has not run yet.
 */
export async function passProbe(c: TestCoordinator, image: string, open: ScriptedSupervisor[]): Promise<() => Promise<void>> {
  const tag = uniqueTag();
  const user = await c.createUser();
  const host = await c.createHost({ tags: tag });
  open.push(await attach(c, host, { mode: "exit" }));
  return async () => {
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, hosts: { tags: tag } } });
    await jobInState(c.sql, job!.id, "finalized");
  };
}

/**
 * A host of its own with a scripted supervisor (pushed on `open`), and a
 * job of `userToken`'s on it that ran to its end (attempt 1, finalized).
 */
export async function finishedJob(c: TestCoordinator, userToken: string, image: string, open: ScriptedSupervisor[]) {
  const tag = uniqueTag();
  const host = await c.createHost({ tags: tag });
  const s = await attach(c, host);
  open.push(s);
  const { job } = await c.client(JobService, userToken).submitJob({ spec: { image, hosts: { tags: tag } } });
  const jobId = job!.id;
  await s.startJob(jobId);
  await s.report(jobId, 1, JobState.RUNNING);
  await s.exit(jobId, 1);
  await jobInState(c.sql, jobId, "finalized");
  return { host, s, jobId };
}

/** A unique tag so a test's jobs only match its own hosts. */
export function uniqueTag(): Record<string, string> {
  return { t: randomUUID().slice(0, 8) };
}
