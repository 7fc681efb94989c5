/**
 * docs/events.md's subscriptions part as it is written: its command blocks
 * run with bash against a coordinator (with an SMTP server started here),
 * its Node receiver runs as a process and must verify real deliveries and
 * refuse a forged request, and its Python check must accept a real
 * delivery and reject the same delivery with its body or signature changed.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { spawn, type ChildProcess } from "node:child_process";
import { createServer, connect, type AddressInfo } from "node:net";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SMTPServer } from "smtp-server";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { SubscriptionService } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { Notifier } from "../../lib/async/notifier.js";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";
import { WebhookReceiver } from "../support/webhook-receiver.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "events.md");

let c: TestCoordinator;
let smtp: SMTPServer;
let dir: string;
let bins: string;
let blocks: DocBlock[];
let user: { id: string; token: string };
let image: string;
let webhookUrl: string;
const mails: string[] = [];
const mailed = new Notifier();
const children: ChildProcess[] = [];

const text = (name: string) => docBlock(blocks, GUIDE, "subs", name).text;

function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: join(dir, "tml.json"), NO_COLOR: "1", TML_SERVER: c.url, TML_TOKEN: user.token, WEBHOOK_URL: webhookUrl, ...extra };
}

async function run(name: string, extra: Record<string, string> = {}) {
  const r = await runBash(`set -eo pipefail\n${text(name)}`, { cwd: dir, env: env(extra) });
  if (r.code !== 0) throw new Error(`block ${name} exited ${r.code}: ${r.stderr}`);
  return r;
}

/** A port free now (the receiver binds it next). */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const { port } = s.address() as AddressInfo;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

describe("docs/events.md: subscriptions", () => {
  beforeAll(async () => {
    smtp = new SMTPServer({
      authOptional: true,
      disabledCommands: ["STARTTLS"],
      logger: false,
      onData(stream, _session, callback) {
        const chunks: Buffer[] = [];
        stream.on("data", (b: Buffer) => chunks.push(b));
        stream.on("end", () => {
          mails.push(Buffer.concat(chunks).toString("utf8").replace(/\r?\n[ \t]+/g, " "));
          mailed.notify();
          callback();
        });
      },
    });
    await new Promise<void>((resolve) => smtp.listen(0, "127.0.0.1", resolve));
    c = await startTestCoordinator({
      config: {
        ...FAST,
        smtpUrl: `smtp://127.0.0.1:${(smtp.server.address() as AddressInfo).port}`,
        subscriptionLeaderPollMs: 100,
        subscriptionRetryInitialMs: 50,
      },
    });
    user = await c.createUser();
    image = (await insertImage(c.sql)).ref;
    blocks = await docBlocks(GUIDE);
    dir = await mkdtemp(join(tmpdir(), "tml-subs-"));
    bins = join(dir, "bin");
    await mkdir(bins);
    await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  });
  afterAll(async () => {
    for (const child of children) child.kill("SIGKILL");
    await c?.stop();
    await new Promise<void>((resolve) => smtp.close(() => resolve()));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("creates a subscription whose deliveries the guide's Node receiver verifies, refuses a forged request, and lists, tests, redelivers and deletes as shown", async () => {
    const port = await freePort();
    webhookUrl = `http://127.0.0.1:${port}/`;
    const created = await run("create");
    const sub = /^ID: +(\S+)$/m.exec(created.stdout)![1];
    const secret = /^Secret: +(whsec_\S+)$/m.exec(created.stdout)![1];
    expect(created.stdout).toMatch(/^Filter: +labels project=tock, state=finalized$/m);
    expect(created.stderr).toMatch(/Keep the secret/);

    await writeFile(join(dir, "receiver.mjs"), docBlock(blocks, GUIDE, "verify", "node").text);
    const receiver = spawn(process.execPath, ["receiver.mjs"], { cwd: dir, env: { ...process.env, WEBHOOK_SECRET: secret, PORT: String(port) }, stdio: ["ignore", "pipe", "inherit"] });
    children.push(receiver);
    let out = "";
    const printed = new Notifier();
    receiver.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      printed.notify();
    });
    const lines = (pattern: RegExp, n = 1) =>
      printed.until(() => out.split("\n").filter((l) => pattern.test(l)).length >= n, 20_000, () => new Error(`the receiver printed:\n${out}`));
    await waitUntil(
      () =>
        new Promise<boolean>((resolve) => {
          const s = connect(port, "127.0.0.1", () => {
            s.end();
            resolve(true);
          }).on("error", () => resolve(false));
        }),
      "the guide's receiver to listen",
    );

    // A matching event: a job labelled project=tock reaching finalized (the queued event does not match).
    const jobs = c.client(JobService, user.token);
    const { job } = await jobs.submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: { project: "tock" } } });
    await jobs.cancelJob({ jobId: job!.id });
    await lines(/^verified [0-9a-f-]{36} job\.state$/);

    const tested = await run("test", { SUB: sub });
    expect(tested.stdout).toMatch(/subscription\.test/);
    await lines(/^verified [0-9a-f-]{36} subscription\.test$/);

    const forged = await run("forge");
    expect(forged.stdout).toBe("401\n");
    await lines(/^refused a forged request$/);

    const log = await waitUntil(async () => {
      const r = await run("deliveries", { SUB: sub });
      return (r.stdout.match(/ delivered /g) ?? []).length === 2 && r;
    }, "two deliveries delivered in the log");
    expect(log.stdout.split("\n")[0]).toMatch(/^ID +EVENT +KIND +STATE +ATTEMPTS +CODE +QUEUED +ERROR$/);
    const delivery = /^([0-9a-f-]{36}) +\d+ +job\.state +delivered +1 +204 /m.exec(log.stdout)![1];
    const redelivered = await run("redeliver", { SUB: sub, DELIVERY: delivery });
    // As queued, or already sent: the worker is woken by the redelivery's commit.
    expect(redelivered.stdout).toMatch(/job\.state +(pending|delivered)/);
    await lines(/^verified [0-9a-f-]{36} job\.state$/, 2);

    const listed = await run("list");
    expect(listed.stdout).toMatch(new RegExp(`^${sub} +ci-results +enabled +${webhookUrl.replace(/[./]/g, "\\$&")} +labels project=tock, state=finalized$`, "m"));
    const managed = await run("manage", { SUB: sub });
    expect(managed.stdout).toMatch(new RegExp(`Subscription ${sub} disabled\\.\\nSubscription ${sub} enabled\\.`));
    await run("delete", { SUB: sub });
    const after = await run("list");
    expect(after.stdout).toBe("");
  }, 120_000);

  it("accepts a real delivery with the guide's Python check and rejects it with its body or signature changed", async () => {
    const r = await WebhookReceiver.start();
    try {
      const { subscription, secret } = await c.client(SubscriptionService, user.token).createSubscription({
        name: "python",
        filter: { labels: uniqueTag() },
        destinations: [{ target: { case: "webhook", value: { url: r.url } } }],
      });
      await c.client(SubscriptionService, user.token).testSubscription({ id: subscription!.id });
      const [got] = await r.until((rs) => rs.length === 1 && rs);
      const headers = {
        "X-Treadmill-Timestamp": String(got.headers["x-treadmill-timestamp"]),
        "X-Treadmill-Signature-256": String(got.headers["x-treadmill-signature-256"]),
      };
      await writeFile(join(dir, "verify.py"), docBlock(blocks, GUIDE, "verify", "python").text);
      await writeFile(join(dir, "delivery.json"), JSON.stringify({ secret, headers, body: got.body }));
      const check = `
import json
from verify import verify
d = json.load(open("delivery.json"))
body = d["body"].encode()
forged_body = body.replace(b"subscription.test", b"subscription.tesT")
forged_sig = dict(d["headers"], **{"X-Treadmill-Signature-256": "sha256=" + "0" * 64})
print(verify(d["secret"], d["headers"], body), verify(d["secret"], d["headers"], forged_body), verify(d["secret"], forged_sig, body), verify("whsec_other", d["headers"], body))
`;
      const py = await runBash(`python3 -c '${check}'`, { cwd: dir, env: process.env });
      expect(py).toMatchObject({ code: 0, stdout: "True False False False\n" });
    } finally {
      await r.close();
    }
  });

  it("creates the guide's email subscriptions, and a test of one reaches the smtp server", async () => {
    const r = await run("email");
    const ids = [...r.stdout.matchAll(/^ID: +(\S+)$/gm)].map((m) => m[1]);
    expect(ids).toHaveLength(2);
    expect(r.stdout).toMatch(/email me@example\.org$/m);
    expect(r.stdout).toMatch(/email team@example\.org \(digest\)$/m);
    await c.client(SubscriptionService, user.token).testSubscription({ id: ids[0] });
    await mailed.until(() => mails.some((m) => /^Subject: \[treadmill\] nightly: subscription\.test/m.test(m)), 15_000, () => new Error(`mails: ${mails.length}`));
  });
});
