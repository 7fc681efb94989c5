/**
 * The certificates of `npm run site`, made with openssl at launch: a CA of
 * the run, and one server certificate per namespace whose subjectAltName is
 * that namespace's address (every server of a namespace listens there), made
 * as docs/tls.md makes a lab's. The CA's key never leaves the run's
 * directory, and dies with it.
 */
import { execFile } from "node:child_process";
import { chmod, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const exec = promisify(execFile);

/** P-256 keys, as docs/tls.md makes them: browsers (the web console) take no Ed25519 certificates. */
const P256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

export interface ServerCertificate {
  certFile: string;
  keyFile: string;
}

export interface Pki {
  /** The CA certificate every client trusts (PEM). */
  caFile: string;
  /** Issues a certificate for a server reached at `address` (an IPv4 address), named `name`. */
  issue(name: string, address: string): Promise<ServerCertificate>;
}

/** Makes the run's CA in `dir` (created, mode 0700). */
export async function createPki(dir: string, runId: string): Promise<Pki> {
  await mkdir(dir, { recursive: true });
  await chmod(dir, 0o700);
  const caFile = join(dir, "ca.pem");
  const caKey = join(dir, "ca.key");
  await exec("openssl", [
    "req", "-x509", ...P256, "-nodes", "-days", "7",
    "-subj", `/CN=treadmill sites ${runId} CA`,
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-keyout", caKey, "-out", caFile,
  ]);
  // The servers run as root here; clients only need the certificate.
  await chmod(caFile, 0o644);
  return {
    caFile,
    async issue(name, address) {
      const keyFile = join(dir, `${name}.key`);
      const csr = join(dir, `${name}.csr`);
      const certFile = join(dir, `${name}.pem`);
      const ext = join(dir, `${name}.ext`);
      await exec("openssl", ["req", "-new", ...P256, "-nodes", "-subj", `/CN=${name}`, "-keyout", keyFile, "-out", csr]);
      await writeFile(ext, `subjectAltName=IP:${address}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`);
      await exec("openssl", ["x509", "-req", "-in", csr, "-CA", caFile, "-CAkey", caKey, "-CAcreateserial", "-days", "7", "-extfile", ext, "-out", certFile]);
      return { certFile, keyFile };
    },
  };
}
