/** Every command of `tml`, in the order `tml --help` lists them. */
import { defineCommand, type Command } from "../command.js";
import { bashCompletion, zshCompletion } from "../completion.js";
import { ExitCode, UsageError } from "../errors.js";
import { authCommands } from "./auth.js";
import { eventsCommands } from "./events.js";
import { healthCommands } from "./health.js";
import { hostCommands } from "./host.js";
import { imageCommands } from "./image.js";
import { jobCommands } from "./job.js";
import { jobFileCommands } from "./job-file.js";
import { leaseCommands } from "./lease.js";
import { serviceCommands } from "./service.js";
import { sessionCommands } from "./session.js";
import { subscriptionCommands } from "./subscription.js";
import { userCommands } from "./user.js";

const completionCommands: Command[] = [
  defineCommand({
    path: ["completion"],
    summary: "Print a shell completion script (bash or zsh)",
    args: [{ name: "SHELL", required: true, description: "bash or zsh" }],
    examples: ["source <(tml completion bash)", "tml completion zsh > \"${fpath[1]}/_tml\""],
    async run(ctx, { args }) {
      if (args.SHELL === "bash") ctx.io.stdout.write(bashCompletion(allCommands));
      else if (args.SHELL === "zsh") ctx.io.stdout.write(zshCompletion(allCommands));
      else {
        throw new UsageError(`SHELL must be bash or zsh, got "${args.SHELL}"`);
      }
      return ExitCode.OK;
    },
  }),
];

export const allCommands: Command[] = [
  ...authCommands.filter((c) => c.path[0] !== "token" && c.path[0] !== "context"),
  ...jobCommands,
  ...jobFileCommands,
  ...sessionCommands,
  ...leaseCommands,
  ...eventsCommands,
  ...subscriptionCommands,
  ...imageCommands,
  ...hostCommands,
  ...healthCommands,
  ...serviceCommands,
  ...userCommands,
  ...authCommands.filter((c) => c.path[0] === "token" || c.path[0] === "context"),
  ...completionCommands,
];

/** Summaries of the command groups, for help. */
export const groupSummaries: Record<string, string> = {
  job: "Run jobs, follow their logs, list, cancel and inspect them",
  lease: "List, inspect, extend, renew and release leases of hosts (`tml reserve` takes one)",
  subscription: "Subscribe webhooks and email to the event feed; read the delivery log",
  image: "Push, pull, list and manage images",
  host: "List and manage hosts (changes: admins)",
  service: "List the registered stores, caches, log servers and proxies (admins)",
  user: "Manage users (admins)",
  token: "Create, list and revoke API tokens",
  context: "List, switch and remove saved server contexts",
};
