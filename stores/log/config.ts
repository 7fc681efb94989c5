import { loadConfig } from "../../lib/config.js";
import { serverConfigFields } from "../../lib/component.js";

/** Everything a log server can be told, with its defaults. */
export const logServerSchema = {
  ...serverConfigFields(7703),
  dataDir: {
    type: "path",
    default: ".treadmill/log-server",
    description: "where job logs live (segment files per job and channel)",
  },
} as const;

export type LogServerConfig = ReturnType<typeof loadLogServerConfig>;

/** Reads the log server's config from the environment and flags. */
export function loadLogServerConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("log_server", logServerSchema, source);
}
