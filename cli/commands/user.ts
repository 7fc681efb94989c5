/** `tml user list|get|create|update|passwd|rm` (admins; a user may see itself and change its password). */
import { allPages } from "../pages.js";
import type { Client } from "@connectrpc/connect";
import { Role, RoleSchema, UserSchema, type User } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { ago, iso, jsonOf, word } from "../format.js";
import { askSecret, readStdinLine } from "../prompt.js";

type Users = Client<typeof UserService>;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

async function findUser(users: Users, ref: string): Promise<User> {
  const { user } = await users.getUser({ user: UUID.test(ref) ? { case: "userId", value: ref } : { case: "name", value: ref } }, { timeoutMs: 15_000 });
  if (!user) throw new CliError(`user ${ref} not found`, ExitCode.NOT_FOUND);
  return user;
}

function roleOf(text: string): Role {
  if (text === "admin") return Role.ADMIN;
  if (text === "user") return Role.USER;
  throw new UsageError(`flag --role must be user or admin, got "${text}"`);
}

/** A new password: from stdin with --password-stdin, else asked twice on the terminal. */
async function newPassword(ctx: CliContext, fromStdin: boolean, who: string): Promise<string> {
  if (fromStdin || !ctx.io.stdin.isTTY) return readStdinLine(ctx.io);
  const first = await askSecret(ctx.io, `New password for ${who} (12 characters or more): `);
  const again = await askSecret(ctx.io, "Again: ");
  if (first !== again) throw new UsageError("the two passwords differ");
  return first;
}

export const userCommands: Command[] = [
  defineCommand({
    path: ["user", "list"],
    summary: "List users (admins)",
    flags: { prefix: { type: "string", placeholder: "TEXT", description: "only names starting with TEXT" } },
    examples: ["tml user list", "tml user list -o yaml"],
    async run(ctx, { flags }) {
      const users = await ctx.client(UserService);
      const found: User[] = await allPages(async (pageToken) => {
        const page = await users.listUsers({ namePrefix: flags.prefix ?? "", pageSize: 1000, pageToken }, { timeoutMs: 30_000 });
        return { items: page.users, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((u) => jsonOf(UserSchema, u)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "NAME", value: (u) => u.name },
              { header: "ROLE", value: (u) => word(RoleSchema, u.role) },
              { header: "STATUS", value: (u) => (u.disabled ? "disabled" : "active") },
              { header: "DISPLAY NAME", value: (u) => u.displayName || "-" },
              { header: "LAST LOGIN", value: (u) => ago(u.lastLoginTime) },
              { header: "ID", value: (u) => u.id },
            ],
            "No users.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["user", "get"],
    summary: "Show a user (admins, or yourself)",
    args: [{ name: "USER", required: true, description: "name or id" }],
    examples: ["tml user get alice"],
    async run(ctx, { args }) {
      const user = await findUser(await ctx.client(UserService), args.USER);
      ctx.out.data(jsonOf(UserSchema, user), () =>
        ctx.out.fields([
          ["Name", user.name],
          ["ID", user.id],
          ["Display name", user.displayName],
          ["Role", word(RoleSchema, user.role)],
          ["Status", user.disabled ? "disabled" : "active"],
          ["Groups", user.groupIds.join(", ") || "-"],
          ["Created", iso(user.createTime)],
          ["Last login", iso(user.lastLoginTime) ?? "never"],
        ]),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["user", "create"],
    summary: "Create a user (admins); asks for the initial password",
    args: [{ name: "NAME", required: true, description: "login name" }],
    flags: {
      role: { type: "string", placeholder: "ROLE", choices: ["user", "admin"], description: "user (default) or admin" },
      "display-name": { type: "string", placeholder: "TEXT", description: "name shown in listings" },
      "password-stdin": { type: "bool", description: "read the password from standard input" },
    },
    examples: ['tml user create alice --display-name "Alice Martin"', "echo \"$PW\" | tml user create ci-bot --password-stdin"],
    async run(ctx, { args, flags }) {
      const users = await ctx.client(UserService);
      const password = await newPassword(ctx, flags["password-stdin"] === true, args.NAME);
      const { user } = await users.createUser(
        {
          name: args.NAME,
          password,
          role: roleOf(flags.role ?? "user"),
          displayName: flags["display-name"] ?? "",
        },
        { timeoutMs: 15_000 },
      );
      ctx.out.data(user ? jsonOf(UserSchema, user) : {}, () => ctx.out.line(`User ${args.NAME} created (${user?.id}).`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["user", "update"],
    summary: "Change a user's role, display name, or enable/disable it (admins)",
    args: [{ name: "USER", required: true, description: "name or id" }],
    flags: {
      role: { type: "string", placeholder: "ROLE", choices: ["user", "admin"], description: "the new role" },
      "display-name": { type: "string", placeholder: "TEXT", description: "the new display name" },
      disable: { type: "bool", description: "refuse its logins and tokens" },
      enable: { type: "bool", description: "accept them again" },
    },
    examples: ["tml user update alice --role admin", "tml user update bob --disable"],
    async run(ctx, { args, flags }) {
      if (flags.disable === true && flags.enable === true) throw new UsageError("give --disable or --enable, not both");
      const users = await ctx.client(UserService);
      const current = await findUser(users, args.USER);
      const { user } = await users.updateUser(
        {
          userId: current.id,
          role: flags.role === undefined ? undefined : roleOf(flags.role),
          displayName: flags["display-name"],
          disabled: flags.disable === true ? true : flags.enable === true ? false : undefined,
        },
        { timeoutMs: 15_000 },
      );
      ctx.out.data(user ? jsonOf(UserSchema, user) : {}, () => ctx.out.line(`User ${current.name} updated.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["user", "passwd"],
    summary: "Change your password, or reset another user's (admins)",
    args: [{ name: "USER", description: "name or id (default: yourself)" }],
    flags: { "password-stdin": { type: "bool", description: "read the current, then the new password from standard input (two lines)" } },
    examples: ["tml user passwd", "tml user passwd alice"],
    async run(ctx, { args, flags }) {
      const users = await ctx.client(UserService);
      const me = (await (await ctx.client(AuthService)).whoAmI({}, { timeoutMs: 15_000 })).user;
      const target = args.USER === undefined ? me : await findUser(users, args.USER);
      if (!target) throw new CliError("cannot tell who you are", ExitCode.AUTH);
      const self = target.id === me?.id;
      let current = "";
      const stdin = flags["password-stdin"] === true || !ctx.io.stdin.isTTY;
      if (self && me?.role !== Role.ADMIN) current = stdin ? await readStdinLine(ctx.io) : await askSecret(ctx.io, "Current password: ");
      const password = await newPassword(ctx, stdin, target.name);
      await users.updateUser({ userId: target.id, password, currentPassword: current }, { timeoutMs: 15_000 });
      ctx.out.note(`Password of ${target.name} changed.`);
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["user", "rm"],
    summary: "Delete a user and revoke its tokens (admins)",
    args: [{ name: "USER", required: true, description: "name or id" }],
    examples: ["tml user rm bob"],
    async run(ctx, { args }) {
      const users = await ctx.client(UserService);
      const current = await findUser(users, args.USER);
      await users.deleteUser({ userId: current.id }, { timeoutMs: 15_000 });
      ctx.out.data({ deleted: current.id }, () => ctx.out.line(`User ${current.name} deleted.`));
      return ExitCode.OK;
    },
  }),
];
