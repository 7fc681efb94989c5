import { writeFile } from "node:fs/promises";
import { TokenSigner, generateSigningKey, type Capability, type JSONWebKeySet } from "../../lib/tokens.js";

/** A signing key standing in for the coordinator's, for servers tested alone. */
export interface Keys {
  signer: TokenSigner;
  jwks: JSONWebKeySet;
  /** A capability token signed with the key (10 minutes unless `ttlMs`). */
  token(capability: Capability, ttlMs?: number): Promise<string>;
  /** Writes the JWKS to a file, for a server in a child process. */
  writeFile(path: string): Promise<void>;
}

/** A fresh key; tokens carry `audience` when given. */
export async function makeKeys(options: { audience?: string } = {}): Promise<Keys> {
  const key = await generateSigningKey();
  const signer = await TokenSigner.create(key, { issuer: "test-coordinator" });
  const jwks = signer.publicJwks();
  return {
    signer,
    jwks,
    token: (capability, ttlMs = 600_000) => signer.sign(capability, ttlMs, { subject: "test", audience: options.audience }),
    writeFile: (path) => writeFile(path, JSON.stringify(jwks)),
  };
}
