/**
 * Exit codes and the one-sentence messages the CLI prints for errors. A user
 * never sees a stack trace for a user error: every ConnectError code maps to
 * a sentence that says what happened and what to do, and to an exit code
 * scripts can test.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { isNetworkError } from "../lib/retry.js";

/** Exit codes of `tml`. */
export const ExitCode = {
  /** Success (for `job run`/`job wait`: the job succeeded). */
  OK: 0,
  /** The job failed (its workload failed, timed out, was canceled, or the infrastructure failed it). */
  JOB_FAILED: 1,
  /** Bad command line or bad input (the server's InvalidArgument too). */
  USAGE: 2,
  /** Any other error: server unreachable, internal error, timeout. */
  ERROR: 3,
  /** Not logged in, credentials expired or revoked, or not allowed. */
  AUTH: 4,
  /** The thing named does not exist (or is not visible to you). */
  NOT_FOUND: 5,
  /** Conflict: it already exists, or it is in the wrong state for this. */
  CONFLICT: 6,
  /** Interrupted by the user (Ctrl-C). */
  INTERRUPTED: 130,
} as const;

/** An error with a message for the user and an exit code. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = ExitCode.ERROR,
  ) {
    super(message);
    this.name = "CliError";
  }
}

/** A mistake on the command line: exit code 2. */
export class UsageError extends CliError {
  constructor(message: string) {
    super(message, ExitCode.USAGE);
    this.name = "UsageError";
  }
}

/** What the CLI was doing, to word the message. */
export interface ErrorContext {
  /** The server the call went to. */
  server?: string;
  /** The saved context in use, if any. */
  context?: string;
  /** Whether the call carried a saved token (an Unauthenticated then means it expired). */
  hadToken?: boolean;
}

/** A connection lost below gRPC that carries no errno: the HTTP layer's own words (isNetworkError has the rest). */
const HTTP_CONNECTION_LOST = /socket hang up|ERR_HTTP2/;

function capitalise(s: string): string {
  return s.length === 0 ? s : s[0].toUpperCase() + s.slice(1);
}

function sentence(s: string): string {
  const t = capitalise(s.trim());
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

/** How Node words a TLS peer whose certificate chain it cannot verify. */
const UNTRUSTED_CERTIFICATE = /self[- ]signed certificate( in certificate chain)?|unable to verify the first certificate|unable to get local issuer certificate/;

/** Turns any error into the sentence to print and the exit code. */
export function explain(err: unknown, context: ErrorContext = {}): { message: string; exitCode: number } {
  if (err instanceof CliError) return { message: sentence(err.message), exitCode: err.exitCode };
  if (!(err instanceof ConnectError)) {
    const e = err as NodeJS.ErrnoException;
    if (e && typeof e === "object" && typeof e.code === "string" && e.code.startsWith("E") && e.message) {
      // A local file problem (ENOENT, EACCES...): its message names the path.
      return { message: sentence(e.message), exitCode: ExitCode.ERROR };
    }
    return { message: sentence(`unexpected error: ${String((err as Error)?.message ?? err)}`), exitCode: ExitCode.ERROR };
  }
  const server = context.server ? ` at ${context.server}` : "";
  const raw = err.rawMessage;
  const untrusted = UNTRUSTED_CERTIFICATE.exec(`${raw} ${String(err.cause ?? "")}`);
  if (untrusted) {
    return {
      message: `The server${server} presented a certificate this machine does not trust (${untrusted[0]}): give the CA that signed it with \`tml login SERVER --ca-file FILE\` (or TML_CA_FILE with TML_SERVER).`,
      exitCode: ExitCode.ERROR,
    };
  }
  switch (err.code) {
    case Code.Unavailable:
    case Code.Unknown:
      if (isNetworkError(err) || HTTP_CONNECTION_LOST.test(raw) || HTTP_CONNECTION_LOST.test(String(err.cause ?? ""))) {
        const what = /ECONNREFUSED/.test(raw) ? "connection refused" : /ENOTFOUND|EAI_AGAIN/.test(raw) ? "unknown host" : "network error";
        return {
          message: `Cannot reach the server${server} (${what}): is it running, and is the address right? (see \`tml context list\`)`,
          exitCode: ExitCode.ERROR,
        };
      }
      return { message: sentence(`the server${server} is unavailable (${raw}); try again in a moment`), exitCode: ExitCode.ERROR };
    case Code.Unauthenticated:
      if (context.hadToken) {
        return {
          message: `The server${server} refused your credentials: your token has expired or was revoked. Run \`tml login\` again.`,
          exitCode: ExitCode.AUTH,
        };
      }
      return { message: sentence(`not authenticated: ${raw}`), exitCode: ExitCode.AUTH };
    case Code.PermissionDenied:
      return { message: sentence(`permission denied: ${raw}`), exitCode: ExitCode.AUTH };
    case Code.NotFound:
      return { message: sentence(`not found: ${raw}`), exitCode: ExitCode.NOT_FOUND };
    case Code.AlreadyExists:
      return { message: sentence(`already exists: ${raw}`), exitCode: ExitCode.CONFLICT };
    case Code.FailedPrecondition:
      return { message: sentence(`not possible now: ${raw}`), exitCode: ExitCode.CONFLICT };
    case Code.Aborted:
      return { message: sentence(`${raw}; try again`), exitCode: ExitCode.CONFLICT };
    case Code.InvalidArgument:
    case Code.OutOfRange:
      return { message: sentence(`the server rejected the request: ${raw}`), exitCode: ExitCode.USAGE };
    case Code.ResourceExhausted:
      return { message: sentence(`limit reached: ${raw}`), exitCode: ExitCode.ERROR };
    case Code.DeadlineExceeded:
      return { message: `The server${server} did not answer in time; try again.`, exitCode: ExitCode.ERROR };
    case Code.Unimplemented:
      return { message: `The server${server} does not support this yet (${raw}).`, exitCode: ExitCode.ERROR };
    case Code.Canceled:
      return { message: "Interrupted.", exitCode: ExitCode.INTERRUPTED };
    case Code.DataLoss:
      return { message: sentence(`data corrupted in transit or at rest: ${raw}`), exitCode: ExitCode.ERROR };
    default:
      return {
        message: `The server${server} failed with an internal error; try again, and tell its admin if it persists.`,
        exitCode: ExitCode.ERROR,
      };
  }
}
