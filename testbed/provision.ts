import { randomBytes } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind } from "../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../gen/treadmill/coordinator/v1/image_service_pb.js";
import { coordinatorTransport } from "../lib/coordinator-client.js";
import { pushImage } from "../lib/image-push.js";
import type { Logger } from "../lib/logger.js";
import { sleep } from "../lib/retry.js";
import { buildBusyboxImage } from "./images.js";

/**
 * What the testbed keeps between starts, in `<dataDir>/testbed.json` (mode
 * 0600: it holds credentials). The admin password is made at the first start
 * and is also written, alone, to `<dataDir>/admin-password` for a newcomer.
 */
export interface TestbedState {
  adminPassword: string;
  serviceCredential?: string;
  hosts: Record<string, { id: string; credential: string }>;
  examples?: string[];
}

export const ADMIN_NAME = "admin";

/** Reads the state, or makes a new one with a random admin password. */
export async function loadState(dataDir: string): Promise<TestbedState> {
  await mkdir(dataDir, { recursive: true, mode: 0o755 });
  try {
    return JSON.parse(await readFile(join(dataDir, "testbed.json"), "utf8")) as TestbedState;
  } catch {
    const state: TestbedState = { adminPassword: randomBytes(18).toString("base64url"), hosts: {} };
    await saveState(dataDir, state);
    return state;
  }
}

export async function saveState(dataDir: string, state: TestbedState): Promise<void> {
  await writeFile(join(dataDir, "testbed.json"), `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 });
  // The password alone, for `tml login --user admin --password-stdin < FILE`.
  await writeFile(join(dataDir, "admin-password"), `${state.adminPassword}\n`, { mode: 0o600 });
}

/** Logs in as the testbed's admin and returns a transport carrying the token. */
export async function adminTransport(coordinatorUrl: string, state: TestbedState): Promise<Transport> {
  const login = await createClient(AuthService, coordinatorTransport(coordinatorUrl)).login({
    name: ADMIN_NAME,
    password: state.adminPassword,
    description: "npm start",
  });
  return coordinatorTransport(coordinatorUrl, login.token);
}

/** A service credential for the testbed's stores, log server and proxy (made once, kept). */
export async function ensureServiceCredential(admin: Transport, state: TestbedState): Promise<string> {
  const auth = createClient(AuthService, admin);
  if (state.serviceCredential) {
    const mine = await auth.listTokens({});
    // The credential is still valid if one of the admin's service tokens is live.
    if (mine.tokens.some((t) => t.scope === TokenScope.SERVICE && !t.revokeTime)) return state.serviceCredential;
  }
  const created = await auth.createToken({ scope: TokenScope.SERVICE, description: "npm start services" });
  state.serviceCredential = created.token;
  return created.token;
}

/** Creates the testbed's process hosts (or gives them new credentials when the saved ones are gone). */
export async function ensureHosts(
  admin: Transport,
  state: TestbedState,
  names: string[],
): Promise<Record<string, { id: string; credential: string }>> {
  const hosts = createClient(HostService, admin);
  for (const name of names) {
    const saved = state.hosts[name];
    const existing = await hosts.getHost({ host: { case: "name", value: name } }).catch((err: unknown) => {
      if (ConnectError.from(err).code === Code.NotFound) return undefined;
      throw err;
    });
    if (existing?.host && saved?.id === existing.host.id) continue;
    if (existing?.host) {
      const rotated = await hosts.updateHost({ hostId: existing.host.id, rotateCredential: true });
      state.hosts[name] = { id: existing.host.id, credential: rotated.credential ?? "" };
      continue;
    }
    const created = await hosts.createHost({
      name,
      tags: { arch: process.arch === "x64" ? "x86_64" : process.arch, driver: "process" },
      site: "local",
      driverKind: DriverKind.PROCESS,
      mediaTypes: ["application/vnd.treadmill.rootfs.tar+gzip"],
      capacity: 1,
    });
    state.hosts[name] = { id: created.host!.id, credential: created.credential };
  }
  return state.hosts;
}

/**
 * Pushes the example images that are not in the catalog yet (at the first
 * start): `example/hello` greets and shows its parameters; `example/shell`
 * is an interactive shell for `tml console`. Waits for the image store to
 * have registered with the coordinator (it does so at its start).
 */
export async function ensureExamples(
  admin: Transport,
  state: TestbedState,
  options: { workDir: string; logger: Logger; signal?: AbortSignal },
): Promise<void> {
  const catalog = createClient(ImageService, admin);
  for (const example of EXAMPLES) {
    const have = await catalog.resolveImage({ reference: example.ref }).then(
      () => true,
      () => false,
    );
    if (have) continue;
    const image = await buildBusyboxImage({ dir: options.workDir, title: example.title, entrypoint: example.entrypoint });
    const [name, tag] = example.ref.split(":");
    const deadline = Date.now() + 20000;
    for (;;) {
      try {
        await pushImage(
          admin,
          {
            manifestDigest: image.manifestDigest,
            manifestJson: image.manifestJson,
            blobs: image.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
            mediaTypes: image.layers.map((l) => l.mediaType),
          },
          { name, tag, signal: options.signal },
        );
        break;
      } catch (err) {
        // No image store registered yet: it registers right after its start.
        const code = ConnectError.from(err).code;
        if ((code !== Code.FailedPrecondition && code !== Code.Unavailable) || Date.now() > deadline) throw err;
        await sleep(100, options.signal);
      }
    }
    options.logger.info({ image: example.ref }, "example image pushed");
  }
  state.examples = EXAMPLES.map((e) => e.ref);
}

/** The example images of a new testbed: busybox root file systems. */
const EXAMPLES = [
  {
    ref: "example/hello:latest",
    title: "hello",
    // Greets, and shows the job's (non-secret) parameters.
    entrypoint: ["/bin/sh", "-c", 'echo "hello from treadmill on $(hostname)"; env | grep ^TREADMILL_PARAM_ | grep -v SECRET || true'],
  },
  {
    ref: "example/shell:latest",
    title: "shell",
    // An interactive shell on the job's console, for `tml console`.
    entrypoint: ["/bin/sh", "-i"],
  },
];
