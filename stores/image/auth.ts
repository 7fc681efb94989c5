import { Code, ConnectError } from "@connectrpc/connect";
import { decodeJwt } from "jose";
import { DIGEST_PATTERN } from "../../lib/image/digest.js";
import { bearerToken, type Requirement, type TokenVerifier, type VerifiedToken } from "../../lib/tokens.js";
import type { BlobStore } from "./store.js";

/** At most this many mount tokens in one PutManifest. */
export const MAX_MOUNT_TOKENS = 16;

/**
 * Who may do what on an image store (DESIGN.md §3, image_store_service.proto):
 *
 * - `image:read digest=M holder=H` reads manifest M and every blob M
 *   references, when H holds M here (store.ts, "Possession"). A blob read is
 *   authorized by looking the blob up in the stored manifest M, so a token
 *   for one image cannot read another image's blobs, and by H's possession
 *   of M, so a manifest that names another user's blob is no key to it: its
 *   writer had to hold every blob it names.
 * - `image:write` uploads blobs and manifests and queries uploads; its
 *   subject is the writer, who becomes a holder of what it uploads.
 * - `image:admin` lists, deletes and collects garbage; it may also read.
 *
 * Tokens are verified offline (signature, expiry, issuer, audience) by the
 * TokenVerifier; this class picks the capability to check and checks the
 * holder against the store's records.
 */
export class Authorizer {
  constructor(
    private readonly verifier: TokenVerifier,
    private readonly store: BlobStore,
  ) {}

  /** The token must grant exactly `required`. */
  require(headers: Headers, required: Requirement): Promise<VerifiedToken> {
    return this.verifier.verify(bearerToken(headers), required);
  }

  /**
   * A valid image:read token for manifest `digest` (or image:admin), its
   * holder NOT checked: for a cache's Fetch, which proves the holder's
   * possession itself (from a location, or from its records).
   */
  readToken(headers: Headers, digest: string): Promise<VerifiedToken> {
    const token = bearerToken(headers);
    if (claimedScope(token).scope === "image:admin") return this.verifier.verify(token, { scope: "image:admin" });
    return this.verifier.verify(token, { scope: "image:read", digest });
  }

  /** Reading manifest `digest`: image:read for it whose holder holds it here, or image:admin. */
  async readManifest(headers: Headers, digest: string): Promise<VerifiedToken> {
    const verified = await this.readToken(headers, digest);
    await this.requireHolder(verified, digest);
    return verified;
  }

  /**
   * Reading blob `digest`: image:read for a stored manifest that references
   * it (or is it) and that the token's holder holds here, or image:admin.
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
    await this.requireHolder(verified, manifest);
    return verified;
  }

  /**
   * The blobs `mountTokens` let `writer` mount (PutManifestRequest.mount_tokens):
   * those of each token's manifest, when the token is a valid image:read
   * minted for the writer and its holder holds that manifest here.
   */
  async mountable(mountTokens: readonly string[], writer: string): Promise<Set<string>> {
    if (mountTokens.length > MAX_MOUNT_TOKENS) {
      throw new ConnectError(`mount_tokens must have at most ${MAX_MOUNT_TOKENS} entries`, Code.InvalidArgument);
    }
    const blobs = new Set<string>();
    for (const [i, token] of mountTokens.entries()) {
      const claimed = claimedScope(token);
      if (claimed.scope !== "image:read" || claimed.digest === undefined) {
        throw new ConnectError(`mount_tokens[${i}] is not an image:read token`, Code.InvalidArgument);
      }
      let verified: VerifiedToken;
      try {
        verified = await this.verifier.verify(token, { scope: "image:read", digest: claimed.digest });
      } catch (err) {
        throw new ConnectError(`mount_tokens[${i}]: ${ConnectError.from(err).rawMessage}`, Code.PermissionDenied);
      }
      if (verified.subject !== writer) {
        throw new ConnectError(`mount_tokens[${i}] was minted for another subject than the write token`, Code.PermissionDenied);
      }
      await this.requireHolder(verified, claimed.digest, `mount_tokens[${i}]: `);
      for (const blob of this.store.getManifestRecord(claimed.digest)!.blobs.keys()) blobs.add(blob);
    }
    return blobs;
  }

  /** An image:read token's holder must hold `manifest` here (an admin token passes). */
  async requireHolder(verified: VerifiedToken, manifest: string, prefix = ""): Promise<void> {
    if (verified.capability.scope !== "image:read") return;
    if (!this.store.getManifestRecord(manifest)) throw new ConnectError(`${prefix}manifest ${manifest} not found`, Code.NotFound);
    if (!(await this.store.holds(manifest, verified.capability.holder, { legacy: true }))) {
      throw new ConnectError(
        `${prefix}the token's holder has not uploaded manifest ${manifest} to this store: it is not theirs to share here`,
        Code.PermissionDenied,
      );
    }
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
