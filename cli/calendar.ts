/**
 * `tml lease list --calendar`'s chart: the booking calendar
 * (LeaseService.GetLeaseCalendar) as one text row per host over the window,
 * a column per equal slice of it, so that free time, leases and running jobs
 * read at a glance in a terminal. Pure: the tests give it a calendar and a
 * width; times are shown in the local time zone.
 */
import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { LeaseState, type CalendarHost } from "../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { spanText } from "../lib/figures.js";

/** What a column of a host's row shows, by precedence: an active lease over a booked one over a job. */
export const CALENDAR_MARKS = { free: ".", job: "=", booked: "~", active: "#" } as const;

export interface CalendarChart {
  hosts: readonly CalendarHost[];
  from?: Timestamp;
  to?: Timestamp;
}

/** Hours between ticks of the time axis: the first that leaves room for a label. */
const TICK_HOURS = [1, 2, 3, 6, 12, 24, 48, 96, 168];
const LABEL_WIDTH = 6;
const HOUR_MS = 3_600_000;

/** `2026-12-08 14:00` in the local time zone. */
export function localMinute(ms: number): string {
  const d = new Date(ms);
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/**
 * The chart's lines: a time axis (local hours, the date at midnight), one
 * row per host (its name, then `columns` marks), and a legend saying what a
 * column is worth. An entry covers every column its interval overlaps.
 */
export function renderCalendar(calendar: CalendarChart, columns = 96): string[] {
  if (calendar.from === undefined || calendar.to === undefined) return [];
  const from = timestampMs(calendar.from);
  const to = timestampMs(calendar.to);
  const cellMs = (to - from) / columns;
  if (!(cellMs > 0)) return [];
  const nameWidth = Math.max(4, ...calendar.hosts.map((h) => h.hostName.length));

  const axis = Array<string>(columns).fill(" ");
  const tickHours = TICK_HOURS.find((hours) => (hours * HOUR_MS) / cellMs >= LABEL_WIDTH) ?? TICK_HOURS[TICK_HOURS.length - 1];
  const firstTick = new Date(from);
  firstTick.setMinutes(0, 0, 0);
  for (let tick = firstTick.getTime(); tick < to; tick += HOUR_MS) {
    const at = new Date(tick);
    if (tick < from || at.getHours() % tickHours !== 0) continue;
    const column = Math.floor((tick - from) / cellMs);
    const pad = (n: number) => String(n).padStart(2, "0");
    const label = at.getHours() === 0 ? `${pad(at.getMonth() + 1)}-${pad(at.getDate())}` : `${pad(at.getHours())}:00`;
    if (column + label.length > columns) continue;
    axis.splice(column, label.length, ...label);
  }

  const rank = (mark: string) => Object.values(CALENDAR_MARKS).indexOf(mark as never);
  const rows = calendar.hosts.map((host) => {
    const cells = Array<string>(columns).fill(CALENDAR_MARKS.free);
    for (const entry of host.entries) {
      if (entry.startTime === undefined) continue;
      const start = Math.max(from, timestampMs(entry.startTime));
      const end = Math.min(to, entry.endTime === undefined ? to : timestampMs(entry.endTime));
      if (end <= start) continue;
      const mark = entry.kind === "lease" ? (entry.leaseState === LeaseState.ACTIVE ? CALENDAR_MARKS.active : CALENDAR_MARKS.booked) : CALENDAR_MARKS.job;
      const last = Math.min(columns - 1, Math.ceil((end - from) / cellMs) - 1);
      for (let c = Math.floor((start - from) / cellMs); c <= last; c++) {
        if (rank(mark) > rank(cells[c])) cells[c] = mark;
      }
    }
    return `${host.hostName.padEnd(nameWidth)}  ${cells.join("")}`;
  });

  const step = spanText(cellMs);
  return [
    `${"".padEnd(nameWidth)}  ${axis.join("").trimEnd()}`,
    ...rows,
    "",
    `${localMinute(from)} to ${localMinute(to)}, one column = ${step}: ${CALENDAR_MARKS.active} active lease  ${CALENDAR_MARKS.booked} booked lease  ${CALENDAR_MARKS.job} job  ${CALENDAR_MARKS.free} free`,
  ];
}
