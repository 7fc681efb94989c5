/** `tml image push|pull|list|inspect|rm|tag`. */
import { allPages } from "../pages.js";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, open, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { ImageSchema, ImageVisibility, ImageVisibilitySchema, type Image } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { downloadBlob, imageStoreClient, imageStoreTransport } from "../../lib/image/client.js";
import { digestFile } from "../../lib/image/digest.js";
import { buildManifest } from "../../lib/image/manifest.js";
import { DRIVER_OF_KIND, MEDIA_TYPE_OF_KIND, type LayerKind } from "../../lib/image/media-types.js";
import { registerImage, requestUploadGrant, uploadImage, type LocalImage } from "../../lib/image/push.js";
import { packDirectory } from "../../lib/image/tar.js";
import { keyValues, parseBytes } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import { tlsOptions, type CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { ago, enumValue, enumWords, iso, jsonOf, tagsText, word } from "../format.js";
import { formatBytes, progressBar } from "../progress.js";

/** What `tml image push` makes an image of (kernel and initrd only go with a disk). */
type Kind = Exclude<LayerKind, "kernel" | "initrd">;

/** `name:tag` split; a name alone means `:latest`; a digest stays whole. */
export function splitReference(ref: string, flag = "reference"): { name: string; tag: string; text: string } {
  if (ref.startsWith("sha256:")) return { name: "", tag: "", text: ref };
  const slash = ref.lastIndexOf("/");
  const colon = ref.lastIndexOf(":");
  if (colon > slash && colon > 0) {
    if (colon === ref.length - 1) throw new UsageError(`${flag} "${ref}" has an empty tag`);
    return { name: ref.slice(0, colon), tag: ref.slice(colon + 1), text: ref };
  }
  if (ref === "") throw new UsageError(`${flag} is empty`);
  return { name: ref, tag: "latest", text: `${ref}:latest` };
}

/** What kind of image file PATH is, from flags, extension and magic bytes. */
async function detectKind(path: string, flags: { readonly firmware: boolean; readonly type?: Kind }): Promise<Kind | "dir"> {
  if (flags.firmware === true) return "firmware";
  if (flags.type !== undefined) return flags.type;
  const st = await stat(path).catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`cannot read ${path} (${err.code === "ENOENT" ? "no such file or directory" : err.code})`);
  });
  if (st.isDirectory()) return "dir";
  const head = await readHead(path, 4);
  if (head.subarray(0, 4).equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))) return "qcow2";
  if (/\.(tar\.gz|tgz)$/i.test(path)) {
    if (head[0] !== 0x1f || head[1] !== 0x8b) throw new UsageError(`${path} is named like a .tar.gz but is not gzip data`);
    return "rootfs";
  }
  if (/\.qcow2$/i.test(path)) throw new UsageError(`${path} is named .qcow2 but has no qcow2 header`);
  if (/\.(img|raw|iso)$/i.test(path)) return "raw";
  throw new UsageError(
    `cannot tell what ${path} is: give a rootfs directory, a .tar.gz, a .qcow2, a raw disk (.img/.raw), or --firmware (or --type)`,
  );
}

/** The first `bytes` bytes of a file (zeros past its end). */
async function readHead(path: string, bytes: number): Promise<Buffer> {
  const head = Buffer.alloc(bytes);
  const file = await open(path, "r");
  try {
    await file.read(head, 0, bytes, 0);
  } finally {
    await file.close();
  }
  return head;
}

/** Whether a qcow2 file's header names a backing file (its bytes 8-15, the backing file offset, are not zero). */
async function qcow2HasBacking(path: string): Promise<boolean> {
  const head = await readHead(path, 16);
  return head.readBigUInt64BE(8) !== 0n;
}

function entrypointOf(text: string): string {
  if (text.trim().startsWith("[")) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new UsageError(`flag --entrypoint is not a JSON array: ${text}`);
    }
    if (!Array.isArray(parsed) || parsed.length === 0 || !parsed.every((p) => typeof p === "string")) {
      throw new UsageError("flag --entrypoint must be a JSON array of strings, or a shell command line");
    }
    return JSON.stringify(parsed);
  }
  return JSON.stringify(["/bin/sh", "-c", text]);
}

function imageRows(ctx: CliContext, images: Image[]) {
  ctx.out.table(
    images,
    [
      { header: "IMAGE", value: (i) => `${i.name}:${i.tag}` },
      { header: "DIGEST", value: (i) => i.manifestDigest.slice(0, 19) },
      { header: "SIZE", value: (i) => formatBytes(Number(i.sizeBytes)) },
      { header: "DRIVER", value: (i) => i.annotations["treadmill.driver"] ?? "-" },
      { header: "VISIBILITY", value: (i) => word(ImageVisibilitySchema, i.visibility) },
      { header: "UPDATED", value: (i) => ago(i.updateTime) },
    ],
    "No images.",
  );
}

export const imageCommands: Command[] = [
  defineCommand({
    path: ["image", "push"],
    summary: "Upload an image (rootfs directory, .tar.gz, qcow2/raw disk or firmware) and name it",
    description:
      "A directory is packed as a rootfs layer (tar+gzip, reproducibly); a .tar.gz is sent as is; a qcow2\n" +
      "or raw disk (by magic bytes or .qcow2/.img/.raw) becomes a disk layer; --firmware marks a firmware\n" +
      "file. The upload resumes where it stopped: run the same command again after an interruption.",
    args: [{ name: "PATH", required: true, description: "a directory or a file" }],
    flags: {
      name: { type: "string", short: "n", placeholder: "NAME:TAG", description: "the image's name and tag (required; tag default latest)" },
      entrypoint: { type: "string", placeholder: "CMD", description: 'rootfs: the command, as a shell line or JSON array (["/bin/app","-v"])' },
      firmware: { type: "bool", description: "the file is firmware for the board driver" },
      type: { type: "string", placeholder: "TYPE", choices: ["rootfs", "qcow2", "raw", "firmware"], description: "override the detected type" },
      arch: { type: "string", placeholder: "ARCH", description: "qemu: guest architecture (x86_64, aarch64)" },
      kernel: { type: "string", placeholder: "FILE", description: "qemu: a kernel to boot directly (-kernel)" },
      initrd: { type: "string", placeholder: "FILE", description: "qemu: an initrd for the kernel (-initrd)" },
      cmdline: { type: "string", placeholder: "TEXT", description: "qemu: the kernel command line (default console=ttyS0)" },
      title: { type: "string", placeholder: "TEXT", description: "short title (default: the name)" },
      description: { type: "string", placeholder: "TEXT", description: "longer description" },
      annotation: { type: "list", placeholder: "KEY=VALUE", description: "a manifest annotation" },
      public: { type: "bool", description: "visible to every user (default: private)" },
      replace: { type: "bool", description: "move an existing name:tag to this image" },
      "limit-rate": { type: "string", placeholder: "SIZE", description: "upload at most SIZE per second, e.g. 10M" },
      store: { type: "string", placeholder: "STORE_ID", description: "upload to this store (default: the server picks)" },
    },
    examples: [
      'tml image push ./rootfs --name example/hello:latest --entrypoint "echo hello"',
      "tml image push build/zephyr.bin --firmware --name zephyr/blinky:v1",
      "tml image push debian.qcow2 --name vm/debian:12 --arch x86_64 --public",
      "tml image push disk.qcow2 --kernel vmlinuz --initrd initrd.gz --cmdline 'console=ttyS0 quiet' --name vm/tiny:1",
    ],
    async run(ctx, { args, flags }) {
      if (flags.name === undefined) throw new UsageError("`tml image push` needs --name NAME:TAG");
      const ref = splitReference(flags.name, "flag --name");
      if (ref.name === "") throw new UsageError("flag --name takes NAME:TAG, not a digest");
      const path = resolve(args.PATH);
      const detected = await detectKind(path, flags);
      const kind: Kind = detected === "dir" ? "rootfs" : detected;
      if (flags.entrypoint !== undefined && kind !== "rootfs") throw new UsageError("flag --entrypoint applies to rootfs images only");
      const rate = flags["limit-rate"] === undefined ? undefined : parseBytes("limit-rate", flags["limit-rate"]);
      const images = await ctx.client(ImageService);
      const work = await mkdtemp(join(tmpdir(), "tml-push-"));
      try {
        let file = path;
        let layerTitle = basename(path);
        if (detected === "dir") {
          file = join(work, "rootfs.tar.gz");
          layerTitle = "rootfs.tar.gz";
          if (ctx.out.format === "table") ctx.out.note(`Packing ${args.PATH} ...`);
          const { skipped } = await packDirectory(path, file);
          if (skipped.length > 0) ctx.out.note(`Left out ${skipped.length} special file(s) (sockets, devices, fifos), e.g. ${skipped[0]}.`);
        }
        // A VM image: optional kernel and initrd layers below the disk (docs/qemu.md).
        const boot = { kernel: flags.kernel, initrd: flags.initrd };
        const isDisk = kind === "qcow2" || kind === "raw";
        for (const f of ["kernel", "initrd", "cmdline"] as const) {
          if (flags[f] !== undefined && !isDisk) throw new UsageError(`flag --${f} applies to qcow2 and raw images only`);
        }
        if (boot.initrd !== undefined && boot.kernel === undefined) throw new UsageError("flag --initrd needs --kernel");
        if (flags.cmdline !== undefined && boot.kernel === undefined) throw new UsageError("flag --cmdline needs --kernel");
        if (kind === "qcow2" && (await qcow2HasBacking(file))) {
          throw new UsageError(`${args.PATH} has a backing file: flatten it first (qemu-img convert -O qcow2 ${args.PATH} flat.qcow2)`);
        }
        const layers: { file: string; title: string; mediaType: string; annotations: Record<string, string> }[] = [];
        for (const part of ["kernel", "initrd"] as const) {
          const given = boot[part];
          if (given === undefined) continue;
          const bootFile = resolve(given);
          await stat(bootFile).catch(() => {
            throw new UsageError(`flag --${part}: cannot read ${given}`);
          });
          const annotations: Record<string, string> = { "org.opencontainers.image.title": basename(bootFile) };
          if (part === "kernel" && flags.cmdline !== undefined) annotations["treadmill.kernel.cmdline"] = flags.cmdline;
          layers.push({ file: bootFile, title: basename(bootFile), mediaType: MEDIA_TYPE_OF_KIND[part], annotations });
        }
        layers.push({ file, title: layerTitle, mediaType: MEDIA_TYPE_OF_KIND[kind], annotations: { "org.opencontainers.image.title": layerTitle } });
        const digests = await Promise.all(layers.map((l) => digestFile(l.file)));
        const annotations: Record<string, string> = {
          "org.opencontainers.image.title": flags.title ?? ref.name,
          "treadmill.driver": DRIVER_OF_KIND[kind],
        };
        if (flags.description !== undefined) annotations["org.opencontainers.image.description"] = flags.description;
        if (kind === "rootfs") annotations["treadmill.entrypoint"] = entrypointOf(flags.entrypoint ?? "/bin/sh");
        if (flags.arch !== undefined) annotations["treadmill.arch"] = flags.arch;
        Object.assign(annotations, keyValues("annotation", flags.annotation));
        const { manifestJson, manifestDigest } = buildManifest(
          layers.map((l, i) => ({ mediaType: l.mediaType, digest: digests[i]!.digest, size: digests[i]!.size, annotations: l.annotations })),
          annotations,
        );
        const local: LocalImage = {
          manifestDigest,
          manifestJson,
          blobs: layers.map((l, i) => ({ ...digests[i]!, path: l.file })),
          mediaTypes: layers.map((l) => l.mediaType),
        };
        // The grant names what this push uploads: the coordinator lets the
        // pusher register those digests (docs/images.md, "Possession").
        const grant = await requestUploadGrant(images, local, { storeId: flags.store, timeoutMs: 30_000 });
        ctx.errorContext.server = grant.storeUrl;
        const { totalSize } = await uploadImage(grant.storeUrl, grant.token, local, {
          signal: ctx.abort.signal,
          timeoutMs: 30_000,
          bytesPerSecond: rate,
          tls: tlsOptions(ctx.caFile),
          onBlob: ({ digest, size, index }, held) => {
            if (held.exists) {
              ctx.out.note(`Layer ${digest.slice(0, 19)} is already in the store (uploaded by you).`);
              return undefined;
            }
            if (held.committedOffset > 0) ctx.out.note(`Resuming the upload at ${formatBytes(held.committedOffset)} of ${formatBytes(size)}.`);
            const bar = progressBar({ label: `Uploading ${layers[index]!.title}`, total: size, stream: ctx.io.stderr, startAt: held.committedOffset });
            return { progress: (bytesDone) => bar.update(bytesDone), done: () => bar.done(), failed: () => bar.stop() };
          },
        });
        ctx.errorContext.server = undefined;
        const image = await registerImage(images, local, grant, {
          name: ref.name,
          tag: ref.tag,
          sizeBytes: totalSize,
          annotations,
          visibility: flags.public === true ? ImageVisibility.PUBLIC : ImageVisibility.UNSPECIFIED,
          replace: flags.replace === true,
          timeoutMs: 30_000,
        });
        ctx.out.data(jsonOf(ImageSchema, image), () => ctx.out.line(`Pushed ${ref.name}:${ref.tag} (${manifestDigest}).`));
      } finally {
        await rm(work, { recursive: true, force: true });
      }
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["image", "pull"],
    summary: "Download an image: its manifest and every layer, verified",
    args: [{ name: "IMAGE", required: true, description: "name:tag or a manifest digest" }],
    flags: { dir: { type: "string", placeholder: "DIR", description: "where to write (default: ./NAME-TAG)" } },
    examples: ["tml image pull example/hello:latest", "tml image pull vm/debian:12 --dir /tmp/debian"],
    async run(ctx, { args, flags }) {
      const ref = splitReference(args.IMAGE, "IMAGE");
      const images = await ctx.client(ImageService);
      const { image, readToken } = await images.resolveImage({ reference: ref.text }, { timeoutMs: 30_000 });
      if (!image) throw new CliError("the server returned no image");
      const dir = resolve(flags.dir ?? `${image.name.split("/").pop()}-${image.tag}`);
      await mkdir(dir, { recursive: true });
      let lastError: unknown = new CliError(`no store holds ${ref.text}`, ExitCode.NOT_FOUND);
      for (const location of image.locations) {
        const transport = imageStoreTransport(location.url, { token: readToken?.token ?? "", tls: tlsOptions(ctx.caFile) });
        ctx.errorContext.server = location.url;
        try {
          const store = imageStoreClient(transport);
          const got = await store.getManifest({ digest: image.manifestDigest }, { timeoutMs: 30_000 });
          const actual = `sha256:${createHash("sha256").update(got.manifestJson).digest("hex")}`;
          if (actual !== image.manifestDigest) throw new CliError(`the store at ${location.url} sent a manifest that does not match its digest`);
          await writeFile(join(dir, "manifest.json"), got.manifestJson);
          const files: string[] = [];
          for (const layer of got.manifest?.layers ?? []) {
            const title = layer.annotations["org.opencontainers.image.title"];
            const name = title && /^[A-Za-z0-9._-]+$/.test(title) && !title.startsWith(".") ? title : layer.digest.replace(":", "-");
            const bar = progressBar({ label: `Downloading ${name}`, total: Number(layer.size), stream: ctx.io.stderr });
            try {
              await downloadBlob(store, { digest: layer.digest, size: Number(layer.size) }, join(dir, name), {
                onProgress: (p) => bar.update(p.bytesDone),
                signal: ctx.abort.signal,
              });
              bar.done();
            } catch (err) {
              bar.stop();
              throw err;
            }
            files.push(join(dir, name));
          }
          ctx.out.data({ image: jsonOf(ImageSchema, image), dir, files }, () =>
            ctx.out.line(`Pulled ${image.name}:${image.tag} into ${dir} (${files.length} layer${files.length === 1 ? "" : "s"}).`),
          );
          return ExitCode.OK;
        } catch (err) {
          lastError = err;
          if (image.locations.length > 1) ctx.out.note(`Could not pull from ${location.url}; trying the next store.`);
        } finally {
          transport.close();
        }
      }
      throw lastError;
    },
  }),
  defineCommand({
    path: ["image", "list"],
    summary: "List the images you can use",
    flags: {
      prefix: { type: "string", placeholder: "TEXT", description: "only names starting with TEXT" },
      visibility: { type: "string", placeholder: "V", description: `only ${enumWords(ImageVisibilitySchema).join(", ")} images` },
      mine: { type: "bool", description: "only images you registered" },
    },
    examples: ["tml image list", "tml image list --prefix zephyr/ -o json"],
    async run(ctx, { flags }) {
      const images = await ctx.client(ImageService);
      let visibility = 0;
      if (flags.visibility !== undefined) {
        const v = enumValue(ImageVisibilitySchema, flags.visibility);
        if (v === undefined) throw new UsageError(`flag --visibility must be one of ${enumWords(ImageVisibilitySchema).join(", ")}`);
        visibility = v;
      }
      let owner = "";
      if (flags.mine === true) {
        const { AuthService } = await import("../../gen/treadmill/coordinator/v1/auth_service_pb.js");
        owner = (await (await ctx.client(AuthService)).whoAmI({}, { timeoutMs: 15_000 })).user?.id ?? "";
      }
      const found: Image[] = await allPages(async (pageToken) => {
        const page = await images.listImages(
          { namePrefix: flags.prefix ?? "", visibility, ownerUserId: owner, pageSize: 1000, pageToken },
          { timeoutMs: 30_000 },
        );
        return { items: page.images, nextPageToken: page.nextPageToken };
      });
      ctx.out.data(
        found.map((i) => jsonOf(ImageSchema, i)),
        () => imageRows(ctx, found),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["image", "inspect"],
    summary: "Show an image's catalog entry and layers",
    args: [{ name: "IMAGE", required: true, description: "name:tag" }],
    examples: ["tml image inspect example/hello:latest"],
    async run(ctx, { args }) {
      const ref = splitReference(args.IMAGE, "IMAGE");
      const images = await ctx.client(ImageService);
      const { image } = await images.getImage({ reference: ref.text }, { timeoutMs: 15_000 });
      if (!image) throw new CliError("the server returned no image");
      ctx.out.data(jsonOf(ImageSchema, image), () =>
        ctx.out.fields([
          ["Image", `${image.name}:${image.tag}`],
          ["Digest", image.manifestDigest],
          ["Size", formatBytes(Number(image.sizeBytes))],
          ["Media types", image.mediaTypes.join(", ")],
          ["Visibility", word(ImageVisibilitySchema, image.visibility)],
          ["Owner", image.ownerUserId],
          ["Annotations", tagsText(image.annotations)],
          ["Stores", image.locations.map((l) => `${l.url}${l.site ? ` (${l.site})` : ""}`).join(", ")],
          ["Snapshot of", image.sourceJobId],
          ["Created", iso(image.createTime)],
          ["Updated", iso(image.updateTime)],
        ]),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["image", "rm"],
    summary: "Remove a name:tag from the catalog (the stores keep the bytes until collected)",
    args: [{ name: "IMAGE", required: true, description: "name:tag" }],
    examples: ["tml image rm example/hello:old"],
    async run(ctx, { args }) {
      const ref = splitReference(args.IMAGE, "IMAGE");
      const images = await ctx.client(ImageService);
      await images.deleteImage({ reference: ref.text }, { timeoutMs: 15_000 });
      ctx.out.data({ deleted: ref.text }, () => ctx.out.line(`Removed ${ref.text}.`));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["image", "tag"],
    summary: "Give an image another name:tag",
    args: [
      { name: "SOURCE", required: true, description: "an existing name:tag" },
      { name: "TARGET", required: true, description: "the new name:tag" },
    ],
    flags: { replace: { type: "bool", description: "move TARGET if it names another image" } },
    examples: ["tml image tag example/hello:latest example/hello:v1"],
    async run(ctx, { args, flags }) {
      const source = splitReference(args.SOURCE, "SOURCE");
      const target = splitReference(args.TARGET, "TARGET");
      if (target.name === "") throw new UsageError("TARGET must be NAME:TAG");
      const images = await ctx.client(ImageService);
      const { image } = await images.getImage({ reference: source.text }, { timeoutMs: 15_000 });
      if (!image) throw new CliError("the server returned no image");
      const { image: tagged } = await images.registerImage(
        {
          name: target.name,
          tag: target.tag,
          manifestDigest: image.manifestDigest,
          storeIds: image.locations.map((l) => l.storeId),
          mediaTypes: image.mediaTypes,
          sizeBytes: image.sizeBytes,
          annotations: image.annotations,
          visibility: image.visibility,
          groupIds: image.groupIds,
          replace: flags.replace === true,
        },
        { timeoutMs: 15_000 },
      );
      ctx.out.data(tagged ? jsonOf(ImageSchema, tagged) : {}, () => ctx.out.line(`Tagged ${source.text} as ${target.text}.`));
      return ExitCode.OK;
    },
  }),
];
