#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-log-server", "stores/log/main.ts");
