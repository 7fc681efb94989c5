/**
 * Delivery of a host's pending operations (snapshots, host controls) to its
 * supervisor stream on this replica: each pending row is sent once per
 * stream, and again to a new stream (the supervisor answers a repeat from
 * what it remembers). Woken by the operation's channel (payload a host id),
 * by 'treadmill_commands' (a stream attached or re-read its host), after a
 * LISTEN outage, and every heartbeat for streams new here (the attach
 * notification may come before the stream is registered). Deliveries of one
 * host are coalesced: one runs at a time, and a wake meanwhile runs it once
 * more.
 */
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";
import type { HostSession } from "./session.js";
import type { SupervisorStreams } from "./supervisor-stream.js";

export interface HostDeliveryOptions<Row extends { id: string }> {
  /** The notification channel that names a host with new pending rows. */
  channel: string;
  /** What the log calls these operations. */
  what: string;
  /** The host's pending rows. */
  pending(hostId: string): Promise<Row[]>;
  /** Sends one row's command on `session` (and audits it). */
  send(session: HostSession, hostId: string, row: Row): Promise<void>;
}

export class HostDelivery<Row extends { id: string }> {
  private readonly log: Logger;
  private readonly unsubscribe: (() => void)[] = [];
  /** Rows sent on each stream. */
  private readonly sent = new WeakMap<HostSession, Set<string>>();
  /** Per host: a delivery running, and whether another was asked meanwhile. */
  private readonly delivering = new Map<string, { again: boolean }>();
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    private readonly streams: SupervisorStreams,
    private readonly options: HostDeliveryOptions<Row>,
  ) {
    this.log = ctx.logger.child({ subsystem: options.what });
  }

  async start(): Promise<void> {
    const all = () => {
      for (const hostId of this.streams.sessions.keys()) this.deliver(hostId);
    };
    this.timer = setInterval(() => {
      for (const [hostId, session] of this.streams.sessions) if (!this.sent.has(session)) this.deliver(hostId);
    }, this.config.supervisorHeartbeatMs);
    this.timer.unref?.();
    const n = this.ctx.notifications;
    this.unsubscribe.push(
      n.onResync(all),
      await n.subscribe(this.options.channel, (hostId) => this.deliver(hostId)),
      await n.subscribe("treadmill_commands", (hostId) => {
        const session = this.streams.sessions.get(hostId);
        if (session && !this.sent.has(session)) this.deliver(hostId);
      }),
    );
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
    for (const off of this.unsubscribe.splice(0)) off();
  }

  /** Sends the host's pending rows its stream here has not had (coalesced per host). */
  deliver(hostId: string): void {
    if (this.stopped || !this.streams.sessions.has(hostId)) return;
    const running = this.delivering.get(hostId);
    if (running) {
      running.again = true;
      return;
    }
    const state = { again: false };
    this.delivering.set(hostId, state);
    void (async () => {
      try {
        do {
          state.again = false;
          await this.deliverOnce(hostId);
        } while (state.again && !this.stopped);
      } catch (err) {
        if (!this.stopped) this.log.warn({ err, hostId }, `cannot deliver ${this.options.what} commands`);
      } finally {
        this.delivering.delete(hostId);
      }
    })();
  }

  private async deliverOnce(hostId: string): Promise<void> {
    const session = this.streams.sessions.get(hostId);
    if (!session) return;
    let sent = this.sent.get(session);
    if (!sent) this.sent.set(session, (sent = new Set()));
    for (const row of await this.options.pending(hostId)) {
      if (sent.has(row.id) || this.streams.sessions.get(hostId) !== session) continue;
      await this.options.send(session, hostId, row);
      sent.add(row.id);
    }
  }
}
