#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-coordinator.js", "coordinator/main.ts");
