import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import type { Browser, Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { launchChromium } from "../support/browser.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 60_000 };

/**
 * The job page's artifacts and raw log downloads in headless Chromium
 * against the all-in-one testbed: a failed job's artifacts are listed with
 * links, a click saves the file from the image store (verified in the page),
 * and a channel's whole log saves as a file. Any console error fails the test.
 */
describe("the job page's downloads in headless Chromium", () => {
  let tb: RunningTestbed;
  let dist: string;
  let browser: Browser;
  let page: Page;
  const errors: string[] = [];

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    await mkdir(ARTIFACTS, { recursive: true });
    tb = await startTestbed({ supervisors: 1, coordinatorConfig: { consoleDir: dist } });
    await tb.pushShellImage("test/echo:1");
    browser = await launchChromium();
    page = await browser.newPage({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
    page.on("console", (message) => {
      if (message.type() === "error") errors.push(`console: ${message.text()} at ${message.location().url}`);
    });
    page.on("pageerror", (err) => errors.push(`page: ${String(err)}`));
    await page.goto(`${tb.coordinatorUrl}/login`);
    await page.getByLabel("User").fill(tb.testbed.admin().name);
    await page.getByLabel("Password").fill(tb.testbed.admin().password);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByRole("heading", { name: "Jobs", level: 1 }).waitFor(WAIT);
  }, 180_000);

  afterAll(async () => {
    await browser?.close();
    await tb?.stop();
    if (dist) await rm(dist, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  it("lists a failed job's artifacts with links that save the verified file, and saves a channel's raw log", async () => {
    const script = "mkdir -p $TREADMILL_ARTIFACTS_DIR/out; seq 1 5000 > $TREADMILL_ARTIFACTS_DIR/out/numbers.txt; echo console-line-1; echo console-line-2; exit 2";
    const { job } = await tb.client(JobService).submitJob({ spec: { image: "test/echo:1", parameters: [{ name: "script", value: script }] } });
    const jobId = job!.id;
    await tb.waitFinalized(jobId);
    await page.goto(`${tb.coordinatorUrl}/jobs/${jobId}`);
    const link = page.locator("#artifacts-table a.artifact-link", { hasText: "out/numbers.txt" });
    await link.waitFor(WAIT);
    await page.screenshot({ path: `${ARTIFACTS}/job-artifacts.png`, fullPage: true });

    const [saved] = await Promise.all([page.waitForEvent("download", WAIT), link.click()]);
    expect(saved.suggestedFilename()).toBe("numbers.txt");
    const bytes = await readFile((await saved.path())!);
    const expected = `${Array.from({ length: 5000 }, (_, i) => i + 1).join("\n")}\n`;
    expect(bytes.toString()).toBe(expected);
    await page.locator("#artifacts-status", { hasText: "Downloaded out/numbers.txt" }).waitFor(WAIT);
    const { artifacts } = await tb.client(JobService).listJobArtifacts({ jobId });
    expect(artifacts[0].digest).toBe(`sha256:${createHash("sha256").update(bytes).digest("hex")}`);

    const [log] = await Promise.all([page.waitForEvent("download", WAIT), page.locator("#raw-log-console").click()]);
    expect(log.suggestedFilename()).toBe(`${jobId}-1-console.log`);
    const text = (await readFile((await log.path())!)).toString();
    expect(text).toContain("console-line-1");
    expect(text).toContain("console-line-2");
    expect(text).toBe(await tb.readLog(jobId, "console"));
  }, 180_000);
});
