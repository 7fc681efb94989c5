import { randomBytes } from "node:crypto";
import { audit } from "./db/queries/audit.js";
import type { CoordinatorContext } from "./context.js";
import { USER_NAME, uuidv7 } from "./shared/common.js";
import { hashPassword } from "./services/passwords.js";

/** Advisory lock key so that two replicas starting together create one admin. */
const BOOTSTRAP_LOCK = 7_351_003;

export interface BootstrapResult {
  /** The admin created now, if any. */
  created?: { id: string; name: string };
  /** The generated password (only when none was configured and it was created now). */
  generatedPassword?: string;
}

/**
 * Makes sure the coordinator can be administered (DESIGN.md §3):
 * - with `adminPassword` configured: creates the admin `adminName` with it
 *   when no user of that name exists (an existing user is left unchanged);
 * - without: when there is no user at all, creates the admin `adminName` with
 *   a random password and announces it ONCE through `announce` (main.ts:
 *   standard error; never the log). Later starts find a user and do nothing.
 * Runs under an advisory lock, so replicas starting together create one admin.
 */
export async function bootstrapAdmin(
  ctx: CoordinatorContext,
  options: { announce?: (text: string) => void } = {},
): Promise<BootstrapResult> {
  const name = ctx.config.adminName;
  const configured = ctx.config.adminPassword;
  if (!USER_NAME.test(name)) throw new Error("admin-name must match [a-z][a-z0-9._-]{0,63}");
  if (configured !== "" && (configured.length < 12 || Buffer.byteLength(configured) > 1024)) {
    throw new Error("admin-password must be 12 to 1024 bytes");
  }
  // Cheap check first: most starts find the admin (or some user) there already.
  const [present] =
    configured !== ""
      ? await ctx.sql`select id from users where name = ${name}`
      : await ctx.sql`select id from users limit 1`;
  if (present) return {};
  const password = configured !== "" ? configured : randomBytes(18).toString("base64url");
  // Hashed outside the transaction: scrypt takes a while and the lock is shared.
  const hash = await hashPassword(password);
  const result = await ctx.sql.begin(async (tx): Promise<BootstrapResult> => {
    await tx`select pg_advisory_xact_lock(${BOOTSTRAP_LOCK})`;
    if (configured !== "") {
      const [existing] = await tx`select id from users where name = ${name}`;
      if (existing) return {};
    } else {
      const [any] = await tx`select id from users limit 1`;
      if (any) return {};
    }
    const id = uuidv7(ctx.clock());
    await tx`
      insert into users (id, name, password_hash, role, display_name, created_at)
      values (${id}, ${name}, ${hash}, 'admin', 'Administrator', ${new Date(ctx.clock())})`;
    await audit(tx, {
      kind: "user.bootstrap",
      actor: "system",
      userId: id,
      message: `first admin ${name} created`,
      details: { name, passwordSource: configured !== "" ? "config" : "generated" },
    });
    return { created: { id, name }, generatedPassword: configured === "" ? password : undefined };
  });
  if (result.created) {
    ctx.logger.warn(
      { user: name, passwordSource: result.generatedPassword === undefined ? "config" : "generated, printed to stderr" },
      "first admin created",
    );
  }
  if (result.generatedPassword !== undefined) {
    // Not through the logger: logs are kept and shipped; this is shown once.
    if (options.announce === undefined) {
      ctx.logger.warn({ user: name }, "generated admin password not shown (no console); start with --admin-password");
    } else {
      options.announce(
        [
          "",
          "=================================================================",
          ` treadmill-coordinator created the first admin user "${name}".`,
          ` Its password, shown only this once:  ${result.generatedPassword}`,
          " Log in and change it (UserService.UpdateUser), or start with",
          " --admin-name/--admin-password to create another admin.",
          "=================================================================",
          "",
        ].join("\n"),
      );
    }
  }
  return result;
}
