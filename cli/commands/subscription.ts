/**
 * `tml subscription` (SubscriptionService; docs/events.md, "Subscriptions"):
 * create, list, show, enable, disable and delete subscriptions to the event
 * feed, send a test event, read a subscription's delivery log and redeliver
 * one delivery. The webhook secret is printed by `create` and
 * `rotate-secret` only: the coordinator never shows it again.
 */
import type { ArgSpec } from "../args.js";
import { keyValues, parseDuration, parseIntFlag } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { ExitCode, UsageError } from "../errors.js";
import { ago, iso, jsonOf, tagsText, word } from "../format.js";
import { allPages } from "../pages.js";
import {
  CreateSubscriptionResponseSchema,
  type Delivery,
  DeliverySchema,
  DeliveryStateSchema,
  type Destination,
  EmailMode,
  type Subscription,
  SubscriptionSchema,
  SubscriptionService,
  UpdateSubscriptionResponseSchema,
} from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { durationFromMs } from "@bufbuild/protobuf/wkt";

const SUB_ARG = [{ name: "SUB", required: true, description: "the subscription's id" }] as const satisfies readonly ArgSpec[];

function destinationText(d: Destination): string {
  if (d.target.case === "webhook") return d.target.value.url;
  if (d.target.case === "email") {
    const e = d.target.value;
    return `email ${e.to.join(",")}${e.mode === EmailMode.DIGEST ? " (digest)" : ""}`;
  }
  return "-";
}

function filterText(s: Subscription): string {
  const f = s.filter;
  if (!f) return "-";
  const parts = [
    f.kinds.length > 0 ? `kind=${f.kinds.join("|")}` : "",
    Object.keys(f.labels).length > 0 ? `labels ${tagsText(f.labels)}` : "",
    f.images.length > 0 ? `image=${f.images.join("|")}` : "",
    f.ownerUserIds.length > 0 ? `owner=${f.ownerUserIds.join("|")}` : "",
    f.states.length > 0 ? `state=${f.states.join("|")}` : "",
    f.outcomes.length > 0 ? `outcome=${f.outcomes.join("|")}` : "",
    f.regressionsOnly ? "regressions only" : "",
  ].filter((p) => p !== "");
  return parts.length === 0 ? "every event" : parts.join(", ");
}

function stateText(s: Subscription): string {
  if (s.enabled) return "enabled";
  return s.disabledReason !== "" ? "disabled by the coordinator" : "disabled";
}

function showSubscription(ctx: CliContext, s: Subscription): void {
  ctx.out.fields([
    ["ID", s.id],
    ["Name", s.name],
    ["State", stateText(s)],
    ["Disabled because", s.disabledReason],
    ["Failing since", s.failingSince ? iso(s.failingSince) : undefined],
    ["Group", s.groupName],
    ["Filter", filterText(s)],
    ["Created", iso(s.createTime)],
  ]);
  ctx.out.line();
  ctx.out.table(s.destinations, [
    { header: "DESTINATION", value: (d) => d.id },
    { header: "TARGET", value: destinationText },
  ]);
}

function deliveryTable(ctx: CliContext, deliveries: Delivery[]): void {
  ctx.out.table(
    deliveries,
    [
      { header: "ID", value: (d) => d.id },
      { header: "EVENT", value: (d) => d.eventId },
      { header: "KIND", value: (d) => d.eventKind },
      { header: "STATE", value: (d) => word(DeliveryStateSchema, d.state) },
      { header: "ATTEMPTS", value: (d) => String(d.attemptCount) },
      { header: "CODE", value: (d) => (d.responseCode === 0 ? "-" : String(d.responseCode)) },
      { header: "QUEUED", value: (d) => ago(d.createTime) },
      { header: "ERROR", value: (d) => d.error || "-" },
    ],
    "No deliveries.",
  );
}

export const subscriptionCommands: Command[] = [
  defineCommand({
    path: ["subscription", "create"],
    summary: "Subscribe a webhook or email addresses to events of the feed; prints the webhook secret once",
    args: [{ name: "NAME", required: true, description: "a name for people" }],
    flags: {
      webhook: { type: "list", placeholder: "URL", description: "POST each event to this http(s) URL, signed (repeatable)" },
      email: { type: "list", placeholder: "ADDRESS", description: "email each event to this address (repeatable; the coordinator needs an smtp server)" },
      digest: { type: "string", placeholder: "DURATION", description: "with --email: one message per window (1h, 30m...) instead of one per event" },
      kind: { type: "list", placeholder: "KIND", description: "only this kind (job.state, job.stage, job.results, job.artifacts, lease.state; host.health: admins)" },
      label: { type: "list", placeholder: "KEY=VALUE", description: "only events of jobs with this label" },
      image: { type: "list", placeholder: "NAME[:TAG]", description: "only events of jobs of this image" },
      owner: { type: "list", placeholder: "USER_ID", description: "only events of this user's jobs (admins)" },
      state: { type: "list", placeholder: "STATE", description: "only events whose state is this (queued, running, finalized...)" },
      outcome: { type: "list", placeholder: "OUTCOME", description: "only finalized jobs with this outcome (success, failure, canceled, job_timeout...)" },
      "regressions-only": { type: "bool", description: "only events the results flag as a regression" },
      group: { type: "string", placeholder: "GROUP", description: "one of your groups, whose members may manage it too" },
    },
    examples: [
      "tml subscription create ci-results --webhook https://ci.example.org/treadmill --label project=tock --state finalized",
      "tml subscription create nightly --email me@example.org --digest 1h --outcome failure",
    ],
    async run(ctx, { args, flags }) {
      if (flags.webhook.length === 0 && flags.email.length === 0) throw new UsageError("give at least one --webhook URL or --email ADDRESS");
      if (flags.digest !== undefined && flags.email.length === 0) throw new UsageError("flag --digest goes with --email");
      const destinations: Destination["target"][] = flags.webhook.map((url) => ({ case: "webhook" as const, value: { url } }) as Destination["target"]);
      if (flags.email.length > 0) {
        const digest = flags.digest === undefined ? undefined : parseDuration("digest", flags.digest);
        destinations.push({
          case: "email",
          value: { to: [...flags.email], mode: digest === undefined ? EmailMode.EACH : EmailMode.DIGEST, digestWindow: digest === undefined ? undefined : durationFromMs(digest) },
        } as Destination["target"]);
      }
      const subs = await ctx.client(SubscriptionService);
      const res = await subs.createSubscription(
        {
          name: args.NAME,
          groupName: flags.group ?? "",
          filter: {
            kinds: [...flags.kind],
            labels: keyValues("label", flags.label),
            images: [...flags.image],
            ownerUserIds: [...flags.owner],
            states: [...flags.state],
            outcomes: [...flags.outcome],
            regressionsOnly: flags["regressions-only"],
          },
          destinations: destinations.map((target) => ({ target })),
        },
        { timeoutMs: 15_000 },
      );
      ctx.out.data(jsonOf(CreateSubscriptionResponseSchema, res), () => {
        showSubscription(ctx, res.subscription!);
        ctx.out.line();
        ctx.out.fields([["Secret", res.secret]]);
      });
      ctx.out.note("Keep the secret: it signs every webhook request and is not shown again (`tml subscription rotate-secret` makes a new one).");
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["subscription", "list"],
    summary: "List your subscriptions and your groups', newest first",
    examples: ["tml subscription list", "tml subscription list -o json"],
    async run(ctx) {
      const subs = await ctx.client(SubscriptionService);
      const { subscriptions } = await subs.listSubscriptions({}, { timeoutMs: 15_000 });
      ctx.out.data(
        subscriptions.map((s) => jsonOf(SubscriptionSchema, s)),
        () =>
          ctx.out.table(
            subscriptions,
            [
              { header: "ID", value: (s) => s.id },
              { header: "NAME", value: (s) => s.name },
              { header: "STATE", value: stateText },
              { header: "DESTINATIONS", value: (s) => s.destinations.map(destinationText).join(" ") },
              { header: "FILTER", value: filterText },
            ],
            "No subscriptions.",
          ),
      );
      for (const s of subscriptions) {
        if (s.disabledReason !== "") ctx.out.note(ctx.out.errStyle(`subscription ${s.id} was disabled: ${s.disabledReason}`, "yellow"));
      }
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["subscription", "get"],
    summary: "Show one subscription: its filter, destinations and why it was disabled",
    args: SUB_ARG,
    examples: ["tml subscription get $SUB"],
    async run(ctx, { args }) {
      const { subscription } = await (await ctx.client(SubscriptionService)).getSubscription({ id: args.SUB }, { timeoutMs: 15_000 });
      ctx.out.data(jsonOf(SubscriptionSchema, subscription!), () => showSubscription(ctx, subscription!));
      return ExitCode.OK;
    },
  }),
  ...(["enable", "disable"] as const).map((verb) =>
    defineCommand({
      path: ["subscription", verb],
      summary: verb === "enable" ? "Enable a subscription again (clears the coordinator's disable notice)" : "Stop delivering a subscription's events",
      args: SUB_ARG,
      examples: [`tml subscription ${verb} $SUB`],
      async run(ctx, { args }) {
        const subs = await ctx.client(SubscriptionService);
        const { subscription } = await subs.updateSubscription({ id: args.SUB, enabled: verb === "enable" }, { timeoutMs: 15_000 });
        ctx.out.data(jsonOf(SubscriptionSchema, subscription!), () => ctx.out.line(`Subscription ${args.SUB} ${stateText(subscription!)}.`));
        return ExitCode.OK;
      },
    }),
  ),
  defineCommand({
    path: ["subscription", "rotate-secret"],
    summary: "Replace a subscription's webhook secret; prints the new one once",
    args: SUB_ARG,
    examples: ["tml subscription rotate-secret $SUB"],
    async run(ctx, { args }) {
      const res = await (await ctx.client(SubscriptionService)).updateSubscription({ id: args.SUB, rotateSecret: true }, { timeoutMs: 15_000 });
      ctx.out.data(jsonOf(UpdateSubscriptionResponseSchema, res), () => ctx.out.fields([["Secret", res.secret]]));
      ctx.out.note("The old secret no longer signs anything; this one is not shown again.");
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["subscription", "delete"],
    summary: "Delete a subscription and its delivery log",
    args: SUB_ARG,
    examples: ["tml subscription delete $SUB"],
    async run(ctx, { args }) {
      await (await ctx.client(SubscriptionService)).deleteSubscription({ id: args.SUB }, { timeoutMs: 15_000 });
      ctx.out.note(`Subscription ${args.SUB} deleted.`);
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["subscription", "test"],
    summary: "Send a synthetic event (kind subscription.test) to each destination of a subscription",
    args: SUB_ARG,
    examples: ["tml subscription test $SUB && tml subscription deliveries $SUB"],
    async run(ctx, { args }) {
      const { deliveries } = await (await ctx.client(SubscriptionService)).testSubscription({ id: args.SUB }, { timeoutMs: 15_000 });
      ctx.out.data(
        deliveries.map((d) => jsonOf(DeliverySchema, d)),
        () => deliveryTable(ctx, deliveries),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["subscription", "deliveries"],
    summary: "Show a subscription's delivery log, newest first; --redeliver sends one delivery again",
    args: SUB_ARG,
    flags: {
      redeliver: { type: "string", placeholder: "DELIVERY", description: "send this delivery again (a new delivery of the same event)" },
      limit: { type: "string", placeholder: "N", description: "show at most N deliveries (default 50)" },
    },
    examples: ["tml subscription deliveries $SUB", "tml subscription deliveries $SUB --redeliver $DELIVERY"],
    async run(ctx, { args, flags }) {
      const subs = await ctx.client(SubscriptionService);
      if (flags.redeliver !== undefined) {
        const { delivery } = await subs.redeliver({ deliveryId: flags.redeliver }, { timeoutMs: 15_000 });
        ctx.out.data(jsonOf(DeliverySchema, delivery!), () => deliveryTable(ctx, [delivery!]));
        return ExitCode.OK;
      }
      const limit = flags.limit === undefined ? 50 : parseIntFlag("limit", flags.limit, 1, 10_000);
      let left = limit;
      const deliveries = await allPages(async (pageToken) => {
        if (left <= 0) return { items: [], nextPageToken: "" };
        const page = await subs.listDeliveries({ subscriptionId: args.SUB, pageSize: Math.min(500, left), pageToken }, { timeoutMs: 15_000 });
        left -= page.deliveries.length;
        return { items: page.deliveries, nextPageToken: left > 0 ? page.nextPageToken : "" };
      });
      ctx.out.data(
        deliveries.map((d) => jsonOf(DeliverySchema, d)),
        () => deliveryTable(ctx, deliveries),
      );
      return ExitCode.OK;
    },
  }),
];
