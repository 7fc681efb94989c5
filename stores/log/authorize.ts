/**
 * The log server's authorization table (DESIGN.md §3): the capability scopes
 * each LogService procedure takes. The server's hook (lib/server/authorize.ts)
 * checks a call's token against it before any handler, on every protocol and
 * on the hand-framed Append and Read; the handlers (log-service.ts) then
 * check the job the token names.
 */
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { capabilityAuthorizer, scopeEntries } from "../../lib/server/authorize.js";
import type { Authorize } from "../../lib/server.js";
import type { TokenVerifier } from "../../lib/tokens.js";

/** The hook of a log server. */
export function logAuthorizer(verifier: TokenVerifier): Authorize {
  return capabilityAuthorizer(
    verifier,
    scopeEntries(LogService, {
      append: ["log:write"],
      read: ["log:read", "log:admin"],
      closeChannel: ["log:write", "log:admin"],
      listChannels: ["log:read", "log:admin"],
      deleteJobLogs: ["log:admin"],
    }),
  );
}
