#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-supervisor.js", "supervisor/main.ts");
