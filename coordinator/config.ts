import { ConfigError, loadConfig } from "../lib/config.js";
import { serverConfigFields } from "../lib/component.js";
import { databaseUrlProblem } from "./db/url.js";
import { webhookDenyList } from "./subscriptions/address-deny.js";
import { artifactConfigFields } from "./jobs/artifact-config.js";
import { feedConfigFields } from "./feed/config.js";
import { jobConfigFields } from "./jobs/config.js";
import { leaseConfigFields } from "./leases/config.js";
import { parseOverrides } from "./leases/policy.js";
import { subscriptionConfigFields } from "./subscriptions/config.js";

/** Everything the coordinator can be told, with its defaults. */
export const coordinatorSchema = {
  ...serverConfigFields(7700),
  ...jobConfigFields,
  ...leaseConfigFields,
  ...artifactConfigFields,
  ...feedConfigFields,
  ...subscriptionConfigFields,
  dataDir: {
    type: "path",
    default: ".treadmill/coordinator",
    description: "state directory; holds the embedded PostgreSQL when database-url is not set",
  },
  databaseUrl: {
    // Not "url": a WHATWG URL refuses several hosts (db/url.ts checks it).
    type: "string",
    default: "",
    env: "DATABASE_URL",
    secret: true,
    description:
      "PostgreSQL 14+ to use instead of the embedded one (postgres://user:pass@host/db); with a standby, every host and target_session_attrs=read-write (postgres://user:pass@h1:5432,h2:5432/db?target_session_attrs=read-write)",
  },
  adminName: {
    type: "string",
    default: "admin",
    description: "login name of the first admin, created at start when it does not exist (see admin-password)",
  },
  adminPassword: {
    type: "string",
    default: "",
    secret: true,
    description:
      "password of the first admin (12+ characters); empty: when there is no user at all, a random one is printed once to stderr",
  },
  tokenTtlMs: {
    type: "duration",
    default: 30 * 24 * 3600 * 1000,
    min: 60_000,
    description: "lifetime of a user API token when Login or CreateToken names none",
  },
  tokenMaxTtlMs: {
    type: "duration",
    default: 365 * 24 * 3600 * 1000,
    min: 60_000,
    description: "longest lifetime of a user API token (longer requests are capped)",
  },
  maxTokensPerUser: {
    type: "int",
    default: 200,
    min: 1,
    description: "active API tokens a user may hold; more: ResourceExhausted",
  },
  loginMaxFailures: {
    type: "int",
    default: 10,
    min: 1,
    description: "failed logins of one name per login-lockout-ms before Login answers ResourceExhausted",
  },
  loginLockoutMs: {
    type: "duration",
    default: 15 * 60 * 1000,
    min: 1000,
    description: "window of login-max-failures",
  },
  serviceHeartbeatMs: {
    type: "duration",
    default: 10_000,
    min: 100,
    description: "heartbeat interval asked of registered stores, caches, log servers and proxies",
  },
  console: { type: "bool", default: true, description: "serve the web console at / (--no-console: APIs only)" },
  consoleDir: {
    type: "path",
    default: "",
    description: "the built web console to serve (default: console/dist of this installation, made by npm run build)",
  },
  imageTokenTtlMs: {
    type: "duration",
    default: 60 * 60 * 1000,
    min: 1000,
    description: "lifetime of image:read tokens (ResolveImage) and image:write tokens (CreateUploadGrant)",
  },
} as const;

export type CoordinatorConfig = ReturnType<typeof loadCoordinatorConfig>;

/** Reads the coordinator's config from the environment and flags. */
export function loadCoordinatorConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  const config = loadConfig("coordinator", coordinatorSchema, source);
  const problem = config.databaseUrl === "" ? undefined : databaseUrlProblem(config.databaseUrl.trim());
  if (problem !== undefined) throw new ConfigError([`database-url (DATABASE_URL): the value ${problem}`]);
  const { problems } = parseOverrides(config.leasePolicyOverrides);
  try {
    webhookDenyList(config.subscriptionWebhookDeny);
  } catch (err) {
    problems.push(`subscription-webhook-deny: ${(err as Error).message}`);
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return { ...config, databaseUrl: config.databaseUrl.trim() };
}
