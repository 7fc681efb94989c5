import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { Sql, TransactionSql } from "postgres";
import { CapabilityScope, CapabilityTokenSchema } from "../../gen/treadmill/common/v1/capability_pb.js";
import { type Image, ImageLocationSchema, ImageSchema, ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import type {
  CreateUploadGrantRequest,
  DeleteImageRequest,
  GetImageRequest,
  ImageService,
  ListImagesRequest,
  RegisterImageRequest,
  ResolveImageRequest,
} from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { requireUser, type UserCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { imageAccessCondition } from "./access.js";
import {
  checkId,
  checkMediaTypes,
  checkPattern,
  checkText,
  clip,
  decodePageToken,
  denied,
  checkName,
  checkTag,
  encodePageToken,
  exists,
  HOST_NAME,
  precondition,
  invalid,
  notFound,
  pageSize,
  ts,
} from "../shared/common.js";
import { liveCondition } from "./registry-service.js";

type Db = Sql | TransactionSql;

const DIGEST = /^sha256:[0-9a-f]{64}$/;
const MAX_STORES = 32;
const MAX_ANNOTATIONS = 32;
const MAX_GROUPS = 32;
const MAX_GRANT_DIGESTS = 64;
/** A grant's digests may be registered this long after its token expires. */
const GRANT_REGISTRATION_MARGIN_MS = 24 * 3600_000;

interface Location {
  service: string;
  url: string;
  site: string;
}

interface ImageRow {
  name: string;
  tag: string;
  digest: string;
  media_types: string[];
  size: string;
  owner_id: string | null;
  holder_id: string | null;
  visibility: "private" | "group" | "public";
  locations: Location[];
  annotations: Record<string, string>;
  source_job_id: string | null;
  created_at: Date;
  updated_at: Date;
  group_ids: string[];
}

const VISIBILITY: Record<ImageRow["visibility"], ImageVisibility> = {
  private: ImageVisibility.PRIVATE,
  group: ImageVisibility.GROUP,
  public: ImageVisibility.PUBLIC,
};

function visibilityName(field: string, v: ImageVisibility): ImageRow["visibility"] {
  const name = (Object.keys(VISIBILITY) as ImageRow["visibility"][]).find((k) => VISIBILITY[k] === v);
  if (name === undefined) throw invalid(`${field} is not a known visibility`);
  return name;
}

const imageColumns = (sql: Db) => sql`
  i.name, i.tag, i.digest, i.media_types, i.size::text as size, i.owner_id, i.holder_id, i.visibility, i.locations, i.annotations,
  i.source_job_id, i.created_at, i.updated_at,
  coalesce((select array_agg(g.group_id::text order by g.group_id) from image_groups g where g.name = i.name and g.tag = i.tag), '{}') as group_ids`;

function imageMessage(row: ImageRow, locations: Location[] = row.locations): Image {
  return create(ImageSchema, {
    name: row.name,
    tag: row.tag,
    manifestDigest: row.digest,
    sizeBytes: BigInt(row.size),
    mediaTypes: row.media_types,
    locations: locations.map((l) => create(ImageLocationSchema, { storeId: l.service, url: l.url, site: l.site ?? "" })),
    ownerUserId: row.owner_id ?? "",
    holderUserId: row.holder_id ?? "",
    visibility: VISIBILITY[row.visibility],
    groupIds: row.group_ids,
    annotations: row.annotations,
    sourceJobId: row.source_job_id ?? "",
    createTime: ts(row.created_at),
    updateTime: ts(row.updated_at),
  });
}

/** `name:tag` (the tag is after the last colon; names have none). */
function parseReference(field: string, reference: string): { name: string; tag: string } {
  if (reference === "") throw invalid(`${field} is required`);
  if (reference.length > 300) throw invalid(`${field} must be at most 300 characters`);
  const colon = reference.lastIndexOf(":");
  if (colon <= 0) throw invalid(`${field} must be name:tag`);
  return { name: checkName(`${field} name`, reference.slice(0, colon)), tag: checkTag(`${field} tag`, reference.slice(colon + 1)) };
}

/**
 * ImageService, the catalog: `name:tag` -> manifest digest and the stores
 * holding it. Users see what they may use (treadmill_user_may_use_image);
 * images they may not see are NotFound, never PermissionDenied.
 *
 * Possession (docs/images.md): a store serves an image only to read tokens
 * naming a holder who proved possession there. The catalog cannot check the
 * stores (a site's cache is not reachable from here), so it records the
 * holder each entry's tokens name, chosen by holderFor: the caller when a
 * grant of theirs named the digest (they uploaded it, or the stores will
 * refuse them), else the holder of an image with that digest the caller may
 * read. Anything else is refused: a digest is no key to anything.
 */
export class ImageServiceImpl implements ServiceImpl<typeof ImageService> {
  constructor(private readonly ctx: CoordinatorContext) {}

  async registerImage(req: RegisterImageRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const name = checkName("name", req.name);
    const tag = checkTag("tag", req.tag);
    const digest = checkPattern("manifest_digest", req.manifestDigest, DIGEST, "sha256:<64 lower-case hex digits>");
    if (req.storeIds.length === 0) throw invalid("store_ids must name at least one store");
    if (req.storeIds.length > MAX_STORES) throw invalid(`store_ids must have at most ${MAX_STORES} entries`);
    const storeIds = [...new Set(req.storeIds.map((id, i) => checkId(`store_ids[${i}]`, id)))];
    const mediaTypes = checkMediaTypes("media_types", req.mediaTypes, { required: true });
    if (req.sizeBytes < 0n) throw invalid("size_bytes must not be negative");
    const annotations = Object.entries(req.annotations);
    if (annotations.length > MAX_ANNOTATIONS) throw invalid(`annotations must have at most ${MAX_ANNOTATIONS} entries`);
    for (const [key, value] of annotations) {
      if (key === "" || key.length > 128) throw invalid("annotations keys must be 1 to 128 characters");
      checkText(`annotations["${clip(key)}"]`, value, 1024);
    }
    const visibility = req.visibility === ImageVisibility.UNSPECIFIED ? "private" : visibilityName("visibility", req.visibility);
    if (req.groupIds.length > MAX_GROUPS) throw invalid(`group_ids must have at most ${MAX_GROUPS} entries`);
    const groupIds = [...new Set(req.groupIds.map((id, i) => checkId(`group_ids[${i}]`, id)))];
    if (visibility === "group" && groupIds.length === 0) throw invalid("group_ids is required for IMAGE_VISIBILITY_GROUP");
    if (visibility !== "group" && groupIds.length > 0) throw invalid("group_ids applies to IMAGE_VISIBILITY_GROUP only");

    return this.ctx.sql.begin(async (tx) => {
      const holder = await holderFor(tx, caller, digest, this.ctx.clock());
      const stores = await tx<{ id: string; url: string; site: string }[]>`
        select id, url, site from services where id in ${tx(storeIds)} and kind in ('image_store', 'image_cache')`;
      for (const id of storeIds) if (!stores.some((s) => s.id === id)) throw invalid(`store_ids: ${id} is not a registered image store`);
      const newLocations: Location[] = storeIds.map((id) => {
        const s = stores.find((x) => x.id === id)!;
        return { service: s.id, url: s.url, site: s.site };
      });
      if (groupIds.length > 0) {
        const found = await tx<{ id: string }[]>`select id from groups where id in ${tx(groupIds)}`;
        for (const id of groupIds) if (!found.some((g) => g.id === id)) throw invalid(`group_ids: group ${id} not found`);
      }
      const now = new Date(this.ctx.clock());
      const inserted = await tx`
        insert into images (name, tag, digest, media_types, size, owner_id, holder_id, visibility, locations, annotations, created_at, updated_at)
        values (${name}, ${tag}, ${digest}, ${mediaTypes}, ${req.sizeBytes.toString()}::bigint, ${caller.userId}, ${holder}, ${visibility},
                ${tx.json(newLocations as never)}, ${tx.json(req.annotations)}, ${now}, ${now})
        on conflict (name, tag) do nothing
        returning name`;
      let action = "register";
      if (inserted.length > 0) {
        for (const g of groupIds) await tx`insert into image_groups (name, tag, group_id) values (${name}, ${tag}, ${g})`;
      } else {
        const [current] = await tx<ImageRow[]>`select ${imageColumns(tx)} from images i where name = ${name} and tag = ${tag} for update`;
        if (current.owner_id !== caller.userId && caller.role !== "admin") {
          throw denied(`${name}:${tag} belongs to another user`);
        }
        if (current.digest === digest) {
          action = "merge_locations";
          const merged = [...current.locations];
          for (const l of newLocations) if (!merged.some((m) => m.service === l.service)) merged.push(l);
          await tx`update images set locations = ${tx.json(merged as never)}, updated_at = ${now} where name = ${name} and tag = ${tag}`;
        } else {
          if (!req.replace) throw exists(`${name}:${tag} is bound to another digest; set replace to move it`);
          action = "replace";
          await tx`
            update images set digest = ${digest}, media_types = ${mediaTypes}, size = ${req.sizeBytes.toString()}::bigint,
              holder_id = ${holder}, visibility = ${visibility}, locations = ${tx.json(newLocations as never)}, annotations = ${tx.json(req.annotations)},
              updated_at = ${now}
            where name = ${name} and tag = ${tag}`;
          await tx`delete from image_groups where name = ${name} and tag = ${tag}`;
          for (const g of groupIds) await tx`insert into image_groups (name, tag, group_id) values (${name}, ${tag}, ${g})`;
        }
      }
      await audit(tx, {
        kind: `image.${action}`,
        actor: actorOf(caller),
        userId: caller.userId,
        message: `${name}:${tag} -> ${digest}`,
        details: { name, tag, digest, storeIds, holder },
      });
      const [row] = await tx<ImageRow[]>`select ${imageColumns(tx)} from images i where name = ${name} and tag = ${tag}`;
      return { image: imageMessage(row) };
    });
  }

  async resolveImage(req: ResolveImageRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const site = req.site === "" ? "" : checkPattern("site", req.site, HOST_NAME, "[a-z0-9][a-z0-9._-]{0,62} or be empty");
    let row: ImageRow | undefined;
    let locations: Location[];
    if (req.reference.startsWith("sha256:")) {
      const digest = checkPattern("reference", req.reference, DIGEST, "name:tag or sha256:<64 lower-case hex digits>");
      const rows = await this.visible(caller, this.ctx.sql`i.digest = ${digest}`, this.ctx.sql`order by i.created_at, i.name, i.tag`);
      row = rows[0];
      locations = [];
      // Only the entries of the token's holder: another holder's stores need not hold it for this one.
      for (const r of rows.filter((x) => x.holder_id === row?.holder_id)) {
        for (const l of r.locations) if (!locations.some((m) => m.service === l.service)) locations.push(l);
      }
    } else {
      const { name, tag } = parseReference("reference", req.reference);
      [row] = await this.visible(caller, this.ctx.sql`i.name = ${name} and i.tag = ${tag}`);
      locations = row?.locations ?? [];
    }
    if (!row) throw notFound(`image ${clip(req.reference, 300)} not found`);
    if (row.holder_id === null) {
      throw precondition(`image ${row.name}:${row.tag} has no holder (the user who uploaded it is gone): push it again`);
    }
    // The caller's site first, then stores of every site, then other sites; stable otherwise.
    const rank = (l: Location) => (site !== "" && l.site === site ? 0 : l.site === "" ? 1 : 2);
    locations = [...locations].sort((a, b) => rank(a) - rank(b));
    const ttlMs = this.ctx.config.imageTokenTtlMs;
    const issuedAt = this.ctx.clock();
    const token = await this.ctx.keys.sign({ scope: "image:read", digest: row.digest, holder: row.holder_id }, ttlMs, {
      subject: caller.userId,
      audience: "image",
    });
    return {
      image: imageMessage(row, locations),
      readToken: create(CapabilityTokenSchema, {
        token,
        scope: CapabilityScope.IMAGE_READ,
        expireTime: timestampFromMs(Math.floor((issuedAt + ttlMs) / 1000) * 1000),
      }),
    };
  }

  async listImages(req: ListImagesRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const visibility = req.visibility === ImageVisibility.UNSPECIFIED ? undefined : visibilityName("visibility", req.visibility);
    checkText("name_prefix", req.namePrefix, 128);
    const owner = req.ownerUserId === "" ? undefined : checkId("owner_user_id", req.ownerUserId);
    const size = pageSize(req.pageSize);
    const filters = { visibility, prefix: req.namePrefix, owner, user: caller.userId };
    const after = decodePageToken(req.pageToken, filters, 2);
    const sql = this.ctx.sql;
    const rows = await this.visible(
      caller,
      sql`left(i.name, ${req.namePrefix.length}) = ${req.namePrefix}
        ${visibility ? sql`and i.visibility = ${visibility}` : sql``}
        ${owner ? sql`and i.owner_id = ${owner}` : sql``}
        ${after ? sql`and (i.name, i.tag) > (${after[0]}, ${after[1]})` : sql``}`,
      sql`order by i.name, i.tag limit ${size + 1}`,
    );
    const page = rows.slice(0, size);
    const last = page.at(-1);
    return {
      images: page.map((r) => imageMessage(r)),
      nextPageToken: rows.length > size && last ? encodePageToken(filters, [last.name, last.tag]) : "",
    };
  }

  async getImage(req: GetImageRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const { name, tag } = parseReference("reference", req.reference);
    const [row] = await this.visible(caller, this.ctx.sql`i.name = ${name} and i.tag = ${tag}`);
    if (!row) throw notFound(`image ${name}:${tag} not found`);
    return { image: imageMessage(row) };
  }

  async deleteImage(req: DeleteImageRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const { name, tag } = parseReference("reference", req.reference);
    return this.ctx.sql.begin(async (tx) => {
      const [row] = await tx<ImageRow[]>`
        select ${imageColumns(tx)} from images i
        where i.name = ${name} and i.tag = ${tag} and ${imageAccessCondition(tx, caller.userId)} for update`;
      if (!row) throw notFound(`image ${name}:${tag} not found`);
      if (row.owner_id !== caller.userId && caller.role !== "admin") throw denied(`only the owner or an admin deletes ${name}:${tag}`);
      await tx`delete from images where name = ${name} and tag = ${tag}`;
      await audit(tx, {
        kind: "image.delete",
        actor: actorOf(caller),
        userId: row.owner_id ?? undefined,
        message: `${name}:${tag} removed from the catalog`,
        details: { name, tag, digest: row.digest },
      });
      return {};
    });
  }

  async createUploadGrant(req: CreateUploadGrantRequest, context: HandlerContext) {
    const caller = requireUser(context);
    if (req.sizeBytes < 0n) throw invalid("size_bytes must not be negative");
    const site = req.site === "" ? "" : checkPattern("site", req.site, HOST_NAME, "[a-z0-9][a-z0-9._-]{0,62} or be empty");
    if (req.digests.length > MAX_GRANT_DIGESTS) throw invalid(`digests must have at most ${MAX_GRANT_DIGESTS} entries`);
    const digests = [...new Set(req.digests.map((d, i) => checkPattern(`digests[${i}]`, d, DIGEST, "sha256:<64 lower-case hex digits>")))];
    const sql = this.ctx.sql;
    const now = this.ctx.clock();
    let store: { id: string; url: string } | undefined;
    if (req.storeId !== "") {
      const id = checkId("store_id", req.storeId);
      [store] = await sql<{ id: string; url: string }[]>`
        select id, url from services s where id = ${id} and kind in ('image_store', 'image_cache') and ${liveCondition(sql, now)}`;
      if (!store) throw notFound(`store ${id} not found`);
    } else {
      const candidates = await sql<{ id: string; url: string; site: string; capacity: string; free_bytes: string }[]>`
        select id, url, site, capacity::text, free_bytes::text from services s
        where kind = 'image_store' and ${liveCondition(sql, now)}
        order by (site = ${site} and ${site} <> '') desc, free_bytes desc, id`;
      if (candidates.length === 0) throw new ConnectError("no image store is registered", Code.Unavailable);
      // A store that reports no capacity (0) says nothing about room: it is tried.
      store = candidates.find((c) => c.capacity === "0" || BigInt(c.free_bytes) >= req.sizeBytes);
      if (!store) throw new ConnectError("no image store has room for size_bytes", Code.ResourceExhausted);
    }
    const ttlMs = this.ctx.config.imageTokenTtlMs;
    const token = await this.ctx.keys.sign({ scope: "image:write" }, ttlMs, { subject: caller.userId, audience: "image" });
    const registrableUntil = new Date(now + ttlMs + GRANT_REGISTRATION_MARGIN_MS);
    await sql.begin(async (tx) => {
      await tx`delete from upload_grants where user_id = ${caller.userId} and expires_at < ${new Date(now)}`;
      if (digests.length > 0) {
        await tx`
          insert into upload_grants (user_id, digest, expires_at)
          select ${caller.userId}, d, ${registrableUntil} from unnest(${digests}::text[]) d
          on conflict (user_id, digest) do update set expires_at = greatest(upload_grants.expires_at, excluded.expires_at)`;
      }
      await audit(tx, {
        kind: "image.upload_grant",
        actor: actorOf(caller),
        userId: caller.userId,
        message: `upload grant for store ${store.id}`,
        details: { storeId: store.id, sizeBytes: req.sizeBytes.toString(), digests },
      });
    });
    return {
      storeId: store.id,
      storeUrl: store.url,
      writeToken: create(CapabilityTokenSchema, {
        token,
        scope: CapabilityScope.IMAGE_WRITE,
        expireTime: timestampFromMs(Math.floor((now + ttlMs) / 1000) * 1000),
      }),
    };
  }

  /** Images matching `where` (over `i`) that the caller may see. */
  private visible(caller: UserCaller, where: ReturnType<Sql>, tail: ReturnType<Sql> = this.ctx.sql``): Promise<ImageRow[]> {
    const sql = this.ctx.sql;
    return sql<ImageRow[]>`
      select ${imageColumns(sql)} from images i
      where ${where} and ${imageAccessCondition(sql, caller.userId)}
      ${tail}`;
  }
}

/**
 * The holder of a new catalog entry for `digest` registered by `caller`:
 * the caller when a live grant of theirs names the digest, else the holder
 * of an image with that digest the caller may read (the caller's own
 * possession first, then the oldest); PermissionDenied otherwise.
 */
async function holderFor(tx: Db, caller: UserCaller, digest: string, nowMs: number): Promise<string> {
  const [granted] = await tx`
    select 1 from upload_grants where user_id = ${caller.userId} and digest = ${digest} and expires_at > ${new Date(nowMs)}`;
  if (granted) return caller.userId;
  const [readable] = await tx<{ holder_id: string }[]>`
    select i.holder_id from images i
    where i.digest = ${digest} and i.holder_id is not null and ${imageAccessCondition(tx, caller.userId)}
    order by (i.holder_id = ${caller.userId}) desc, i.created_at limit 1`;
  if (readable) return readable.holder_id;
  throw denied(
    `you may not register ${digest}: upload it under an upload grant that names it (CreateUploadGrant digests), or register an image you may read`,
  );
}
