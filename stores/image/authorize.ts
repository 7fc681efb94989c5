/**
 * The image store's authorization table (DESIGN.md §3): the capability
 * scopes each procedure of ImageStoreService and ImageCacheService takes. The
 * server's hook (lib/server/authorize.ts) checks a call's token against it
 * before any handler, on every protocol and on the hand-framed PutBlob and
 * GetBlob; the handlers (auth.ts) then check the digest the token names.
 */
import type { Scope, TokenVerifier } from "../../lib/tokens.js";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { capabilityAuthorizer, scopeEntries } from "../../lib/server/authorize.js";
import type { Authorize } from "../../lib/server.js";

const READ: readonly Scope[] = ["image:read", "image:admin"];
const WRITE: readonly Scope[] = ["image:write"];
const ADMIN: readonly Scope[] = ["image:admin"];

/** The hook of an image store or cache. */
export function imageAuthorizer(verifier: TokenVerifier): Authorize {
  return capabilityAuthorizer(verifier, [
    ...scopeEntries(ImageStoreService, {
      putBlob: WRITE,
      queryUpload: WRITE,
      getBlob: READ,
      statBlob: READ,
      putManifest: WRITE,
      getManifest: READ,
      listManifests: ADMIN,
      deleteManifest: ADMIN,
      collectGarbage: ADMIN,
    }),
    ...scopeEntries(ImageCacheService, {
      fetch: READ,
      pin: READ,
      // The lease's image decides which read token (auth.ts); an unknown
      // lease takes any image token.
      unpin: ["image:read", "image:write", "image:admin"],
      localPath: READ,
      push: READ,
      stats: ["image:read", "image:write", "image:admin"],
    }),
  ]);
}
