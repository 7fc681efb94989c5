/**
 * A cache's upstreams (issue #17, hole 4): the only stores it fetches from or
 * pushes to, so that no caller can make it send a token, or any request, to
 * an address of the caller's choosing. They are the image stores and caches
 * registered with the coordinator (RegistryService.ListServices, with the
 * cache's service credential), refreshed every `refreshMs` and on a miss (at
 * most once per `missRefreshMs`), plus the configured `upstream-urls`
 * (stand-alone use). A location that is not an upstream is refused with
 * PermissionDenied naming it, before anything is sent anywhere; a fetch is
 * never sent to what is left of a partly refused list.
 *
 * URLs are compared normalised: scheme, host and port (lower case, default
 * ports dropped) and path without trailing slashes.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "../../lib/logger.js";
import { sleep } from "../../lib/retry.js";

export interface UpstreamOptions {
  /** Configured upstream base URLs. */
  static: readonly string[];
  /** The registered stores' and caches' base URLs; absent when the cache has no coordinator to ask. */
  registered?: () => Promise<string[]>;
  refreshMs: number;
  missRefreshMs: number;
  logger: Logger;
  clock?: () => number;
}

/** The normal form of a store's base URL, or undefined when it is not an http(s) URL. */
export function normaliseUrl(value: string): string | undefined {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return undefined;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
  return `${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, "")}`;
}

export class Upstreams {
  readonly #o: UpstreamOptions;
  readonly #clock: () => number;
  readonly #static: Set<string>;
  #registered = new Set<string>();
  #refreshedAt = -Infinity;
  #inflight: Promise<void> | undefined;

  constructor(options: UpstreamOptions) {
    this.#o = options;
    this.#clock = options.clock ?? Date.now;
    this.#static = new Set(options.static.map((u) => normaliseUrl(u)).filter((u): u is string => u !== undefined));
  }

  /** Refreshes now and then every refreshMs until `signal` aborts. */
  async run(signal: AbortSignal): Promise<void> {
    if (!this.#o.registered) return;
    while (!signal.aborted) {
      await this.refresh();
      await sleep(this.#o.refreshMs, signal).catch(() => undefined);
    }
  }

  /** Reads the registered stores again (one read at a time; a failure keeps the last list). */
  refresh(): Promise<void> {
    const registered = this.#o.registered;
    if (!registered) return Promise.resolve();
    this.#inflight ??= (async () => {
      this.#refreshedAt = this.#clock();
      try {
        const urls = await registered();
        this.#registered = new Set(urls.map((u) => normaliseUrl(u)).filter((u): u is string => u !== undefined));
      } catch (err) {
        this.#o.logger.warn({ err: ConnectError.from(err).rawMessage }, "cannot list the registered image stores; keeping the last list");
      } finally {
        this.#inflight = undefined;
      }
    })();
    return this.#inflight;
  }

  #known(url: string): boolean {
    const n = normaliseUrl(url);
    return n !== undefined && (this.#static.has(n) || this.#registered.has(n));
  }

  /**
   * Throws PermissionDenied naming the first of `urls` (field `field[i]`, or
   * `field` for one) that is not an upstream, after one refresh when some
   * are unknown (rate-limited).
   */
  async check(field: string, urls: readonly string[]): Promise<void> {
    if (urls.every((u) => this.#known(u))) return;
    if (this.#o.registered && (this.#inflight || this.#clock() - this.#refreshedAt >= this.#o.missRefreshMs)) await this.refresh();
    for (const [i, url] of urls.entries()) {
      if (this.#known(url)) continue;
      const name = urls.length === 1 && !field.endsWith("s") ? field : `${field}[${i}]`;
      throw new ConnectError(
        `${name}: ${url} is not an image store registered with the coordinator (nor in this cache's upstream-urls); the cache fetches from nowhere else`,
        Code.PermissionDenied,
      );
    }
  }
}
