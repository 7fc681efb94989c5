#!/usr/bin/env node
import { run } from "./run.js";

// Source maps only where tml prints a stack (an unexpected error with --verbose).
const verbose = process.argv.some((arg) => arg === "--verbose" || /^-[a-zA-Z]*v[a-zA-Z]*$/.test(arg));
await run("tml.cjs", "cli/main.ts", { sourceMaps: verbose });
