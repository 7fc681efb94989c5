#!/usr/bin/env node
import { run } from "./run.js";

await run("treadmill-image-store", "stores/image/main.ts");
