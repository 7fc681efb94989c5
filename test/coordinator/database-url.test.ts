/**
 * DATABASE_URL with a standby (issue #20 item 4): the coordinator takes a
 * URL naming several hosts, as the `postgres` driver and libpq do, and
 * refuses a bad one at start with a message that does not quote it.
 */
import { describe, expect, it } from "@jest/globals";
import { ConfigError } from "../../lib/config.js";
import { loadCoordinatorConfig } from "../../coordinator/config.js";

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
});
