/**
 * Who may use what, as SQL the scheduler and the services share (the rules
 * live in SQL functions created by migration 0003, so every query applies the
 * same ones):
 *
 * - Hosts (user.proto, Group): a host that no grant of any group matches is
 *   usable by every user; a host some grant matches only by the members of the
 *   groups whose grants match it, and by admins. A grant matches a host by id,
 *   or when the host's tags plus `site=<site>` include the grant's tags.
 *   `treadmill_user_may_use_host(user uuid, host uuid) returns boolean`.
 * - Images: admins, the owner, everyone for a public image, the members of the
 *   image's groups for a group image.
 *   `treadmill_user_may_use_image(user uuid, name text, tag text) returns boolean`.
 */
import type { Fragment, Sql, TransactionSql } from "postgres";

/**
 * `treadmill_user_may_use_host(<userId>, <hostIdColumn>)`: true when the user
 * may run jobs on the host. Use in a WHERE clause, e.g.
 * sql`select h.id from hosts h where ${hostAccessCondition(sql, userId)}`.
 */
export function hostAccessCondition(sql: Sql | TransactionSql, userId: string, hostIdColumn = "h.id"): Fragment {
  return sql`treadmill_user_may_use_host(${userId}::uuid, ${sql.unsafe(column(hostIdColumn))})`;
}

/** `treadmill_user_may_use_image(<userId>, i.name, i.tag)` over an `images` row alias. */
export function imageAccessCondition(sql: Sql | TransactionSql, userId: string, imageAlias = "i"): Fragment {
  const a = column(imageAlias);
  return sql`treadmill_user_may_use_image(${userId}::uuid, ${sql.unsafe(`${a}.name`)}, ${sql.unsafe(`${a}.tag`)})`;
}

/** Guards the identifiers spliced into SQL (they come from code, never from users). */
function column(name: string): string {
  if (!/^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$/.test(name)) throw new Error(`bad column reference ${name}`);
  return name;
}
