import { loadConfig } from "../lib/config.js";
import { serverConfigFields } from "../lib/component.js";

/** Everything the coordinator can be told, with its defaults. */
export const coordinatorSchema = {
  ...serverConfigFields(7700),
  dataDir: {
    type: "path",
    default: ".treadmill/coordinator",
    description: "state directory; holds the embedded PostgreSQL when database-url is not set",
  },
  databaseUrl: {
    type: "url",
    default: "",
    env: "DATABASE_URL",
    secret: true,
    description: "PostgreSQL 14+ to use instead of the embedded one (postgres://user:pass@host/db)",
  },
} as const;

export type CoordinatorConfig = ReturnType<typeof loadCoordinatorConfig>;

/** Reads the coordinator's config from the environment and flags. */
export function loadCoordinatorConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("coordinator", coordinatorSchema, source);
}
