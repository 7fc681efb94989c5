/**
 * DATABASE_URL as the `postgres` driver reads it, checked at start-up. Beside
 * one host it may name several, `postgres://user:pass@h1:5432,h2:5432/db`,
 * which a WHATWG URL refuses: the driver tries them in order at every
 * (re)connection and, with `target_session_attrs=read-write`, keeps the first
 * that accepts writes, which is how the coordinators find a promoted standby
 * (docs/ha.md). The URL holds a password: no message here quotes it.
 */

/** The `target_session_attrs` values the driver supports (it throws on others). */
const SESSION_ATTRS = ["read-write", "read-only", "primary", "standby", "prefer-standby"];

/** What is wrong with `url` as a PostgreSQL URL, or undefined when nothing is. */
export function databaseUrlProblem(url: string): string | undefined {
  const scheme = /^(postgres|postgresql):\/\//.exec(url);
  if (scheme === null) return "is not a postgres:// or postgresql:// url";
  const rest = url.slice(scheme[0].length);
  const authority = rest.split(/[/?#]/, 1)[0];
  const at = authority.lastIndexOf("@") + 1;
  const hosts = authority.slice(at);
  const list = hosts.split(",");
  for (const host of list) {
    // host, host:port, [v6]:port; an empty host list is a Unix socket or PGHOST.
    const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]*)(?::(\d*))?$/.exec(decodeURIComponent(host));
    if (m === null || (list.length > 1 && m[1] === "")) return "names a host that is not host or host:port";
    if (m[2] !== undefined && m[2] !== "" && !(Number(m[2]) >= 1 && Number(m[2]) <= 65535)) return "names a port outside 1-65535";
  }
  let parsed: URL;
  try {
    // The rest is checked as the driver reads it: with the first host only.
    parsed = new URL(`${scheme[0]}${rest.slice(0, at)}${list[0]}${rest.slice(at + hosts.length)}`);
  } catch {
    return "is not a valid url";
  }
  const attrs = parsed.searchParams.get("target_session_attrs");
  if (attrs !== null && !SESSION_ATTRS.includes(attrs)) return `has target_session_attrs ${JSON.stringify(attrs)}, not one of ${SESSION_ATTRS.join(", ")}`;
  return undefined;
}
