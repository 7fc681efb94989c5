/**
 * `npm test`, `npm run test:security` and `npm run test:interop` first run
 * scripts/check.mjs: with a tool missing they stop at once, naming it, its
 * Debian package and `npm run setup` (issue #18, defect 8).
 */
import { describe, expect, it } from "@jest/globals";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const CHECK = fileURLToPath(new URL("../../scripts/check.mjs", import.meta.url));

function check(run: string, path: string): Promise<{ code: number | null; stderr: string; ms: number }> {
  const began = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CHECK, run], { env: { ...process.env, PATH: path }, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", reject);
    child.once("close", (code) => resolve({ code, stderr, ms: Date.now() - began }));
  });
}

describe("the tests' pre-check", () => {
  it("stops within a second naming each missing tool, its Debian package and npm run setup", async () => {
    const empty = await mkdtemp(join(tmpdir(), "treadmill-no-tools-"));
    try {
      const result = await check("interop", empty);
      expect(result.code).toBe(1);
      expect(result.ms).toBeLessThan(1000);
      expect(result.stderr).toMatch(/^npm run test:interop needs what is not installed here:/);
      const named = ["bwrap (Debian package bubblewrap)", "socat (Debian package socat)", "setpriv (Debian package util-linux)"];
      named.push("protoc (Debian package protobuf-compiler)", "chromium (Debian package chromium)");
      for (const line of named) expect(result.stderr).toContain(line);
      expect(result.stderr).toContain("Run `npm run setup`");
    } finally {
      await rm(empty, { recursive: true });
    }
  });

  it("names npm run test:security and only the tools npm test needs when the security tests cannot run", async () => {
    const empty = await mkdtemp(join(tmpdir(), "treadmill-no-tools-"));
    try {
      const result = await check("security", empty);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(/^npm run test:security needs what is not installed here:/);
      expect(result.stderr).toContain("bwrap (Debian package bubblewrap)");
      expect(result.stderr).not.toContain("protoc");
    } finally {
      await rm(empty, { recursive: true });
    }
  });

  it("lets the tests run on a machine that npm run setup has set up", async () => {
    for (const run of ["test", "security", "interop"]) {
      const result = await check(run, process.env.PATH ?? "");
      expect(result).toMatchObject({ code: 0, stderr: "" });
    }
  });
});
