/** `tml login`, `logout`, `whoami`, `token ...` and `context ...`. */
import { allPages } from "../pages.js";
import { resolve } from "node:path";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { AuthService, type ApiToken, ApiTokenSchema, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { RoleSchema, UserSchema } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { parseDuration } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import { splitList } from "../../lib/config.js";
import { contextNameFor, contextServers } from "../config.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { ago, iso, jsonOf, word } from "../format.js";
import { askLine, askSecret, readStdinLine } from "../prompt.js";

const DEFAULT_SERVER = "http://127.0.0.1:7700";

function normaliseServer(text: string): string {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new UsageError(`"${text}" is not a server address (like http://127.0.0.1:7700)`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw new UsageError(`server address must be http:// or https://, got "${text}"`);
  return url.origin;
}

/** `A[,B...]`: the coordinator's replicas, each normalised. */
function normaliseServers(text: string): string[] {
  const servers = splitList(text).map(normaliseServer);
  if (servers.length === 0) throw new UsageError(`"${text}" names no server (like http://127.0.0.1:7700)`);
  return servers;
}

export const authCommands: Command[] = [
  defineCommand({
    path: ["login"],
    summary: "Log in to a Treadmill server and save the token in a context",
    description:
      "Asks for the password without echoing it (or reads it from standard input with --password-stdin),\n" +
      "saves the API token in the contexts file (mode 0600) and makes the context current.",
    args: [
      {
        name: "SERVER",
        description:
          "the coordinator's address, or its replicas' comma-separated (tried in order, the next when one cannot be reached; default: the current context's, else http://127.0.0.1:7700)",
      },
    ],
    flags: {
      user: { type: "string", short: "u", placeholder: "NAME", description: "login name (asked for when omitted on a terminal)" },
      "password-stdin": { type: "bool", description: "read the password from the first line of standard input" },
      name: { type: "string", placeholder: "CONTEXT", description: "name of the context to save (default: host-port of the server)" },
      ttl: { type: "string", placeholder: "DURATION", description: "token lifetime, e.g. 12h or 30d (default: the server's)" },
      "ca-file": { type: "string", placeholder: "FILE", description: "CA certificate (PEM) that signed the servers' certificates, kept in the context" },
    },
    examples: [
      "tml login http://127.0.0.1:7700 --user admin",
      "tml login https://treadmill.lab.example --user alice --ca-file lab-ca.pem",
      "tml login https://coord-1.lab.example,https://coord-2.lab.example --user alice",
      "echo \"$TREADMILL_PASSWORD\" | tml login https://treadmill.lab.example --user ci --password-stdin --name lab",
    ],
    async run(ctx, { args, flags }) {
      const file = await ctx.config.load();
      const current = flags.context === undefined && file.current ? file.contexts[file.current] : undefined;
      const servers = args.SERVER !== undefined ? normaliseServers(args.SERVER) : current ? contextServers(current) : [DEFAULT_SERVER];
      const server = servers.join(",");
      let user = flags.user ?? (args.SERVER === undefined ? current?.user : undefined);
      if (user === undefined) {
        if (!ctx.io.stdin.isTTY) throw new UsageError("`tml login` needs --user NAME when standard input is not a terminal");
        user = (await askLine(ctx.io, "User: ")).trim();
      }
      if (user === "") throw new UsageError("the user name is empty");
      let password: string;
      if (flags["password-stdin"] === true || !ctx.io.stdin.isTTY) {
        password = await readStdinLine(ctx.io);
      } else {
        password = await askSecret(ctx.io, `Password for ${user} at ${server}: `);
      }
      if (password === "") throw new UsageError("the password is empty");
      ctx.errorContext.server = server;
      ctx.errorContext.hadToken = false;
      const caFile = flags["ca-file"] === undefined ? (args.SERVER === undefined ? current?.caFile : undefined) : resolve(flags["ca-file"]);
      const auth = createClient(AuthService, ctx.transport(servers, "", caFile));
      const ttl = flags.ttl === undefined ? undefined : durationFromMs(parseDuration("ttl", flags.ttl));
      let response;
      try {
        response = await auth.login(
          { name: user, password, ttl, description: `tml on ${process.platform}` },
          { timeoutMs: 30_000 },
        );
      } catch (err) {
        const e = ConnectError.from(err);
        if (e.code === Code.Unauthenticated) throw new CliError(`wrong user name or password for ${server}`, ExitCode.AUTH);
        if (e.code === Code.ResourceExhausted) throw new CliError(`too many failed logins for ${user}; wait a while and try again`, ExitCode.AUTH);
        throw err;
      }
      const existing = Object.entries(file.contexts).find(([, c]) => contextServers(c).join(",") === server && c.user === user)?.[0];
      const name = flags.name ?? flags.context ?? existing ?? contextNameFor(servers[0]);
      file.contexts[name] = {
        server: servers[0],
        ...(servers.length > 1 ? { servers } : {}),
        user,
        token: response.token,
        tokenId: response.info?.id,
        expireTime: iso(response.info?.expireTime),
        ...(caFile === undefined ? {} : { caFile }),
      };
      file.current = name;
      await ctx.config.save(file);
      const role = response.user ? word(RoleSchema, response.user.role) : "user";
      ctx.out.data({ context: name, server, servers, user, role, expireTime: iso(response.info?.expireTime) ?? null }, () => {
        ctx.out.line(`Logged in to ${server} as ${user} (${role}); context "${name}" is now current.`);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["logout"],
    summary: "Revoke the current context's token and forget it",
    flags: { all: { type: "bool", description: "log out of every saved context" } },
    examples: ["tml logout", "tml logout --context lab", "tml logout --all"],
    async run(ctx, { flags }) {
      const file = await ctx.config.load();
      const names =
        flags.all === true ? Object.keys(file.contexts) : [((await ctx.selected(file)) ?? { name: undefined }).name].filter((n) => n !== undefined);
      if (names.length === 0) throw new CliError("you are not logged in", ExitCode.AUTH);
      for (const name of names) {
        const saved = file.contexts[name];
        if (saved.token && saved.tokenId) {
          const auth = createClient(AuthService, ctx.transport(contextServers(saved), saved.token, saved.caFile));
          // The token may have expired already: logging out still forgets it.
          await auth.revokeToken({ tokenId: saved.tokenId }, { timeoutMs: 15_000 }).catch((err) => {
            ctx.out.note(`Note: could not revoke the token at ${contextServers(saved).join(",")} (${(err as Error).message}); it is forgotten here.`);
          });
        }
        delete saved.token;
        delete saved.tokenId;
        delete saved.expireTime;
        ctx.out.note(`Logged out of ${contextServers(saved).join(",")} (context "${name}").`);
      }
      await ctx.config.save(file);
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["whoami"],
    summary: "Show who the current token belongs to",
    examples: ["tml whoami", "tml whoami -o json"],
    async run(ctx) {
      const target = await ctx.target();
      const auth = await ctx.client(AuthService);
      const me = await auth.whoAmI({}, { timeoutMs: 15_000 });
      const user = me.user;
      ctx.out.data(
        {
          context: target.name,
          server: target.server,
          servers: target.servers,
          user: user ? jsonOf(UserSchema, user) : null,
          token: me.token ? jsonOf(ApiTokenSchema, me.token) : null,
        },
        () =>
          ctx.out.fields([
            ["User", user?.name],
            ["Role", user ? word(RoleSchema, user.role) : undefined],
            [target.servers.length > 1 ? "Servers" : "Server", target.servers.join(", ")],
            ["Context", target.name || "(from TML_SERVER/TML_TOKEN)"],
            ["Token", me.token ? `${me.token.prefix}... (${me.token.id})` : undefined],
            ["Expires", me.token?.expireTime ? `${iso(me.token.expireTime)} (${ago(me.token.expireTime)})` : "never"],
          ]),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["token", "create"],
    summary: "Create an API token (shown once), e.g. for CI",
    flags: {
      description: { type: "string", placeholder: "TEXT", description: "what the token is for" },
      ttl: { type: "string", placeholder: "DURATION", description: "lifetime, e.g. 90d (default: the server's)" },
      user: { type: "string", placeholder: "USER_ID", description: "for another user (admins)" },
      service: { type: "bool", description: "a service credential for a store, log server or proxy (admins)" },
    },
    examples: ['tml token create --description "CI runner" --ttl 90d', "tml token create --service --description log-server-lab-a"],
    async run(ctx, { flags }) {
      const auth = await ctx.client(AuthService);
      const response = await auth.createToken(
        {
          description: flags.description ?? "",
          ttl: flags.ttl === undefined ? undefined : durationFromMs(parseDuration("ttl", flags.ttl)),
          userId: flags.user ?? "",
          scope: flags.service === true ? TokenScope.SERVICE : TokenScope.USER,
        },
        { timeoutMs: 15_000 },
      );
      ctx.out.data({ token: response.token, info: response.info ? jsonOf(ApiTokenSchema, response.info) : null }, () => {
        ctx.out.line(response.token);
        ctx.out.note(`Token ${response.info?.id} created${response.info?.expireTime ? `, expires ${iso(response.info.expireTime)}` : ""}. It is shown only this once.`);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["token", "list"],
    summary: "List your API tokens (never their secrets)",
    flags: {
      all: { type: "bool", description: "include revoked and expired tokens" },
      user: { type: "string", placeholder: "USER_ID", description: "another user's tokens (admins)" },
    },
    examples: ["tml token list", "tml token list --all -o json"],
    async run(ctx, { flags }) {
      const auth = await ctx.client(AuthService);
      const tokens: ApiToken[] = await allPages(async (pageToken) => {
        const page = await auth.listTokens(
          { userId: flags.user ?? "", includeInactive: flags.all === true, pageToken, pageSize: 500 },
          { timeoutMs: 15_000 },
        );
        return { items: page.tokens, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        tokens.map((t) => jsonOf(ApiTokenSchema, t)),
        () =>
          ctx.out.table(
            tokens,
            [
              { header: "ID", value: (t) => t.id },
              { header: "PREFIX", value: (t) => t.prefix },
              { header: "SCOPE", value: (t) => (t.scope === TokenScope.SERVICE ? "service" : "user") },
              { header: "DESCRIPTION", value: (t) => t.description || "-" },
              { header: "CREATED", value: (t) => ago(t.createTime) },
              { header: "EXPIRES", value: (t) => (t.revokeTime ? "revoked" : t.expireTime ? ago(t.expireTime) : "never") },
              { header: "LAST USED", value: (t) => ago(t.lastUseTime) },
            ],
            "No tokens.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["token", "revoke"],
    summary: "Revoke an API token by id",
    args: [{ name: "TOKEN_ID", required: true, description: "the token's id (see `tml token list`)" }],
    examples: ["tml token revoke 0190f5c2-7c1e-7000-8000-000000000000"],
    async run(ctx, { args }) {
      const auth = await ctx.client(AuthService);
      const response = await auth.revokeToken({ tokenId: args.TOKEN_ID }, { timeoutMs: 15_000 });
      ctx.out.data(response.info ? jsonOf(ApiTokenSchema, response.info) : {}, () => ctx.out.line(`Token ${args.TOKEN_ID} revoked.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["context", "list"],
    summary: "List saved contexts (server, user); * marks the current one",
    examples: ["tml context list"],
    async run(ctx) {
      const file = await ctx.config.load();
      const rows = Object.entries(file.contexts).map(([name, c]) => ({
        name,
        current: name === file.current,
        server: contextServers(c).join(","),
        servers: contextServers(c),
        user: c.user,
        loggedIn: c.token !== undefined,
        expireTime: c.expireTime ?? null,
      }));
      ctx.out.data(rows, () =>
        ctx.out.table(
          rows,
          [
            { header: "", value: (r) => (r.current ? "*" : "") },
            { header: "NAME", value: (r) => r.name },
            { header: "SERVER", value: (r) => r.server },
            { header: "USER", value: (r) => r.user },
            { header: "STATUS", value: (r) => (!r.loggedIn ? "logged out" : r.expireTime && Date.parse(r.expireTime) < Date.now() ? "expired" : "logged in") },
          ],
          "No contexts: run `tml login SERVER`.",
        ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["context", "use"],
    summary: "Make a saved context current",
    args: [{ name: "NAME", required: true }],
    examples: ["tml context use lab"],
    async run(ctx, { args }) {
      const file = await ctx.config.load();
      if (!file.contexts[args.NAME]) throw new CliError(`there is no context "${args.NAME}"; see \`tml context list\``, ExitCode.NOT_FOUND);
      file.current = args.NAME;
      await ctx.config.save(file);
      ctx.out.note(`Context "${args.NAME}" is now current (${contextServers(file.contexts[args.NAME]).join(",")}).`);
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["context", "rm"],
    summary: "Forget a saved context (its token is not revoked: use `tml logout` for that)",
    args: [{ name: "NAME", required: true }],
    examples: ["tml context rm old-lab"],
    async run(ctx, { args }) {
      const file = await ctx.config.load();
      if (!file.contexts[args.NAME]) throw new CliError(`there is no context "${args.NAME}"; see \`tml context list\``, ExitCode.NOT_FOUND);
      delete file.contexts[args.NAME];
      if (file.current === args.NAME) delete file.current;
      await ctx.config.save(file);
      ctx.out.note(`Context "${args.NAME}" removed.`);
      return ExitCode.OK;
    },
  }),
];
