import { randomBytes } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind } from "../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../gen/treadmill/coordinator/v1/image_service_pb.js";
import { coordinatorTransport } from "../lib/coordinator-client.js";
import { pushImage } from "../lib/image/push.js";
import type { Logger } from "../lib/logger.js";
import { retry } from "../lib/retry.js";
import { mediaTypesOfDriver } from "../lib/image/media-types.js";
import { buildBusyboxImage, buildFirmwareImage, type TestImage } from "./images.js";

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
export async function adminTransport(coordinatorUrl: string | readonly string[], state: TestbedState): Promise<Transport> {
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

/** A host of the testbed, as CreateHost takes it. */
export interface TestbedHost {
  name: string;
  driverKind: DriverKind;
  mediaTypes: string[];
  tags: Record<string, string>;
}

/** Creates the testbed's hosts (or gives them new credentials when the saved ones are gone). */
export async function ensureHosts(
  admin: Transport,
  state: TestbedState,
  wanted: TestbedHost[],
): Promise<Record<string, { id: string; credential: string }>> {
  const hosts = createClient(HostService, admin);
  for (const spec of wanted) {
    const saved = state.hosts[spec.name];
    const existing = await hosts.getHost({ host: { case: "name", value: spec.name } }).catch((err: unknown) => {
      if (ConnectError.from(err).code === Code.NotFound) return undefined;
      throw err;
    });
    if (existing?.host && saved?.id === existing.host.id) continue;
    if (existing?.host) {
      const rotated = await hosts.updateHost({ hostId: existing.host.id, rotateCredential: true });
      state.hosts[spec.name] = { id: existing.host.id, credential: rotated.credential ?? "" };
      continue;
    }
    const created = await hosts.createHost({ ...spec, site: "local", capacity: 1 });
    state.hosts[spec.name] = { id: created.host!.id, credential: created.credential };
  }
  return state.hosts;
}

/** A process host of the testbed. */
export function processHost(name: string): TestbedHost {
  return {
    name,
    driverKind: DriverKind.PROCESS,
    mediaTypes: mediaTypesOfDriver("process"),
    tags: { arch: process.arch === "x64" ? "x86_64" : process.arch, driver: "process" },
  };
}

/** A simulated board of the testbed. */
export function boardHost(name: string): TestbedHost {
  return { name, driverKind: DriverKind.BOARD, mediaTypes: mediaTypesOfDriver("board"), tags: { board: "sim", driver: "board" } };
}

/** A board-driver host of the testbed whose simulated board fails now and then (`--flaky-boards`). */
export function flakyBoardHost(name: string): TestbedHost {
  return { ...boardHost(name), tags: { board: "flaky", driver: "board" } };
}

/** A qemu-driver host of the testbed. */
export function vmHost(name: string): TestbedHost {
  return {
    name,
    driverKind: DriverKind.QEMU,
    mediaTypes: mediaTypesOfDriver("qemu", { boot: true }),
    tags: { arch: "x86_64", driver: "qemu" },
  };
}

/** Pushes a built image (testbed/images.ts) as `name:tag` (tag `latest` when `ref` has none). */
export async function pushTestImage(admin: Transport, image: TestImage, ref: string, signal?: AbortSignal): Promise<void> {
  const [name, tag] = ref.split(":");
  await pushImage(
    admin,
    {
      manifestDigest: image.manifestDigest,
      manifestJson: image.manifestJson,
      blobs: image.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
      mediaTypes: image.layers.map((l) => l.mediaType),
    },
    { name: name!, tag: tag ?? "latest", signal },
  );
}

/**
 * Pushes the example images that are not in the catalog yet (at the first
 * start): `example/hello` greets and shows its parameters; `example/shell`
 * is an interactive shell for `tml console`; `example/blinky` is firmware
 * for the simulated board. Waits for the image store to
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
    const image = await example.build(options.workDir);
    const deadline = Date.now() + 20000;
    await retry(() => pushTestImage(admin, image, example.ref, options.signal), {
      initialMs: 100,
      maxMs: 100,
      jitter: "none",
      signal: options.signal,
      // No image store registered yet (FailedPrecondition): it registers right after its start.
      isRetryable: (err) => {
        const code = ConnectError.from(err).code;
        return (code === Code.FailedPrecondition || code === Code.Unavailable) && Date.now() <= deadline;
      },
    });
    options.logger.info({ image: example.ref }, "example image pushed");
  }
  state.examples = EXAMPLES.map((e) => e.ref);
}

/** The example images of a new testbed. */
const EXAMPLES: { ref: string; build: (dir: string) => Promise<TestImage> }[] = [
  {
    ref: "example/hello:latest",
    // Greets, and shows the job's (non-secret) parameters.
    build: (dir) =>
      buildBusyboxImage({
        dir,
        title: "hello",
        entrypoint: ["/bin/sh", "-c", 'echo "hello from treadmill on $(hostname)"; env | grep ^TREADMILL_PARAM_ | grep -v SECRET || true'],
      }),
  },
  {
    ref: "example/shell:latest",
    // An interactive shell on the job's console, for `tml console`.
    build: (dir) => buildBusyboxImage({ dir, title: "shell", entrypoint: ["/bin/sh", "-i"] }),
  },
  {
    ref: "example/blinky:latest",
    // Firmware for the simulated board: its output appears on the serial
    // console, and the exit pattern ends the job.
    build: (dir) =>
      buildFirmwareImage({
        dir,
        title: "blinky",
        script: 'echo "blinky booted"\nfor i in 1 2 3; do echo "blink $i"; sleep 0.2; done\necho TREADMILL_EXIT=0\n',
      }),
  },
];
