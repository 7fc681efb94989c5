#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-image-store.js", "stores/image/main.ts");
