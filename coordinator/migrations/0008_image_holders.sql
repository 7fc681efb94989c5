-- 0008_image_holders: possession behind image reads (issue #17, hole 3;
-- docs/images.md "Possession"). An image store serves an image to an
-- `image:read digest=M holder=H` token only when user H proved possession of
-- M there (uploaded it, or mounted it from an image H could read). The
-- catalog records, per entry, the holder its read tokens name; a job records
-- the holder of the image it was submitted with.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

-- The user whose possession at the stores backs the entry: the uploader, or
-- for an entry registered from an image its registrant could read, that
-- image's holder. Entries from before: their owner.
alter table images add column holder_id uuid references users (id) on delete set null;
update images set holder_id = owner_id;
create index images_digest_holder_idx on images (digest, holder_id);

-- Upload grants (CreateUploadGrant) and the digests they name: a user may
-- register a digest a grant of theirs named, until expires_at.
create table upload_grants (
  user_id uuid not null references users (id) on delete cascade,
  digest text not null check (digest ~ '^sha256:[0-9a-f]{64}$'),
  expires_at timestamptz not null,
  primary key (user_id, digest)
);
create index upload_grants_expires_at_idx on upload_grants (expires_at);

-- The holder of the job's image, chosen at submission; the image token of
-- every StartJob of the job names it. Jobs from before: the holder of an
-- image with the job's digest that the job's owner may use, else the owner.
alter table jobs add column image_holder uuid;
update jobs j set image_holder = coalesce(
  (select i.holder_id from images i
   where i.digest = j.manifest_digest and i.holder_id is not null
     and treadmill_user_may_use_image(j.owner_id, i.name, i.tag)
   order by (i.holder_id = j.owner_id) desc, i.created_at limit 1),
  j.owner_id)
where j.state <> 'finalized';
