/**
 * What `tml reserve` and `tml lease` make of their input and of leases,
 * without a server: --at and --deadline times, the calendar chart, the lines
 * `tml reserve` prints as a lease changes, and the usage errors it gives
 * before calling anything.
 */
import { describe, expect, it } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { parseTime } from "../../cli/args.js";
import { renderCalendar } from "../../cli/calendar.js";
import { leaseHostsText, leaseNarration, leaseStateText, parseDeadline } from "../../cli/commands/lease.js";
import { UsageError } from "../../cli/errors.js";
import {
  CalendarEntrySchema,
  CalendarHostSchema,
  LeaseEndReason,
  LeaseSchema,
  LeaseState,
} from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { tml } from "./harness.js";

const HOUR = 3_600_000;
/** A local time today, so that the tests hold in any time zone. */
const today = (h: number, m = 0) => new Date(new Date(2026, 11, 7).setHours(h, m, 0, 0)).getTime();

describe("--at and --deadline times", () => {
  it("read a clock time as the next such local time: today while it is ahead, tomorrow once it has passed", () => {
    const now = today(10, 30);
    expect(parseTime("at", "14:00", now)).toBe(today(14));
    expect(parseTime("at", "9:15", now)).toBe(today(9, 15) + 24 * HOUR);
    expect(parseTime("at", "10:30", now)).toBe(today(10, 30) + 24 * HOUR);
    expect(parseTime("at", "23:59:30", now)).toBe(today(23, 59) + 30_000);
  });

  it("read a date and time as local without an offset, and as that instant with one", () => {
    const now = today(10);
    expect(parseTime("at", "2026-12-08T14:00", now)).toBe(new Date(2026, 11, 8, 14, 0).getTime());
    expect(parseTime("at", "2026-12-08 14:00:30", now)).toBe(new Date(2026, 11, 8, 14, 0, 30).getTime());
    expect(parseTime("at", "2026-12-08T14:00:00Z", now)).toBe(Date.UTC(2026, 11, 8, 14));
    expect(parseTime("at", "2026-12-08T14:00:00+02:00", now)).toBe(Date.UTC(2026, 11, 8, 12));
    expect(parseTime("at", "+90m", now)).toBe(now + 90 * 60_000);
  });

  it("refuse anything else with a usage error naming the flag and the forms it takes", () => {
    for (const bad of ["2pm", "25:00", "14:60", "2026-02-30T10:00", "2026-13-01T10:00", "tomorrow", "+soon", ""]) {
      expect(() => parseTime("at", bad, today(10))).toThrow(UsageError);
    }
    expect(() => parseTime("at", "2pm", today(10))).toThrow('flag --at takes a time like 14:00, 2026-12-08T14:00, 2026-12-08T14:00:00Z or +2h, got "2pm"');
  });

  it("take a deadline as a duration from now or as a time", () => {
    const now = today(10);
    expect(parseDeadline("30m", now)).toBe(now + 30 * 60_000);
    expect(parseDeadline("12:00", now)).toBe(today(12));
    expect(() => parseDeadline("later", now)).toThrow("flag --deadline takes a time");
  });
});

describe("the calendar chart", () => {
  const from = today(12);
  const entry = (kind: string, start: number, end: number, leaseState = LeaseState.UNSPECIFIED) =>
    create(CalendarEntrySchema, { id: `${kind}-${start}`, kind, startTime: timestampFromMs(start), endTime: timestampFromMs(end), leaseState });

  it("draws a row per host with a column per slice: active leases over booked ones over jobs, free time as dots", () => {
    const hosts = [
      create(CalendarHostSchema, {
        hostName: "board-1",
        entries: [entry("job", from - HOUR, from + 2 * HOUR), entry("lease", from + 2 * HOUR, from + 6 * HOUR, LeaseState.WAITING)],
      }),
      create(CalendarHostSchema, {
        hostName: "b2",
        // A job running inside an active lease shows as the lease.
        entries: [entry("lease", from, from + 3 * HOUR, LeaseState.ACTIVE), entry("job", from + HOUR, from + 2 * HOUR)],
      }),
      create(CalendarHostSchema, { hostName: "idle", entries: [] }),
    ];
    const lines = renderCalendar({ hosts, from: timestampFromMs(from), to: timestampFromMs(from + 12 * HOUR) }, 12);
    expect(lines.slice(1, 4)).toEqual(["board-1  ==~~~~......", "b2       ###.........", "idle     ............"]);
    expect(lines[5]).toMatch(/one column = 1h: # active lease {2}~ booked lease {2}= job {2}\. free$/);
  });

  it("labels the time axis with local hours, and the date at midnight", () => {
    const lines = renderCalendar({ hosts: [create(CalendarHostSchema, { hostName: "h", entries: [] })], from: timestampFromMs(from), to: timestampFromMs(from + 48 * HOUR) }, 96);
    const axis = lines[0];
    // 30 minutes a column: a label every 3 hours, 6 columns apart, after the name column ("h" padded to 4, 2 spaces).
    expect(axis.slice(6, 6 + 12)).toBe("12:00 15:00 ");
    expect(axis).toContain("12-08");
    expect(axis.indexOf("12-08") - 6).toBe(24);
    expect(lines[1]).toBe(`h     ${".".repeat(96)}`);
  });

  it("clips entries to the window and draws nothing without one", () => {
    const hosts = [create(CalendarHostSchema, { hostName: "h", entries: [entry("lease", from - 5 * HOUR, from + 30 * 60_000, LeaseState.ACTIVE), entry("job", from + 11 * HOUR, from + 20 * HOUR)] })];
    expect(renderCalendar({ hosts, from: timestampFromMs(from), to: timestampFromMs(from + 12 * HOUR) }, 12)[1]).toBe("h     #..........=");
    expect(renderCalendar({ hosts })).toEqual([]);
  });
});

describe("what tml reserve says as its lease changes", () => {
  const base = {
    id: "0190f5c2-7c1e-7000-8000-000000000001",
    hosts: { tags: { board: "nrf52" }, hostCount: 2 },
    gracePeriod: durationFromMs(5 * 60_000),
    startTime: timestampFromMs(today(14)),
    endTime: timestampFromMs(today(16)),
  };
  const now = today(13);
  const requested = create(LeaseSchema, { ...base, state: LeaseState.REQUESTED });
  const booked = [
    { hostId: "h1", hostName: "board-1" },
    { hostId: "h2", hostName: "board-2" },
  ];
  const waiting = create(LeaseSchema, { ...base, state: LeaseState.WAITING, leaseHosts: booked });
  const active = create(LeaseSchema, { ...base, state: LeaseState.ACTIVE, leaseHosts: booked });

  it("names what was asked while nothing is booked, then the booked hosts", () => {
    expect(leaseHostsText(requested)).toBe("2 x board=nrf52");
    expect(leaseHostsText(waiting)).toBe("board-1, board-2");
    expect(leaseNarration(undefined, requested, now)).toEqual([
      expect.stringMatching(/^requested: no matching hosts are free for its whole window yet; retried until its end$/),
    ]);
    expect(leaseNarration(requested, waiting, now)).toEqual([expect.stringMatching(/^waiting: until .*14:00 \(in 1h\) \(booked: board-1, board-2\)$/)]);
  });

  it("says once it is active where, until when, and how to run jobs, open a console, extend and release it", () => {
    const lines = leaseNarration(waiting, active, now);
    expect(lines[0]).toMatch(/^active on board-1, board-2 until .*16:00 \(in 3h\)$/);
    expect(lines.slice(1).join("\n")).toBe(
      [
        `run jobs in it:   tml job run --lease ${base.id} IMAGE`,
        `open a console:   tml console --lease ${base.id} --host NAME   (on a job running in it)`,
        `extend it:        tml lease extend ${base.id} --by 1h`,
        `release it:       Ctrl-C here, or tml lease release ${base.id}`,
      ].join("\n"),
    );
    expect(leaseNarration(active, active, now)).toEqual([]);
    const extended = create(LeaseSchema, { ...active, endTime: timestampFromMs(today(17)) });
    expect(leaseNarration(active, extended, now)).toEqual([expect.stringMatching(/^now ends at .*17:00 \(in 4h\)$/)]);
  });

  it("words an ended lease's state with its reason and an admin's message", () => {
    const revoked = create(LeaseSchema, { ...active, state: LeaseState.ENDED, endReason: LeaseEndReason.REVOKED, statusMessage: "rack maintenance" });
    expect(leaseStateText(revoked)).toBe("ended (revoked: rack maintenance)");
    // The coordinator's own words, when they already say the reason, are not said twice.
    const byAdmin = create(LeaseSchema, { ...revoked, statusMessage: "revoked by admin ada: rack maintenance" });
    expect(leaseStateText(byAdmin)).toBe("ended (revoked by admin ada: rack maintenance)");
    expect(leaseStateText(create(LeaseSchema, { ...revoked, endReason: LeaseEndReason.EXPIRED, statusMessage: "" }))).toBe("ended (expired)");
    expect(leaseStateText(create(LeaseSchema, { ...waiting, statusMessage: "host board-1 runs job J" }))).toBe("waiting: host board-1 runs job J");
  });
});

describe("tml reserve and tml lease on a bad command line", () => {
  const noServer = "/nonexistent/tml.json";
  it.each([
    [["reserve", "--tag", "board=sim"], "`tml reserve` needs --for DURATION"],
    [["reserve", "--host", "b1", "--tag", "board=sim", "--for", "1h"], "flag --host names the hosts"],
    [["reserve", "--tag", "board=sim", "--for", "soon"], 'flag --for takes a duration like 30s, 15m, 2h or 7d, got "soon"'],
    [["reserve", "--tag", "board=sim", "--for", "1h", "--at", "2pm"], 'flag --at takes a time like 14:00'],
    [["reserve", "--tag", "board=sim", "--for", "1h", "--wait"], "flag --wait goes with --detach"],
    [["lease", "extend", "L"], "`tml lease extend` needs --by DURATION"],
    [["lease", "revoke", "L"], "`tml lease revoke` needs --reason TEXT"],
    [["lease", "list", "--hours", "5"], "flag --hours goes with --calendar"],
    [["console"], "`tml console` needs JOB or --lease LEASE (not both)"],
  ])("tml %j exits 2 saying what is wrong before calling a server", async (argv, message) => {
    const result = await tml(noServer, argv);
    expect(result.code).toBe(2);
    expect(result.stderr.toLowerCase()).toContain(message.toLowerCase());
  });
});
