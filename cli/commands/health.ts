/**
 * `tml host health-check create|list|get|update|delete|run` and `tml host
 * quarantine|return|retire` (HealthService; docs/health.md). Reads are open
 * to every user; the rest needs an admin.
 */
import { allPages } from "../pages.js";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { DriverKindSchema, HostHealthSchema, HostSchema, type Host } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { type HealthCheck, HealthCheckSchema, HealthService } from "../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { type Job, JobSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { ConfigOf } from "../../lib/config.js";
import { keyValues, parseDuration, parseIntFlag, type FlagSchema } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { enumValue, enumWords, iso, jsonOf, tagsText, word } from "../format.js";
import { findHost } from "./host.js";

type Checks = Client<typeof HealthService>;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** A check by id or name. */
async function findCheck(checks: Checks, ref: string): Promise<HealthCheck> {
  const { healthCheck } = await checks.getHealthCheck(
    { healthCheck: UUID.test(ref) ? { case: "healthCheckId", value: ref } : { case: "name", value: ref } },
    { timeoutMs: 15_000 },
  );
  if (!healthCheck) throw new CliError(`health check ${ref} not found`, ExitCode.NOT_FOUND);
  return healthCheck;
}

const definitionFlags = {
  image: { type: "string", placeholder: "IMAGE", description: "the image its jobs run (name:tag or a digest)" },
  tag: { type: "list", placeholder: "KEY=VALUE", description: "applies to hosts with this tag (create: none means every host)" },
  driver: { type: "string", placeholder: "KIND", description: `applies only to hosts with this driver (${enumWords(DriverKindSchema).join(", ")})` },
  param: { type: "list", placeholder: "NAME=VALUE", description: "a parameter for the workload (not secret: checks are readable by every user)" },
  timeout: { type: "string", placeholder: "DURATION", description: "longest run of the check, e.g. 5m (default 10m)" },
  interval: { type: "string", placeholder: "DURATION", description: "run on each host this long after its last run, e.g. 24h (0: not on a schedule)" },
  "every-jobs": { type: "string", placeholder: "N", description: "run on a host after every N of its user jobs (0: never)" },
  "quarantine-after": { type: "string", placeholder: "K", description: "infrastructure failures in a row that quarantine a host (default 3)" },
  "return-needs-admin": { type: "string", choices: ["yes", "no"], description: "after a retried check passes, wait for `tml host return` (default no)" },
  description: { type: "string", placeholder: "TEXT", description: "free text shown in listings" },
} as const satisfies FlagSchema;

/** The check's fields the flags set, and their update_mask paths. */
function definitionOf(flags: ConfigOf<typeof definitionFlags>): { check: Record<string, unknown>; paths: string[] } {
  const check: Record<string, unknown> = {};
  const paths: string[] = [];
  const set = (path: string, key: string, value: unknown) => {
    paths.push(path);
    check[key] = value;
  };
  if (flags.image !== undefined) set("image", "image", flags.image);
  if (flags.tag.length > 0) set("host_tags", "hostTags", keyValues("tag", flags.tag));
  if (flags.driver !== undefined) {
    const v = enumValue(DriverKindSchema, flags.driver);
    if (v === undefined) throw new UsageError(`flag --driver must be one of ${enumWords(DriverKindSchema).join(", ")}, got "${flags.driver}"`);
    set("driver_kind", "driverKind", v);
  }
  if (flags.param.length > 0) {
    set("parameters", "parameters", Object.entries(keyValues("param", flags.param)).map(([name, value]) => ({ name, value, secret: false })));
  }
  if (flags.timeout !== undefined) set("timeout", "timeout", durationFromMs(parseDuration("timeout", flags.timeout)));
  if (flags.interval !== undefined) {
    const ms = parseDuration("interval", flags.interval);
    set("interval", "interval", ms === 0 ? undefined : durationFromMs(ms));
  }
  if (flags["every-jobs"] !== undefined) set("every_jobs", "everyJobs", parseIntFlag("every-jobs", flags["every-jobs"], 0, 1_000_000));
  if (flags["quarantine-after"] !== undefined) {
    set("quarantine_after_failures", "quarantineAfterFailures", parseIntFlag("quarantine-after", flags["quarantine-after"], 1, 100));
  }
  if (flags["return-needs-admin"] !== undefined) set("return_needs_admin", "returnNeedsAdmin", flags["return-needs-admin"] === "yes");
  if (flags.description !== undefined) set("description", "description", flags.description);
  return { check, paths };
}

const seconds = (d: { seconds: bigint } | undefined) => (d === undefined ? "-" : `${d.seconds}s`);

function showCheck(ctx: CliContext, c: HealthCheck) {
  ctx.out.fields([
    ["Name", c.name],
    ["ID", c.id],
    ["Image", c.image],
    ["Hosts", `${tagsText(c.hostTags)}${c.driverKind ? ` (${word(DriverKindSchema, c.driverKind)})` : ""}`],
    ["Parameters", c.parameters.map((p) => `${p.name}=${p.value}`).join(", ")],
    ["Timeout", seconds(c.timeout)],
    ["Interval", seconds(c.interval)],
    ["Every jobs", c.everyJobs === 0 ? "-" : String(c.everyJobs)],
    ["Quarantine after", `${c.quarantineAfterFailures} infrastructure failures in a row`],
    ["Return", c.returnNeedsAdmin ? "waits for an admin" : "automatic after a passed retry"],
    ["Description", c.description],
    ["Owner", c.ownerUserId],
    ["Updated", iso(c.updateTime)],
  ]);
}

/** Prints a host after a change of its health, with the health jobs queued for it. */
function showChange(ctx: CliContext, host: Host | undefined, jobs: Job[], verb: string) {
  ctx.out.data({ host: host ? jsonOf(HostSchema, host) : null, jobs: jobs.map((j) => jsonOf(JobSchema, j)) }, () => {
    ctx.out.line(`Host ${host?.name ?? "?"} ${verb}: ${host ? word(HostHealthSchema, host.health) : "?"}${host?.healthReason ? ` (${host.healthReason})` : ""}.`);
    for (const j of jobs) ctx.out.line(`Health job ${j.id} queued (${j.spec?.tags["health-check"] ?? j.healthCheckId}).`);
  });
}

/** `tml host quarantine|retire HOST [--reason R]`. */
function outOfService(verb: "quarantine" | "retire", summary: string, example: string): Command {
  return defineCommand({
    path: ["host", verb],
    summary,
    args: HOST_ARG,
    flags: { reason: { type: "string", placeholder: "TEXT", description: "why, shown on the host and in its health timeline" } },
    examples: [example],
    async run(ctx, { args, flags }) {
      const checks = await ctx.client(HealthService);
      const host = await findHost(await ctx.client(HostService), args.HOST);
      const request = { hostId: host.id, reason: flags.reason ?? "" };
      const response = verb === "quarantine" ? await checks.quarantineHost(request, { timeoutMs: 15_000 }) : await checks.retireHost(request, { timeoutMs: 15_000 });
      showChange(ctx, response.host, [], verb === "quarantine" ? "quarantined" : "retired");
      return ExitCode.OK;
    },
  });
}

const HOST_ARG = [{ name: "HOST", required: true, description: "the host's name or id" }] as const;
const CHECK_ARG = [{ name: "CHECK", required: true, description: "the health check's name or id" }] as const;

export const healthCommands: Command[] = [
  defineCommand({
    path: ["host", "health-check", "create"],
    summary: "Define a health check for a selector of hosts (admins)",
    args: [{ name: "NAME", required: true, description: "unique name of the check" }],
    flags: definitionFlags,
    examples: [
      "tml host health-check create smoke --image checks/smoke:v1 --tag board=nrf52840dk --interval 24h",
      "tml host health-check create vm-boot --image checks/boot:v2 --driver qemu --every-jobs 50 --quarantine-after 2",
    ],
    async run(ctx, { args, flags }) {
      if (flags.image === undefined) throw new UsageError("flag --image is required");
      const { check } = definitionOf(flags);
      const checks = await ctx.client(HealthService);
      const { healthCheck } = await checks.createHealthCheck({ healthCheck: { ...check, name: args.NAME } }, { timeoutMs: 15_000 });
      ctx.out.data(jsonOf(HealthCheckSchema, healthCheck!), () => ctx.out.line(`Health check ${healthCheck!.name} created (${healthCheck!.id}).`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "health-check", "list"],
    summary: "List health checks",
    examples: ["tml host health-check list"],
    async run(ctx) {
      const checks = await ctx.client(HealthService);
      const found: HealthCheck[] = await allPages(async (pageToken) => {
        const page = await checks.listHealthChecks({ pageSize: 1000, pageToken }, { timeoutMs: 30_000 });
        return { items: page.healthChecks, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((c) => jsonOf(HealthCheckSchema, c)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "NAME", value: (c) => c.name },
              { header: "IMAGE", value: (c) => c.image },
              { header: "HOSTS", value: (c) => `${tagsText(c.hostTags)}${c.driverKind ? ` (${word(DriverKindSchema, c.driverKind)})` : ""}` },
              { header: "INTERVAL", value: (c) => seconds(c.interval) },
              { header: "EVERY", value: (c) => (c.everyJobs === 0 ? "-" : `${c.everyJobs} jobs`) },
              { header: "K", value: (c) => String(c.quarantineAfterFailures) },
              { header: "ID", value: (c) => c.id },
            ],
            "No health checks.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "health-check", "get"],
    summary: "Show one health check",
    args: CHECK_ARG,
    examples: ["tml host health-check get smoke"],
    async run(ctx, { args }) {
      const c = await findCheck(await ctx.client(HealthService), args.CHECK);
      ctx.out.data(jsonOf(HealthCheckSchema, c), () => showCheck(ctx, c));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "health-check", "update"],
    summary: "Change a health check; you become the owner of its jobs (admins)",
    args: CHECK_ARG,
    flags: definitionFlags,
    examples: ["tml host health-check update smoke --interval 12h --return-needs-admin yes"],
    async run(ctx, { args, flags }) {
      const { check, paths } = definitionOf(flags);
      if (paths.length === 0) throw new UsageError("`tml host health-check update` needs something to change; see its --help");
      const checks = await ctx.client(HealthService);
      const current = await findCheck(checks, args.CHECK);
      const { healthCheck } = await checks.updateHealthCheck({ healthCheckId: current.id, healthCheck: check, updateMask: { paths } }, { timeoutMs: 15_000 });
      ctx.out.data(jsonOf(HealthCheckSchema, healthCheck!), () => ctx.out.line(`Health check ${healthCheck!.name} updated.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "health-check", "delete"],
    summary: "Delete a health check; its jobs stay marked (admins)",
    args: CHECK_ARG,
    examples: ["tml host health-check delete smoke"],
    async run(ctx, { args }) {
      const checks = await ctx.client(HealthService);
      const current = await findCheck(checks, args.CHECK);
      await checks.deleteHealthCheck({ healthCheckId: current.id }, { timeoutMs: 15_000 });
      ctx.out.data({ deleted: current.id }, () => ctx.out.line(`Health check ${current.name} deleted.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "health-check", "run"],
    summary: "Run a host's health checks now, ahead of its queued user jobs (admins)",
    args: HOST_ARG,
    flags: { check: { type: "string", placeholder: "CHECK", description: "only this check (default: every check that applies)" } },
    examples: ["tml host health-check run lab-a-nrf-1", "tml host health-check run lab-a-nrf-1 --check smoke"],
    async run(ctx, { args, flags }) {
      const checks = await ctx.client(HealthService);
      const host = await findHost(await ctx.client(HostService), args.HOST);
      const checkId = flags.check === undefined ? "" : (await findCheck(checks, flags.check)).id;
      const response = await checks.runHealthCheck({ hostId: host.id, healthCheckId: checkId }, { timeoutMs: 15_000 });
      showChange(ctx, response.host, response.jobs, "is being checked");
      return ExitCode.OK;
    },
  }),
  outOfService("quarantine", "Take a host out of service: no user job goes to it; running ones go on (admins)", 'tml host quarantine lab-a-nrf-1 --reason "flaky USB hub"'),
  defineCommand({
    path: ["host", "return"],
    summary: "Return a host to service: it runs its health checks, or is healthy at once when none applies (admins)",
    args: HOST_ARG,
    examples: ["tml host return lab-a-nrf-1"],
    async run(ctx, { args }) {
      const checks = await ctx.client(HealthService);
      const host = await findHost(await ctx.client(HostService), args.HOST);
      const response = await checks.returnHost({ hostId: host.id }, { timeoutMs: 15_000 });
      showChange(ctx, response.host, response.jobs, "returned");
      return ExitCode.OK;
    },
  }),
  outOfService("retire", "Take a host out of service for good, keeping its history (admins)", 'tml host retire old-board-3 --reason "replaced by rev C"'),
];
