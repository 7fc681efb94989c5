/**
 * The network of `npm run site` (docs/sites-netns.md): a router namespace
 * joins the root namespace (the user), a central namespace and one namespace
 * per site, each over a veth pair, and its nftables forward chain is the
 * whole policy: the user reaches the centre and each site's public ports (its
 * proxy, log server and the proxy's TCP entrances), a site reaches the
 * centre, and nothing else is forwarded (the centre never reaches a site, a
 * site never reaches another or the user). Every rule lives in the router's
 * namespace, so deleting the namespaces removes every veth, route and rule.
 *
 * Names carry the run id (`tm-<id>-centre`, veths `tm<id>…`) so that two
 * launchers on one machine never collide; addresses are a /24 of
 * 198.18.0.0/15 (RFC 2544, benchmarking) that no route or address of the
 * root namespace overlaps. A run records its pid (and the pid's start time)
 * under RECORDS before it creates anything: a later launcher removes the
 * namespaces, veths and processes of a run whose launcher is gone.
 */
import { execFile, execFileSync } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../../lib/logger.js";

const exec = promisify(execFile);

/** Where each run records its launcher's pid. */
export const RECORDS = "/run/treadmill/sites";

/** Sites a /24 holds after the user's and the centre's /30s. */
export const MAX_SITES = 60;

/** A site's ports the user may reach from the root namespace. */
export interface PublicPorts {
  /** Single ports (the proxy, the log server). */
  ports: number[];
  /** An inclusive range (the proxy's TCP entrances), if any. */
  range?: [number, number];
}

export interface SiteNet {
  name: string;
  /** The site's network namespace. */
  ns: string;
  /** The site's address: every server and host of the site uses it. */
  address: string;
  /** The router's end of the site's veth pair, inside the router namespace. */
  routerDevice: string;
}

export interface NetworkPlan {
  runId: string;
  /** The /24 the run uses, e.g. 198.18.7.0/24. */
  subnet: string;
  router: string;
  /** The user's side: the root namespace's end of its veth pair, and the address it has. */
  user: { device: string; address: string; gateway: string };
  centre: { ns: string; address: string };
  sites: SiteNet[];
}

/** A fresh run id: 6 hex digits. */
export function newRunId(): string {
  return randomBytes(3).toString("hex");
}

/** The plan of a run: names and addresses, nothing created. `base` is the /24's first three octets. */
export function planNetwork(runId: string, base: string, siteNames: string[]): NetworkPlan {
  if (!/^[0-9a-f]{6}$/.test(runId)) throw new Error(`run id ${runId} must be 6 hex digits`);
  if (siteNames.length > MAX_SITES) throw new Error(`at most ${MAX_SITES} sites`);
  const prefix = `tm-${runId}`;
  return {
    runId,
    subnet: `${base}.0/24`,
    router: `${prefix}-router`,
    user: { device: `tm${runId}u`, address: `${base}.1`, gateway: `${base}.2` },
    centre: { ns: `${prefix}-centre`, address: `${base}.6` },
    sites: siteNames.map((name, i) => ({ name, ns: `${prefix}-${name}`, address: `${base}.${8 + 4 * i + 2}`, routerDevice: `s${i + 1}` })),
  };
}

/** Whether two IPv4 prefixes (`a.b.c.d/n`) overlap. */
export function overlaps(a: string, b: string): boolean {
  const parse = (p: string): [number, number] => {
    const [ip, bits = "32"] = p.split("/");
    const n = ip.split(".").reduce((acc, o) => acc * 256 + Number(o), 0);
    return [n, Number(bits)];
  };
  const [na, ba] = parse(a);
  const [nb, bb] = parse(b);
  const bits = Math.min(ba, bb);
  const mask = bits === 0 ? 0 : 2 ** 32 - 2 ** (32 - bits);
  return (na & mask) >>> 0 === (nb & mask) >>> 0;
}

/** The prefixes the root namespace routes or holds. */
async function hostPrefixes(): Promise<string[]> {
  const routes = JSON.parse((await exec("ip", ["-4", "-j", "route", "show", "table", "all"])).stdout) as { dst: string }[];
  const addrs = JSON.parse((await exec("ip", ["-4", "-j", "addr"])).stdout) as { addr_info: { local: string; prefixlen: number }[] }[];
  return [
    ...routes.filter((r) => r.dst !== "default" && /^\d/.test(r.dst)).map((r) => r.dst),
    ...addrs.flatMap((l) => l.addr_info.map((a) => `${a.local}/${a.prefixlen}`)),
  ];
}

/**
 * The run's /24 as its first three octets: `wanted` when nothing in the root
 * namespace overlaps it, else (when not given) a free one of 198.18.0.0/15.
 */
export async function chooseSubnet(wanted?: string): Promise<string> {
  const taken = await hostPrefixes();
  if (wanted !== undefined) {
    if (!/^\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(wanted) || wanted.split(".").some((o) => Number(o) > 255)) {
      throw new Error(`subnet ${wanted} must be the first three octets of a /24, e.g. 198.18.7`);
    }
    const clash = taken.find((p) => overlaps(p, `${wanted}.0/24`));
    if (clash !== undefined) throw new Error(`subnet ${wanted}.0/24 overlaps ${clash} of this machine`);
    return wanted;
  }
  for (let attempt = 0; attempt < 100; attempt++) {
    const n = randomInt(0, 512);
    const base = `198.${18 + (n >> 8)}.${n & 255}`;
    if (!taken.some((p) => overlaps(p, `${base}.0/24`))) return base;
  }
  throw new Error("no free /24 in 198.18.0.0/15: pass --subnet");
}

async function ip(...args: string[]): Promise<void> {
  await exec("ip", args);
}

/** Runs `nft -f -` in a namespace with `rules` on its input. */
function nft(ns: string, rules: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile("ip", ["netns", "exec", ns, "nft", "-f", "-"], (err, _stdout, stderr) =>
      err ? reject(new Error(`nft in ${ns} failed: ${stderr}`)) : resolve(),
    );
    child.stdin!.end(rules);
  });
}

/** The router's forward chain: the whole policy (see the head comment). */
export function routerRules(plan: NetworkPlan, open: PublicPorts): string {
  const ports = [...open.ports.map(String), ...(open.range ? [`${open.range[0]}-${open.range[1]}`] : [])].join(", ");
  const toSites = plan.sites.map((s) => `    iifname "u" oifname "${s.routerDevice}" ip daddr ${s.address} tcp dport { ${ports} } accept`);
  const fromSites = plan.sites.map((s) => `    iifname "${s.routerDevice}" oifname "c" accept`);
  return [
    "table inet treadmill {",
    "  chain forward {",
    "    type filter hook forward priority 0; policy drop;",
    "    ct state established,related accept",
    '    iifname "u" oifname "c" accept',
    ...toSites,
    ...fromSites,
    "  }",
    "}",
    "",
  ].join("\n");
}

/** The start time of a process (field 22 of /proc/PID/stat), or undefined when it is gone. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** Records this process as the owner of run `runId`, before anything of it exists; refuses a run id in use. */
export function recordRun(runId: string): void {
  if (runAlive(runId)) throw new Error(`run ${runId} is running: give another run id`);
  const dir = join(RECORDS, runId);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "owner"), `${process.pid} ${startTime(process.pid)}\n`);
}

/** Whether the launcher that recorded run `runId` still runs. */
function runAlive(runId: string): boolean {
  try {
    const [pid, started] = readFileSync(join(RECORDS, runId, "owner"), "utf8").trim().split(" ");
    return startTime(Number(pid)) === started;
  } catch {
    return false;
  }
}

/** The namespaces of run `runId` (all runs' when undefined), by `ip netns list`. */
function namespacesSync(runId?: string): string[] {
  const out = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
  return out
    .split("\n")
    .map((l) => l.split(" ")[0])
    .filter((n) => (runId === undefined ? /^tm-[0-9a-f]{6}-/.test(n) : n.startsWith(`tm-${runId}-`)));
}

/**
 * Removes run `runId` synchronously (usable in an `exit` handler): kills
 * every process left in its namespaces, deletes them (with their veths,
 * routes and nftables tables), the user's veth if it outlived them, and the
 * run's record. Errors are ignored: what is gone is gone.
 */
export function destroyRunSync(runId: string): void {
  const quiet = { stdio: "ignore" as const };
  for (const ns of namespacesSync(runId)) {
    try {
      const pids = execFileSync("ip", ["netns", "pids", ns], { encoding: "utf8" }).split("\n").filter(Boolean);
      for (const pid of pids) {
        try {
          process.kill(Number(pid), "SIGKILL");
        } catch {
          // already gone
        }
      }
      execFileSync("ip", ["netns", "del", ns], quiet);
    } catch {
      // already gone
    }
  }
  try {
    execFileSync("ip", ["link", "del", `tm${runId}u`], quiet);
  } catch {
    // deleted with the router's namespace
  }
  rmSync(join(RECORDS, runId), { recursive: true, force: true });
}

/** Removes every run whose launcher is gone (namespaces, veths, records); returns their ids. */
export function cleanStaleRuns(logger: Logger): string[] {
  const ids = new Set(namespacesSync().map((n) => n.slice(3, 9)));
  const links = JSON.parse(execFileSync("ip", ["-j", "link"], { encoding: "utf8" })) as { ifname: string }[];
  for (const l of links) if (/^tm[0-9a-f]{6}u$/.test(l.ifname)) ids.add(l.ifname.slice(2, 8));
  try {
    for (const id of readdirSync(RECORDS)) ids.add(id);
  } catch {
    // no run recorded yet
  }
  const stale = [...ids].filter((id) => !runAlive(id));
  for (const id of stale) {
    logger.warn({ runId: id }, "removing a stale run of a launcher that is gone");
    destroyRunSync(id);
  }
  return stale;
}

/** Creates the namespaces, veth pairs, addresses, routes and the router's rules of `plan`. */
export async function createNetwork(plan: NetworkPlan, open: PublicPorts): Promise<void> {
  const id = plan.runId;
  const prefix = plan.subnet.split(".").slice(0, 3).join(".");
  const namespaces = [plan.router, plan.centre.ns, ...plan.sites.map((s) => s.ns)];
  for (const ns of namespaces) {
    await ip("netns", "add", ns);
    await ip("-n", ns, "link", "set", "lo", "up");
  }
  // One veth pair per link: made in the root namespace under run-unique names, then moved and renamed.
  const link = async (rootName: string, routerName: string, far: { ns: string; address: string } | undefined, routerAddress: string) => {
    const peer = `${rootName}r`;
    await ip("link", "add", rootName, "type", "veth", "peer", "name", peer);
    await ip("link", "set", peer, "netns", plan.router);
    await ip("-n", plan.router, "link", "set", peer, "name", routerName);
    await ip("-n", plan.router, "addr", "add", `${routerAddress}/30`, "dev", routerName);
    await ip("-n", plan.router, "link", "set", routerName, "up");
    if (far === undefined) return;
    await ip("link", "set", rootName, "netns", far.ns);
    await ip("-n", far.ns, "link", "set", rootName, "name", "eth0");
    await ip("-n", far.ns, "addr", "add", `${far.address}/30`, "dev", "eth0");
    await ip("-n", far.ns, "link", "set", "eth0", "up");
    await ip("-n", far.ns, "route", "add", "default", "via", routerAddress);
  };
  await link(plan.user.device, "u", undefined, plan.user.gateway);
  await ip("addr", "add", `${plan.user.address}/30`, "dev", plan.user.device);
  await ip("link", "set", plan.user.device, "up");
  await ip("route", "add", plan.subnet, "via", plan.user.gateway);
  await link(`tm${id}c`, "c", plan.centre, `${prefix}.5`);
  for (const [i, site] of plan.sites.entries()) {
    await link(`tm${id}s${i + 1}`, site.routerDevice, site, `${prefix}.${8 + 4 * i + 1}`);
  }
  await exec("ip", ["netns", "exec", plan.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
  await nft(plan.router, routerRules(plan, open));
}
