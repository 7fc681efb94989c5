/**
 * The contexts file: named (server, user, token) triples like kubectl's
 * contexts, one of them current. JSON, mode 0600 in a 0700 directory, at
 * `$TML_CONFIG`, else `$XDG_CONFIG_HOME/treadmill/config.json`, else
 * `~/.config/treadmill/config.json`. Written atomically (temp file + rename).
 */
import { chmod, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { CliError, ExitCode } from "./errors.js";

export interface SavedContext {
  /** The coordinator's base URL (its first replica's when there are several: what older tml versions read). */
  server: string;
  /** The coordinator's replicas, in the order tried, when there are several (absent from files written before). */
  servers?: string[];
  /** The login name. */
  user: string;
  /** The API token's secret; absent after logout. */
  token?: string;
  /** The API token's id (to revoke it at logout). */
  tokenId?: string;
  /** When the token expires (RFC 3339), if it does. */
  expireTime?: string;
  /** The CA certificate file (PEM, absolute path) that https servers of this context are verified with, beside the system's. */
  caFile?: string;
}

export interface ConfigFile {
  current?: string;
  contexts: Record<string, SavedContext>;
}

/** Where the contexts file lives for this environment. */
export function configPath(env: Record<string, string | undefined>): string {
  if (env.TML_CONFIG) return env.TML_CONFIG;
  const base = env.XDG_CONFIG_HOME || join(env.HOME || homedir(), ".config");
  return join(base, "treadmill", "config.json");
}

export class ConfigStore {
  constructor(readonly path: string) {}

  async load(): Promise<ConfigFile> {
    let text: string;
    try {
      text = await readFile(this.path, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return { contexts: {} };
      throw err;
    }
    // An empty file (`TML_CONFIG=$(mktemp)`) or `{}` holds no contexts yet.
    if (text.trim() === "") return { contexts: {} };
    try {
      const parsed = JSON.parse(text) as Partial<ConfigFile> | null;
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("shape");
      const contexts = parsed.contexts ?? {};
      if (typeof contexts !== "object" || contexts === null || Array.isArray(contexts)) throw new Error("shape");
      return { ...parsed, contexts };
    } catch {
      throw new CliError(`the config file ${this.path} is not valid; fix or delete it, then run \`tml login\``, ExitCode.ERROR);
    }
  }

  async save(config: ConfigFile): Promise<void> {
    await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
    const temp = `${this.path}.${process.pid}.tmp`;
    await writeFile(temp, JSON.stringify(config, null, 2) + "\n", { mode: 0o600 });
    await chmod(temp, 0o600);
    await rename(temp, this.path);
  }
}

/** The coordinator replicas of a saved context, in the order tried. */
export function contextServers(context: SavedContext): string[] {
  return Array.isArray(context.servers) && context.servers.length > 0 ? [...context.servers] : [context.server];
}

/** A context name derived from a server URL: `host-port`. */
export function contextNameFor(server: string): string {
  try {
    const url = new URL(server);
    return `${url.hostname}${url.port ? `-${url.port}` : ""}`.replace(/[^A-Za-z0-9._-]/g, "-");
  } catch {
    return "default";
  }
}
