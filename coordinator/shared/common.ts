/**
 * Helpers shared by the catalog services (services/) and the job system
 * (jobs/), which import neither each other's folders nor this one's
 * callers: ids, validation (every message names the field), timestamps,
 * keyset page tokens and database error mapping.
 */
import { createHash, randomBytes } from "node:crypto";
import { type Timestamp, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

/** A new UUIDv7 (RFC 9562): 48-bit unix milliseconds, then random bits (or the first 16 bytes of `bits`, such as a hash). */
export function uuidv7(nowMs: number = Date.now(), bits: Uint8Array = randomBytes(16)): string {
  const bytes = Buffer.from(bits.subarray(0, 16));
  const ms = BigInt(Math.max(0, Math.floor(nowMs)));
  for (let i = 0; i < 6; i++) bytes[i] = Number((ms >> BigInt(8 * (5 - i))) & 0xffn);
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export const invalid = (message: string) => new ConnectError(message, Code.InvalidArgument);
export const notFound = (message: string) => new ConnectError(message, Code.NotFound);
export const denied = (message: string) => new ConnectError(message, Code.PermissionDenied);
export const exists = (message: string) => new ConnectError(message, Code.AlreadyExists);
export const precondition = (message: string) => new ConnectError(message, Code.FailedPrecondition);

/** Login names of users and names of groups (user.proto). */
export const USER_NAME = /^[a-z][a-z0-9._-]{0,63}$/;
/** Host names and sites (host.proto). */
export const HOST_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const TAG_KEY = /^[a-z0-9][a-z0-9._/-]{0,62}$/;
export const TAG_VALUE = /^[A-Za-z0-9._:/+-]{0,128}$/;
export const MAX_TAGS = 64;
/** An RFC 6838 media type, lower-case, without parameters. */
export const MEDIA_TYPE = /^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$/;
export const MAX_MEDIA_TYPES = 32;
/** Image names and tags of the catalog (image.proto). */
const IMAGE_NAME = /^[a-z0-9]+([._-][a-z0-9]+)*(\/[a-z0-9]+([._-][a-z0-9]+)*)*$/;
const IMAGE_TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** A required canonical (lower-case) UUID. */
export function checkId(field: string, value: string): string {
  if (value === "") throw invalid(`${field} is required`);
  if (!UUID.test(value)) throw invalid(`${field} must be a lower-case uuid`);
  return value;
}

/** `value` matches `pattern` (described as `shape` in the message). */
export function checkPattern(field: string, value: string, pattern: RegExp, shape: string): string {
  if (value === "") throw invalid(`${field} is required`);
  if (!pattern.test(value)) throw invalid(`${field} must match ${shape}`);
  return value;
}

/** An image name of the catalog. */
export function checkName(field: string, name: string): string {
  if (name.length > 128) throw invalid(`${field} must be at most 128 characters`);
  return checkPattern(field, name, IMAGE_NAME, "lower-case components [a-z0-9]+([._-][a-z0-9]+)* joined by /");
}

/** An image tag of the catalog. */
export function checkTag(field: string, tag: string): string {
  return checkPattern(field, tag, IMAGE_TAG, "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}");
}

/** Free text of at most `max` characters, without control characters. */
export function checkText(field: string, value: string, max: number): string {
  if (value.length > max) throw invalid(`${field} must be at most ${max} characters`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0008\u000b-\u001f\u007f]/.test(value)) throw invalid(`${field} must not contain control characters`);
  return value;
}

/** Tags: at most 64, keys and values well-formed; `site` reserved unless allowed. */
export function checkTags(field: string, tags: Record<string, string>, options: { allowSite?: boolean } = {}) {
  const entries = Object.entries(tags);
  if (entries.length > MAX_TAGS) throw invalid(`${field} must have at most ${MAX_TAGS} entries`);
  for (const [key, value] of entries) {
    if (!TAG_KEY.test(key)) throw invalid(`${field} key "${clip(key)}" must match [a-z0-9][a-z0-9._/-]{0,62}`);
    if (!TAG_VALUE.test(value)) throw invalid(`${field}["${key}"] must match [A-Za-z0-9._:/+-]{0,128}`);
    if (key === "site" && !options.allowSite) throw invalid(`${field} must not use the reserved key "site" (set site instead)`);
  }
  return Object.fromEntries(entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

export function checkMediaTypes(field: string, types: readonly string[], options: { required: boolean }): string[] {
  if (options.required && types.length === 0) throw invalid(`${field} must name at least one media type`);
  if (types.length > MAX_MEDIA_TYPES) throw invalid(`${field} must have at most ${MAX_MEDIA_TYPES} entries`);
  for (const t of types) if (!MEDIA_TYPE.test(t)) throw invalid(`${field} entry "${clip(t)}" is not a media type`);
  return [...new Set(types)].sort();
}

/** `value` cut to at most `max` characters (stored text). */
export function clipText(value: string, max: number): string {
  return value.length <= max ? value : value.slice(0, max);
}

/** A value for a message, clipped so that a huge bad input does not make a huge error. */
export function clip(value: string, max = 64): string {
  return value.length <= max ? value : `${value.slice(0, max)}...`;
}

export function ts(date: Date | null | undefined): Timestamp | undefined {
  return date ? timestampFromDate(date) : undefined;
}

/** A Duration in milliseconds; undefined when unset. Negative or zero: InvalidArgument. */
export function durationMs(field: string, d: Duration | undefined): number | undefined {
  if (d === undefined) return undefined;
  const ms = Number(d.seconds) * 1000 + Math.trunc(d.nanos / 1e6);
  if (!Number.isFinite(ms) || ms <= 0 || d.nanos < 0 || d.nanos > 999_999_999) throw invalid(`${field} must be positive`);
  return ms;
}

export function durationOf(ms: number): { seconds: bigint; nanos: number } {
  return { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

/** Page size per the convention of treadmill.common.v1: 0 -> 100, at most 1000. */
export function pageSize(value: number): number {
  if (value < 0) throw invalid("page_size must not be negative");
  return value === 0 ? 100 : Math.min(value, 1000);
}

/**
 * Opaque keyset page tokens: the last key of a page and a fingerprint of the
 * call's filters, so a token used with other filters is refused.
 */
export function encodePageToken(filters: unknown, key: unknown[]): string {
  return Buffer.from(JSON.stringify({ f: fingerprint(filters), k: key })).toString("base64url");
}

export function decodePageToken(token: string, filters: unknown, arity: number): string[] | undefined {
  if (token === "") return undefined;
  let parsed: unknown;
  try {
    if (token.length > 4096) throw new Error("long");
    parsed = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
  } catch {
    throw invalid("page_token is malformed");
  }
  const p = parsed as { f?: unknown; k?: unknown };
  if (typeof p !== "object" || p === null || !Array.isArray(p.k) || p.k.length !== arity) {
    throw invalid("page_token is malformed");
  }
  if (p.f !== fingerprint(filters)) throw invalid("page_token does not belong to this call's filters");
  const key = p.k as unknown[];
  if (!key.every((v): v is string => typeof v === "string" && v.length <= 512)) throw invalid("page_token is malformed");
  return key;
}

function fingerprint(filters: unknown): string {
  return createHash("sha256").update(JSON.stringify(filters)).digest("base64url").slice(0, 16);
}

/** PostgreSQL unique violation (23505), optionally on a given constraint. */
export function isUniqueViolation(err: unknown, constraint?: string): boolean {
  const e = err as { code?: string; constraint_name?: string };
  return e?.code === "23505" && (constraint === undefined || e.constraint_name === constraint);
}
