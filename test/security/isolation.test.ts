import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { access, readdir, readFile, readlink } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { FinalizeReason, JobState, ReasonClass } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { dialTunnel } from "../../lib/tunnel/client.js";
import { processesOfUid, signalAll } from "../../supervisor/drivers/sandbox.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const execFileAsync = promisify(execFile);

/**
 * Issue #17 holes 1 and 2, and #18 defect 5, on a real multi-user site (the
 * all-in-one testbed: coordinator, PostgreSQL, store, cache, log server,
 * proxy, two process supervisors) with two ordinary users besides the
 * admin: alice runs a job holding a secret with a shell on its console;
 * mallory's job attacks it, and the host, from inside.
 */

/** TCP listeners of the host's network namespace: port, and whether bound to ::1 only. */
async function hostListeners(): Promise<{ port: number; inode: number; v6only: boolean }[]> {
  const out: { port: number; inode: number; v6only: boolean }[] = [];
  for (const file of ["tcp", "tcp6"]) {
    const text = await readFile(`/proc/net/${file}`, "utf8");
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== "0A") continue;
      const [address, port] = f[1]!.split(":");
      out.push({ port: parseInt(port!, 16), inode: Number(f[9]), v6only: address === "00000000000000000000000001000000" });
    }
  }
  return out;
}

/** Inodes of the sockets this process (the testbed, supervisors included) holds. */
async function ownSocketInodes(): Promise<Set<number>> {
  const out = new Set<number>();
  for (const fd of await readdir("/proc/self/fd")) {
    const m = /^socket:\[(\d+)\]$/.exec(await readlink(`/proc/self/fd/${fd}`).catch(() => ""));
    if (m !== null) out.add(Number(m[1]));
  }
  return out;
}

/** The first file under `dir` (depth first) whose name ends with `suffix`, or undefined. */
async function findFile(dir: string, suffix: string): Promise<string | undefined> {
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const path = join(dir, entry.name);
    if (entry.isFile() && entry.name.endsWith(suffix)) return path;
    if (entry.isDirectory()) {
      const found = await findFile(path, suffix);
      if (found !== undefined) return found;
    }
  }
  return undefined;
}

/** This process's TCP listeners, by inode. */
async function ownListeners(): Promise<Set<number>> {
  const own = await ownSocketInodes();
  return new Set((await hostListeners()).filter((l) => own.has(l.inode)).map((l) => l.inode));
}

describe("isolation of jobs from each other and from their host", () => {
  let tb: RunningTestbed;
  let alice: Transport;
  let mallory: Transport;
  const data = () => join(tb.dir, "data");

  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 2, config: { boards: 0 } });
    const users = tb.client(UserService);
    const login = async (name: string) => {
      const password = randomBytes(18).toString("base64url");
      await users.createUser({ name, password });
      const { token } = await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name, password });
      return coordinatorTransport(tb.coordinatorUrl, token);
    };
    alice = await login("alice");
    mallory = await login("mallory");
    await tb.pushShellImage("alice/sh:1", undefined, alice);
    await tb.pushShellImage("mallory/sh:1", undefined, mallory);
  }, 180000);

  afterAll(async () => {
    await tb?.stop();
  }, 60000);

  /** Waits until the job's console log (from the log server) matches. */
  const consoleSays = async (jobId: string, pattern: RegExp, timeoutMs = 60000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const log = await tb.readLog(jobId, "console").catch(() => "");
      if (pattern.test(log)) return log;
      if (Date.now() > deadline) throw new Error(`console of ${jobId} never matched ${pattern}:\n${log}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  };

  /** The job's host name and slot uid (from its `supervisor` channel). */
  const whereRuns = async (jobId: string) => {
    const job = (await tb.client(JobService).getJob({ jobId })).job!;
    const host = (await tb.client(HostService).getHost({ host: { case: "hostId", value: job.hostIds[0]! } })).host!;
    const supervisorLog = await tb.readLog(jobId, "supervisor");
    const uid = Number(/as uid (\d+)/.exec(supervisorLog)?.[1]);
    return { host: host.name, uid, supervisorLog };
  };

  it("keeps another user's job from alice's console, her secret, her processes and files, and the host's services and credentials", async () => {
    const secret = `alice-secret-${randomBytes(12).toString("hex")}`;
    const listenersBefore = await ownListeners();
    const { job: aliceJob } = await createClient(JobService, alice).submitJob({
      spec: {
        image: "alice/sh:1",
        hosts: { hostCount: 1 },
        parameters: [
          { name: "script", value: "echo alice-ready; exec sh -i" },
          { name: "KEY", value: secret, secret: true },
        ],
      },
    });
    const aliceId = aliceJob!.id;
    await tb.waitState(aliceId, JobState.RUNNING);
    await consoleSays(aliceId, /alice-ready/);
    const aliceAt = await whereRuns(aliceId);
    expect(aliceAt.uid).toBeGreaterThan(0);

    // Alice's console is no TCP listener of the host (it was one: hole 1).
    const newListeners = [...(await ownListeners())].filter((inode) => !listenersBefore.has(inode));
    expect(newListeners).toEqual([]);

    // Every TCP listener of the host now, the site's PostgreSQL among them.
    const listeners = await hostListeners();
    const pgPort = Number((await readFile(join(data(), "coordinator", "postgres", "pgdata", "postmaster.pid"), "utf8")).split("\n")[3]);
    expect(listeners.some((l) => l.port === pgPort)).toBe(true);
    const ports4 = [...new Set(listeners.filter((l) => !l.v6only).map((l) => l.port))];
    const ports6 = [...new Set(listeners.filter((l) => l.v6only).map((l) => l.port))];
    const alicePids = (await processesOfUid(aliceAt.uid)).map((p) => p.pid);
    expect(alicePids.length).toBeGreaterThan(0);
    const aliceJobDir = join(data(), "supervisors", aliceAt.host, "process", "jobs", `${aliceId}.1`);
    const aliceSecretFile = join(aliceJobDir, "rootfs", "run", "treadmill", "secrets", "KEY");
    const coordinatorPort = Number(new URL(tb.coordinatorUrl).port);
    // On a build that bridges consoles to TCP, the supervisor names alice's console port: expose it too.
    const aliceConsolePort = /console on 127\.0\.0\.1:(\d+)/.exec(aliceAt.supervisorLog)?.[1];
    // What mallory's job goes after on the host: each is there.
    const targets = {
      alice_work_dir: aliceJobDir,
      alice_secret_file: aliceSecretFile,
      // The supervisor's log spill of alice's job: her output and the log:write token beside it.
      alice_log_spill: await findFile(join(data(), "supervisors", aliceAt.host, "spill", `${aliceId}-1`), ".shipper.json"),
      // The testbed's state: every host's credential and the service credential.
      state_file: join(data(), "testbed.json"),
      // The driver's Unix sockets (alice's console among them) and the slots' claims.
      console_sockets: "/run/treadmill/sockets",
      slot_claims: "/run/treadmill/slots",
      pg_dir: join(data(), "coordinator", "postgres"),
      pg_password: join(data(), "coordinator", "postgres", "password"),
      pg_files: join(data(), "coordinator", "postgres", "pgdata", "PG_VERSION"),
      cache_blob_dir: join(data(), "image-cache", "blobs", "sha256"),
      cache_blob_file: await findFile(join(data(), "image-cache", "blobs", "sha256"), ""),
      store_blob_file: await findFile(join(data(), "image-store", "blobs", "sha256"), ""),
      log_files: join(data(), "log-server"),
    };
    for (const [name, path] of Object.entries(targets)) {
      const found = path === undefined ? "missing" : await access(path).then(() => path, () => "missing");
      expect({ name, found }).toEqual({ name, found: path });
    }
    const params: Record<string, string> = {
      ...(targets as Record<string, string>),
      supervisor_pid: String(process.pid),
      pg_port: String(pgPort),
      coordinator_port: String(coordinatorPort),
    };
    /** Each attack on the rest of the host: a name and a command that succeeds when it got through. */
    const attacks = (signal: string): [string, string][] => [
      // Another job's files, processes and secrets...
      ["alice-work-dir", "ls $TREADMILL_PARAM_alice_work_dir"],
      ["alice-secret-file", "cat $TREADMILL_PARAM_alice_secret_file"],
      ["alice-log-spill", "cat $TREADMILL_PARAM_alice_log_spill"],
      ...alicePids.map((pid): [string, string] => [`environment-${pid}`, `cat /proc/${pid}/environ`]),
      ...alicePids.map((pid): [string, string] => [`signal-${pid}`, `kill -${signal} ${pid}`]),
      // ...the supervisor's credential and sockets...
      ["supervisor-environment", "cat /proc/$TREADMILL_PARAM_supervisor_pid/environ"],
      ["host-credentials", "cat $TREADMILL_PARAM_state_file"],
      ["console-sockets", "ls $TREADMILL_PARAM_console_sockets"],
      ["slot-claims", "ls $TREADMILL_PARAM_slot_claims"],
      // ...the coordinator's database, by its port and by its files...
      ["database-port", "timeout 3 nc 127.0.0.1 $TREADMILL_PARAM_pg_port -e /bin/true"],
      ["coordinator-port", "timeout 3 nc 127.0.0.1 $TREADMILL_PARAM_coordinator_port -e /bin/true"],
      ["database-socket", "ls $TREADMILL_PARAM_pg_dir"],
      ["database-password", "cat $TREADMILL_PARAM_pg_password"],
      ["database-files", "cat $TREADMILL_PARAM_pg_files"],
      // ...the cache's, the store's and the log server's files.
      ["cache-blobs", "ls $TREADMILL_PARAM_cache_blob_dir"],
      ["cache-blob-file", "cat $TREADMILL_PARAM_cache_blob_file"],
      ["store-blob-file", "cat $TREADMILL_PARAM_store_blob_file"],
      ["log-files", "ls $TREADMILL_PARAM_log_files"],
    ];
    const attempt = ([what, command]: [string, string]) => `if ${command} >/dev/null 2>&1; then echo LEAK-${what}; else echo denied-${what}; fi`;

    // Control: from the host, as root, with the same shell, every attack gets through
    // (a probe, not a kill, for alice's processes): each would be seen from the job.
    const control = await execFileAsync("/bin/busybox", ["sh", "-c", attacks("0").map(attempt).join("\n")], {
      env: { PATH: process.env.PATH, ...Object.fromEntries(Object.entries(params).map(([k, v]) => [`TREADMILL_PARAM_${k}`, v])) },
    });
    expect(control.stdout.trim().split("\n")).toEqual(attacks("0").map(([what]) => `LEAK-${what}`));

    // The connection stays open a moment after the command, for the shell's answer to come back.
    const probe = `{ printf 'echo PROBE-$(id -u); cat /run/treadmill/secrets/KEY\\n'; sleep 2; }`;
    const script = [
      "echo mallory-start",
      // Control: nc and this job's own loopback work.
      "nc -ll -p 7000 -e /bin/sh -c 'echo own-listener-answers' &",
      "while ! netstat -ltn | grep -q ':7000 '; do sleep 0.05; done",
      "echo | timeout 3 nc 127.0.0.1 7000",
      // Hole 1, exactly: against every listener of the host.
      "tried=0",
      `for p in $TREADMILL_PARAM_ports4; do tried=$((tried+1)); (${probe} | timeout 4 nc 127.0.0.1 $p 2>/dev/null | head -c 4000 | sed "s/^/port-$p: /") & probes="$probes $!"; done`,
      `for p in $TREADMILL_PARAM_ports6; do tried=$((tried+1)); (${probe} | timeout 4 nc ::1 $p 2>/dev/null | head -c 4000 | sed "s/^/port6-$p: /") & probes="$probes $!"; done`,
      "wait $probes",
      'echo "tried $tried ports"',
      // The rest of the host, from inside.
      ...attacks("KILL").map(attempt),
      // Last, a signal to every process the job may signal: its own only (alice's job runs on, below).
      "kill -KILL -1",
      "echo mallory-done",
      "exec sleep 100000",
    ].join("\n");
    const { job: malloryJob } = await createClient(JobService, mallory).submitJob({
      spec: {
        image: "mallory/sh:1",
        hosts: { hostCount: 1 },
        parameters: [
          { name: "script", value: script },
          { name: "ports4", value: ports4.join(" ") },
          { name: "ports6", value: ports6.join(" ") },
          ...Object.entries(params).map(([name, value]) => ({ name, value })),
        ],
        // Hole 2: exposures naming the site's database, the coordinator and (where it has one) alice's console port.
        exposedPorts: [
          { name: "db", port: pgPort },
          { name: "coordinator", port: coordinatorPort },
          ...(aliceConsolePort === undefined ? [] : [{ name: "alice-console", port: Number(aliceConsolePort) }]),
        ],
      },
    });
    const malloryId = malloryJob!.id;
    await tb.waitState(malloryId, JobState.RUNNING);
    const seen = await consoleSays(malloryId, /mallory-done/, 240000);

    expect(seen).toContain("own-listener-answers");
    expect(seen).toContain(`tried ${ports4.length + ports6.length} ports`);
    expect(seen).not.toMatch(/PROBE-\d/);
    expect(seen).not.toContain(secret);
    expect(seen).not.toMatch(/^port6?-\d+: /m);
    expect(seen).not.toContain("LEAK-");
    for (const [what] of attacks("KILL")) expect(seen).toContain(`denied-${what}`);

    // Through the proxy: each of mallory's exposures is refused by the supervisor.
    const sessions = createClient(JobService, mallory);
    for (const name of ["db", "coordinator", ...(aliceConsolePort === undefined ? [] : ["alice-console"])]) {
      const session = await sessions.openJobSession({ jobId: malloryId, portName: name });
      const err = await dialTunnel({ proxyUrl: session.grpcUrl, token: session.dialToken!.token, jobId: malloryId, port: name, hostId: session.hostId }).then(
        (tunnel) => {
          tunnel.destroy();
          return undefined;
        },
        (e: unknown) => ConnectError.from(e),
      );
      expect({ name, code: err?.code }).toEqual({ name, code: Code.PermissionDenied });
    }
    // And alice's console itself is alice's.
    await expect(sessions.openJobSession({ jobId: aliceId, portName: "console" })).rejects.toMatchObject({ code: Code.PermissionDenied });

    // Alice's job ran on, untouched; nothing typed into her shell.
    expect((await tb.client(JobService).getJob({ jobId: aliceId })).job?.state).toBe(JobState.RUNNING);
    expect(await tb.readLog(aliceId, "console")).not.toContain("PROBE-");
    for (const id of [aliceId, malloryId]) await tb.client(JobService).cancelJob({ jobId: id });
    await Promise.all([aliceId, malloryId].map((id) => tb.waitFinalized(id)));
    expect(tb.logLines.join("\n")).not.toContain(secret);
  }, 360000);

  it("reports a job whose sandbox was killed from outside (every process of its slot's uid) as an infrastructure failure, not its workload's", async () => {
    const { job } = await createClient(JobService, alice).submitJob({
      spec: { image: "alice/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: "echo up; exec sleep 100000" }] },
    });
    const id = job!.id;
    await tb.waitState(id, JobState.RUNNING);
    await consoleSays(id, /up/);
    const { uid } = await whereRuns(id);
    signalAll(
      (await processesOfUid(uid)).map((p) => p.pid),
      "SIGKILL",
    );
    const done = await tb.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.INTERNAL_ERROR);
    expect(done.reasonClass).toBe(ReasonClass.INFRASTRUCTURE);
    expect(done.statusMessage).toMatch(/killed by SIGKILL, from outside the job/);
  }, 120000);
});
