/**
 * Builds the web console into console/dist (offline: esbuild only):
 * `assets/app-<hash>.js|.css` (+ source maps and precompressed `.gz`),
 * `index.html` pointing at them, and `favicon.svg`. Run by `npm run build`
 * (and so by `npm ci`, through `prepare`); the coordinator serves the result.
 */
import { copyFile, mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { gzip as gzipCallback, constants } from "node:zlib";
import { build } from "esbuild";

const gzip = promisify(gzipCallback);
const here = dirname(fileURLToPath(import.meta.url));

export interface ConsoleBuild {
  outDir: string;
  /** Path (relative to outDir) and size in bytes, raw and gzipped, of each script and stylesheet. */
  assets: { path: string; bytes: number; gzipBytes: number }[];
}

export async function buildConsole(options: { outDir?: string; minify?: boolean } = {}): Promise<ConsoleBuild> {
  const outDir = resolve(options.outDir ?? join(here, "dist"));
  await rm(outDir, { recursive: true, force: true });
  await mkdir(outDir, { recursive: true });
  const result = await build({
    entryPoints: { app: join(here, "src/main.ts") },
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022", "chrome111", "firefox115", "safari16.4"],
    minify: options.minify ?? true,
    sourcemap: "linked",
    legalComments: "linked",
    splitting: true,
    entryNames: "assets/[name]-[hash]",
    chunkNames: "assets/[name]-[hash]",
    assetNames: "assets/[name]-[hash]",
    outdir: outDir,
    metafile: true,
    logLevel: "warning",
  });
  const outputs = Object.keys(result.metafile.outputs).map((p) => resolve(p));
  const find = (ext: string) => {
    const found = outputs.find((p) => p.endsWith(ext) && relative(outDir, p).startsWith("assets/app-"));
    if (!found) throw new Error(`the build produced no ${ext} file`);
    return found;
  };
  const js = find(".js");
  const css = find(".css");
  const template = await readFile(join(here, "index.html"), "utf8");
  const href = (p: string) => `/${relative(outDir, p).split("\\").join("/")}`;
  await writeFile(join(outDir, "index.html"), template.replace("__APP_JS__", href(js)).replace("__APP_CSS__", href(css)));
  await copyFile(join(here, "favicon.svg"), join(outDir, "favicon.svg"));
  const assets: ConsoleBuild["assets"] = [];
  for (const file of outputs.filter((p) => /\.(js|css)$/.test(p))) {
    const body = await readFile(file);
    const packed = await gzip(body, { level: constants.Z_BEST_COMPRESSION });
    await writeFile(`${file}.gz`, packed);
    assets.push({ path: relative(outDir, file), bytes: (await stat(file)).size, gzipBytes: packed.length });
  }
  return { outDir, assets };
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const built = await buildConsole();
  for (const a of built.assets) {
    console.log(`console/dist/${a.path}  ${(a.bytes / 1024).toFixed(1)} KiB (${(a.gzipBytes / 1024).toFixed(1)} KiB gzipped)`);
  }
}
