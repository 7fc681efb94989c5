#!/usr/bin/env node
// The embedded PostgreSQL as a server of its own (scripts/postgres.ts).
import { runTs } from "../bin/run-ts.js";

await runTs("scripts/postgres.ts");
