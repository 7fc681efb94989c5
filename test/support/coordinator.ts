import { randomUUID } from "node:crypto";
import type { Sql } from "postgres";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import type { DescService } from "@bufbuild/protobuf";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { hashSecret, newSecret } from "../../coordinator/auth.js";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { loadCoordinatorConfig, type CoordinatorConfig } from "../../coordinator/config.js";
import { createCoordinator } from "../../coordinator/coordinator.js";
import type { ServingComponent } from "../../lib/component.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { ROOTFS_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { silentLogger, type Logger } from "../../lib/logger.js";
import { createTestDatabase, type TestDatabase } from "./db.js";

/** A real coordinator on a fresh test database, with shortcuts for fixtures. */
export interface TestCoordinator {
  coordinator: ServingComponent;
  url: string;
  db: TestDatabase;
  sql: Sql;
  /** A user with an API token, made directly in the database. */
  createUser(options?: { name?: string; role?: "admin" | "user" }): Promise<{ id: string; name: string; token: string }>;
  /** A host with a supervisor credential, made directly in the database. */
  createHost(options?: {
    name?: string;
    tags?: Record<string, string>;
    driverKind?: string;
    mediaTypes?: string[];
    site?: string;
    capacity?: number;
  }): Promise<{ id: string; name: string; credential: string }>;
  /** A service token (what a store, log server or proxy registers with), made by `adminToken` through AuthService. */
  createServiceToken(adminToken: string, description?: string): Promise<string>;
  /** A gRPC transport sending `token` as the bearer (none when omitted). */
  transport(token?: string): Transport;
  /** A client of `service` with `token`. */
  client<S extends DescService>(service: S, token?: string): Client<S>;
  stop(): Promise<void>;
}

/**
 * Starts a coordinator (port 0) on a database cloned from the migrated
 * template. Pass `db` to start a second replica on the same database.
 */
export async function startTestCoordinator(
  options: {
    config?: Partial<CoordinatorConfig>;
    logger?: Logger;
    db?: TestDatabase;
    clock?: () => number;
    /**
     * A registration of a log server at `http://fixture-logs.invalid` that
     * lasts for weeks (default true): the scheduler assigns no job without a
     * live log server, and most tests of the job system need none to exist.
     */
    logServer?: boolean;
  } = {},
): Promise<TestCoordinator> {
  const ownDb = options.db === undefined;
  const db = options.db ?? (await createTestDatabase());
  const coordinator = createCoordinator({
    config: { ...loadCoordinatorConfig({ env: {}, argv: [] }), port: 0, databaseUrl: db.url, ...options.config },
    logger: options.logger ?? silentLogger(),
    clock: options.clock,
  });
  try {
    await coordinator.start();
  } catch (err) {
    if (ownDb) await db.drop();
    throw err;
  }
  if (options.logServer !== false) {
    await db.sql`
      insert into services (id, kind, url, site, heartbeat_interval_ms, last_heartbeat_at)
      values (${randomUUID()}, 'log_server', 'http://fixture-logs.invalid', '', ${600_000_000}, now())
      on conflict (kind, url) do nothing`;
  }
  const url = coordinator.address().url;
  const transport = (token?: string) =>
    createGrpcTransport({ baseUrl: url, interceptors: token ? [bearerInterceptor(() => token)] : [] });
  return {
    coordinator,
    url,
    db,
    sql: db.sql,
    async createUser({ name = `user-${randomUUID().slice(0, 8)}`, role = "user" } = {}) {
      const id = randomUUID();
      const token = newSecret("user");
      await db.sql`insert into users (id, name, role) values (${id}, ${name}, ${role})`;
      await db.sql`insert into api_tokens (id, user_id, hash, name) values (${randomUUID()}, ${id}, ${hashSecret(token)}, 'test')`;
      return { id, name, token };
    },
    async createHost({
      name = `host-${randomUUID().slice(0, 8)}`,
      tags = {},
      driverKind = "process",
      mediaTypes = [ROOTFS_MEDIA_TYPE],
      site = "",
      capacity = 1,
    } = {}) {
      const id = randomUUID();
      const credential = newSecret("host");
      await db.sql`
        insert into hosts (id, name, tags, driver_kind, media_types, site, capacity, credential_hash)
        values (${id}, ${name}, ${db.sql.json(tags)}, ${driverKind}, ${mediaTypes}, ${site}, ${capacity}, ${hashSecret(credential)})`;
      return { id, name, credential };
    },
    async createServiceToken(adminToken, description = "") {
      return (await createClient(AuthService, transport(adminToken)).createToken({ scope: TokenScope.SERVICE, description })).token;
    },
    transport,
    client: (service, token) => createClient(service, transport(token)),
    async stop() {
      await coordinator.stop();
      if (ownDb) await db.drop();
    },
  };
}
