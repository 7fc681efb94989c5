/** `tml host list|get|stats|create|update|drain|enable|disable|rm` (changes need an admin). */
import { allPages } from "../pages.js";
import type { Client } from "@connectrpc/connect";
import {
  DriverKind,
  DriverKindSchema,
  HostAdminState,
  HostAdminStateSchema,
  HostHealth,
  HostHealthSchema,
  HostSchema,
  type Host,
} from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { type GetHostStatsResponse, GetHostStatsResponseSchema, HostService, type HostStatsWindow } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { mediaTypesOfDriver } from "../../lib/image/media-types.js";
import { keyValues, parseIntFlag } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { percentText, spanText } from "../../lib/figures.js";
import { ago, enumValue, enumWords, iso, jsonOf, tagsText, word } from "../format.js";

type Hosts = Client<typeof HostService>;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** A host by id or name. */
export async function findHost(hosts: Hosts, ref: string): Promise<Host> {
  const { host } = await hosts.getHost({ host: UUID.test(ref) ? { case: "hostId", value: ref } : { case: "name", value: ref } }, { timeoutMs: 15_000 });
  if (!host) throw new CliError(`host ${ref} not found`, ExitCode.NOT_FOUND);
  return host;
}

export function driverOf(text: string): DriverKind {
  const v = enumValue(DriverKindSchema, text);
  if (v === undefined) throw new UsageError(`flag --driver must be one of ${enumWords(DriverKindSchema).join(", ")}, got "${text}"`);
  return v;
}

function healthOf(text: string): HostHealth {
  const v = enumValue(HostHealthSchema, text);
  if (v === undefined) throw new UsageError(`flag --health must be one of ${enumWords(HostHealthSchema).join(", ")}, got "${text}"`);
  return v;
}

/** A host's health with its reason: `quarantined (3 infrastructure failures in a row)`. */
function healthText(h: Host): string {
  const health = word(HostHealthSchema, h.health);
  return h.healthReason ? `${health} (${h.healthReason})` : health;
}

const DEFAULT_MEDIA: Record<number, string[]> = {
  [DriverKind.PROCESS]: mediaTypesOfDriver("process"),
  [DriverKind.BOARD]: mediaTypesOfDriver("board"),
  [DriverKind.QEMU]: mediaTypesOfDriver("qemu"),
};

function stateText(h: Host): string {
  const admin = word(HostAdminStateSchema, h.adminState);
  return `${h.online ? "online" : "offline"}, ${admin}`;
}

function showHost(ctx: CliContext, h: Host) {
  ctx.out.fields([
    ["Name", h.name],
    ["ID", h.id],
    ["Status", stateText(h)],
    ["Reason", h.adminStateReason],
    ["Health", healthText(h)],
    ["Health since", h.healthChangeTime ? `${iso(h.healthChangeTime)} (${ago(h.healthChangeTime)})` : "-"],
    ["Driver", word(DriverKindSchema, h.driverKind)],
    ["Site", h.site],
    ["Tags", tagsText(h.tags)],
    ["Media types", h.mediaTypes.join(", ")],
    ["Capacity", String(h.capacity)],
    ["Jobs", h.currentJobIds.join(", ") || "-"],
    ["Supervisor", h.supervisorVersion],
    ["Last seen", h.lastSeenTime ? `${iso(h.lastSeenTime)} (${ago(h.lastSeenTime)})` : "never"],
    ["Created", iso(h.createTime)],
  ]);
}

/** A window's length as a column header: 24H, 7D. */
function windowName(seconds: number): string {
  return seconds <= 2 * 86_400 ? `${Math.round(seconds / 3600)}H` : `${Math.round(seconds / 86_400)}D`;
}

/** A host's health and last check, one column of figures per window, then its health changes. */
function showStats(ctx: CliContext, { host, windows, lastHealthCheck: check, healthChanges }: GetHostStatsResponse) {
  if (host) ctx.out.fields([
    ["Host", host.name],
    ["Health", healthText(host)],
    ["Last check", check ? `${check.passed ? "passed" : "failed"} ${ago(check.time)} (job ${check.jobId})${check.message && !check.passed ? `: ${check.message}` : ""}` : "never"],
  ]);
  ctx.out.line("");
  const count = (f: (w: HostStatsWindow) => bigint) => (w: HostStatsWindow) => String(f(w));
  const rows: [string, (w: HostStatsWindow) => string][] = [
    ["Jobs run", count((w) => w.jobsRun)],
    ["Succeeded", count((w) => w.jobsSucceeded)],
    ["Job failures", count((w) => w.jobFailures)],
    ["User failures", count((w) => w.userFailures)],
    ["Infrastructure failures", (w) => `${w.infrastructureFailures} (${percentText(w.infrastructureFailureRate)})`],
    ["Online", (w) => percentText(w.onlineShare)],
    ...HostHealthSchema.values
      .filter((v) => v.number !== 0)
      .map((v): [string, (w: HostStatsWindow) => string] => [
        `Time ${word(HostHealthSchema, v.number)}`,
        (w) => {
          const d = w.healthDurations.find((x) => x.health === v.number)?.duration;
          return d ? spanText(Number(d.seconds) * 1000 + d.nanos / 1e6) : "-";
        },
      ]),
  ];
  ctx.out.table(rows, [
    { header: "", value: ([label]) => label },
    ...windows.map((w) => ({ header: `LAST ${windowName(Number(w.length?.seconds ?? 0n))}`, value: ([, f]: (typeof rows)[number]) => f(w) })),
  ]);
  ctx.out.line("");
  if (healthChanges.length === 0) return ctx.out.line("No change of its health in the last 7 days.");
  ctx.out.table(
    healthChanges,
    [
      { header: "HEALTH CHANGED", value: (e) => iso(e.time) ?? "-" },
      { header: "TO", value: (e) => word(HostHealthSchema, e.health) },
      { header: "BY", value: (e) => e.actor },
      { header: "JOB", value: (e) => e.jobId || "-" },
      { header: "REASON", value: (e) => e.reason || "-" },
    ],
  );
}

async function setAdminState(ctx: CliContext, ref: string, state: HostAdminState, reason: string): Promise<number> {
  const hosts = await ctx.client(HostService);
  const current = await findHost(hosts, ref);
  const { host } = await hosts.updateHost(
    { hostId: current.id, host: { adminState: state, adminStateReason: reason }, updateMask: { paths: ["admin_state", "admin_state_reason"] } },
    { timeoutMs: 15_000 },
  );
  ctx.out.data(host ? jsonOf(HostSchema, host) : {}, () => ctx.out.line(`Host ${current.name} is now ${word(HostAdminStateSchema, state)}.`));
  return ExitCode.OK;
}

export const hostCommands: Command[] = [
  defineCommand({
    path: ["host", "list"],
    summary: "List hosts",
    flags: {
      tag: { type: "list", placeholder: "KEY=VALUE", description: "only hosts with this tag" },
      site: { type: "string", placeholder: "SITE", description: "only this site" },
      driver: { type: "string", placeholder: "KIND", description: "only this driver" },
      online: { type: "bool", description: "only hosts whose supervisor is attached" },
      health: { type: "string", placeholder: "STATE", description: `only hosts of this health (${enumWords(HostHealthSchema).join(", ")})` },
    },
    examples: ["tml host list", "tml host list --tag board=nrf52840dk --online -o json", "tml host list --health quarantined"],
    async run(ctx, { flags }) {
      const hosts = await ctx.client(HostService);
      const found: Host[] = await allPages(async (pageToken) => {
        const page = await hosts.listHosts(
          {
            filter: {
              tags: keyValues("tag", flags.tag),
              site: flags.site,
              driverKind: flags.driver === undefined ? 0 : driverOf(flags.driver),
              online: flags.online === true ? true : undefined,
              health: flags.health === undefined ? HostHealth.UNSPECIFIED : healthOf(flags.health),
            },
            pageSize: 1000,
            pageToken,
          },
          { timeoutMs: 30_000 },
        );
        return { items: page.hosts, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((h) => jsonOf(HostSchema, h)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "NAME", value: (h) => h.name },
              { header: "STATUS", value: (h) => stateText(h) },
              { header: "HEALTH", value: (h) => word(HostHealthSchema, h.health) },
              { header: "DRIVER", value: (h) => word(DriverKindSchema, h.driverKind) },
              { header: "SITE", value: (h) => h.site || "-" },
              { header: "JOBS", value: (h) => `${h.currentJobIds.length}/${h.capacity}` },
              { header: "TAGS", value: (h) => tagsText(h.tags) },
              { header: "ID", value: (h) => h.id },
            ],
            "No hosts.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "get"],
    summary: "Show one host",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    examples: ["tml host get lab-a-nrf-1"],
    async run(ctx, { args }) {
      const host = await findHost(await ctx.client(HostService), args.HOST);
      ctx.out.data(jsonOf(HostSchema, host), () => showHost(ctx, host));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "stats"],
    summary: "Show a host's jobs, failures by class, online time and health over the last 24 hours and 7 days",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    examples: ["tml host stats lab-a-nrf-1", "tml host stats lab-a-nrf-1 -o json"],
    async run(ctx, { args }) {
      const ref = args.HOST;
      const stats = await (await ctx.client(HostService)).getHostStats(
        { host: UUID.test(ref) ? { case: "hostId", value: ref } : { case: "name", value: ref } },
        { timeoutMs: 15_000 },
      );
      ctx.out.data(jsonOf(GetHostStatsResponseSchema, stats), () => showStats(ctx, stats));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "create"],
    summary: "Create a host and print its supervisor credential (once) and command line (admins)",
    args: [{ name: "NAME", required: true, description: "unique host name" }],
    flags: {
      driver: { type: "string", placeholder: "KIND", description: `the host's driver (${enumWords(DriverKindSchema).join(", ")}; default process)` },
      tag: { type: "list", placeholder: "KEY=VALUE", description: "a tag jobs can ask for" },
      "media-type": { type: "list", placeholder: "TYPE", description: "an image layer type the host runs (default: the driver's)" },
      site: { type: "string", placeholder: "SITE", description: "the host's site" },
      capacity: { type: "string", placeholder: "N", description: "jobs at once (default 1)" },
      disabled: { type: "bool", description: "create it disabled" },
    },
    examples: ["tml host create lab-a-nrf-1 --driver board --tag board=nrf52840dk --site lab-a", "tml host create ci-runner-1 --capacity 4"],
    async run(ctx, { args, flags }) {
      const target = await ctx.target();
      const driverKind = driverOf(flags.driver ?? "process");
      const hosts = await ctx.client(HostService);
      const response = await hosts.createHost(
        {
          name: args.NAME,
          driverKind,
          tags: keyValues("tag", flags.tag),
          mediaTypes: flags["media-type"].length > 0 ? [...flags["media-type"]] : DEFAULT_MEDIA[driverKind],
          site: flags.site ?? "",
          capacity: flags.capacity === undefined ? 0 : parseIntFlag("capacity", flags.capacity, 1, 1024),
          adminState: flags.disabled === true ? HostAdminState.DISABLED : HostAdminState.UNSPECIFIED,
        },
        { timeoutMs: 15_000 },
      );
      const host = response.host!;
      const command =
        `TREADMILL_SUPERVISOR_HOST_CREDENTIAL=${response.credential} treadmill-supervisor` +
        ` --coordinator-url ${target.server} --name ${host.name} --driver ${word(DriverKindSchema, host.driverKind)}` +
        (host.capacity > 1 ? ` --capacity ${host.capacity}` : "");
      ctx.out.data({ host: jsonOf(HostSchema, host), credential: response.credential, supervisorCommand: command }, () => {
        ctx.out.line(`Host ${host.name} created (${host.id}).`);
        ctx.out.line("");
        ctx.out.line("Its supervisor credential, shown only this once:");
        ctx.out.line(`  ${response.credential}`);
        ctx.out.line("");
        ctx.out.line("Start its supervisor on the host with:");
        ctx.out.line(`  ${command}`);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "update"],
    summary: "Change a host's tags, media types, site or capacity, or rotate its credential (admins)",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    flags: {
      name: { type: "string", placeholder: "NAME", description: "rename it" },
      tag: { type: "list", placeholder: "KEY=VALUE", description: "the new tags (replace all)" },
      "media-type": { type: "list", placeholder: "TYPE", description: "the new media types (replace all)" },
      site: { type: "string", placeholder: "SITE", description: "the new site" },
      capacity: { type: "string", placeholder: "N", description: "the new capacity" },
      "rotate-credential": { type: "bool", description: "issue a new supervisor credential (the old one stops working)" },
    },
    examples: ["tml host update lab-a-nrf-1 --tag board=nrf52840dk --tag rev=b", "tml host update ci-runner-1 --rotate-credential"],
    async run(ctx, { args, flags }) {
      const hosts = await ctx.client(HostService);
      const current = await findHost(hosts, args.HOST);
      const paths: string[] = [];
      const host: Record<string, unknown> = {};
      if (flags.name !== undefined) {
        paths.push("name");
        host.name = flags.name;
      }
      if (flags.tag.length > 0) {
        paths.push("tags");
        host.tags = keyValues("tag", flags.tag);
      }
      if (flags["media-type"].length > 0) {
        paths.push("media_types");
        host.mediaTypes = flags["media-type"];
      }
      if (flags.site !== undefined) {
        paths.push("site");
        host.site = flags.site;
      }
      if (flags.capacity !== undefined) {
        paths.push("capacity");
        host.capacity = parseIntFlag("capacity", flags.capacity, 1, 1024);
      }
      const rotate = flags["rotate-credential"] === true;
      if (paths.length === 0 && !rotate) throw new UsageError("`tml host update` needs something to change; see `tml host update --help`");
      const response = await hosts.updateHost(
        { hostId: current.id, host, updateMask: { paths }, rotateCredential: rotate },
        { timeoutMs: 15_000 },
      );
      ctx.out.data({ host: response.host ? jsonOf(HostSchema, response.host) : null, credential: response.credential ?? null }, () => {
        ctx.out.line(`Host ${response.host?.name ?? current.name} updated.`);
        if (response.credential) ctx.out.line(`New supervisor credential, shown only this once:\n  ${response.credential}`);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["host", "drain"],
    summary: "Stop giving a host new jobs; running ones finish (admins)",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    flags: { reason: { type: "string", placeholder: "TEXT", description: "why, shown in `tml host get`" } },
    examples: ['tml host drain lab-a-nrf-1 --reason "replacing the USB hub"'],
    run: (ctx, { args, flags }) => setAdminState(ctx, args.HOST, HostAdminState.DRAINING, flags.reason ?? ""),
  }),
  defineCommand({
    path: ["host", "disable"],
    summary: "Give a host no new jobs, e.g. while broken (admins)",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    flags: { reason: { type: "string", placeholder: "TEXT", description: "why, shown in `tml host get`" } },
    examples: ['tml host disable lab-a-nrf-1 --reason "board dead"'],
    run: (ctx, { args, flags }) => setAdminState(ctx, args.HOST, HostAdminState.DISABLED, flags.reason ?? ""),
  }),
  defineCommand({
    path: ["host", "enable"],
    summary: "Give a drained or disabled host jobs again (admins)",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    examples: ["tml host enable lab-a-nrf-1"],
    run: (ctx, { args }) => setAdminState(ctx, args.HOST, HostAdminState.ENABLED, ""),
  }),
  defineCommand({
    path: ["host", "rm"],
    summary: "Delete a host and its credential (admins; drain it first)",
    args: [{ name: "HOST", required: true, description: "the host's name or id" }],
    examples: ["tml host rm old-runner"],
    async run(ctx, { args }) {
      const hosts = await ctx.client(HostService);
      const current = await findHost(hosts, args.HOST);
      await hosts.deleteHost({ hostId: current.id }, { timeoutMs: 15_000 });
      ctx.out.data({ deleted: current.id }, () => ctx.out.line(`Host ${current.name} deleted.`));
      return ExitCode.OK;
    },
  }),
];
