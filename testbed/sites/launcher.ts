/**
 * `npm run site`: the components of docs/site.md spread across network
 * namespaces (docs/sites-netns.md), every one its own process (the compiled
 * bins, as an operator runs them): a central namespace with PostgreSQL
 * (scripts/postgres.js), two coordinator replicas and an image store; a
 * namespace per site with its image cache, log server, proxy, a process
 * host's supervisor and a simulated board with its supervisor. The user is
 * the root namespace, where tml runs. Every server speaks TLS with a
 * certificate of the run's CA, which every component that dials out trusts
 * through `--ca-file` and tml through its context (`tml login --ca-file`).
 *
 * It composes nothing in-process: it makes the network (network.ts) and the
 * certificates (pki.ts), then runs each bin inside its namespace once the
 * ones it needs are ready (processes.ts), making credentials and hosts with
 * tml as docs/site.md does. stop() stops the processes (hosts first,
 * PostgreSQL last), then removes the network; an `exit` hook removes the
 * network at once (killing what is left in it) if the launcher ends any
 * other way: a second signal, a crash.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { chmod, mkdir, readdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "../../lib/logger.js";
import { packagePath } from "../../lib/package.js";
import {
  chooseSubnet,
  cleanStaleRuns,
  createNetwork,
  destroyRunSync,
  newRunId,
  planNetwork,
  recordRun,
  type NetworkPlan,
  type PublicPorts,
  type SiteNet,
} from "./network.js";
import { createPki, type Pki, type ServerCertificate } from "./pki.js";
import { NamespaceProcesses } from "./processes.js";

/** Ports inside each namespace: every namespace has its own, so they are fixed. */
export const PORTS = {
  postgres: 5432,
  coordinator: 7700,
  store: 7701,
  cache: 7702,
  logs: 7703,
  proxy: 7704,
  /** The proxy's plain TCP entrances (`tml port-forward --tcp`). */
  proxyTcp: [7720, 7739] as [number, number],
} as const;

/** Stop order, highest first: hosts, then the site servers they use, then the centre, then its database. */
const STAGE = { database: 0, centre: 1, site: 2, host: 3 } as const;

/** The ports of a site the user reaches. */
const PUBLIC: PublicPorts = { ports: [PORTS.proxy, PORTS.logs], range: PORTS.proxyTcp };

export interface SitesOptions {
  sites: number;
  coordinators: number;
  /** The run's directory; made (it must be empty or absent). */
  dir: string;
  /** Remove `dir` at stop. */
  removeDir: boolean;
  runId?: string;
  /** The /24's first three octets; default a free one of 198.18.0.0/15. */
  subnet?: string;
  logger: Logger;
}

export interface SiteInfo {
  name: string;
  ns: string;
  address: string;
  proxyUrl: string;
  logServerUrl: string;
  cacheUrl: string;
  proxyTcpPorts: string;
  processHost: string;
  boardHost: string;
}

/** What a run started and how to reach it: written to `<dir>/sites.json`. */
export interface SitesInfo {
  runId: string;
  pid: number;
  dir: string;
  subnet: string;
  router: string;
  caFile: string;
  tmlConfig: string;
  adminPasswordFile: string;
  coordinatorUrls: string[];
  storeUrl: string;
  centre: { ns: string; address: string };
  sites: SiteInfo[];
  logs: string;
}

export interface Sites {
  info: SitesInfo;
  /** Stops every process, removes the network (and the directory when asked). Idempotent. */
  stop(): Promise<void>;
}

/** The simulated board's program: its bundle when built (`npm run site` builds first), else its source through tsx. */
function simBoardCommand(): string {
  return existsSync(packagePath("dist", "sim-board.js"))
    ? `${process.execPath} --enable-source-maps ${packagePath("dist", "sim-board.js")}`
    : `${process.execPath} --import tsx ${packagePath("supervisor", "sim-board", "sim-board.ts")}`;
}

const bin = (name: string) => packagePath("bin", `${name}.js`);

/** What starting the centre and the sites shares: the run's directory, its processes, tml in its context, its CA. */
interface RunContext {
  dir: string;
  pki: Pki;
  launch(name: string, stage: number, ns: string, argv: string[], ready: string, env?: NodeJS.ProcessEnv): Promise<void>;
  /** Runs tml (the launcher's context) and resolves with its standard output; rejects on a non-zero exit. */
  tml(args: string[], input?: string): Promise<string>;
}

/** A secret made by tml (`.field` of its JSON output), also kept in `<dir>/<file>`, mode 0600. */
async function secret(run: RunContext, file: string, args: string[], field: string): Promise<string> {
  const value = (JSON.parse(await run.tml([...args, "-o", "json"])) as Record<string, string>)[field];
  await writeFile(join(run.dir, file), `${value}\n`, { mode: 0o600 });
  return value;
}

/** A directory of the run that the postgres user and the jobs' slot uids may enter. */
async function openDir(path: string): Promise<string> {
  await mkdir(path);
  await chmod(path, 0o755);
  return path;
}

const tlsFlags = (cert: ServerCertificate) => ["--tls-cert-file", cert.certFile, "--tls-key-file", cert.keyFile];

/** PostgreSQL, the coordinators (one at a time: the first makes the admin), tml's login, the image store. */
async function startCentre(run: RunContext, centre: NetworkPlan["centre"], coordinators: number) {
  const centreDir = await openDir(join(run.dir, "centre"));
  const cert = await run.pki.issue("centre", centre.address);
  const databaseUrlFile = join(run.dir, "database-url");
  await run.launch(
    "postgres",
    STAGE.database,
    centre.ns,
    [packagePath("scripts", "postgres.js"), "--data-dir", join(centreDir, "postgres"), "--port", String(PORTS.postgres), "--url-file", databaseUrlFile],
    "postgres ready",
  );
  const databaseUrl = readFileSync(databaseUrlFile, "utf8").trim();
  const adminPasswordFile = join(run.dir, "admin-password");
  const adminPassword = randomBytes(18).toString("base64");
  await writeFile(adminPasswordFile, `${adminPassword}\n`, { mode: 0o600 });
  const coordinatorUrls: string[] = [];
  for (let i = 1; i <= coordinators; i++) {
    const port = PORTS.coordinator + 10 * (i - 1);
    coordinatorUrls.push(`https://${centre.address}:${port}`);
    await run.launch(
      `coordinator-${i}`,
      STAGE.centre,
      centre.ns,
      [bin("treadmill-coordinator"), "--host", centre.address, "--port", String(port), "--data-dir", join(centreDir, `coordinator-${i}`), ...tlsFlags(cert)],
      "coordinator ready",
      { DATABASE_URL: databaseUrl, TREADMILL_COORDINATOR_ADMIN_PASSWORD: adminPassword },
    );
  }
  await run.tml(["login", coordinatorUrls.join(","), "--ca-file", run.pki.caFile, "--user", "admin", "--password-stdin"], `${adminPassword}\n`);

  const storeUrl = `https://${centre.address}:${PORTS.store}`;
  const credential = await secret(run, "image-store.credential", ["token", "create", "--service", "--description", "image store of the centre"], "token");
  await run.launch(
    "image-store",
    STAGE.centre,
    centre.ns,
    [bin("treadmill-image-store"), "--mode", "store", "--host", centre.address, "--port", String(PORTS.store), "--data-dir", join(centreDir, "image-store"),
      ...tlsFlags(cert), "--ca-file", run.pki.caFile, "--coordinator-url", coordinatorUrls.join(","), "--public-url", storeUrl],
    "registered with coordinator",
    { TREADMILL_IMAGE_STORE_SERVICE_CREDENTIAL: credential },
  );
  return { coordinatorUrls, storeUrl, adminPasswordFile };
}

/** The simulated board's configuration for the board driver (docs/site.md's), its state in `boardDir`. */
function boardConfig(name: string, boardDir: string) {
  const control = (command: string) => `echo ${command} | socat -t 5 - UNIX-CONNECT:${boardDir}/control.sock`;
  return {
    name,
    serial: { device: join(boardDir, "tty"), baud: 115200 },
    commands: { powerOn: control("on"), powerOff: control("off"), reset: control("reset"), flash: `cp {image} ${boardDir}/firmware.sh` },
    bootPattern: "boot: starting firmware",
    bootTimeoutMs: 20000,
    exitPattern: "TREADMILL_EXIT=(\\d+)",
  };
}

/** A site: its cache, log server and proxy side by side, then its two hosts (a process host; a simulated board and its host). */
/** Every replica, the i-th (round) first: site i's components prefer replica i and fail over to the others. */
function preferring(urls: string[], i: number): string[] {
  const first = i % urls.length;
  return [...urls.slice(first), ...urls.slice(0, first)];
}

async function startSite(run: RunContext, site: SiteNet, coordinatorUrls: string): Promise<SiteInfo> {
  const siteDir = await openDir(join(run.dir, site.name));
  const cert = await run.pki.issue(site.name, site.address);
  const url = (port: number) => `https://${site.address}:${port}`;
  const credential = (server: string) =>
    secret(run, `${site.name}-${server}.credential`, ["token", "create", "--service", "--description", `${server} of ${site.name}`], "token");
  const server = (port: number) => [
    "--site", site.name, "--host", site.address, "--port", String(port), ...tlsFlags(cert),
    "--ca-file", run.pki.caFile, "--coordinator-url", coordinatorUrls, "--public-url", url(port),
  ];
  const [cacheCredential, logsCredential, proxyCredential] = [await credential("image-cache"), await credential("log-server"), await credential("proxy")];
  const cacheDir = join(siteDir, "image-cache");
  await Promise.all([
    run.launch(
      `${site.name}-image-cache`,
      STAGE.site,
      site.ns,
      [bin("treadmill-image-store"), "--mode", "cache", "--data-dir", cacheDir, "--shared-path", cacheDir, ...server(PORTS.cache)],
      "registered with coordinator",
      { TREADMILL_IMAGE_STORE_SERVICE_CREDENTIAL: cacheCredential },
    ),
    run.launch(
      `${site.name}-log-server`,
      STAGE.site,
      site.ns,
      [bin("treadmill-log-server"), "--data-dir", join(siteDir, "log-server"), ...server(PORTS.logs)],
      "registered with coordinator",
      { TREADMILL_LOG_SERVER_SERVICE_CREDENTIAL: logsCredential },
    ),
    run.launch(
      `${site.name}-proxy`,
      STAGE.site,
      site.ns,
      [bin("treadmill-proxy"), "--tcp-port-range", `${PORTS.proxyTcp[0]}-${PORTS.proxyTcp[1]}`, ...server(PORTS.proxy)],
      "registered with coordinator",
      { TREADMILL_PROXY_SERVICE_CREDENTIAL: proxyCredential },
    ),
  ]);

  const processHost = `${site.name}-sup`;
  const boardHost = `${site.name}-board`;
  const processCredential = await secret(run, `${processHost}.credential`, ["host", "create", processHost, "--driver", "process", "--site", site.name], "credential");
  const boardCredential = await secret(run, `${boardHost}.credential`, ["host", "create", boardHost, "--driver", "board", "--tag", "board=sim", "--site", site.name], "credential");
  const boardDir = join(siteDir, "board");
  await mkdir(boardDir);
  const boardConfigFile = join(siteDir, "board.json");
  await writeFile(boardConfigFile, JSON.stringify(boardConfig(boardHost, boardDir)));
  const supervisor = (name: string, work: string, driver: string[]) => [
    bin("treadmill-supervisor"), "--name", name, ...driver, "--ca-file", run.pki.caFile, "--coordinator-url", coordinatorUrls, "--work-dir", join(siteDir, work),
  ];
  await Promise.all([
    run.launch(`${site.name}-supervisor`, STAGE.host, site.ns, supervisor(processHost, "supervisor", ["--driver", "process"]), "attached to coordinator", {
      TREADMILL_SUPERVISOR_HOST_CREDENTIAL: processCredential,
    }),
    (async () => {
      await run.launch(`${site.name}-sim-board`, STAGE.host, site.ns, ["socat", `pty,raw,echo=0,link=${boardDir}/tty`, `EXEC:${simBoardCommand()} ${boardDir}`], "sim-board ready");
      await run.launch(
        `${site.name}-board-supervisor`,
        STAGE.host,
        site.ns,
        supervisor(boardHost, "board-work", ["--driver", "board", "--board-config-file", boardConfigFile]),
        "attached to coordinator",
        { TREADMILL_SUPERVISOR_HOST_CREDENTIAL: boardCredential },
      );
    })(),
  ]);
  return {
    name: site.name,
    ns: site.ns,
    address: site.address,
    proxyUrl: url(PORTS.proxy),
    logServerUrl: url(PORTS.logs),
    cacheUrl: url(PORTS.cache),
    proxyTcpPorts: `${PORTS.proxyTcp[0]}-${PORTS.proxyTcp[1]}`,
    processHost,
    boardHost,
  };
}

/** Runs tml in the launcher's context (`tmlConfig`) with `env`. */
function tmlIn(env: NodeJS.ProcessEnv, tmlConfig: string) {
  return (args: string[], input?: string) =>
    new Promise<string>((resolve, reject) => {
      const child = execFile(bin("tml"), args, { env: { ...env, TML_CONFIG: tmlConfig } });
      child.stdin!.end(input ?? "");
      let out = "";
      let err = "";
      child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
      child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
      child.once("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`tml ${args.slice(0, 2).join(" ")} exited ${code}: ${err}`))));
    });
}

/** Starts a run; on failure removes what it made and throws (the logs stay when the directory is kept). */
export async function startSites(options: SitesOptions): Promise<Sites> {
  const { logger, dir } = options;
  if (existsSync(dir) && (await readdir(dir)).length > 0) throw new Error(`directory ${dir} is not empty: give a new one`);
  cleanStaleRuns(logger);
  const runId = options.runId ?? newRunId();
  const siteNames = Array.from({ length: options.sites }, (_, i) => `site-${i + 1}`);
  const plan: NetworkPlan = planNetwork(runId, await chooseSubnet(options.subnet), siteNames);
  recordRun(runId);
  const destroyOnExit = () => destroyRunSync(runId);
  process.on("exit", destroyOnExit);
  await mkdir(dir, { recursive: true });
  // The embedded PostgreSQL runs as the postgres user and the jobs as slot uids: both enter it.
  await chmod(dir, 0o755);
  const logs = join(dir, "logs");
  await mkdir(logs);

  let processes: NamespaceProcesses | undefined;
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      await processes?.stop();
      destroyRunSync(runId);
      process.off("exit", destroyOnExit);
      if (options.removeDir) await rm(dir, { recursive: true, force: true });
      logger.info({ runId }, "sites stopped and removed");
    })();
    return stopping;
  };

  try {
    await createNetwork(plan, PUBLIC);
    logger.info({ runId, subnet: plan.subnet }, "network made");
    const pki = await createPki(join(dir, "tls"), runId);
    const env: NodeJS.ProcessEnv = { ...process.env, NO_COLOR: "1" };
    // The run's own settings only: none of the caller's Treadmill or tml settings, nor a CA it trusts.
    for (const key of Object.keys(env)) if (key.startsWith("TML_") || key.startsWith("TREADMILL_")) delete env[key];
    delete env.NODE_EXTRA_CA_CERTS;
    const group = new NamespaceProcesses({ cwd: dir, logs, env, logger });
    processes = group;
    const tmlConfig = join(dir, "tml.json");
    const run: RunContext = {
      dir,
      pki,
      launch: (name, stage, ns, argv, ready, extra = {}) => group.launch({ name, stage, ns, argv, ready, env: extra }),
      tml: tmlIn(env, tmlConfig),
    };
    const centre = await startCentre(run, plan.centre, options.coordinators);
    // Until clients take a list of coordinators, each site's components use one replica, in turn.
    const sites = await Promise.all(plan.sites.map((site, i) => startSite(run, site, preferring(centre.coordinatorUrls, i).join(","))));
    const info: SitesInfo = {
      runId,
      pid: process.pid,
      dir,
      subnet: plan.subnet,
      router: plan.router,
      caFile: pki.caFile,
      tmlConfig,
      adminPasswordFile: centre.adminPasswordFile,
      coordinatorUrls: centre.coordinatorUrls,
      storeUrl: centre.storeUrl,
      centre: plan.centre,
      sites,
      logs,
    };
    await writeInfo(info);
    return { info, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** `<dir>/sites.json`, and the shell variables of docs/sites-netns.md: `<dir>/env` and `<dir>/<site>.env`. */
async function writeInfo(info: SitesInfo): Promise<void> {
  const vars = (pairs: Record<string, string>) =>
    Object.entries(pairs)
      .map(([k, v]) => `${k}='${v}'\n`)
      .join("");
  await writeFile(join(info.dir, "env"), [
    `export TML_CONFIG='${info.tmlConfig}'\n`,
    vars({
      RUN_ID: info.runId,
      CA_FILE: info.caFile,
      COORDINATOR_URLS: info.coordinatorUrls.join(","),
      STORE_URL: info.storeUrl,
      CENTRE_NS: info.centre.ns,
      CENTRE_ADDRESS: info.centre.address,
      COORDINATOR_PORT: String(PORTS.coordinator),
      SITES: info.sites.map((s) => s.name).join(" "),
    }),
  ].join(""));
  for (const site of info.sites) {
    await writeFile(
      join(info.dir, `${site.name}.env`),
      vars({
        SITE: site.name,
        SITE_NS: site.ns,
        SITE_ADDRESS: site.address,
        PROXY_URL: site.proxyUrl,
        LOG_SERVER_URL: site.logServerUrl,
        CACHE_URL: site.cacheUrl,
        PROXY_PORT: String(PORTS.proxy),
        LOG_SERVER_PORT: String(PORTS.logs),
        CACHE_PORT: String(PORTS.cache),
        PROCESS_HOST: site.processHost,
        BOARD_HOST: site.boardHost,
      }),
    );
  }
  await writeFile(join(info.dir, "sites.json"), `${JSON.stringify(info, null, 2)}\n`);
}

/** What the launcher prints once everything is up. */
export function sitesBanner(info: SitesInfo): string {
  const rows = info.sites.map(
    (s) =>
      `  ${s.name.padEnd(8)} ${s.ns} ${s.address}: proxy ${s.proxyUrl} (TCP entrances ${s.proxyTcpPorts}), log server ${s.logServerUrl};` +
      ` unreachable from here: cache ${s.cacheUrl}, hosts ${s.processHost} (process), ${s.boardHost} (simulated board)`,
  );
  return [
    "",
    `Treadmill sites are up: run ${info.runId}, ${info.subnet}, state in ${info.dir}`,
    "",
    `  centre   ${info.centre.ns} ${info.centre.address}: coordinators ${info.coordinatorUrls.join(", ")}, image store ${info.storeUrl}, PostgreSQL on its 127.0.0.1`,
    ...rows,
    "",
    `tml:   export TML_CONFIG=${info.tmlConfig}   (or . ${join(info.dir, "env")})`,
    `       or: tml login ${info.coordinatorUrls.join(",")} --ca-file ${info.caFile} --user admin --password-stdin < ${info.adminPasswordFile}`,
    `Logs:  ${info.logs}/<name>.log`,
    "Ctrl-C (SIGINT or SIGTERM) stops every process and removes the namespaces.",
    "",
  ].join("\n");
}
