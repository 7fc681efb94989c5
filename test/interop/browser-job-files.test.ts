import { randomUUID } from "node:crypto";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import type { Browser, Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { insertImage } from "../support/jobs.js";
import { launchChromium, loggedInPage } from "../support/browser.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 30_000 };

/**
 * Job files, labels and re-runs in the web console, in headless Chromium,
 * against a coordinator serving a console built for this test (no hosts:
 * the jobs stay queued, which is all these pages need): the submit page
 * takes a pasted job file with a matrix (a mistake shown with its line) and
 * an uploaded one; the jobs list shows labels and filters by them; a job's
 * page shows its job file and re-runs it, the two linked both ways. Any
 * console error fails the test.
 */
describe("job files, labels and re-runs in the web console", () => {
  let c: TestCoordinator;
  let dist: string;
  let browser: Browser;
  let page: Page;
  let user: { id: string; name: string; token: string };
  const errors: string[] = [];
  const image = `ci-${randomUUID().slice(0, 6)}`;
  const submitted: string[] = [];

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    await mkdir(ARTIFACTS, { recursive: true });
    c = await startTestCoordinator({ config: { consoleDir: dist } });
    user = await c.createUser({ name: "file-user" });
    await insertImage(c.sql, { name: image, tag: "1" });
    browser = await launchChromium();
    page = await loggedInPage(browser, user, false, errors);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await c?.stop();
    if (dist) await rm(dist, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  it("submits a pasted job file with a matrix, showing a mistake with its line first", async () => {
    await page.goto(`${c.url}/jobs/new`);
    const file = page.getByLabel("Job file", { exact: true });
    await file.fill(`image: ${image}:1\ndescription: \${suite} on \${board}\nlabels: {commit: '\${commit}'}\nmatrix: {board: [a, b]}\nvariables: {suite: smoke}\n`);
    await page.getByRole("button", { name: "Submit job file" }).click();
    await page.locator("#submit-file-error").filter({ hasText: "job file:3: labels.commit: variable ${commit} is not defined" }).waitFor(WAIT);
    expect(await file.getAttribute("aria-invalid")).toBe("true");
    await page.getByLabel("Variables").fill("commit=abc123");
    await page.getByRole("button", { name: "Submit job file" }).click();
    await page.locator("#submit-file-status").filter({ hasText: "2 jobs submitted." }).waitFor(WAIT);
    const links = page.locator("#submitted-jobs a");
    expect(await links.allTextContents()).toEqual(["board=a", "board=b"]);
    for (const href of await links.evaluateAll((as) => as.map((a) => a.getAttribute("href")!))) submitted.push(href.split("/").pop()!);
    const rows = await c.sql<{ spec: { tags: Record<string, string>; description: string } }[]>`select spec from jobs where id = any(${submitted}::uuid[]) order by id`;
    expect(rows.map((r) => [r.spec.description, r.spec.tags])).toEqual([
      ["smoke on a", { commit: "abc123", board: "a" }],
      ["smoke on b", { commit: "abc123", board: "b" }],
    ]);
    await page.screenshot({ path: `${ARTIFACTS}/submit-job-file.png`, fullPage: true });
  }, 60_000);

  it("shows labels on the jobs list and filters by one, from its link or the Label field", async () => {
    await page.goto(`${c.url}/jobs`);
    await page.locator(`tr[data-job-id="${submitted[1]}"]`).waitFor(WAIT);
    await page.locator(`tr[data-job-id="${submitted[0]}"] a`, { hasText: "board=a" }).click();
    await page.waitForURL(/\/jobs\?label=board%3Da$/, WAIT);
    await page.locator(`tr[data-job-id="${submitted[0]}"]`).waitFor(WAIT);
    expect(await page.locator("#jobs-table tbody tr").count()).toBe(1);
    await page.getByLabel("Label", { exact: true }).fill("board=b commit=abc123");
    await page.getByRole("button", { name: "Apply" }).click();
    await page.locator(`tr[data-job-id="${submitted[1]}"]`).waitFor(WAIT);
    expect(await page.locator("#jobs-table tbody tr").count()).toBe(1);
    await page.screenshot({ path: `${ARTIFACTS}/jobs-labels.png`, fullPage: true });
  }, 60_000);

  it("shows a job's file on its page and re-runs it, the two jobs linked both ways", async () => {
    const old = submitted[0];
    await page.goto(`${c.url}/jobs/${old}`);
    const file = page.locator("#job-file");
    await file.filter({ hasText: "board: a" }).waitFor(WAIT);
    expect(await file.textContent()).toContain(`image: ${image}:1`);
    await page.screenshot({ path: `${ARTIFACTS}/job-file.png`, fullPage: true });
    await page.getByRole("button", { name: "Re-run" }).click();
    await page.waitForURL((url) => /\/jobs\/[0-9a-f-]{36}$/.test(url.pathname) && !url.pathname.endsWith(old), WAIT);
    const rerun = new URL(page.url()).pathname.split("/").pop()!;
    await page.locator(`#job-reruns a[href="/jobs/${old}"]`).waitFor(WAIT);
    expect(await page.locator("#job-reruns").textContent()).toMatch(/^Re-run of /);
    await page.locator("#job-timeline").filter({ hasText: `re-runs job ${old}` }).waitFor(WAIT);
    await page.goto(`${c.url}/jobs/${old}`);
    await page.locator(`#job-reruns a[href="/jobs/${rerun}"]`).waitFor(WAIT);
    expect(await page.locator("#job-reruns").textContent()).toMatch(/Re-runs: /);
  }, 60_000);

  it("fills the submit page from a job (Edit as a new job) and submits an uploaded file", async () => {
    await page.goto(`${c.url}/jobs/${submitted[1]}`);
    await page.getByRole("link", { name: "Edit as a new job" }).click();
    await page.waitForURL(/\/jobs\/new\?from=/, WAIT);
    // A textarea's value is not its text: the value is waited on.
    await page.waitForFunction(() => (document.querySelector("#submit-file") as HTMLTextAreaElement).value.includes("board: b"), undefined, WAIT);
    await page.setInputFiles("#submit-file-upload", { name: "uploaded.yaml", mimeType: "application/yaml", buffer: Buffer.from(`image: ${image}:1\ndescription: uploaded\n`) });
    await page.waitForFunction(() => (document.querySelector("#submit-file") as HTMLTextAreaElement).value.includes("uploaded"), undefined, WAIT);
    await page.getByRole("button", { name: "Submit job file" }).click();
    await page.waitForURL((url) => /\/jobs\/[0-9a-f-]{36}$/.test(url.pathname), WAIT);
    const id = new URL(page.url()).pathname.split("/").pop()!;
    const [row] = await c.sql<{ spec: { description: string } }[]>`select spec from jobs where id = ${id}`;
    expect(row.spec.description).toBe("uploaded");
  }, 60_000);
});
