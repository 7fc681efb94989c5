import { Code, ConnectError, type ContextValues, type Interceptor } from "@connectrpc/connect";
import type { Logger } from "../logger.js";
import type { RpcMetrics } from "./metrics.js";

/** Codes that mean a bug or an unknown failure on our side: logged as errors. */
const SERVER_FAULTS = new Set([Code.Internal, Code.Unknown, Code.DataLoss]);

/** "OK" or the code's name as in DESIGN.md ("NotFound"), for logs and metrics. */
export function codeName(code: Code | undefined): string {
  return code === undefined ? "OK" : Code[code];
}

/**
 * Records the end of one RPC and decides what its client gets, for both
 * transports of a procedure: the Connect adapter (createRpcInterceptor) and
 * the hand-framed gRPC path (lib/grpc/server.ts). It logs the RPC with
 * `procedure`, `code` and `durationMs`, records it in the metrics, and
 * replaces errors that are not ConnectError (bugs, driver errors, anything
 * that may carry internal detail) with a generic Internal error. The real
 * cause goes to the log under `err`, never to the client.
 *
 * Called exactly once per RPC, with the error it ended with (undefined for
 * success) and the call's signal; returns the error to send.
 */
export type RpcFinisher = (procedure: string, startedMs: number, error: unknown, signal: AbortSignal) => ConnectError | undefined;

/** The RpcFinisher of a server (one per server, shared by its transports). */
export function createRpcFinisher(logger: Logger, metrics: RpcMetrics): RpcFinisher {
  return (procedure, startedMs, error, signal) => {
    const durationMs = Math.round((performance.now() - startedMs) * 1000) / 1000;
    const { sent, cause } = toClientError(error, signal);
    const code = sent?.code;
    metrics.observe(procedure, codeName(code), durationMs / 1000);
    const fields = { procedure, code: codeName(code), durationMs };
    if (code === undefined) {
      logger.info(fields, "rpc finished");
    } else if (SERVER_FAULTS.has(code)) {
      logger.error({ ...fields, err: cause }, "rpc failed");
    } else {
      // The caller's problem (bad input, no permission, not built yet): worth
      // a line, not an alarm.
      logger.info({ ...fields, reason: sent?.rawMessage }, "rpc failed");
    }
    return sent;
  };
}

/**
 * The one interceptor every server runs: every Connect-served RPC ends
 * through the server's RpcFinisher (logged, counted, its error made safe to
 * send).
 *
 * Streaming RPCs are measured until their response stream ends, not until the
 * handler returns its iterator.
 */
export function createRpcInterceptor(finishRpc: RpcFinisher): Interceptor {
  return (next) => async (request) => {
    const started = performance.now();
    const procedure = `/${request.service.typeName}/${request.method.name}`;
    const finish = (error: unknown) => finishRpc(procedure, started, error, request.signal);

    let response;
    try {
      response = await next(request);
    } catch (error) {
      throw finish(error);
    }
    if (!response.stream) {
      finish(undefined);
      return response;
    }
    return { ...response, message: observeStream(response.message, finish) };
  };
}

/**
 * A server's authorization hook (ServerOptions.authorize): decides from the
 * procedure ("/pkg.Service/Method") and the request headers alone whether a
 * call may reach its handler, before the handler looks at the request.
 * Refuses by throwing a ConnectError: Unauthenticated (no credential, or one
 * that is not authentic), PermissionDenied (an authentic credential of a kind
 * the procedure does not take), Unavailable (it cannot tell now). It may put
 * what it established (the caller) in `values`, which the handler reads from
 * its context (`ctx.values`, on either transport).
 */
export type Authorize = (procedure: string, headers: Headers, values: ContextValues) => Promise<void>;

/**
 * Runs `authorize` before the handler of every call to the services
 * `guarded()` names (the component's own: health and reflection stay open).
 * It runs inside the RPC interceptor, so a refusal is logged and counted like
 * any other outcome. The hand-framed gRPC path calls the same hook
 * (lib/grpc/server.ts).
 */
export function createAuthorizeInterceptor(authorize: Authorize, guarded: () => ReadonlySet<string>): Interceptor {
  return (next) => async (request) => {
    if (guarded().has(request.service.typeName)) {
      await authorize(`/${request.service.typeName}/${request.method.name}`, request.header, request.contextValues);
    }
    return next(request);
  };
}

/**
 * Passes a response stream through and calls `finish` once when it ends: with
 * undefined when it completed, the error when it failed, or a Canceled error
 * when the server stopped reading it early (the client went away).
 */
async function* observeStream<T>(
  messages: AsyncIterable<T>,
  finish: (error: unknown) => ConnectError | undefined,
): AsyncGenerator<T> {
  let outcome: { error: unknown } | undefined;
  try {
    yield* messages;
    outcome = { error: undefined };
  } catch (error) {
    outcome = { error };
    throw finish(error);
  } finally {
    if (outcome === undefined) finish(new ConnectError("stream abandoned", Code.Canceled));
    else if (outcome.error === undefined) finish(undefined);
  }
}

/**
 * Decides what the client sees for an error. ConnectErrors are deliberate and
 * pass unchanged. Anything else is a bug, unless the call was already
 * cancelled or timed out (a library then often throws its own AbortError): the
 * client gets the cancellation, not a misleading Internal.
 *
 * A call that succeeded after its signal aborted (the client went away, the
 * deadline passed, the server forced its stop) never reached the client; it
 * is reported with the abort's code rather than as OK.
 */
function toClientError(error: unknown, signal: AbortSignal): { sent?: ConnectError; cause?: unknown } {
  if (error === undefined) return signal.aborted ? { sent: ConnectError.from(signal.reason) } : {};
  if (error instanceof ConnectError) return { sent: error, cause: error };
  if (signal.aborted) return { sent: ConnectError.from(signal.reason), cause: error };
  return { sent: new ConnectError("internal error", Code.Internal), cause: error };
}
