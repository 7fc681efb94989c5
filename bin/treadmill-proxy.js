#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-proxy.js", "proxy/main.ts");
