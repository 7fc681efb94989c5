/**
 * `npm run site -- --sites 2`: the launcher of docs/sites-netns.md, in the
 * foreground until SIGINT or SIGTERM, which stop every process and remove the
 * namespaces (launcher.ts). As root: it makes network namespaces.
 */
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { logLevelField } from "../../lib/component.js";
import { loadConfig } from "../../lib/config.js";
import { runMain } from "../../lib/main.js";
import { MAX_SITES } from "./network.js";
import { sitesBanner, startSites, type Sites } from "./launcher.js";

const schema = {
  sites: { type: "int", default: 2, min: 1, max: MAX_SITES, description: "how many site namespaces" },
  coordinators: { type: "int", default: 2, min: 1, max: 9, description: "how many coordinator replicas in the central namespace" },
  dir: { type: "path", default: "", description: "the run's directory, new or empty, kept at the end (default: a temporary one, removed at the end)" },
  runId: { type: "string", default: "", description: "6 hex digits naming the run's namespaces and veths (default: random)" },
  subnet: { type: "string", default: "", description: "the /24 to use as its first three octets, e.g. 198.18.7 (default: a free one of 198.18.0.0/15)" },
  logLevel: logLevelField("info"),
} as const;

if (process.getuid?.() !== 0 && !process.argv.includes("--help")) {
  process.stderr.write("npm run site makes network namespaces: run it as root\n");
  process.exit(2);
}

await runMain({
  component: "sites",
  summary: "npm run site: a central namespace and N site namespaces, every component its own process (docs/sites-netns.md).",
  schema,
  proc: process,
  load: (source) => loadConfig("sites", schema, source),
  create: (config, logger) => {
    let sites: Sites | undefined;
    return {
      async start() {
        // npm runs scripts in the package's directory; a relative --dir is the caller's (INIT_CWD).
        const dir = config.dir === "" ? await mkdtemp(join(tmpdir(), "treadmill-sites-")) : resolve(process.env.INIT_CWD ?? process.cwd(), config.dir);
        sites = await startSites({
          sites: config.sites,
          coordinators: config.coordinators,
          dir,
          removeDir: config.dir === "",
          runId: config.runId === "" ? undefined : config.runId,
          subnet: config.subnet === "" ? undefined : config.subnet,
          logger,
        });
      },
      async stop() {
        await sites?.stop();
      },
      get info() {
        return sites?.info;
      },
    };
  },
  ready: (component) => process.stdout.write(sitesBanner(component.info!)),
});
