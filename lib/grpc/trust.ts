/**
 * What a client trusts when it dials a server over TLS (docs/tls.md): a
 * component that dials out (supervisor, image store and cache, log server,
 * proxy) loads its `--ca-file` once into a `ClientTls`, whose CAs are then
 * trusted besides Node's bundled public roots by every TLS connection the
 * component makes (Connect transports, raw gRPC calls, tunnels); `tml`
 * makes one from its context's CA. It is a value passed to what dials, not a
 * process-wide setting: the testbed and the tests run components with
 * different trust in one process. Servers import it (registration, signing
 * keys), so it holds no raw-path client piece.
 *
 * `connectSocket` is where every https connection is made: Node verifies the
 * chain and the name as usual (never turned off), and the error of a
 * certificate it refuses is reworded to name the server, the certificate and
 * the fix (`--ca-file`): what an operator reads in the log.
 */
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { ConfigError } from "../config.js";

/**
 * TLS options of a client connection: one secure context holding Node's
 * bundled roots and the lab's CA, made once per component, so that a
 * connection does not parse every root again; none: Node's roots alone.
 */
export interface ClientTls {
  secureContext?: tls.SecureContext;
}

/** Node's own trust: the bundled public roots. */
export const PUBLIC_ROOTS: ClientTls = {};

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----/g;

/**
 * The trust of `--ca-file` (empty: the public roots alone). A file that
 * cannot be read or holds no PEM certificate is a ConfigError naming the
 * flag: a component must not start trusting less than its operator meant.
 */
export function loadClientTls(caFile: string): ClientTls {
  if (caFile === "") return PUBLIC_ROOTS;
  let text: string;
  try {
    text = readFileSync(caFile, "utf8");
  } catch (err) {
    throw new ConfigError([`--ca-file ${caFile} cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`]);
  }
  const pems = text.match(PEM_CERTIFICATE) ?? [];
  if (pems.length === 0) throw new ConfigError([`--ca-file ${caFile} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`]);
  for (const pem of pems) {
    try {
      new X509Certificate(pem);
    } catch (err) {
      throw new ConfigError([`--ca-file ${caFile} holds a certificate that does not parse (${(err as Error).message})`]);
    }
  }
  return { secureContext: tls.createSecureContext({ ca: [...tls.rootCertificates, ...pems] }) };
}

/** Marks an error whose message untrustedCertificateIn may pass on as is. */
const UNTRUSTED = "UntrustedCertificateError";

/** The refusal of a certificate in `err`'s cause chain (an HTTP/2 stream's error wraps its connection's), if any. */
export function untrustedCertificateIn(err: unknown): Error | undefined {
  for (let e = err, depth = 0; e !== null && typeof e === "object" && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    // By name: under jest's module sandbox errors cross realms.
    if ((e as Error).name === UNTRUSTED) return e as Error;
  }
  return undefined;
}

/** "CN=x, O=y" of a certificate's subject or issuer. */
function nameOf(name: tls.Certificate | undefined): string {
  if (!name) return "?";
  return (
    Object.entries(name)
      .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : String(v)}`)
      .join(", ") || "?"
  );
}

/**
 * Rewords Node's refusal of a server certificate (`err`, about to reach
 * whoever uses the socket) so that it names the server, the certificate and
 * the fix. `peer` is the certificate, when it could be read.
 */
function reword(err: Error & { code?: string; cert?: tls.PeerCertificate }, authority: string, peer: tls.PeerCertificate | undefined): void {
  const code = err.code ?? "";
  const cert = peer ?? err.cert;
  const what = cert?.subject ? `certificate "${nameOf(cert.subject)}" issued by "${nameOf(cert.issuer)}"` : "certificate";
  err.name = UNTRUSTED;
  err.message =
    code === "ERR_TLS_CERT_ALTNAME_INVALID"
      ? `the server at ${authority} presented a ${what} whose names (${cert?.subjectaltname ?? "none"}) do not include the one dialled: reissue it with that name in its subjectAltName (docs/tls.md)`
      : `the server at ${authority} presented a ${what} that this machine does not trust (${err.message}): give the CA that signed it with --ca-file (docs/tls.md)`;
}

/**
 * A TCP connection to an http(s) URL's authority, or for https a TLS one
 * (ALPN h2) verified with `trust`. Node verifies the chain and the name and
 * refuses the connection as usual; only its error is reworded (`reword`).
 */
export function connectSocket(authority: URL, trust: ClientTls): net.Socket {
  const port = Number(authority.port || (authority.protocol === "https:" ? 443 : 80));
  const host = authority.hostname.replace(/^\[|\]$/g, "");
  if (authority.protocol !== "https:") return net.connect({ host, port });
  const socket = tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ALPNProtocols: ["h2"], ...trust });
  // 'secure' ends the handshake, and Node's verification listens to it:
  // ahead of it, the certificate can still be read for the message. An
  // error between it and 'secureConnect' is that verification's refusal.
  let peer: tls.PeerCertificate | undefined;
  let verified = false;
  socket.prependOnceListener("secure", () => {
    peer = socket.getPeerCertificate();
  });
  socket.once("secureConnect", () => (verified = true));
  // The first error listener: the error reaches the socket's user reworded.
  socket.once("error", (err: Error & { code?: string }) => {
    if (peer !== undefined && !verified) reword(err, authority.host, peer);
  });
  return socket;
}

/** http2.connect options that dial through `connectSocket` (https only; http keeps Node's path). */
export function http2Trust(url: string, trust: ClientTls): { createConnection?: (authority: URL) => net.Socket } {
  return new URL(url).protocol === "https:" ? { createConnection: (authority: URL) => connectSocket(authority, trust) } : {};
}
