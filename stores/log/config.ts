import { loadConfig } from "../../lib/config.js";
import { registrationConfigFields, serverConfigFields } from "../../lib/component.js";

/** Everything a log server can be told, with its defaults. */
export const logServerSchema = {
  ...serverConfigFields(7703),
  dataDir: {
    type: "path",
    default: ".treadmill/log-server",
    description: "where job logs live (segment files per job and channel)",
  },
  ...registrationConfigFields("http://127.0.0.1:7700"),
  jobSizeCapBytes: {
    type: "int",
    default: 1024 * 1024 * 1024,
    min: 0,
    description: "largest log of one job (all attempts and channels) in bytes; 0: no cap",
  },
  retentionMaxAgeMs: {
    type: "duration",
    default: 30 * 86_400_000,
    min: 0,
    description: "finalized jobs unchanged for this long are deleted; 0: keep forever",
  },
  retentionMaxTotalBytes: {
    type: "int",
    default: 0,
    min: 0,
    description: "the oldest finalized jobs are deleted while all logs take more than this; 0: no cap",
  },
  retentionIntervalMs: { type: "duration", default: 60_000, min: 100, description: "how often retention runs" },
} as const;

export type LogServerConfig = ReturnType<typeof loadLogServerConfig>;

/** Reads the log server's config from the environment and flags. */
export function loadLogServerConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("log_server", logServerSchema, source);
}
