#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-supervisor", "supervisor/main.ts");
