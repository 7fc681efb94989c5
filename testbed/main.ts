import { runMain } from "../lib/main.js";
import { loadTestbedConfig, testbedSchema } from "./config.js";
import { banner } from "./banner.js";
import { createTestbed } from "./testbed.js";

await runMain({
  component: "testbed",
  summary: "npm start: the whole Treadmill testbed in one process.",
  schema: testbedSchema,
  proc: process,
  load: loadTestbedConfig,
  create: (config, logger) => createTestbed({ config, logger }),
  ready: (testbed) => process.stdout.write(banner(testbed)),
  logComponent: null,
});
