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
  return [
    "",
    "Treadmill testbed is up.",
    "",
    ...rows,
    `  ${"supervisors".padEnd(13)} ${testbed.supervisors().join(", ")} (process driver)`,
    "",
    `Admin: user "${testbed.admin().name}", password in ${testbed.admin().credentialsFile}`,
    `Example images: ${testbed.examples().join(", ") || "none"}`,
    "",
    "Every server speaks gRPC, Connect and gRPC-Web on its one port. Try:",
    `  npx buf curl --protocol grpc --http2-prior-knowledge --list-services ${coordinator}`,
    `  npx buf curl --protocol grpc --http2-prior-knowledge ${coordinator}/grpc.health.v1.Health/Check`,
    "",
    "Press Ctrl-C to stop.",
    "",
  ].join("\n");
}
