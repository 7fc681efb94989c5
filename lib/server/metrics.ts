import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

/** Per-RPC metrics, recorded by the RPC interceptor. */
export interface RpcMetrics {
  /** Counts one finished RPC and records its duration. */
  observe(procedure: string, code: string, seconds: number): void;
}

/** Connection metrics, recorded by the listener (listener.ts). */
export interface ConnectionMetrics {
  /** A connection was accepted. */
  opened(): void;
  /** An accepted connection closed, for whatever reason. */
  closed(): void;
  /** A connection was closed by the idle timeout. */
  closedIdle(): void;
  /** A connection was refused: its address holds as many as it may. */
  refused(): void;
}

/**
 * A registry of its own for each server, never prom-client's global one: the
 * all-in-one testbed runs several servers in one process, and each serves only
 * its own metrics under `component`.
 */
export function createMetricsRegistry(component: string): { registry: Registry; rpc: RpcMetrics; connections: ConnectionMetrics } {
  const registry = new Registry();
  registry.setDefaultLabels({ component });
  // Process metrics (CPU, memory, event loop lag). Called exactly once per
  // registry: a second call would try to register the same names again.
  collectDefaultMetrics({ register: registry });

  const requests = new Counter({
    name: "treadmill_rpc_requests_total",
    help: "Finished RPCs by procedure and status code.",
    labelNames: ["procedure", "code"] as const,
    registers: [registry],
  });
  const duration = new Histogram({
    name: "treadmill_rpc_duration_seconds",
    help: "RPC duration, until the last message of a stream.",
    labelNames: ["procedure"] as const,
    // Wide on purpose: unary calls take milliseconds, streams minutes.
    buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600],
    registers: [registry],
  });

  const open = new Gauge({
    name: "treadmill_server_connections",
    help: "Open connections (TCP, before and after TLS and protocol sniffing).",
    registers: [registry],
  });
  const closedIdle = new Counter({
    name: "treadmill_server_connections_closed_idle_total",
    help: "Connections closed because they had no open stream or request for the idle timeout.",
    registers: [registry],
  });
  const refused = new Counter({
    name: "treadmill_server_connections_refused_total",
    help: "Connections refused because their client address held max-connections-per-address.",
    registers: [registry],
  });

  return {
    registry,
    connections: {
      opened: () => open.inc(),
      closed: () => open.dec(),
      closedIdle: () => closedIdle.inc(),
      refused: () => refused.inc(),
    },
    rpc: {
      observe(procedure, code, seconds) {
        requests.inc({ procedure, code });
        duration.observe({ procedure }, seconds);
      },
    },
  };
}
