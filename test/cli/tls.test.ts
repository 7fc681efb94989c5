/**
 * `tml` against a coordinator that serves TLS with a certificate of the
 * lab's own CA (issue #20): refused with a clear message until the CA is
 * given, then `tml login --ca-file` keeps it in the context, which later
 * commands verify the server with.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { createTestCertificate } from "../support/tls.js";
import { tml } from "./harness.js";

const PASSWORD = "a-long-admin-password";
let dir: string;
let coordinator: TestCoordinator;
let caFile: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "tml-tls-"));
  const certificate = await createTestCertificate();
  caFile = join(dir, "lab-ca.pem");
  await writeFile(caFile, certificate.cert);
  await writeFile(join(dir, "key.pem"), certificate.key);
  coordinator = await startTestCoordinator({
    config: { adminPassword: PASSWORD, host: "127.0.0.1", tlsCertFile: caFile, tlsKeyFile: join(dir, "key.pem") },
    logServer: false,
  });
});

afterAll(async () => {
  await coordinator?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("tml over TLS", () => {
  it("refuses a certificate it cannot verify, naming --ca-file, then keeps the CA of the login in the context", async () => {
    expect(coordinator.url).toMatch(/^https:/);
    const config = join(dir, "tml.json");
    const login = (extra: string[]) => tml(config, ["login", coordinator.url, "--user", "admin", "--password-stdin", ...extra], { input: `${PASSWORD}\n` });

    const refused = await login([]);
    expect(refused.code).toBe(3);
    expect(refused.stderr).toMatch(/presented a certificate this machine does not trust \(self[- ]signed certificate\).*--ca-file/);

    const missing = await login(["--ca-file", join(dir, "nope.pem")]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain(`Cannot read the CA file ${join(dir, "nope.pem")}`);

    expect((await login(["--ca-file", caFile])).code).toBe(0);
    const saved = JSON.parse(await readFile(config, "utf8")) as { contexts: Record<string, { caFile?: string }> };
    expect(Object.values(saved.contexts).map((c) => c.caFile)).toEqual([caFile]);
    const whoami = await tml(config, ["whoami"]);
    expect({ code: whoami.code, stdout: whoami.stdout }).toEqual({ code: 0, stdout: expect.stringContaining("admin") });
  });
});
