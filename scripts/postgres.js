#!/usr/bin/env node
// The embedded PostgreSQL as a server of its own (scripts/postgres.ts).
import { run } from "../bin/run.js";

await run("postgres", "scripts/postgres.ts");
