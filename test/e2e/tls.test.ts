/**
 * TLS on every link (issue #20 item 2), on real sockets: a site CA and a
 * server certificate made by docs/tls.md's own openssl blocks; a
 * coordinator, an image store, a site cache, a log server and a proxy that
 * all serve TLS with it (in this process); a process supervisor (a child
 * process) and `tml` that trust the CA only through `--ca-file`. A job's
 * image comes through the cache, its log back from the log server and its
 * console through the proxy; a supervisor without `--ca-file` is refused
 * with a message that names the certificate and the flag.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, type Transport } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { RegistryService } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { loadClientTls } from "../../lib/grpc/trust.js";
import { silentLogger } from "../../lib/logger.js";
import { loadProxyConfig } from "../../proxy/config.js";
import { createProxy } from "../../proxy/proxy.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore, type ImageStoreComponent } from "../../stores/image/image-store.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { processHost } from "../../testbed/provision.js";
import { startTml, tml } from "../cli/harness.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";
import { freePort } from "../support/net.js";
import { startProcess, type RunningProcess } from "../support/process.js";
import { jobTools, type JobTools } from "../support/testbed.js";
import { waitUntil } from "../support/wait.js";

const TLS_DOC = fileURLToPath(new URL("../../docs/tls.md", import.meta.url));
const PASSWORD = "a-long-admin-password";
const SITE = "lab";
const noInput = { env: {}, argv: [] };

let dir: string;
let pki: string;
let caFile: string;
let coordinator: TestCoordinator;
let admin: Transport;
let tools: JobTools;
let cache: ImageStoreComponent;
const servers: ServingComponent[] = [];
const children: RunningProcess[] = [];

/** Runs one `sh step=NAME` block of docs/tls.md with its variables set for this test. */
async function docStep(name: string, vars: Record<string, string>): Promise<string> {
  const block = docBlock(await docBlocks(TLS_DOC), TLS_DOC, "step", name);
  const result = await runBash(block.text, { cwd: dir, env: { PATH: process.env.PATH, ...vars } });
  if (result.code !== 0) throw new Error(`docs/tls.md step=${name} failed (${result.code}): ${result.stderr}`);
  return result.stdout;
}

/** A supervisor child for a new host of the site, with `args` besides the coordinator and the host. */
async function startSupervisor(name: string, args: string[]): Promise<RunningProcess> {
  const created = await createClient(HostService, admin).createHost({ ...processHost(name), site: SITE, capacity: 1 });
  const proc = startProcess(
    "bin/treadmill-supervisor.js",
    ["--coordinator-url", coordinator.url, "--name", name, "--work-dir", join(dir, name), "--reconnect-max-ms", "1000", ...args],
    { TREADMILL_SUPERVISOR_HOST_CREDENTIAL: created.credential },
  );
  children.push(proc);
  return proc;
}

/** What a TCP echo at `port` sends back for `text`, or false when the connection fails or closes first. */
function echoOnce(port: number, text: string): Promise<string | false> {
  return new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    let got = "";
    socket.on("data", (d: Buffer) => {
      got += d.toString();
      if (got.includes(text)) {
        socket.destroy();
        resolve(got);
      }
    });
    socket.on("error", () => resolve(false));
    socket.on("close", () => resolve(false));
    socket.write(`${text}\n`);
  });
}

beforeAll(async () => {
  // Trust comes from --ca-file alone: verification is on, and a NODE_EXTRA_CA_CERTS
  // of the machine's cannot hold the CA made below.
  expect(process.env.NODE_TLS_REJECT_UNAUTHORIZED).toBeUndefined();
  dir = await mkdtemp(join(tmpdir(), "treadmill-tls-"));
  await chmod(dir, 0o755); // job slot uids must reach the supervisor's work directory
  pki = join(dir, "pki");
  await docStep("ca", { PKI: pki, LAB: "test-lab" });
  const server = { PKI: pki, LAB: "test-lab", SERVER: "site", SERVER_NAMES: "DNS:localhost,IP:127.0.0.1" };
  await docStep("server-cert", server);
  expect(await docStep("check", server)).toContain("IP Address:127.0.0.1");
  caFile = join(pki, "ca.crt");
  const served = { host: "127.0.0.1", tlsCertFile: join(pki, "site.crt"), tlsKeyFile: join(pki, "site.key") };

  coordinator = await startTestCoordinator({ config: { ...served, adminPassword: PASSWORD }, logServer: false });
  expect(coordinator.url).toMatch(/^https:/);
  const trust = loadClientTls(caFile);
  const login = await createClient(AuthService, coordinatorTransport(coordinator.url, "", trust)).login({ name: "admin", password: PASSWORD });
  admin = coordinatorTransport(coordinator.url, login.token, trust);
  tools = jobTools(admin, join(dir, "images"), trust);
  const serviceCredential = (await createClient(AuthService, admin).createToken({ scope: TokenScope.SERVICE })).token;

  const registered = { ...served, port: 0, coordinatorUrl: [coordinator.url], serviceCredential, site: SITE, caFile };
  cache = createImageStore({
    config: { ...loadImageStoreConfig(noInput), ...registered, mode: "cache", dataDir: join(dir, "cache"), sharedPath: join(dir, "cache") },
    logger: silentLogger(),
  });
  servers.push(
    createImageStore({ config: { ...loadImageStoreConfig(noInput), ...registered, mode: "store", dataDir: join(dir, "store") }, logger: silentLogger() }),
    cache,
    createLogServer({ config: { ...loadLogServerConfig(noInput), ...registered, dataDir: join(dir, "logs") }, logger: silentLogger() }),
    createProxy({ config: { ...loadProxyConfig(noInput), ...registered }, logger: silentLogger() }),
  );
  await Promise.all(servers.map((s) => s.start()));
  // Each registered over TLS, verifying the coordinator with its --ca-file.
  const registry = createClient(RegistryService, admin);
  const urls = await waitUntil(async () => {
    const { services } = await registry.listServices({});
    return services.length === servers.length && services.map((s) => s.url);
  }, "every server registered");
  expect(urls.every((u) => u.startsWith("https://127.0.0.1:"))).toBe(true);
}, 60_000);

afterAll(async () => {
  for (const c of children) c.child.kill("SIGTERM");
  await Promise.all(children.map((c) => c.exited));
  await Promise.all(servers.map((s) => s.stop()));
  await coordinator?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
}, 60_000);

describe("TLS on every link, with the lab's CA given by --ca-file", () => {
  it("runs a job end to end: image through the cache, log from the log server, a port forwarded through the proxy with tml", async () => {
    const supervisor = await startSupervisor("sup-tls", ["--ca-file", caFile]);
    await supervisor.waitForLine(/"attached to coordinator"/, 30_000);
    await tools.pushShellImage("tls/shell:1");

    const config = join(dir, "tml.json");
    const login = await tml(config, ["login", coordinator.url, "--user", "admin", "--password-stdin", "--ca-file", caFile], { input: `${PASSWORD}\n` });
    expect(login.code).toBe(0);
    const jobPort = await freePort();
    const script = `script=echo hello-over-tls; exec nc -ll -p ${jobPort} -e cat`;
    const run = await tml(config, ["job", "run", "--detach", "tls/shell:1", "--expose", `echo=${jobPort}`, "--param", script]);
    if (run.code !== 0) throw new Error(`job run failed: ${run.stderr}`);
    const jobId = run.stdout.trim();
    await tools.waitState(jobId, JobState.RUNNING, 60_000);

    // A plain TCP client through tml's forwarded port, the proxy and the supervisor's tunnel, all TLS but the ends.
    const local = await freePort();
    const forward = startTml(config, ["port-forward", jobId, "echo", String(local)]);
    try {
      await forward.waitForLine(/Forwarding/);
      // The job's nc may take a moment to listen.
      const echoed = await waitUntil(() => echoOnce(local, "ping-through-the-proxy"), "an echo through the forwarded port", 30_000);
      expect(echoed).toContain("ping-through-the-proxy");
    } finally {
      forward.interrupt();
    }
    expect((await forward.result).code).toBe(0);
    expect((await tml(config, ["job", "cancel", jobId])).code).toBe(0);
    await tools.waitFinalized(jobId, 30_000);

    const logs = await tml(config, ["job", "logs", jobId]);
    expect({ code: logs.code, stdout: logs.stdout }).toEqual({ code: 0, stdout: expect.stringContaining("hello-over-tls") });
    // The cache fetched the image from the store (both over TLS) for the supervisor.
    const { image } = await createClient(ImageService, admin).resolveImage({ reference: "tls/shell:1" });
    expect(cache.blobs.getManifestRecord(image!.manifestDigest)).toBeDefined();
  }, 120_000);

  it("refuses the coordinator's certificate without --ca-file, naming the certificate and the flag, and stops at a bad --ca-file", async () => {
    const untrusting = await startSupervisor("sup-untrusting", []);
    const line = JSON.parse(await untrusting.waitForLine(/"cannot attach to coordinator"/, 30_000)) as { reason: string };
    expect(line.reason).toBe(
      `the server at ${new URL(coordinator.url).host} presented a certificate "O=test-lab, CN=site" issued by "O=test-lab, CN=test-lab Treadmill CA" ` +
        "that this machine does not trust (unable to verify the first certificate): give the CA that signed it with --ca-file (docs/tls.md)",
    );

    const missing = await startSupervisor("sup-missing-ca", ["--ca-file", join(dir, "nope.pem")]);
    expect(await missing.exited).toBe(2);
    expect(missing.lines.join("\n")).toContain(`--ca-file ${join(dir, "nope.pem")} cannot be read (ENOENT)`);
    const notPem = await startSupervisor("sup-not-pem", ["--ca-file", join(pki, "site.key")]);
    expect(await notPem.exited).toBe(2);
    expect(notPem.lines.join("\n")).toContain(`--ca-file ${join(pki, "site.key")} holds no PEM certificate`);
  }, 60_000);
});
