/**
 * Who did something, as the audit log says it (db/queries/audit.ts writes
 * the log).
 */
import type { Caller } from "./auth.js";

/** The `actor` string of a caller: "user:<name>", "host:<name>", "service:<token id>", or "system". */
export function actorOf(caller: Caller | undefined): string {
  if (caller === undefined) return "system";
  switch (caller.kind) {
    case "user":
      return `user:${caller.name}`;
    case "host":
      return `host:${caller.hostName}`;
    case "service":
      return `service:${caller.tokenId}`;
  }
}
