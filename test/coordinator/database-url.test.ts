/**
 * DATABASE_URL with a standby (issue #20 item 4): the coordinator takes a
 * URL naming several hosts, as the `postgres` driver and libpq do, and
 * refuses a bad one at start with a message that does not quote it; the
 * driver (as scripts/patch-dependencies.mjs leaves it) tries each host once
 * per connection, as libpq does, so that a query fails while no host will
 * do instead of waiting for one.
 */
import { describe, expect, it } from "@jest/globals";
import postgres from "postgres";
import { ConfigError } from "../../lib/config.js";
import { loadCoordinatorConfig } from "../../coordinator/config.js";
import { isDatabaseUnavailable } from "../../coordinator/db/errors.js";
import { freePort } from "../support/net.js";

const load = (url: string) => loadCoordinatorConfig({ env: { DATABASE_URL: url }, argv: [] });

describe("the coordinator's DATABASE_URL", () => {
  it("takes a primary and a standby with target_session_attrs=read-write", () => {
    const url = "postgres://treadmill:s3cret@10.0.0.1:5432,10.0.0.2:5433/treadmill?target_session_attrs=read-write";
    expect(load(url).databaseUrl).toBe(url);
    expect(load("postgresql://u:p@[::1]:5432,db-2/x").databaseUrl).toBe("postgresql://u:p@[::1]:5432,db-2/x");
    expect(load("postgres://u:p@db/x").databaseUrl).toBe("postgres://u:p@db/x");
  });

  it("refuses a bad url, port or session attribute, naming the setting and never the password", () => {
    const cases: [string, RegExp][] = [
      ["http://u:s3cret@db/x", /not a postgres:\/\/ or postgresql:\/\/ url/],
      ["postgres://u:s3cret@h1:5432,h2:99999/x", /port outside 1-65535/],
      ["postgres://u:s3cret@h1:5432,,h2/x", /host that is not host or host:port/],
      ["postgres://u:s3cret@h1,h2/x?target_session_attrs=master", /target_session_attrs "master"/],
    ];
    for (const [url, message] of cases) {
      let caught: unknown;
      try {
        load(url);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(ConfigError);
      expect((caught as Error).message).toMatch(/^database-url \(DATABASE_URL\): the value /);
      expect((caught as Error).message).toMatch(message);
      expect((caught as Error).message).not.toContain("s3cret");
    }
  });

  it("fails a query at once, as a database outage, when no host of the url answers", async () => {
    const sql = postgres(`postgres://u:p@127.0.0.1:${await freePort()},127.0.0.1:${await freePort()}/x?target_session_attrs=read-write`, {
      max: 1,
      connect_timeout: 30,
      onnotice: () => undefined,
    });
    try {
      let timer: NodeJS.Timeout | undefined;
      const outcome = await Promise.race([
        sql`select 1`.then(
          () => "answered",
          (err: unknown) => err,
        ),
        new Promise((resolve) => (timer = setTimeout(() => resolve("still waiting after 5 s"), 5000))),
      ]);
      clearTimeout(timer);
      expect(isDatabaseUnavailable(outcome)).toBe(true);
    } finally {
      await sql.end({ timeout: 0 });
    }
  });
});
