/**
 * `tml console JOB` (or `--lease L`: the job running in the lease) and
 * `tml port-forward JOB PORT [LOCAL]`: both ride on the
 * rendezvous proxy: JobService.OpenJobSession gives the proxy and a dial
 * token for exactly that job and port, then TunnelService.Dial carries the
 * bytes (lib/tunnel/client.ts). Leaving a console leaves the job running:
 * `tml console` says so, and how to end it.
 */
import { createServer, type Socket } from "node:net";
import { PassThrough } from "node:stream";
import { JobState, JobStateSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { attachTerminal, dialTunnel } from "../../lib/tunnel/client.js";
import { parseDuration } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import { tlsOptions, type CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { word } from "../format.js";
import { outcome, watchJob } from "./job.js";
import { leaseConsoleTarget } from "./lease.js";

async function openSession(ctx: CliContext, jobId: string, port: string, host: string | undefined) {
  const jobs = await ctx.client(JobService);
  const session = await jobs.openJobSession({ jobId, portName: port, hostId: host ?? "" });
  if (!session.dialToken) throw new CliError("the coordinator answered without a dial token", ExitCode.ERROR);
  return session;
}

/**
 * What became of the job once its console is closed: its outcome, or that it
 * still runs (and holds its host until it ends or times out) and how to end it.
 */
async function jobAfterConsole(ctx: CliContext, jobId: string): Promise<string> {
  const cancel = `tml job cancel ${jobId}`;
  try {
    const { job } = await (await ctx.client(JobService)).getJob({ jobId });
    if (job === undefined) return `End the job with: ${cancel}`;
    if (job.state === JobState.FINALIZED) return `Job ${jobId} ${outcome(job)}.`;
    return `Job ${jobId} is still ${word(JobStateSchema, job.state)}: it keeps its host until it ends or times out. End it with: ${cancel}`;
  } catch {
    return `If the job still runs, end it with: ${cancel}`;
  }
}

/** Waits until the job runs (saying so when it does not yet); CliError when it ends first. */
async function untilRunning(ctx: CliContext, jobId: string): Promise<void> {
  const running = new AbortController();
  let said = false;
  const job = await watchJob(await ctx.client(JobService), jobId, AbortSignal.any([ctx.abort.signal, running.signal]), (j) => {
    if (j.state === JobState.RUNNING) running.abort();
    else if (!said && j.state !== JobState.FINALIZED) {
      said = true;
      ctx.io.stderr.write(`Waiting for job ${jobId} to run (${word(JobStateSchema, j.state)}).\n`);
    }
  }).catch((err: unknown) => {
    if (running.signal.aborted) return undefined;
    throw err;
  });
  if (job !== undefined) throw new CliError(`job ${jobId} ${outcome(job)} before its console could open`, ExitCode.CONFLICT);
}

/**
 * Passes keystrokes through, except the escape sequence `~.` typed at the
 * start of a line (as ssh's), which calls `leave` instead.
 */
export function escapeFilter(leave: () => void): PassThrough & { feed(chunk: Buffer): void } {
  const out = new PassThrough();
  let atLineStart = true;
  let pendingTilde = false;
  return Object.assign(out, {
    feed(chunk: Buffer) {
      const passed: number[] = [];
      for (const byte of chunk) {
        if (pendingTilde) {
          pendingTilde = false;
          if (byte === 0x2e /* . */) {
            if (passed.length > 0) out.write(Buffer.from(passed));
            leave();
            return;
          }
          passed.push(0x7e);
          if (byte === 0x7e) {
            // "~~" sends one tilde.
            atLineStart = false;
            continue;
          }
        } else if (atLineStart && byte === 0x7e /* ~ */) {
          pendingTilde = true;
          continue;
        }
        passed.push(byte);
        atLineStart = byte === 0x0d || byte === 0x0a;
      }
      if (passed.length > 0) out.write(Buffer.from(passed));
    },
  });
}

export const sessionCommands: Command[] = [
  defineCommand({
    path: ["console"],
    summary: "Open an interactive console on a running job (leave with ~.)",
    description:
      "The terminal goes to raw mode, so every key (Ctrl-C included) goes to the job; type ~. at the start of a line to leave, like ssh, and ~~ to send one tilde. Leaving does not end the job: tml says whether it still runs, and `tml job cancel JOB` ends it. Input from a pipe or a file is sent as it is; a console has no end of input (a serial line has none), so once the input ends tml goes on printing what the console says until it has been quiet for --linger, then leaves.",
    args: [{ name: "JOB", description: "the job's id (or --lease)" }],
    flags: {
      lease: { type: "string", placeholder: "LEASE", description: "instead of JOB: the job running in this lease (on --host)" },
      host: { type: "string", placeholder: "HOST", description: "for a multi-host job, which host by id (default: the first); with --lease, by name or id" },
      linger: {
        type: "string",
        placeholder: "DURATION",
        description: "after input from a pipe or file ends, how long the console must be quiet before tml leaves (default 2s)",
      },
    },
    examples: ["tml console $JOB", "echo 'uname -a' | tml console $JOB --linger 5s", "tml console --lease $LEASE --host board-1"],
    async run(ctx, { args, flags }) {
      if ((args.JOB === undefined) === (flags.lease === undefined)) throw new UsageError("`tml console` needs JOB or --lease LEASE (not both)");
      const lingerMs = flags.linger === undefined ? 2000 : parseDuration("linger", flags.linger);
      let jobId = args.JOB ?? "";
      let hostId = flags.host;
      if (flags.lease !== undefined) {
        const target = await leaseConsoleTarget(await ctx.client(LeaseService), flags.lease, flags.host);
        ({ jobId, hostId } = target);
        ctx.io.stderr.write(`Lease ${flags.lease}: job ${jobId} on host ${target.hostName || hostId}.\n`);
        // Just started in the lease, it may still be provisioning: its console opens once it runs.
        await untilRunning(ctx, jobId);
      }
      const session = await openSession(ctx, jobId, "console", hostId);
      const { stdin, stdout, stderr } = ctx.io;
      const tty = stdout as typeof stdout & { rows?: number; on(e: "resize", l: () => void): unknown; off(e: "resize", l: () => void): unknown };
      const tunnel = await dialTunnel({
        proxyUrl: session.grpcUrl,
        token: session.dialToken!.token,
        jobId,
        port: "console",
        hostId: session.hostId,
        windowSize: tty.columns && tty.rows ? { cols: tty.columns, rows: tty.rows } : undefined,
        signal: ctx.abort.signal,
        tls: tlsOptions(ctx.caFile),
      });
      stderr.write(`Connected to the console of job ${jobId}. Type ~. at the start of a line to leave.\r\n`);
      const raw = stdin.isTTY === true && typeof stdin.setRawMode === "function";
      if (raw) stdin.setRawMode!(true);
      const input = escapeFilter(() => {
        stderr.write("\r\n");
        tunnel.destroy();
      });
      const onData = (chunk: Buffer) => input.feed(chunk);
      stdin.on("data", onData);
      // The end of piped input is not the console's: leave once it is quiet.
      let quiet: NodeJS.Timeout | undefined;
      const leaveWhenQuiet = () => {
        clearTimeout(quiet);
        quiet = setTimeout(() => tunnel.destroy(), lingerMs);
      };
      stdin.once("end", () => {
        leaveWhenQuiet();
        tunnel.on("data", leaveWhenQuiet);
      });
      try {
        const closed = await attachTerminal(tunnel, {
          stdin: input,
          stdout: Object.assign(tty, { on: tty.on.bind(tty), off: tty.off.bind(tty) }),
        });
        stderr.write(`\r\nConsole closed${closed.message ? `: ${closed.message}` : ""}.\r\n`);
        stderr.write(`${await jobAfterConsole(ctx, jobId)}\r\n`);
      } finally {
        clearTimeout(quiet);
        stdin.off("data", onData);
        if (raw) stdin.setRawMode!(false);
        stdin.pause();
      }
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["port-forward"],
    summary: "Forward a local TCP port to a port the job exposes",
    description: "Like kubectl port-forward: each connection to the local port is a tunnel through the proxy. Ctrl-C stops.",
    args: [
      { name: "JOB", required: true, description: "the job's id" },
      { name: "PORT", required: true, description: "the exposure's name (console, or a port the job declares, such as ssh)" },
      { name: "LOCAL", description: "local port to listen on (default: a free one, printed)" },
    ],
    flags: {
      address: { type: "string", placeholder: "ADDR", description: "local address to listen on (default 127.0.0.1)" },
      host: { type: "string", placeholder: "HOST_ID", description: "for a multi-host job, which host" },
    },
    examples: ["tml port-forward $JOB ssh 2222", "ssh -p 2222 root@127.0.0.1"],
    async run(ctx, { args, flags }) {
      const jobId = args.JOB;
      const port = args.PORT;
      const local = args.LOCAL === undefined ? 0 : Number(args.LOCAL);
      if (!Number.isInteger(local) || local < 0 || local > 65535) {
        throw new CliError(`local port ${args.LOCAL} is not a port number`, ExitCode.USAGE);
      }
      // One session (and token) for every connection; checked before listening.
      const session = await openSession(ctx, jobId, port, flags.host);
      const tls = tlsOptions(ctx.caFile);
      const connections = new Set<Socket>();
      const server = createServer((socket) => {
        connections.add(socket);
        socket.once("close", () => connections.delete(socket));
        dialTunnel({ proxyUrl: session.grpcUrl, token: session.dialToken!.token, jobId, port, hostId: session.hostId, tls }).then(
          (tunnel) => {
            socket.pipe(tunnel);
            tunnel.pipe(socket);
            tunnel.on("error", () => socket.destroy());
            socket.on("error", () => tunnel.destroy());
            socket.once("close", () => tunnel.destroy());
          },
          (err: unknown) => {
            ctx.io.stderr.write(`cannot open a tunnel to ${port}: ${err instanceof Error ? err.message : String(err)}\n`);
            socket.destroy();
          },
        );
      });
      const address = flags.address ?? "127.0.0.1";
      await new Promise<void>((resolve, reject) => {
        server.once("error", (err: NodeJS.ErrnoException) =>
          reject(new CliError(`cannot listen on ${address}:${local}: ${err.code ?? err.message}`, ExitCode.ERROR)),
        );
        server.listen(local, address, resolve);
      });
      const bound = server.address();
      const boundPort = typeof bound === "object" && bound ? bound.port : local;
      ctx.io.stdout.write(`Forwarding ${address}:${boundPort} -> job ${jobId} ${port}. Ctrl-C to stop.\n`);
      await new Promise<void>((resolve) => {
        const stop = () => resolve();
        ctx.abort.signal.addEventListener("abort", stop, { once: true });
        const off = ctx.onInterrupt(stop);
        server.once("close", off);
      });
      server.close();
      for (const socket of connections) socket.destroy();
      return ExitCode.OK;
    },
  }),
];
