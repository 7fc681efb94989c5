import { ImageService } from "../../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { ImageVisibilitySchema, type Image } from "../../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageStoreService } from "../../../gen/treadmill/image/v1/image_store_service_pb.js";
import type { Manifest } from "../../../gen/treadmill/image/v1/manifest_pb.js";
import { errorText } from "../api.js";
import { facts, h, link, notice, pager, table } from "../dom.js";
import { bytes, enumWord, iso, shortDigest, when } from "../format.js";
import type { PageContext } from "../main.js";

const TITLE = "org.opencontainers.image.title";

/** Every image the user may use (ListImages, paged). */
export async function imagesPage({ api, main, signal }: PageContext): Promise<void> {
  document.title = "Images · Treadmill";
  const status = h("div", { class: "status-area" });
  const list = h("div", {});
  const more = h("button", { type: "button", hidden: true }, "Load more");
  main.append(h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Images"), link("/jobs/new", "Submit a job")), status, list, more);
  const images: Image[] = [];
  const load = pager(more, status, signal, async (pageToken) => {
    const res = await api.client(ImageService).listImages({ pageSize: 100, pageToken }, { signal, timeoutMs: 15_000 });
    images.push(...res.images);
    const headers = ["Image", "Digest", "Size", "Media types", "Visibility", "Stored in", "Registered"];
    list.replaceChildren(
      images.length === 0
        ? h("p", {}, "No images yet: push one with tml image push.")
        : table(
            "Images",
            headers,
            images.map((i) => [
              link(`/images/${encodeURIComponent(`${i.name}:${i.tag}`)}`, `${i.name}:${i.tag}`),
              h("code", { title: i.manifestDigest }, shortDigest(i.manifestDigest)),
              bytes(i.sizeBytes),
              i.mediaTypes.map((m) => m.replace("application/vnd.treadmill.", "")).join(", "),
              enumWord(ImageVisibilitySchema, i.visibility),
              `${i.locations.length} store${i.locations.length === 1 ? "" : "s"}`,
              h("time", { datetime: iso(i.createTime) }, when(i.createTime)),
            ]),
            { id: "images-table", class: "cards" },
          ),
    );
    return res.nextPageToken;
  });
  await load();
}

/**
 * One image: its catalog entry (ResolveImage), and its layers from the
 * manifest, read from a store that holds it with the image:read token of
 * ResolveImage, and checked against its digest.
 */
export async function imagePage({ api, main, signal, params }: PageContext): Promise<void> {
  const reference = params[0];
  document.title = `${reference} · Treadmill`;
  const status = h("div", { class: "status-area" });
  const layers = h("section", { "aria-labelledby": "layers-title" }, h("h2", { id: "layers-title" }, "Layers"), h("p", { class: "muted" }, "Loading the manifest…"));
  main.append(h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, reference), link("/images", "All images")), status);
  let image: Image | undefined;
  let readToken: string;
  try {
    const res = await api.client(ImageService).resolveImage({ reference }, { signal, timeoutMs: 15_000 });
    image = res.image;
    readToken = res.readToken?.token ?? "";
  } catch (err) {
    if (!signal.aborted) status.append(notice("error", errorText(err)));
    return;
  }
  if (!image) return;
  main.append(
    facts([
      ["Name", `${image.name}:${image.tag}`],
      ["Manifest", h("code", {}, image.manifestDigest)],
      ["Size", bytes(image.sizeBytes)],
      ["Media types", image.mediaTypes.join(", ")],
      ["Visibility", enumWord(ImageVisibilitySchema, image.visibility)],
      ["Snapshot of job", image.sourceJobId ? link(`/jobs/${image.sourceJobId}`, image.sourceJobId) : ""],
      ["Registered", h("time", { datetime: iso(image.createTime) }, when(image.createTime))],
      ...Object.entries(image.annotations).map(([k, v]): [string, string] => [k, v]),
    ]),
    h(
      "section",
      { "aria-labelledby": "locations-title" },
      h("h2", { id: "locations-title" }, "Stored in"),
      table(
        "Stores holding the image",
        ["Store", "URL", "Site"],
        image.locations.map((l) => [h("code", {}, l.storeId), l.url, l.site]),
        { id: "image-locations" },
      ),
    ),
    layers,
  );
  const { manifest, from, problem } = await fetchManifest(api, image, readToken, signal);
  if (signal.aborted) return;
  if (!manifest) {
    layers.replaceChildren(layers.firstChild!, notice("error", problem ?? "no store answered"));
    return;
  }
  layers.replaceChildren(
    layers.firstChild!,
    h("p", { class: "muted" }, `From ${from}${problem ? ` (${problem})` : ", digest verified"}.`),
    table(
      "Layers",
      ["#", "Title", "Media type", "Size", "Digest"],
      manifest.layers.map((l, i) => [String(i + 1), l.annotations[TITLE] ?? "", l.mediaType, bytes(l.size), h("code", { title: l.digest }, shortDigest(l.digest))]),
      { id: "image-layers" },
    ),
  );
}

async function fetchManifest(
  api: PageContext["api"],
  image: Image,
  token: string,
  signal: AbortSignal,
): Promise<{ manifest?: Manifest; from?: string; problem?: string }> {
  let problem: string | undefined;
  for (const location of image.locations) {
    try {
      const store = api.remote(ImageStoreService, location.url, () => token);
      const res = await store.getManifest({ digest: image.manifestDigest }, { signal, timeoutMs: 15_000 });
      // Nothing trusts a store: the bytes must hash to the digest (WebCrypto needs a secure context).
      if (crypto.subtle) {
        const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", new Uint8Array(res.manifestJson)));
        const hex = Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("");
        if (`sha256:${hex}` !== image.manifestDigest) {
          problem = `the store at ${location.url} sent a manifest that does not match its digest`;
          continue;
        }
        return { manifest: res.manifest, from: location.url };
      }
      return { manifest: res.manifest, from: location.url, problem: "digest not verified: the page is not in a secure context" };
    } catch (err) {
      if (signal.aborted) return {};
      problem = `${location.url}: ${errorText(err)}`;
    }
  }
  return { problem };
}
