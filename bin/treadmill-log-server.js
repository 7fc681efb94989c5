#!/usr/bin/env -S node --max-semi-space-size=2
// A young generation of 2 MB rather than V8's 16 (docs/logs.md, "Benchmark"):
// the log server allocates little on the JS heap but receives every frame in
// a fresh 64 KiB buffer, which only a GC frees; with a large young generation
// scavenges are rare, and V8 frees those buffers by full mark-compacts many
// times a second instead. Run this file itself (or pass the flag to node).
import { run } from "./run.js";

await run("treadmill-log-server.js", "stores/log/main.ts");
