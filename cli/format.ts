/** Turning protobuf messages into what people and scripts read. */
import { toJson, type DescEnum, type DescMessage, type JsonValue, type MessageShape } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

/**
 * A message as stable JSON for scripts: the canonical proto3 JSON form
 * (lowerCamelCase fields, enum names, RFC 3339 times, 64-bit integers as
 * strings) with every field present, so keys never come and go.
 */
export function jsonOf<D extends DescMessage>(schema: D, message: MessageShape<D>): JsonValue {
  return toJson(schema, message, { alwaysEmitImplicit: true });
}

/** An enum value as a short lower-case word: JOB_STATE_RUNNING -> "running". */
export function word(schema: DescEnum, value: number): string {
  const v = schema.values.find((x) => x.number === value);
  if (v === undefined) return String(value);
  if (value === 0) return "-";
  return v.localName.toLowerCase().replace(/_/g, "-");
}

/** The enum value named by `text` (short word or full name), or undefined. */
export function enumValue(schema: DescEnum, text: string): number | undefined {
  const wanted = text.toLowerCase().replace(/-/g, "_");
  const v = schema.values.find((x) => x.number !== 0 && (x.localName.toLowerCase() === wanted || x.name.toLowerCase() === wanted));
  return v?.number;
}

/** Every short word of an enum (UNSPECIFIED left out). */
export function enumWords(schema: DescEnum): string[] {
  return schema.values.filter((x) => x.number !== 0).map((x) => x.localName.toLowerCase().replace(/_/g, "-"));
}

export function msOf(ts: Timestamp | undefined): number | undefined {
  return ts === undefined ? undefined : timestampDate(ts).getTime();
}

/** A time as "3m ago" (or "in 5d" for the future); "-" when unset. */
export function ago(ts: Timestamp | undefined, now = Date.now()): string {
  const ms = msOf(ts);
  if (ms === undefined) return "-";
  const d = now - ms;
  const abs = Math.abs(d);
  const text =
    abs < 60_000
      ? `${Math.round(abs / 1000)}s`
      : abs < 3_600_000
        ? `${Math.round(abs / 60_000)}m`
        : abs < 86_400_000
          ? `${Math.round(abs / 3_600_000)}h`
          : `${Math.round(abs / 86_400_000)}d`;
  return d >= 0 ? `${text} ago` : `in ${text}`;
}

/** A time as an RFC 3339 string; undefined when unset. */
export function iso(ts: Timestamp | undefined): string | undefined {
  const ms = msOf(ts);
  return ms === undefined ? undefined : new Date(ms).toISOString();
}

/** `k=v,k=v` of a string map, sorted; "-" when empty. */
export function tagsText(tags: Record<string, string>): string {
  const entries = Object.entries(tags).sort(([a], [b]) => a.localeCompare(b));
  return entries.length === 0 ? "-" : entries.map(([k, v]) => `${k}=${v}`).join(",");
}

/** The first 8 characters of an id, as shown in tables (ids are UUIDv7: use the full id in commands). */
export function shortId(id: string): string {
  return id;
}
