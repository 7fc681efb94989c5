/**
 * Leases: LeaseService and the lease keeper of this replica, wired to the
 * database's notifications ('treadmill_leases', payload a lease id: the
 * lease changed; WatchLease streams re-read it). One unit with one life,
 * beside the job system, whose jobs and hosts it acts on only through the
 * database (a lease's end cancels its jobs and wakes the scheduler by
 * NOTIFY).
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { Gauge, type Registry } from "prom-client";
import { LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import type { CoordinatorContext } from "../context.js";
import { JobWatchers } from "../jobs/watchers.js";
import { LeaseKeeper } from "./lease-keeper.js";
import { LeaseServiceImpl } from "./lease-service.js";

export interface LeaseSystem {
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
  /** Serves the leases' gauges on the server's /metrics. */
  registerMetrics(registry: Registry): void;
  /** The keeper, for tests that sweep directly. */
  keeper: LeaseKeeper;
}

const OPEN_STATES = ["requested", "waiting", "active"] as const;

export function createLeaseSystem(ctx: CoordinatorContext): LeaseSystem {
  // The fan-out by id is the jobs' one: listeners of one lease's changes.
  const watchers = new JobWatchers();
  const service = new LeaseServiceImpl(ctx, ctx.config, watchers);
  const keeper = new LeaseKeeper(ctx, ctx.config);
  const unsubscribe: (() => void)[] = [];
  let started = false;
  let stopping: Promise<void> | undefined;
  return {
    keeper,
    register(router) {
      router.service(LeaseService, service);
    },
    registerMetrics(registry) {
      const log = ctx.logger.child({ subsystem: "leases" });
      new Gauge({
        name: "treadmill_coordinator_leases",
        help: "Leases not ended, by state (requested: no room in the calendar yet; waiting: booked, before its start or for a busy host; active), and hosts held by active leases (state=hosts).",
        labelNames: ["state"] as const,
        registers: [registry],
        async collect() {
          if (!ctx.notifications.connected) return;
          try {
            const rows = await ctx.sql<{ state: string; n: number }[]>`
              select state, count(*)::int as n from leases where state <> 'ended' group by state
              union all select 'hosts', count(*)::int from hosts where lease_id is not null`;
            for (const state of [...OPEN_STATES, "hosts"]) this.set({ state }, rows.find((r) => r.state === state)?.n ?? 0);
          } catch (err) {
            log.warn({ err }, "cannot read the leases' metrics");
          }
        },
      });
    },
    async start() {
      started = true;
      const n = ctx.notifications;
      unsubscribe.push(
        n.onResync(() => {
          keeper.wake();
          watchers.notifyAll();
        }),
        await n.subscribe("treadmill_leases", (id) => watchers.notify(id)),
      );
      keeper.start();
    },
    stop() {
      stopping ??= (async () => {
        if (!started) return;
        for (const off of unsubscribe) off();
        await keeper.stop();
      })();
      return stopping;
    },
  };
}
