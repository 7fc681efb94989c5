/**
 * `tml console JOB` and `tml port-forward JOB PORT [LOCAL]`: both ride on the
 * rendezvous proxy (JobService.OpenJobSession, then TunnelService.Dial
 * through lib/tunnel-client.ts). That client is still being built, so both
 * commands answer a clear "not available yet" until it lands.
 */
import type { CommandSpec } from "../args.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode } from "../errors.js";

/** The tunnel client, when this build has one. */
async function tunnelClient(): Promise<unknown> {
  const path: string = "../../lib/tunnel-client.js";
  try {
    return await import(path);
  } catch {
    return undefined;
  }
}

async function notYet(command: string): Promise<never> {
  const client = await tunnelClient();
  const why = client === undefined ? "this build has no tunnel client yet" : "this build of tml does not use the tunnel client yet";
  throw new CliError(`\`tml ${command}\` is not available yet: ${why}; follow the job's output with \`tml job logs --follow JOB\``, ExitCode.ERROR);
}

export const sessionCommands: CommandSpec<CliContext>[] = [
  {
    path: ["console"],
    summary: "Open an interactive console on a running job (leave with ~.)",
    description: "The terminal goes to raw mode; type ~. at the start of a line to leave, like ssh.",
    args: [{ name: "JOB", required: true, description: "the job's id" }],
    flags: { host: { type: "string", value: "HOST_ID", description: "for a multi-host job, which host (default: the first)" } },
    examples: ["tml console $JOB"],
    run: () => notYet("console"),
  },
  {
    path: ["port-forward"],
    summary: "Forward a local TCP port to a port the job exposes",
    args: [
      { name: "JOB", required: true, description: "the job's id" },
      { name: "PORT", required: true, description: "the exposure's name (from `tml job run --expose NAME=PORT`)" },
      { name: "LOCAL", description: "local port to listen on (default: a free one, printed)" },
    ],
    flags: {
      address: { type: "string", value: "ADDR", description: "local address to listen on (default 127.0.0.1)" },
      host: { type: "string", value: "HOST_ID", description: "for a multi-host job, which host" },
    },
    examples: ["tml port-forward $JOB ssh 2222", "ssh -p 2222 root@127.0.0.1"],
    run: () => notYet("port-forward"),
  },
];
