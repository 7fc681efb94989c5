/**
 * `tml service list` (admins): the stores, caches, log servers and proxies
 * registered with the coordinator (RegistryService.ListServices), live or
 * not, so an operator can see what jobs and caches will be given.
 */
import { allPages } from "../pages.js";
import {
  RegisteredServiceSchema,
  RegistryService,
  ServiceKindSchema,
  type RegisteredService,
} from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { defineCommand, type Command } from "../command.js";
import { ExitCode, UsageError } from "../errors.js";
import { ago, enumValue, enumWords, jsonOf, word } from "../format.js";
import { formatBytes } from "../progress.js";

export const serviceCommands: Command[] = [
  defineCommand({
    path: ["service", "list"],
    summary: "List the registered stores, caches, log servers and proxies (admins)",
    flags: {
      kind: { type: "string", placeholder: "KIND", description: `only this kind: ${enumWords(ServiceKindSchema).join(", ")}` },
      live: { type: "bool", description: "only registrations heard from recently and not draining" },
    },
    examples: ["tml service list", "tml service list --kind image-store --live -o json"],
    async run(ctx, { flags }) {
      let kind = 0;
      if (flags.kind !== undefined) {
        const k = enumValue(ServiceKindSchema, flags.kind);
        if (k === undefined) throw new UsageError(`flag --kind must be one of ${enumWords(ServiceKindSchema).join(", ")}`);
        kind = k;
      }
      const registry = await ctx.client(RegistryService);
      const found: RegisteredService[] = await allPages(async (pageToken) => {
        const page = await registry.listServices({ kind, liveOnly: flags.live === true, pageSize: 1000, pageToken }, { timeoutMs: 30_000 });
        return { items: page.services, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((s) => jsonOf(RegisteredServiceSchema, s)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "KIND", value: (s) => word(ServiceKindSchema, s.kind) },
              { header: "URL", value: (s) => s.url },
              { header: "SITE", value: (s) => s.site || "-" },
              { header: "STATUS", value: (s) => (s.live ? "live" : s.status?.draining ? "draining" : "gone") },
              { header: "HEARD", value: (s) => ago(s.lastHeartbeatTime) },
              {
                header: "FREE",
                value: (s) => (s.status && s.status.capacityBytes > 0n ? `${formatBytes(Number(s.status.freeBytes))}/${formatBytes(Number(s.status.capacityBytes))}` : "-"),
              },
              { header: "ID", value: (s) => s.serviceId },
            ],
            "No services registered.",
          ),
      );
      return ExitCode.OK;
    },
  }),
];
