/**
 * What a host did over windows of time ending now (HostService.GetHostStats):
 * the ends of the attempts it ran (job_hosts.termination, its own end of each
 * attempt), when its supervisor was attached (host_presence, migration 0015),
 * its health timeline (host_health_events, migration 0011) and its last
 * health check. Every window ends at the caller's `now`, so that a test can
 * seed rows at exact times; the classes of the ends are the caller's
 * (jobs/store.ts reasonClass), read here by reason and exit status.
 */
import type { Sql, TransactionSql } from "postgres";
import type { Health } from "./health.js";

type Db = Sql | TransactionSql;

/** How many attempts ended on the host with this reason and exit status within window `window`. */
export interface EndCount {
  window: number;
  reason: string;
  exitStatus: string | null;
  n: number;
}

/** A change of the host's health. */
export interface HealthMark {
  health: Health;
  at: Date;
}

export interface HostActivity {
  /** Ends by window (its index in `starts`), reason and exit status. */
  ends: EndCount[];
  /** Milliseconds attached within each window, by index. */
  onlineMs: number[];
  /** The health when the earliest window starts ('unknown' before any change). */
  healthAtStart: Health;
  /** Changes after the earliest window start, up to `now`, oldest first. */
  healthChanges: HealthMark[];
}

/** The host's activity within the windows [starts[i], now]. */
export async function hostActivity(sql: Db, hostId: string, starts: Date[], now: Date): Promise<HostActivity> {
  const earliest = new Date(Math.min(...starts.map((s) => s.getTime())));
  const windows = sql`unnest(${starts.map((s) => s.toISOString())}::timestamptz[]) with ordinality as w(start, i)`;
  const [ends, online, [before], changes] = await Promise.all([
    sql<EndCount[]>`
      select (w.i - 1)::int as window, jh.termination->>'reason' as reason, jh.termination->>'exitStatus' as "exitStatus", count(*)::int as n
      from ${windows}
        join job_hosts jh on jh.host_id = ${hostId} and jh.termination is not null
          and jh.terminated_at >= w.start and jh.terminated_at <= ${now}
      group by 1, 2, 3 order by 1, 2, 3`,
    sql<{ window: number; ms: number }[]>`
      select (w.i - 1)::int as window,
        coalesce(sum(extract(epoch from least(coalesce(p.online_until, ${now}), ${now}) - greatest(p.online_from, w.start)) * 1000)
          filter (where p.host_id is not null), 0)::float8 as ms
      from ${windows}
        left join host_presence p on p.host_id = ${hostId} and p.online_from < ${now}
          and coalesce(p.online_until, 'infinity') > w.start
      group by 1 order by 1`,
    sql<{ health: Health }[]>`
      select health from host_health_events where host_id = ${hostId} and at <= ${earliest}
      order by at desc, id desc limit 1`,
    sql<HealthMark[]>`
      select health, at from host_health_events where host_id = ${hostId} and at > ${earliest} and at <= ${now}
      order by at, id`,
  ]);
  return { ends, onlineMs: online.map((o) => o.ms), healthAtStart: before?.health ?? "unknown", healthChanges: changes };
}

/**
 * Milliseconds in each health state within [start, end], from `initial`
 * (the health at or before `start`) and the changes after it, oldest first.
 */
export function timeInHealth(initial: Health, changes: HealthMark[], start: Date, end: Date): Map<Health, number> {
  const out = new Map<Health, number>();
  let health = initial;
  let from = start.getTime();
  const add = (until: number) => {
    if (until > from) out.set(health, (out.get(health) ?? 0) + until - from);
  };
  for (const c of changes) {
    const at = c.at.getTime();
    if (at > end.getTime()) break;
    if (at > from) {
      add(at);
      from = at;
    }
    health = c.health;
  }
  add(end.getTime());
  return out;
}

/** A change of a host's health, as its timeline shows it. */
export interface HealthEvent {
  health: Health;
  reason: string;
  actor: string;
  jobId: string | null;
  at: Date;
}

/** The host's health changes in [since, now], newest first, at most `limit`. */
export function healthTimeline(sql: Db, hostId: string, since: Date, now: Date, limit: number): Promise<HealthEvent[]> {
  return sql<HealthEvent[]>`
    select health, reason, actor, job_id::text as "jobId", at from host_health_events
    where host_id = ${hostId} and at >= ${since} and at <= ${now}
    order by at desc, id desc limit ${limit}`;
}

/** A host's last health check as GetHostStats shows it. */
export interface CheckOutcome {
  jobId: string;
  passed: boolean;
  at: Date;
  message: string;
}

/**
 * The host's last health check: its last finished health job (a job of a
 * check, pinned to the host: migration 0013), passed when its workload
 * exited with success, as jobs/health.ts decides.
 */
export async function lastHealthCheck(sql: Db, hostId: string, now: Date): Promise<CheckOutcome | undefined> {
  const [row] = await sql<{ id: string; reason: string; exit_status: string | null; finalized_at: Date; status_message: string }[]>`
    select j.id::text, j.reason, j.exit_status, j.finalized_at, j.status_message from jobs j
    where j.pinned_host_id = ${hostId} and j.health_check_id is not null and j.state = 'finalized' and j.finalized_at <= ${now}
    order by j.finalized_at desc, j.id desc limit 1`;
  if (!row) return undefined;
  const passed = row.reason === "workload_exited" && row.exit_status === "success";
  return { jobId: row.id, passed, at: row.finalized_at, message: row.status_message };
}

/** Every host's health and its ends so far by reason and exit status (the coordinator's /metrics). */
export async function hostTallies(sql: Db): Promise<{ health: { name: string; health: Health }[]; ends: (Omit<EndCount, "window"> & { name: string })[] }> {
  const [health, ends] = await Promise.all([
    sql<{ name: string; health: Health }[]>`select name, health from hosts order by name`,
    sql<(Omit<EndCount, "window"> & { name: string })[]>`
      select h.name, e.reason, e."exitStatus", e.n
      from (select host_id, termination->>'reason' as reason, termination->>'exitStatus' as "exitStatus", count(*)::int as n
            from job_hosts where termination is not null group by 1, 2, 3) e
        join hosts h on h.id = e.host_id`,
  ]);
  return { health, ends };
}
