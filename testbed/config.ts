import { logLevelField } from "../lib/component.js";
import { loadConfig } from "../lib/config.js";

/** Everything the all-in-one testbed can be told, with its defaults. */
export const testbedSchema = {
  host: { type: "string", default: "127.0.0.1", description: "address every server listens on" },
  basePort: {
    type: "int",
    default: 7700,
    description: "coordinator port; the image store, cache, log server and proxy take the next four (0: free ports)",
  },
  dataDir: { type: "path", default: ".treadmill", description: "state of every component, one folder each" },
  databaseUrl: {
    type: "url",
    default: "",
    env: "DATABASE_URL",
    secret: true,
    description: "PostgreSQL 14+ to use instead of the embedded one",
  },
  supervisors: { type: "int", default: 2, description: "how many process-driver supervisors to run" },
  boards: { type: "int", default: 1, description: "how many simulated boards (each with a board-driver supervisor)" },
  flakyBoards: {
    type: "int",
    default: 0,
    description:
      "how many simulated boards that fail now and then (boot failures, hangs, serial drops: infrastructure failures), tagged board=flaky",
  },
  vms: {
    type: "int",
    default: 0,
    description: "how many qemu-driver supervisors to run (needs qemu-system-x86 and qemu-utils; docs/qemu.md)",
  },
  vmAccel: { type: "string", default: "auto", choices: ["auto", "kvm", "tcg"], description: "accelerator of the qemu supervisors" },
  vmMemoryMb: { type: "int", default: 512, min: 16, description: "memory of each VM in MiB" },
  vmReadyPattern: { type: "string", default: "", description: "console pattern that means a VM has booted (default: at once)" },
  corsOrigins: { type: "list", default: [], description: "browser origins allowed to call the servers" },
  graceMs: { type: "duration", default: 5000, description: "how long a stop waits for open calls" },
  logLevel: logLevelField("warn"),
} as const;

export type TestbedConfig = ReturnType<typeof loadTestbedConfig>;

/** Reads the testbed's config from the environment and flags. */
export function loadTestbedConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("testbed", testbedSchema, source);
}
