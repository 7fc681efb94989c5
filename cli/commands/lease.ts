/**
 * `tml reserve` and `tml lease list|get|extend|release|renew|revoke`
 * (LeaseService; docs/leases.md). `tml reserve` in the foreground is the
 * lease's keepalive: it holds WatchLease with keepalive open, reopening it
 * with backoff (on the next coordinator replica when one cannot be reached)
 * for as long as the lease lasts, and Ctrl-C releases the lease. Killed, it
 * renews nothing more: the lease ends LOST after its grace period, which is
 * what frees a board whose CI job was cancelled. `--detach` leaves the
 * keepalive to the caller (`tml lease renew` in a loop).
 */
import { randomUUID } from "node:crypto";
import { durationFromMs, durationMs, timestampFromMs, timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { DriverKindSchema } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  GetLeaseCalendarResponseSchema,
  type Lease,
  LeaseEndReason,
  LeaseEndReasonSchema,
  type LeaseEvent,
  LeaseEventKind,
  LeaseEventKindSchema,
  LeaseExtensionLimitSchema,
  LeaseKind,
  LeaseSchema,
  LeaseService,
  LeaseState,
  LeaseStateSchema,
} from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { spanText } from "../../lib/figures.js";
import { keepStreaming } from "../../lib/retry.js";
import { keyValues, parseDuration, parseIntFlag, parseTime, type ArgSpec, type FlagSchema } from "../args.js";
import { localMinute, renderCalendar } from "../calendar.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { enumValue, enumWords, jsonOf, msOf, tagsText, word } from "../format.js";
import { allPages } from "../pages.js";
import { driverOf } from "./host.js";

type Leases = Client<typeof LeaseService>;

const LEASE_ARG = [{ name: "LEASE", required: true, description: "the lease's id" }] as const satisfies readonly ArgSpec[];

/** A time as people read it here: local, to the minute, and how far off ("2026-12-08 14:00 (in 2h30m)"). */
export function timeText(ts: Timestamp | undefined, now = Date.now()): string {
  const ms = msOf(ts);
  if (ms === undefined) return "-";
  return `${localMinute(ms)} (${ms >= now ? `in ${spanText(ms - now)}` : `${spanText(now - ms)} ago`})`;
}

/** "active", "waiting: host board-1 runs job J", "ended (revoked: maintenance)". */
export function leaseStateText(lease: Lease): string {
  if (lease.state === LeaseState.ENDED) return `ended (${endReasonText(lease)})`;
  const state = word(LeaseStateSchema, lease.state);
  return lease.statusMessage && lease.state !== LeaseState.ACTIVE ? `${state}: ${lease.statusMessage}` : state;
}

/** The booked hosts by name, or what was asked while none is booked ("2 x board=nrf52"). */
export function leaseHostsText(lease: Lease): string {
  if (lease.leaseHosts.length > 0) return lease.leaseHosts.map((h) => h.hostName || h.hostId).join(", ");
  if (lease.hostNames.length > 0) return lease.hostNames.join(", ");
  const asked = lease.hosts;
  const selector = [tagsText(asked?.tags ?? {}), asked?.site ? `site=${asked.site}` : "", asked?.driverKind ? `driver=${word(DriverKindSchema, asked.driverKind)}` : ""]
    .filter((s) => s !== "" && s !== "-")
    .join(",");
  return `${Math.max(1, asked?.hostCount ?? 1)} x ${selector || "any host"}`;
}

/**
 * Why an ended lease ended: its reason, with the coordinator's message when
 * it says more ("revoked by admin ada: rack maintenance", "lost: no
 * keepalive for 5m"); the message alone when it starts with the reason.
 */
export function endReasonText(lease: Lease): string {
  const reason = word(LeaseEndReasonSchema, lease.endReason);
  const message = lease.statusMessage;
  if (message === "") return reason;
  return message.toLowerCase().startsWith(reason) ? message : `${reason}: ${message}`;
}

/** How the lease ended, as the last line of `tml reserve` and of release and revoke. */
/** The lease of a LeaseService answer; CliError when the server sent none. */
function leaseOf(answer: { lease?: Lease }): Lease {
  if (!answer.lease) throw new CliError("the server returned no lease");
  return answer.lease;
}

function endText(lease: Lease): string {
  if (lease.state !== LeaseState.ENDED) return leaseStateText(lease);
  const returned = lease.endReason === LeaseEndReason.REVOKED || lease.leaseHosts.length > 0 ? "; its hosts are reset and returned" : "";
  return `ended: ${endReasonText(lease)}${returned}`;
}

/** How to use an active lease, for `tml reserve` to print once. */
export function usageLines(lease: Lease): string[] {
  const id = lease.id;
  return [
    `run jobs in it:   tml job run --lease ${id} IMAGE`,
    `open a console:   tml console --lease ${id}${lease.leaseHosts.length > 1 ? " --host NAME" : ""}   (on a job running in it${lease.image ? ", such as its session" : ""})`,
    `extend it:        tml lease extend ${id} --by 1h`,
    `release it:       Ctrl-C here, or tml lease release ${id}`,
  ];
}

/**
 * What `tml reserve` says when the lease it holds changes from `before` to
 * `after` (undefined: the first sight of it): its state and why, its hosts,
 * its end moving, and once active how to use it.
 */
export function leaseNarration(before: Lease | undefined, after: Lease, now = Date.now()): string[] {
  const lines: string[] = [];
  const stateChanged = before === undefined || before.state !== after.state || before.statusMessage !== after.statusMessage;
  const hostsChanged = before === undefined || leaseHostsText(before) !== leaseHostsText(after);
  if (stateChanged || hostsChanged) {
    switch (after.state) {
      case LeaseState.REQUESTED:
        lines.push(
          `requested: ${after.statusMessage || "no matching hosts are free for its whole window yet"}; retried${after.deadline ? ` until ${timeText(after.deadline, now)}` : " until its end"}`,
        );
        break;
      case LeaseState.WAITING:
        lines.push(`waiting: ${after.statusMessage || `until ${timeText(after.startTime, now)}`} (booked: ${leaseHostsText(after)})`);
        break;
      case LeaseState.ACTIVE:
        lines.push(`active on ${leaseHostsText(after)} until ${timeText(after.endTime, now)}`);
        if (before?.state !== LeaseState.ACTIVE) lines.push(...usageLines(after));
        break;
      case LeaseState.ENDED:
        break;
    }
  }
  if (before !== undefined && after.state !== LeaseState.ENDED && msOf(before.endTime) !== msOf(after.endTime)) {
    lines.push(`now ends at ${timeText(after.endTime, now)}`);
  }
  return lines;
}

const reserveFlags = {
  tag: { type: "list", placeholder: "KEY=VALUE", description: "a host must carry this tag" },
  count: { type: "string", placeholder: "N", description: "how many hosts (default 1)" },
  host: { type: "list", placeholder: "NAME", description: "a host by name, instead of --tag/--count" },
  site: { type: "string", placeholder: "SITE", description: "only hosts of this site" },
  driver: { type: "string", placeholder: "KIND", description: `only hosts with this driver (${enumWords(DriverKindSchema).join(", ")})` },
  for: { type: "string", placeholder: "DURATION", description: "how long, e.g. 2h (required)" },
  at: { type: "string", placeholder: "TIME", description: "start then instead of now: 14:00 (the next one), 2026-12-08T14:00, RFC 3339, or +2h" },
  deadline: { type: "string", placeholder: "TIME", description: "give up if not active by then: a duration from now (30m) or a time as --at" },
  image: { type: "string", placeholder: "IMAGE", description: "provision the hosts with this image when it starts (a session job; default: bare)" },
  param: { type: "list", placeholder: "NAME=VALUE", description: "a parameter of the --image session" },
  grace: { type: "string", placeholder: "DURATION", description: "how long it survives without a keepalive (default 5m, within policy)" },
  description: { type: "string", placeholder: "TEXT", description: "free text shown in listings" },
  detach: { type: "bool", short: "d", description: "print the lease's id and exit; keep it alive with `tml lease renew`" },
  wait: { type: "bool", description: "with --detach: wait until the lease is active (or has ended) first" },
} as const satisfies FlagSchema;

/** A deadline: a duration from now (30m) or a time (14:00, RFC 3339, +30m). */
export function parseDeadline(text: string, now: number): number {
  return /^\d+(\.\d+)?(ms|s|m|h|d)?$/.test(text.trim()) ? now + parseDuration("deadline", text) : parseTime("deadline", text, now);
}

/**
 * Follows lease `leaseId` (WatchLease, reopened with backoff on the next
 * replica when one is lost) until it ends or `signal` aborts; `keepalive`
 * makes the open stream its keepalive: the one loop that holds a lease
 * (`tml reserve`, and `tml job run` holding a failed job's hold). Resolves
 * with the last lease seen.
 */
export async function followLease(
  ctx: CliContext,
  leases: Leases,
  leaseId: string,
  options: {
    keepalive: boolean;
    signal: AbortSignal;
    /** The lease as the caller last saw it, if it did. */
    known?: Lease;
    until?: (lease: Lease) => boolean;
    onLease?: (lease: Lease, events: LeaseEvent[]) => void;
  },
): Promise<Lease | undefined> {
  let last = options.known;
  const done = new AbortController();
  const seen = new Set<string>();
  await keepStreaming({
    open: (attempt) => leases.watchLease({ leaseId, keepalive: options.keepalive }, { signal: attempt.signal }),
    onMessage: ({ lease, events }, attempt) => {
      if (!lease) return;
      attempt.healthy();
      // A reopened stream may say again what the last one said.
      const fresh = events.filter((e) => {
        const key = `${msOf(e.time)}|${e.kind}|${e.hostId}|${e.message}`;
        if (seen.has(key)) return false;
        seen.add(key);
        return true;
      });
      options.onLease?.(lease, fresh);
      last = lease;
      if (lease.state === LeaseState.ENDED || options.until?.(lease)) done.abort();
    },
    onError: (err, { verdict, repeated }) => {
      if (verdict === "retryable" && !repeated) {
        const grace = last?.gracePeriod ? spanText(durationMs(last.gracePeriod)) : "its grace period";
        ctx.out.note(ctx.out.errStyle(`--> lost the coordinator (${ConnectError.from(err).rawMessage}); reconnecting: the lease lasts ${grace} without a keepalive`, "yellow"));
      }
    },
    backoff: { initialMs: 250, maxMs: 5000 },
    signal: AbortSignal.any([options.signal, done.signal]),
  }).catch((err: unknown) => {
    throw ConnectError.from(err);
  });
  return last;
}

/** The timeline events `tml reserve` prints besides its own state lines. */
const NARRATED_EVENTS = new Set([LeaseEventKind.JOB, LeaseEventKind.KEEPALIVE]);

/**
 * `tml reserve` in the foreground: holds the lease's keepalive until it
 * ends, printing what happens to it; the first Ctrl-C releases it, a second
 * stops holding it (it then ends LOST after its grace period).
 */
async function holdLease(ctx: CliContext, leases: Leases, created: Lease): Promise<number> {
  const status = (text: string, style: "cyan" | "yellow" = "cyan") => ctx.out.note(ctx.out.errStyle(`--> ${text}`, style));
  const stop = new AbortController();
  let releasing = false;
  let released: Lease | undefined;
  const unsubscribe = ctx.onInterrupt(() => {
    if (releasing) {
      stop.abort();
      return;
    }
    releasing = true;
    status(`releasing lease ${created.id} (Ctrl-C again to stop waiting)`);
    void leases.releaseLease({ leaseId: created.id }, { timeoutMs: 15_000 }).then(
      (answer) => {
        released = answer.lease;
        stop.abort();
      },
      (err: unknown) => status(`could not release lease ${created.id}: ${ConnectError.from(err).rawMessage}; Ctrl-C again to stop holding it`, "yellow"),
    );
  });
  let before: Lease | undefined;
  const show = (lease: Lease, events: LeaseEvent[]) => {
    for (const line of leaseNarration(before, lease)) status(line);
    for (const e of events) if (NARRATED_EVENTS.has(e.kind) && e.message) status(e.message);
    before = lease;
  };
  show(created, []);
  try {
    let lease = created.state === LeaseState.ENDED ? created : ((await followLease(ctx, leases, created.id, { keepalive: true, signal: stop.signal, known: created, onLease: show })) ?? created);
    lease = released ?? lease;
    if (lease.state !== LeaseState.ENDED) {
      ctx.out.note(
        `Stopped holding lease ${lease.id}: without a keepalive it ends after its grace period. Keep it with \`tml lease renew ${lease.id}\`, end it with \`tml lease release ${lease.id}\`.`,
      );
      return ExitCode.INTERRUPTED;
    }
    status(`lease ${lease.id} ${endText(lease)}`);
    ctx.out.data(jsonOf(LeaseSchema, lease), () => undefined);
    return lease.endReason === LeaseEndReason.RELEASED || lease.endReason === LeaseEndReason.EXPIRED ? ExitCode.OK : ExitCode.ERROR;
  } finally {
    unsubscribe();
  }
}

function showLease(ctx: CliContext, lease: Lease): void {
  ctx.out.fields([
    ["ID", lease.id],
    ["State", leaseStateText(lease)],
    ["Kind", lease.kind === LeaseKind.HOLD ? `hold of failed job ${lease.heldJobId}` : undefined],
    ["Owner", lease.ownerUsername || lease.ownerUserId],
    ["Hosts", leaseHostsText(lease)],
    ["Asked for", lease.leaseHosts.length > 0 && lease.hostNames.length === 0 && lease.hosts ? leaseHostsText({ ...lease, leaseHosts: [] }) : undefined],
    ["Image", lease.image ? `${lease.image}${lease.manifestDigest ? ` (${lease.manifestDigest})` : ""}` : "none (bare)"],
    ["Starts", timeText(lease.startTime)],
    ["Ends", timeText(lease.endTime)],
    ["Deadline", lease.deadline ? timeText(lease.deadline) : undefined],
    ["Grace", lease.gracePeriod ? spanText(durationMs(lease.gracePeriod)) : undefined],
    ["Keepalive", lease.keepaliveTime ? timeText(lease.keepaliveTime) : undefined],
    ["Active since", lease.activeTime ? timeText(lease.activeTime) : undefined],
    ["Ended", lease.endReachedTime ? timeText(lease.endReachedTime) : undefined],
    ["Description", lease.description],
  ]);
  const running = lease.leaseHosts.filter((h) => h.jobId !== "");
  if (running.length > 0) {
    ctx.out.line();
    ctx.out.table(running, [
      { header: "HOST", value: (h) => h.hostName || h.hostId },
      { header: "JOB", value: (h) => h.jobId },
    ]);
  }
  if (lease.timeline.length > 0) {
    ctx.out.line();
    ctx.out.table(lease.timeline, [
      { header: "TIME", value: (e) => (e.time ? localMinute(timestampMs(e.time)) : "-") },
      { header: "EVENT", value: (e) => word(LeaseEventKindSchema, e.kind) },
      { header: "STATE", value: (e) => word(LeaseStateSchema, e.state) },
      { header: "MESSAGE", value: (e) => e.message || "-" },
    ]);
  }
}

/** Says what limits an extension the coordinator refused as overlapping a booking or past policy, and how far it could go. */
async function refusedExtension(leases: Leases, leaseId: string, err: ConnectError): Promise<CliError | undefined> {
  const [limit] = err.findDetails(LeaseExtensionLimitSchema);
  if (limit?.maxEndTime === undefined) return undefined;
  const max = timestampMs(limit.maxEndTime);
  const { lease } = await leases.getLease({ leaseId }, { timeoutMs: 15_000 }).catch(() => ({ lease: undefined }));
  const end = msOf(lease?.endTime);
  const room = end === undefined ? "" : max > end ? `: extend it by at most ${spanText(max - end)}` : ": it cannot be extended";
  return new CliError(
    `lease ${leaseId} cannot end later than ${localMinute(max)}${limit.reason ? ` (${limit.reason})` : ""}${room}`,
    err.code === Code.ResourceExhausted ? ExitCode.ERROR : ExitCode.CONFLICT,
  );
}

export const leaseCommands: Command[] = [
  defineCommand({
    path: ["reserve"],
    summary: "Lease hosts for a while, now or from a time ahead, and hold them (Ctrl-C releases)",
    description:
      "Books hosts by selector (--tag, --count, --site, --driver) or by name (--host) for --for, from now or from --at.\n" +
      "In the foreground tml is the lease's keepalive: it prints what happens to the lease and how to use it, reconnects\n" +
      "when the coordinator is lost, and releases the lease on Ctrl-C; killed, the lease ends after its grace period\n" +
      "(--grace, default 5m). With --detach it prints the lease's id and exits: keep it alive with `tml lease renew`.",
    flags: reserveFlags,
    examples: [
      "tml reserve --tag board=nrf52840dk --for 2h",
      "tml reserve --tag board=nrf52840dk --count 2 --for 1h --at 14:00 --image zephyr/shell:v1",
      "tml reserve --host board-3 --for 30m --deadline 10m",
      "LEASE=$(tml reserve --detach --wait --tag board=sim --for 1h --grace 2m)",
    ],
    async run(ctx, { flags }) {
      if (flags.for === undefined) throw new UsageError("`tml reserve` needs --for DURATION (how long, e.g. --for 2h)");
      const byName = flags.host.length > 0;
      if (byName && (flags.tag.length > 0 || flags.count !== undefined || flags.site !== undefined || flags.driver !== undefined)) {
        throw new UsageError("flag --host names the hosts: give it without --tag, --count, --site and --driver");
      }
      if (flags.wait && !flags.detach) throw new UsageError("flag --wait goes with --detach (in the foreground tml waits anyway)");
      const now = Date.now();
      const request = {
        hosts: byName
          ? undefined
          : {
              tags: keyValues("tag", flags.tag),
              hostCount: flags.count === undefined ? 1 : parseIntFlag("count", flags.count, 1, 64),
              site: flags.site,
              driverKind: flags.driver === undefined ? 0 : driverOf(flags.driver),
            },
        hostNames: [...flags.host],
        duration: durationFromMs(parseDuration("for", flags.for)),
        startTime: flags.at === undefined ? undefined : timestampFromMs(parseTime("at", flags.at, now)),
        deadline: flags.deadline === undefined ? undefined : timestampFromMs(parseDeadline(flags.deadline, now)),
        image: flags.image ?? "",
        parameters: Object.entries(keyValues("param", flags.param)).map(([name, value]) => ({ name, value, secret: false })),
        gracePeriod: flags.grace === undefined ? undefined : durationFromMs(parseDuration("grace", flags.grace)),
        description: flags.description ?? "",
        requestId: randomUUID(),
      };
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(await leases.createLease(request, { timeoutMs: 30_000 }));
      if (!flags.detach) {
        ctx.out.note(ctx.out.errStyle(`--> lease ${lease.id}: ${leaseHostsText(lease)} for ${flags.for}${flags.at ? ` from ${timeText(lease.startTime)}` : ""}`, "cyan"));
        return holdLease(ctx, leases, lease);
      }
      let shown = lease;
      if (flags.wait && lease.state !== LeaseState.ACTIVE && lease.state !== LeaseState.ENDED) {
        // The stream is its keepalive while it waits.
        shown = (await followLease(ctx, leases, lease.id, { keepalive: true, signal: ctx.abort.signal, known: lease, until: (l) => l.state === LeaseState.ACTIVE })) ?? lease;
      }
      ctx.out.data(jsonOf(LeaseSchema, shown), () => ctx.out.line(shown.id));
      const grace = shown.gracePeriod ? spanText(durationMs(shown.gracePeriod)) : "its grace period";
      if (shown.state === LeaseState.ENDED) throw new CliError(`lease ${shown.id} ${endText(shown)}`, ExitCode.ERROR);
      ctx.out.note(
        `Lease ${shown.id} is ${leaseStateText(shown)}. Renew it at least every ${grace} (\`tml lease renew ${shown.id}\`), release it with \`tml lease release ${shown.id}\`.`,
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "list"],
    summary: "List your leases, newest first; --calendar shows the booking calendar of the hosts",
    flags: {
      all: { type: "bool", short: "a", description: "every user's leases (admins)" },
      state: { type: "list", placeholder: "STATE", description: `only leases in this state (${enumWords(LeaseStateSchema).join(", ")})` },
      calendar: { type: "bool", description: "the calendar of the hosts instead: per host, its leases and jobs over the next --hours" },
      tag: { type: "list", placeholder: "KEY=VALUE", description: "with --calendar: only hosts with this tag" },
      site: { type: "string", placeholder: "SITE", description: "with --calendar: only hosts of this site" },
      driver: { type: "string", placeholder: "KIND", description: "with --calendar: only hosts with this driver" },
      hours: { type: "string", placeholder: "N", description: "with --calendar: how many hours from now (default 48, at most 336)" },
    },
    examples: ["tml lease list", "tml lease list --state active --all", "tml lease list --calendar --tag board=nrf52840dk --hours 24"],
    async run(ctx, { flags }) {
      if (!flags.calendar) {
        for (const [flag, given] of [["tag", flags.tag.length > 0], ["site", flags.site !== undefined], ["driver", flags.driver !== undefined], ["hours", flags.hours !== undefined]] as const) {
          if (given) throw new UsageError(`flag --${flag} goes with --calendar`);
        }
      }
      const leases = await ctx.client(LeaseService);
      if (flags.calendar) {
        const hours = flags.hours === undefined ? 48 : parseIntFlag("hours", flags.hours, 1, 336);
        const from = Date.now();
        const calendar = await leases.getLeaseCalendar(
          {
            hosts: { tags: keyValues("tag", flags.tag), site: flags.site, driverKind: flags.driver === undefined ? 0 : driverOf(flags.driver) },
            from: timestampFromMs(from),
            to: timestampFromMs(from + hours * 3_600_000),
          },
          { timeoutMs: 30_000 },
        );
        ctx.out.data(jsonOf(GetLeaseCalendarResponseSchema, calendar), () => {
          if (calendar.hosts.length === 0) {
            ctx.out.note("No hosts match.");
            return;
          }
          for (const line of renderCalendar(calendar, Math.min(96, hours * 4))) ctx.out.line(line);
          const entries = calendar.hosts.flatMap((h) => h.entries.map((e) => ({ host: h.hostName, ...e })));
          if (entries.length === 0) return;
          ctx.out.line();
          ctx.out.table(entries, [
            { header: "HOST", value: (e) => e.host },
            { header: "KIND", value: (e) => e.kind },
            { header: "ID", value: (e) => e.id || "(private)" },
            { header: "OWNER", value: (e) => e.ownerUsername || "-" },
            { header: "FROM", value: (e) => (e.startTime ? localMinute(timestampMs(e.startTime)) : "-") },
            { header: "TO", value: (e) => (e.endTime ? localMinute(timestampMs(e.endTime)) : "-") },
            { header: "STATE", value: (e) => (e.kind === "lease" ? word(LeaseStateSchema, e.leaseState) : "running") },
          ]);
        });
        return ExitCode.OK;
      }
      const states = flags.state.map((s) => {
        const v = enumValue(LeaseStateSchema, s);
        if (v === undefined) throw new UsageError(`flag --state must be one of ${enumWords(LeaseStateSchema).join(", ")}, got "${s}"`);
        return v;
      });
      const found = await allPages(async (pageToken) => {
        const page = await leases.listLeases({ pageSize: 1000, pageToken, states, allUsers: flags.all }, { timeoutMs: 30_000 });
        return { items: page.leases, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((l) => jsonOf(LeaseSchema, l)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "ID", value: (l) => l.id },
              ...(flags.all ? [{ header: "OWNER", value: (l: Lease) => l.ownerUsername || l.ownerUserId }] : []),
              { header: "STATE", value: (l) => (l.state === LeaseState.ENDED ? `ended (${word(LeaseEndReasonSchema, l.endReason)})` : word(LeaseStateSchema, l.state)) },
              { header: "HOSTS", value: (l) => leaseHostsText(l) },
              { header: "STARTS", value: (l) => (l.startTime ? localMinute(timestampMs(l.startTime)) : "-") },
              { header: "ENDS", value: (l) => (l.endTime ? localMinute(timestampMs(l.endTime)) : "-") },
              { header: "KIND", value: (l) => (l.kind === LeaseKind.HOLD ? "hold" : "reservation") },
              { header: "DESCRIPTION", value: (l) => l.description || "-" },
            ],
            "No leases.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "get"],
    summary: "Show one lease: its hosts, the jobs running in it, its timeline",
    args: LEASE_ARG,
    examples: ["tml lease get $LEASE", "tml lease get $LEASE -o json | jq -r .state"],
    async run(ctx, { args }) {
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(await leases.getLease({ leaseId: args.LEASE }, { timeoutMs: 15_000 }));
      ctx.out.data(jsonOf(LeaseSchema, lease), () => showLease(ctx, lease));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "extend"],
    summary: "End a lease later, within policy and the bookings of its hosts",
    args: LEASE_ARG,
    flags: { by: { type: "string", placeholder: "DURATION", description: "how much later, e.g. 1h (required)" } },
    examples: ["tml lease extend $LEASE --by 1h"],
    async run(ctx, { args, flags }) {
      if (flags.by === undefined) throw new UsageError("`tml lease extend` needs --by DURATION (e.g. --by 1h)");
      const by = durationFromMs(parseDuration("by", flags.by));
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(
        await leases.extendLease({ leaseId: args.LEASE, by, requestId: randomUUID() }, { timeoutMs: 15_000 }).catch(async (err: unknown) => {
          const error = ConnectError.from(err);
          throw (await refusedExtension(leases, args.LEASE, error)) ?? error;
        }),
      );
      ctx.out.data(jsonOf(LeaseSchema, lease), () => ctx.out.line(`Lease ${lease.id} now ends at ${timeText(lease.endTime)}.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "release"],
    summary: "End a lease now: its jobs are canceled, its hosts reset and returned",
    args: LEASE_ARG,
    examples: ["tml lease release $LEASE"],
    async run(ctx, { args }) {
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(await leases.releaseLease({ leaseId: args.LEASE }, { timeoutMs: 15_000 }));
      ctx.out.data(jsonOf(LeaseSchema, lease), () => ctx.out.line(`Lease ${lease.id} ${endText(lease)}.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "renew"],
    summary: "Keep a lease alive once (a keepalive); exits 6 once the lease has ended",
    description: "For a lease reserved with --detach: run it more often than the lease's grace period, e.g. in a loop beside the jobs.",
    args: LEASE_ARG,
    examples: ["tml lease renew $LEASE", "while tml lease renew $LEASE >/dev/null; do sleep 60; done &"],
    async run(ctx, { args }) {
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(await leases.renewLease({ leaseId: args.LEASE }, { timeoutMs: 15_000 }));
      const lostAt = msOf(lease.keepaliveTime) !== undefined && lease.gracePeriod ? timestampFromMs(msOf(lease.keepaliveTime)! + durationMs(lease.gracePeriod)) : undefined;
      ctx.out.data(jsonOf(LeaseSchema, lease), () =>
        ctx.out.line(`Lease ${lease.id} renewed (${leaseStateText(lease)})${lostAt ? `; without another keepalive it ends at ${timeText(lostAt)}` : ""}.`),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["lease", "revoke"],
    summary: "End any user's lease, with a reason its holder is shown (admins)",
    args: LEASE_ARG,
    flags: { reason: { type: "string", placeholder: "TEXT", description: "why, shown to the holder (required)" } },
    examples: ['tml lease revoke $LEASE --reason "board needed for the release test"'],
    async run(ctx, { args, flags }) {
      if (flags.reason === undefined || flags.reason.trim() === "") throw new UsageError("`tml lease revoke` needs --reason TEXT (shown to the lease's holder)");
      const leases = await ctx.client(LeaseService);
      const lease = leaseOf(await leases.revokeLease({ leaseId: args.LEASE, reason: flags.reason }, { timeoutMs: 15_000 }));
      ctx.out.data(jsonOf(LeaseSchema, lease), () => ctx.out.line(`Lease ${lease.id} ${endText(lease)}.`));
      return ExitCode.OK;
    },
  }),
];

/**
 * The job to open a console on for `tml console --lease L [--host H]`: the
 * lease's job on host H (by name or id; default the first of its hosts that
 * runs one). CliError saying why when there is none.
 */
export async function leaseConsoleTarget(leases: Leases, leaseId: string, host: string | undefined): Promise<{ jobId: string; hostId: string; hostName: string }> {
  const lease = leaseOf(await leases.getLease({ leaseId }, { timeoutMs: 15_000 }));
  if (lease.state !== LeaseState.ACTIVE) {
    throw new CliError(`lease ${leaseId} is ${leaseStateText(lease)}: a console opens on a job running in an active lease`, ExitCode.CONFLICT);
  }
  const candidates = host === undefined ? lease.leaseHosts : lease.leaseHosts.filter((h) => h.hostName === host || h.hostId === host);
  if (candidates.length === 0) {
    throw new CliError(`host ${host} is not one of lease ${leaseId}'s hosts (${leaseHostsText(lease)})`, ExitCode.USAGE);
  }
  const running = candidates.find((h) => h.jobId !== "");
  if (running === undefined) {
    const where = host === undefined ? `any host of lease ${leaseId}` : `host ${host} of lease ${leaseId}`;
    throw new CliError(`no job runs on ${where} now: start one with \`tml job run --lease ${leaseId} IMAGE\`, or reserve with --image`, ExitCode.CONFLICT);
  }
  return { jobId: running.jobId, hostId: running.hostId, hostName: running.hostName };
}

