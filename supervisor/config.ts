import { caFileField, logLevelField } from "../lib/component.js";
import { ConfigError, loadConfig } from "../lib/config.js";

/** Everything a supervisor can be told, with its defaults. */
export const supervisorSchema = {
  coordinatorUrl: {
    type: "urls",
    default: ["http://127.0.0.1:7700"],
    description: "the coordinator to attach to, or its replicas comma-separated (one at a time; the stream moves to the next when its replica is unreachable)",
  },
  name: { type: "string", default: "", description: "this supervisor's name in logs (default: the machine's host name)" },
  hostCredential: {
    type: "string",
    default: "",
    secret: true,
    description: "the host credential CreateHost returned (prefer the environment variable)",
  },
  driver: {
    type: "string",
    default: "process",
    choices: ["process", "board", "qemu"],
    description: "how this host runs jobs",
  },
  workDir: { type: "path", default: ".treadmill/supervisor", description: "where per-job work directories live" },
  hostId: { type: "string", default: "", description: "this host's id (optional: the credential names the host)" },
  capacity: { type: "int", default: 1, min: 1, max: 64, description: "jobs this host runs at once (process driver: one slot uid each)" },
  sandbox: {
    type: "string",
    default: "auto",
    choices: ["auto", "bwrap", "chroot", "none"],
    description: "process driver isolation (auto: bubblewrap when it works)",
  },
  slotUidBase: {
    type: "string",
    default: "auto",
    description:
      "uid of the first job slot (process and qemu drivers), or auto: the first free range from 63000; slots are claimed machine-wide (/run/treadmill/slots) and a supervisor refuses slots another holds",
  },
  jobNetwork: {
    type: "string",
    default: "isolated",
    choices: ["isolated", "host"],
    description:
      "isolated: every job in a network namespace of its own (a vm's guest reaches nothing of the host); host: jobs share the host's network and reach its loopback services (unsafe)",
  },
  boardConfigFile: { type: "path", default: "", description: "JSON configuration of the board (board driver)" },
  qemuBinary: { type: "string", default: "qemu-system-x86_64", description: "qemu driver: the QEMU system emulator to run" },
  qemuMachine: { type: "string", default: "q35", description: "qemu driver: -machine" },
  qemuAccel: {
    type: "string",
    default: "auto",
    choices: ["auto", "kvm", "tcg"],
    description: "qemu driver: accelerator (auto: kvm when /dev/kvm runs a guest, else tcg)",
  },
  qemuCpu: { type: "string", default: "", description: "qemu driver: -cpu model (default: QEMU's)" },
  qemuCpus: { type: "int", default: 1, min: 1, max: 256, description: "qemu driver: virtual CPUs per VM" },
  qemuMemoryMb: { type: "int", default: 512, min: 16, description: "qemu driver: memory per VM in MiB" },
  qemuExtraArgs: { type: "list", default: [], description: "qemu driver: extra QEMU arguments, comma-separated (e.g. -cpu,max)" },
  qemuReadyPattern: {
    type: "string",
    default: "",
    description: "qemu driver: regular expression on the console that means booted (default: running at once)",
  },
  qemuExitPattern: {
    type: "string",
    default: "TREADMILL_EXIT=(\\d+)",
    description: "qemu driver: regular expression on the console whose first group is the exit code (empty: none)",
  },
  qemuSshPort: { type: "int", default: 22, min: 0, max: 65535, description: "qemu driver: guest ssh port exposed as ssh (0: none)" },
  qemuBootTimeoutMs: { type: "duration", default: 300000, description: "qemu driver: longest wait for the ready pattern" },
  qemuDebugExit: { type: "bool", default: true, description: "qemu driver: isa-debug-exit device, so the guest sets QEMU's exit code" },
  qemuSandbox: { type: "bool", default: true, description: "qemu driver: QEMU's seccomp sandbox (-sandbox on)" },
  imageFetchBudgetMs: {
    type: "duration",
    default: 300000,
    min: 0,
    description:
      "how long a job's image fetch retries its cache and stores while they are unreachable (then the attempt ends HOST_START_FAILURE and the restart policy applies)",
  },
  drainOnStop: {
    type: "bool",
    default: false,
    description: "on SIGTERM, let running jobs finish instead of stopping them",
  },
  stopGraceMs: { type: "duration", default: 10000, description: "time between a polite stop and the kill" },
  resultsMaxCases: {
    type: "int",
    default: 250_000,
    min: 1,
    description: "test cases of one job attempt this host reports at most (docs/results.md); more are left out, with a problem on the job's timeline",
  },
  resultsMaxBytes: {
    type: "int",
    default: 64 * 1024 ** 2,
    min: 1,
    description: "bytes of JUnit files read from one job attempt's results directory; a file over what is left is not read (a problem on the job's timeline)",
  },
  resultsCollectMs: {
    type: "duration",
    default: 30_000,
    min: 1,
    description: "longest time a job's end spends reading its results files, and again waiting for the coordinator to acknowledge its results",
  },
  artifactDeadlineMs: {
    type: "duration",
    default: 120000,
    min: 1000,
    description: "longest upload of a job's artifacts once it ended (its end, a cancel's too, is reported after it); what is not up by then is reported as failed",
  },
  logSpillCapBytes: {
    type: "int",
    default: 4 * 1024 ** 3,
    min: 64 * 1024,
    description: "most bytes of job logs this host keeps spilled while log servers are behind; past it, new output is dropped and the job's log is marked incomplete",
  },
  reconnectMaxMs: {
    type: "duration",
    default: 30000,
    description: "longest wait between attempts to reach the coordinator",
  },
  caFile: caFileField,
  logLevel: logLevelField("info"),
} as const;

export type SupervisorConfig = ReturnType<typeof loadSupervisorConfig>;

/** The lowest slot uid a supervisor takes: below are the machine's own accounts. */
const MIN_SLOT_UID = 1000;

/** Reads the supervisor's config from the environment and flags. */
export function loadSupervisorConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  const config = loadConfig("supervisor", supervisorSchema, source);
  const raw = config.slotUidBase.trim();
  let slotUidBase: number | "auto" = "auto";
  if (raw !== "auto") {
    slotUidBase = Number(raw);
    if (!/^\d+$/.test(raw) || slotUidBase < MIN_SLOT_UID || slotUidBase > 4294967294 - config.capacity) {
      throw new ConfigError([`slot-uid-base must be auto or a uid of at least ${MIN_SLOT_UID} (got ${JSON.stringify(config.slotUidBase)})`]);
    }
  }
  return { ...config, slotUidBase };
}
