import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

/** A self-signed certificate (for 127.0.0.1 and localhost unless told), PEM. */
export interface TestCertificate {
  cert: Buffer;
  key: Buffer;
}

/** Generates a fresh self-signed ed25519 certificate with openssl in a temp dir, for `names` (a subjectAltName). */
export async function createTestCertificate(names = "IP:127.0.0.1,DNS:localhost"): Promise<TestCertificate> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-tls-"));
  try {
    const cert = join(dir, "cert.pem");
    const key = join(dir, "key.pem");
    await promisify(execFile)("openssl", [
      "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "1",
      "-subj", "/CN=localhost",
      "-addext", `subjectAltName=${names}`,
      "-keyout", key, "-out", cert,
    ]);
    return { cert: await readFile(cert), key: await readFile(key) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
