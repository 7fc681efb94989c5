import { isAbsolute, relative } from "node:path";
import type { Testbed } from "./testbed.js";

const labels: Record<string, string> = {
  coordinator: "coordinator",
  "image-store": "image store",
  "image-cache": "image cache",
  "log-server": "log server",
  proxy: "proxy",
};

/** What `npm start` prints once everything is up: each address and how to reach it. */
export function banner(testbed: Testbed): string {
  const servers = testbed.servers();
  const coordinator = servers.find((s) => s.role === "coordinator")!.url;
  const rows = servers.map((s) => `  ${labels[s.role].padEnd(13)} ${s.url}`);
  const admin = testbed.admin();
  // Relative when under the working directory (the usual .treadmill/...).
  const rel = relative(process.cwd(), admin.passwordFile);
  const passwordFile = rel.startsWith("..") || isAbsolute(rel) ? admin.passwordFile : rel;
  return [
    "",
    "Treadmill testbed is up.",
    "",
    ...rows,
    `  ${"supervisors".padEnd(13)} ${testbed.supervisors().join(", ")}`,
    "",
    `Web console: ${coordinator}/  (log in as "${admin.name}")`,
    `Admin: user "${admin.name}", password in ${passwordFile}`,
    `Example images: ${testbed.examples().join(", ") || "none"}`,
    "",
    "Try it, in another terminal:",
    `  npx tml login ${coordinator} --user ${admin.name} --password-stdin < ${passwordFile}`,
    "  npx tml job run example/hello",
    "  npx tml job run example/blinky --tag board=sim                 # on the simulated board",
    ...(testbed.supervisors().some((s) => s.startsWith("flaky-"))
      ? ["  npx tml job run example/blinky --tag board=flaky               # on a board that fails now and then"]
      : []),
    "  npx tml console $(npx tml job run --detach example/shell)     # leave with ~.",
    "",
    "Every server speaks gRPC, Connect and gRPC-Web on its one port, with reflection:",
    `  npx buf curl --protocol grpc --http2-prior-knowledge --list-services ${coordinator}`,
    "",
    "Press Ctrl-C to stop.",
    "",
  ].join("\n");
}
