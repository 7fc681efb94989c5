import { spawn } from "node:child_process";
import { connect } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { TML, startTml, tml } from "./harness.js";
import { freePort } from "../support/net.js";


describe("tml console and port-forward on the all-in-one testbed", () => {
  let tb: RunningTestbed;
  let config: string;
  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 2 });
    await tb.pushShellImage("test/echo:1");
    config = join(tb.dir, "tml.json");
    const login = await tml(config, ["login", tb.coordinatorUrl, "--user", "admin", "--password-stdin"], {
      input: `${tb.testbed.admin().password}\n`,
    });
    expect(login.code).toBe(0);
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
  }, 60000);

  it("opens a job's console in a pseudo-terminal: keys go in, the screen shows the answer, ~. leaves", async () => {
    const run = await tml(config, ["job", "run", "--detach", "example/shell"]);
    expect(run.code).toBe(0);
    const jobId = run.stdout.trim();
    await tb.waitState(jobId, JobState.RUNNING);
    // `script` gives tml a real terminal, as a person's shell would.
    const term = spawn("script", ["-qfec", `${process.execPath} ${TML} console ${jobId}`, "/dev/null"], {
      env: { ...process.env, TML_CONFIG: config, NO_COLOR: "1", TML_SERVER: "", TML_TOKEN: "" },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let screen = "";
    const saw = (text: string) =>
      new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`never saw ${text}; screen:\n${screen}`)), 30000);
        const check = () => {
          if (screen.includes(text)) {
            clearTimeout(timer);
            term.stdout!.off("data", check);
            resolve();
          }
        };
        term.stdout!.on("data", check);
        check();
      });
    term.stdout!.on("data", (d: Buffer) => (screen += d.toString()));
    const exited = new Promise<number | null>((resolve) => term.once("exit", (code) => resolve(code)));
    await saw("Connected to the console");
    term.stdin!.write("echo answer-$((6*7))\r");
    await saw("answer-42");
    term.stdin!.write("\r~.");
    expect(await exited).toBe(0);
    expect(screen).toContain("Console closed");
    // Leaving says that the job still holds its host, and how to end it.
    expect(screen).toMatch(new RegExp(`Job ${jobId} is still running: .*End it with: tml job cancel ${jobId}`));
    // Leaving the console leaves the job running; end its shell from a new one.
    await tml(config, ["console", jobId], { input: "exit\n" });
    const done = await tb.waitFinalized(jobId);
    expect(done.state).toBe(JobState.FINALIZED);
  }, 90000);

  it("sends piped input to the console and prints the answer until the console is quiet, leaving the job running", async () => {
    const run = await tml(config, ["job", "run", "--detach", "example/shell"]);
    const jobId = run.stdout.trim();
    await tb.waitState(jobId, JobState.RUNNING);
    const piped = await tml(config, ["console", jobId, "--linger", "1s"], { input: "echo piped-$((6*7))\n" });
    expect(piped.code).toBe(0);
    expect(piped.stdout).toContain("piped-42");
    expect(piped.stderr).toMatch(new RegExp(`Job ${jobId} is still running`));
    const bad = await tml(config, ["console", jobId, "--linger", "soon"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/linger/);
    await tml(config, ["console", jobId], { input: "exit\n" });
    expect((await tb.waitFinalized(jobId)).state).toBe(JobState.FINALIZED);
  }, 90000);

  it("forwards a local port to a port the job exposes, for a plain TCP client", async () => {
    const jobPort = await freePort();
    const run = await tml(config, [
      "job",
      "run",
      "--detach",
      "test/echo:1",
      "--expose",
      `echo=${jobPort}`,
      "--param",
      `script=exec nc -ll -p ${jobPort} -e cat`,
    ]);
    if (run.code !== 0) throw new Error(`job run failed: ${run.stderr}`);
    const jobId = run.stdout.trim();
    await tb.waitState(jobId, JobState.RUNNING);
    const local = await freePort();
    const forward = startTml(config, ["port-forward", jobId, "echo", String(local)]);
    await forward.waitForLine(/Forwarding/);
    // The job's nc may take a moment to listen: retry the connection.
    const echoed = await (async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          return await new Promise<string>((resolve, reject) => {
            const socket = connect(local, "127.0.0.1");
            let got = "";
            socket.on("data", (d: Buffer) => {
              got += d.toString();
              if (got.includes("ping-through-the-proxy")) {
                socket.destroy();
                resolve(got);
              }
            });
            socket.on("error", reject);
            socket.on("close", () => reject(new Error(`closed after ${JSON.stringify(got)}`)));
            socket.write("ping-through-the-proxy\n");
          });
        } catch (err) {
          if (attempt > 20) throw err;
          await new Promise((resolve) => setTimeout(resolve, 250));
        }
      }
    })();
    expect(echoed).toContain("ping-through-the-proxy");
    forward.interrupt();
    expect((await forward.result).code).toBe(0);
    await tml(config, ["job", "cancel", jobId]);
  }, 90000);
});
