/**
 * Per-procedure authorization tables, and the hook (ServerOptions.authorize)
 * of the servers that take capability tokens: image stores and caches, log
 * servers, proxies. Each such server states, in one table, the token scopes
 * each of its procedures accepts; the hook lets a call through only with an
 * authentic token (signature, key, expiry, issuer, audience) of one of them,
 * before its handler looks at the request. The handler then checks what is
 * specific to the request: the digest, the job, the exposure the token names.
 */
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { bearerToken, type Scope, type TokenVerifier } from "../tokens.js";
import type { Authorize } from "./interceptors.js";

function procedureOf(service: DescService, method: string): string {
  return `/${service.typeName}/${method}`;
}

/** A value for every method of `S`, by the method's local name (`putBlob`): the compiler checks that none is left out. */
export type MethodTable<S extends DescService, V> = { readonly [M in keyof S["method"]]: V };

/** A service's table as entries keyed by procedure ("/pkg.Service/Method"). */
export function procedureEntries<S extends DescService, V>(service: S, table: MethodTable<S, V>): [string, V][] {
  // MethodTable is keyed by the literal method names of S, which a loop over
  // service.methods cannot name; each method has its entry by construction.
  const byName = table as Readonly<Record<string, V>>;
  return service.methods.map((method) => [procedureOf(service, method.name), byName[method.localName]]);
}

/** The same value for every method of a service, as procedure entries (new methods get it too). */
export function serviceEntries<V>(service: DescService, value: V): [string, V][] {
  return service.methods.map((method) => [procedureOf(service, method.name), value]);
}

/** A service's table of the capability scopes each method takes. */
export function scopeEntries<S extends DescService>(service: S, table: MethodTable<S, readonly Scope[]>): [string, readonly Scope[]][] {
  return procedureEntries(service, table);
}

/**
 * The hook of a server whose procedures take the capability scopes `table`
 * gives (scopeEntries of each of its services). A procedure missing from
 * the table takes nothing: fail closed.
 */
export function capabilityAuthorizer(verifier: TokenVerifier, table: Iterable<[string, readonly Scope[]]>): Authorize {
  const accepted = new Map(table);
  return async (procedure, headers) => {
    const scopes = accepted.get(procedure);
    if (scopes === undefined || scopes.length === 0) throw new ConnectError(`${procedure} takes no capability token`, Code.PermissionDenied);
    await verifier.verifyScope(bearerToken(headers), scopes);
  };
}
