import { loadConfig } from "../lib/config.js";
import { serverConfigFields } from "../lib/component.js";

/** Everything a rendezvous proxy can be told, with its defaults. */
export const proxySchema = {
  ...serverConfigFields(7704),
} as const;

export type ProxyConfig = ReturnType<typeof loadProxyConfig>;

/** Reads the proxy's config from the environment and flags. */
export function loadProxyConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("proxy", proxySchema, source);
}
