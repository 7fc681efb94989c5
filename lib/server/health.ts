import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import {
  Health,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthListResponseSchema,
  type HealthCheckRequest,
  type HealthCheckResponse,
} from "../../gen/grpc/health/v1/health_pb.js";

export { ServingStatus };

/**
 * The serving status of a server and of each service it offers, as reported by
 * grpc.health.v1.Health. The empty name "" is the server as a whole.
 *
 * One instance per server: components call setStatus() to report that a
 * service cannot serve (e.g. its database is down), and the server calls
 * shutdown() when it starts to stop, so that load balancers and watchers move
 * away before connections close.
 */
export class HealthStatus {
  readonly #statuses = new Map<string, ServingStatus>();
  readonly #listeners = new Set<() => void>();
  #shutDown = false;

  constructor(services: Iterable<string> = []) {
    this.#statuses.set("", ServingStatus.SERVING);
    for (const service of services) this.#statuses.set(service, ServingStatus.SERVING);
  }

  /** The status of a service, or undefined for a service never reported. */
  get(service: string): ServingStatus | undefined {
    return this.#statuses.get(service);
  }

  /** A snapshot of every known service's status. */
  list(): ReadonlyMap<string, ServingStatus> {
    return new Map(this.#statuses);
  }

  /**
   * Sets a service's status and tells every watcher. Ignored once the server is
   * stopping: a component must not flip a stopping server back to SERVING.
   */
  setStatus(service: string, status: ServingStatus): void {
    if (this.#shutDown || this.#statuses.get(service) === status) return;
    this.#statuses.set(service, status);
    this.#notify();
  }

  /** Whether shutdown() was called. */
  get isShutDown(): boolean {
    return this.#shutDown;
  }

  /** Marks every service NOT_SERVING for good (the server is stopping). */
  shutdown(): void {
    if (this.#shutDown) return;
    for (const service of this.#statuses.keys()) this.#statuses.set(service, ServingStatus.NOT_SERVING);
    this.#shutDown = true;
    this.#notify();
  }

  /**
   * Resolves at the next change of any status, or when the signal aborts.
   * Subscribe before reading the current status so that no change is missed.
   */
  nextChange(signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.#listeners.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      if (signal.aborted) return resolve();
      this.#listeners.add(done);
      signal.addEventListener("abort", done);
    });
  }

  #notify(): void {
    // Copy: each listener removes itself while we iterate.
    for (const listener of [...this.#listeners]) listener();
  }
}

/** Registers grpc.health.v1.Health, answering from `status`. */
export function registerHealthService(router: ConnectRouter, status: HealthStatus): void {
  router.service(Health, {
    check(request: HealthCheckRequest): HealthCheckResponse {
      const current = status.get(request.service);
      if (current === undefined) {
        throw new ConnectError(`service "${request.service}" not found`, Code.NotFound);
      }
      return create(HealthCheckResponseSchema, { status: current });
    },

    list() {
      const statuses: Record<string, HealthCheckResponse> = {};
      for (const [service, current] of status.list()) {
        statuses[service] = create(HealthCheckResponseSchema, { status: current });
      }
      return create(HealthListResponseSchema, { statuses });
    },

    // The current status at once, then each change. An unknown service is
    // SERVICE_UNKNOWN, not an error: it may be registered later. When the server
    // stops, watchers get NOT_SERVING and then Unavailable, so that a watch
    // does not hold the server's drain open for the whole grace period.
    async *watch(request: HealthCheckRequest, context: HandlerContext) {
      let sent: ServingStatus | undefined;
      while (!context.signal.aborted) {
        const changed = status.nextChange(context.signal);
        const current = status.get(request.service) ?? ServingStatus.SERVICE_UNKNOWN;
        if (current !== sent) {
          sent = current;
          yield create(HealthCheckResponseSchema, { status: current });
        }
        if (status.isShutDown) {
          throw new ConnectError("server is shutting down", Code.Unavailable);
        }
        await changed;
      }
    },
  });
}
