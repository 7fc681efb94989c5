import { ConfigError, loadConfig } from "../lib/config.js";
import { registrationConfigFields, serverConfigFields } from "../lib/component.js";

/** Everything a rendezvous proxy can be told, with its defaults. */
export const proxySchema = {
  ...serverConfigFields(7704),
  ...registrationConfigFields("http://127.0.0.1:7700"),
  tcpPortRange: {
    type: "string",
    default: "",
    description: "ports for plain TCP entrances, e.g. 40000-40099, one bound per session by OpenTcpEntrance (empty: none)",
  },
  tcpHost: {
    type: "string",
    default: "",
    description: "address the TCP entrance ports bind to (default: host)",
  },
  tcpPublicHost: {
    type: "string",
    default: "",
    description: "host name clients are given for TCP entrances (default: the host of public-url, else host)",
  },
  maxTunnels: { type: "int", default: 2000, min: 1, description: "open tunnels of the whole proxy" },
  maxTunnelsPerJob: { type: "int", default: 64, min: 1, description: "open tunnels of one job" },
  maxExposuresPerHost: { type: "int", default: 64, min: 1, description: "exposures one job host may announce" },
  idleTimeoutMs: {
    type: "duration",
    default: 3_600_000,
    min: 0,
    description: "a tunnel without bytes either way for this long is closed (0: never)",
  },
  openTimeoutMs: { type: "duration", default: 10_000, min: 100, description: "how long a dial waits for the supervisor's tunnel" },
  pingIntervalMs: {
    type: "duration",
    default: 15_000,
    min: 50,
    description: "how often supervisors are pinged; three silent intervals drop the control stream",
  },
} as const;

export type ProxyConfig = ReturnType<typeof loadProxyConfig>;

/** Reads the proxy's config from the environment and flags. */
export function loadProxyConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  const config = loadConfig("proxy", proxySchema, source);
  try {
    parsePortRange(config.tcpPortRange);
  } catch (err) {
    throw new ConfigError([(err as Error).message]);
  }
  return config;
}

/** `40000-40099` (or one port) as an inclusive range; throws on anything else. */
export function parsePortRange(text: string): { low: number; high: number } | undefined {
  if (text.trim() === "") return undefined;
  const match = /^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$/.exec(text);
  const low = match ? Number(match[1]) : NaN;
  const high = match ? Number(match[2] ?? match[1]) : NaN;
  if (!(low >= 1 && high <= 65535 && low <= high)) throw new Error(`tcp-port-range ${text} is not a range like 40000-40099`);
  return { low, high };
}
