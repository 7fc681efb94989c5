import { Code, ConnectError } from "@connectrpc/connect";
import { decodeJwt } from "jose";
import { DIGEST_PATTERN } from "../../lib/image-client.js";
import { bearerToken, type Capability, type TokenVerifier, type VerifiedToken } from "../../lib/tokens.js";
import type { BlobStore } from "./store.js";

/**
 * Who may do what on an image store (DESIGN.md §3, image_store_service.proto):
 *
 * - `image:read digest=M` reads manifest M and every blob M references. A
 *   blob read is authorized by looking the blob up in the stored manifest M,
 *   so a token for one image cannot read another image's blobs.
 * - `image:write` uploads blobs and manifests and queries uploads.
 * - `image:admin` lists, deletes and collects garbage; it may also read.
 *
 * Tokens are verified offline (signature, expiry, issuer, audience) by the
 * TokenVerifier; this class only picks the capability to check.
 */
export class Authorizer {
  constructor(
    private readonly verifier: TokenVerifier,
    private readonly store: BlobStore,
  ) {}

  /** The token must grant exactly `capability`. */
  require(headers: Headers, capability: Capability): Promise<VerifiedToken> {
    return this.verifier.verify(bearerToken(headers), capability);
  }

  /** Reading manifest `digest`: image:read for it, or image:admin. */
  readManifest(headers: Headers, digest: string): Promise<VerifiedToken> {
    const token = bearerToken(headers);
    if (claimedScope(token).scope === "image:admin") return this.verifier.verify(token, { scope: "image:admin" });
    return this.verifier.verify(token, { scope: "image:read", digest });
  }

  /**
   * Reading blob `digest`: image:read for a stored manifest that references it
   * (or is it), or image:admin.
   */
  async readBlob(headers: Headers, digest: string): Promise<VerifiedToken> {
    const token = bearerToken(headers);
    const claimed = claimedScope(token);
    if (claimed.scope === "image:admin") return this.verifier.verify(token, { scope: "image:admin" });
    const manifest = claimed.digest ?? digest;
    const verified = await this.verifier.verify(token, { scope: "image:read", digest: manifest });
    if (manifest !== digest && !this.store.getManifestRecord(manifest)?.blobs.has(digest)) {
      throw new ConnectError(`token does not grant image:read on ${digest}: not in its manifest`, Code.PermissionDenied);
    }
    return verified;
  }

  /** Any valid token of the image scopes (Stats). */
  any(headers: Headers): Promise<VerifiedToken> {
    const token = bearerToken(headers);
    const claimed = claimedScope(token);
    switch (claimed.scope) {
      case "image:admin":
      case "image:write":
        return this.verifier.verify(token, { scope: claimed.scope });
      default:
        return this.verifier.verify(token, { scope: "image:read", digest: claimed.digest ?? "" });
    }
  }
}

/**
 * The scope and digest a token claims, read WITHOUT verification, only to
 * choose which capability to verify it against.
 */
function claimedScope(token: string | undefined): { scope?: string; digest?: string } {
  if (token === undefined) return {};
  try {
    const claims = decodeJwt(token);
    const digest = typeof claims.digest === "string" && DIGEST_PATTERN.test(claims.digest) ? claims.digest : undefined;
    return { scope: typeof claims.scope === "string" ? claims.scope : undefined, digest };
  } catch {
    return {};
  }
}
