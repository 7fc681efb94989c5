#!/usr/bin/env node
import { runTs } from "./run-ts.js";

await runTs("cli/main.ts");
