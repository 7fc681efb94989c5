import { randomUUID } from "node:crypto";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import type { Browser, Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { uuidv7 } from "../../coordinator/shared/common.js";
import { launchChromium, loggedInPage } from "../support/browser.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { insertImage } from "../support/jobs.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 30_000 };
const HOUR = 3_600_000;
const JOBS = 30;

/**
 * The web console's host pages in headless Chromium, against a coordinator
 * serving a console built for this test, over seeded history (a real
 * database): the hosts list shows each host's health and filters by it, and
 * a host's page shows its health and why, its statistics, its health
 * timeline and its jobs a page at a time, and an admin quarantines and
 * returns it there; the health checks page defines, changes and deletes
 * checks (HealthService). Any console error fails the test.
 */
describe("the web console's host and health check pages in headless Chromium", () => {
  let c: TestCoordinator;
  let dist: string;
  let browser: Browser;
  let page: Page;
  const errors: string[] = [];
  const board = `board-${randomUUID().slice(0, 6)}`;
  const vm = `vm-${randomUUID().slice(0, 6)}`;
  const quarantiningJob = uuidv7(Date.now() - HOUR);
  let image: { ref: string };
  const healthJob = uuidv7(Date.now() - 21 * 60_000);

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    await mkdir(ARTIFACTS, { recursive: true });
    c = await startTestCoordinator({ config: { consoleDir: dist } });
    const admin = await c.createUser({ name: "host-admin", role: "admin" });
    await seed(c, admin.id);
    image = await insertImage(c.sql, { name: "checks/boot" });

    browser = await launchChromium();
    page = await loggedInPage(browser, admin, true, errors);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await c?.stop();
    if (dist) await rm(dist, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  /** A quarantined board with 30 finished jobs and a health history, and a healthy VM host. */
  async function seed(t: TestCoordinator, ownerId: string): Promise<void> {
    const sql = t.sql;
    const boardId = (await t.createHost({ name: board, driverKind: "board" })).id;
    const vmId = (await t.createHost({ name: vm, driverKind: "qemu" })).id;
    await sql`update hosts set created_at = now() - interval '3 days' where id = ${boardId}`;
    for (let i = 0; i < JOBS; i++) {
      // Ended 29.5 hours ago to half an hour ago, one an hour; ids in time order, as SubmitJob makes them.
      const ended = new Date(Date.now() - (JOBS - i) * HOUR + HOUR / 2);
      const jobId = i === JOBS - 1 ? quarantiningJob : uuidv7(ended.getTime() - 60_000);
      // Every third job ends for an infrastructure reason, the rest succeed.
      const infra = i % 3 === 0;
      await sql`
        insert into jobs (id, owner_id, spec, state, reason, exit_status, exit_code, created_at, finalized_at)
        values (${jobId}, ${ownerId}, ${sql.json({ image: `test/job-${i}:1` })}, 'finalized', ${infra ? "host_dropped" : "workload_exited"},
          ${infra ? null : "success"}, ${infra ? null : 0}, ${new Date(ended.getTime() - 60_000)}, ${ended})`;
      await sql`
        insert into job_hosts (job_id, host_id, attempt, termination, terminated_at, released_at)
        values (${jobId}, ${boardId}, 1,
          ${sql.json({ reason: infra ? "host_dropped" : "workload_exited", exitStatus: infra ? null : "success", exitCode: null, message: "" })},
          ${ended}, ${ended})`;
    }
    // A health job of a check, finished on the board 20 minutes ago.
    await sql`
      insert into jobs (id, owner_id, spec, state, reason, exit_status, exit_code, created_at, finalized_at, health_check_id, pinned_host_id)
      values (${healthJob}, ${ownerId}, ${sql.json({ image: "checks/boot:1" })}, 'finalized', 'workload_exited', 'failure', 1,
        now() - interval '21 minutes', now() - interval '20 minutes', ${randomUUID()}, ${boardId})`;
    await sql`
      insert into job_hosts (job_id, host_id, attempt, termination, terminated_at, released_at)
      values (${healthJob}, ${boardId}, 1, ${sql.json({ reason: "workload_exited", exitStatus: "failure", exitCode: 1, message: "" })},
        now() - interval '20 minutes', now() - interval '20 minutes')`;
    await sql`
      insert into host_health_events (host_id, health, reason, actor, job_id, at) values
        (${boardId}, 'healthy', '', 'user:host-admin', null, now() - interval '2 days'),
        (${boardId}, 'quarantined', '3 infrastructure failures in a row', 'system', ${quarantiningJob}, now() - interval '5 hours')`;
    await sql`
      update hosts set health = 'quarantined', health_reason = '3 infrastructure failures in a row', health_changed_at = now() - interval '5 hours'
      where id = ${boardId}`;
    await sql`update hosts set health = 'healthy', health_changed_at = now() where id = ${vmId}`;
  }

  it("lists hosts with their health, filters them by health and links each to its page", async () => {
    await page.goto(`${c.url}/hosts`);
    const boardRow = page.locator(`tr[data-host="${board}"]`);
    await page.locator(`tr[data-host="${board}"][data-health="quarantined"]`).waitFor(WAIT);
    await page.locator(`tr[data-host="${vm}"][data-health="healthy"]`).waitFor(WAIT);
    expect(await boardRow.textContent()).toContain("3 infrastructure failures in a row");
    await page.getByLabel("Health").selectOption("quarantined");
    await page.waitForURL(/\/hosts\?health=quarantined$/, WAIT);
    await boardRow.waitFor(WAIT);
    await page.locator(`tr[data-host="${vm}"]`).waitFor({ state: "detached", ...WAIT });
    await page.screenshot({ path: `${ARTIFACTS}/hosts-health.png`, fullPage: true });
    await boardRow.getByRole("link", { name: board }).click();
    await page.waitForURL(new RegExp(`/hosts/${board}$`), WAIT);
    await page.getByRole("heading", { name: `Host ${board}`, level: 1 }).waitFor(WAIT);
  }, 60_000);

  it("shows a host's health with its reason, statistics, health timeline and job history a page at a time", async () => {
    await page.goto(`${c.url}/hosts/${board}`);
    await page.locator('#host-health[data-health="quarantined"]').waitFor(WAIT);
    expect(await page.locator(".facts").textContent()).toContain("quarantined (3 infrastructure failures in a row)");
    expect(await page.locator("#host-online").textContent()).toBe("offline");

    // 24 jobs and the health job ended within 24 hours (8 of them infrastructure failures), all 31 within 7 days (10).
    const stats = page.locator("#host-stats");
    const cells = async (label: string) => (await stats.locator("tr", { hasText: label }).locator("td").allTextContents()).slice(1);
    expect(await cells("Jobs run")).toEqual(["25", String(JOBS + 1)]);
    expect(await cells("Job failures")).toEqual(["1", "1"]);
    expect(await cells("Infrastructure failures")).toEqual(["8 (32.0%)", "10 (32.3%)"]);
    expect(await page.locator("#host-last-check").textContent()).toMatch(/^failed /);
    expect(await cells("Online")).toEqual(["0.0%", "0.0%"]);
    expect(await cells("Time quarantined")).toEqual(["5h", "5h"]);

    const timeline = page.locator("#host-timeline li");
    expect(await timeline.count()).toBe(2);
    expect(await timeline.nth(0).textContent()).toContain("quarantined by system");
    expect(await timeline.nth(0).textContent()).toContain("3 infrastructure failures in a row");
    await timeline.nth(0).getByRole("link").waitFor(WAIT);
    expect(await timeline.nth(1).textContent()).toContain("healthy by user:host-admin");
    expect(await page.locator(".health-bar > span").count()).toBe(3);

    const jobs = page.locator("#host-jobs tbody tr");
    await page.locator(`#host-jobs tr[data-job-id="${quarantiningJob}"]`).waitFor(WAIT);
    expect(await jobs.count()).toBe(25);
    // Newest first: the health job, marked so.
    expect(await jobs.first().getAttribute("data-job-id")).toBe(healthJob);
    expect(await jobs.first().textContent()).toContain("health check");
    await page.screenshot({ path: `${ARTIFACTS}/host.png`, fullPage: true });
    await page.getByRole("button", { name: "Load older jobs" }).click();
    await page.locator("#host-jobs tbody tr").nth(JOBS).waitFor(WAIT);
    expect(await jobs.count()).toBe(JOBS + 1);
    await page.getByRole("button", { name: "Load older jobs" }).waitFor({ state: "hidden", ...WAIT });
  }, 60_000);

  it("lists only health jobs, marked so, when the jobs list is filtered by kind", async () => {
    await page.goto(`${c.url}/jobs`);
    await page.locator(`tr[data-job-id="${quarantiningJob}"]`).waitFor(WAIT);
    await page.getByLabel("Kind").selectOption("health");
    await page.waitForURL(/kind=health/, WAIT);
    const rows = page.locator("#jobs-table tbody tr");
    await page.locator(`tr[data-job-id="${healthJob}"]`).waitFor(WAIT);
    await page.locator(`tr[data-job-id="${quarantiningJob}"]`).waitFor({ state: "detached", ...WAIT });
    expect(await rows.count()).toBe(1);
    expect(await rows.first().textContent()).toContain("health check");
  }, 60_000);

  it("lets an admin define, change and delete a health check, refusing a bad one with the field's name", async () => {
    await page.goto(`${c.url}/health-checks`);
    await page.getByRole("heading", { name: "Health checks", level: 1 }).waitFor(WAIT);
    await page.getByText("No health checks.").waitFor(WAIT);
    await page.getByLabel("Name", { exact: true }).fill("-bad");
    await page.getByLabel("Image", { exact: true }).fill(image.ref);
    await page.getByRole("button", { name: "Create check" }).click();
    await page.getByRole("alert").filter({ hasText: "name" }).waitFor(WAIT);
    await page.getByLabel("Name", { exact: true }).fill("boot-smoke");
    await page.getByLabel("Host tags").fill("board=sim");
    await page.getByLabel("Interval").fill("6h");
    await page.getByLabel("After every N jobs").fill("10");
    await page.getByRole("button", { name: "Create check" }).click();
    const row = page.locator('tr[data-check="boot-smoke"]');
    await row.waitFor(WAIT);
    expect(await row.textContent()).toContain("every 6h, after every 10 jobs");
    expect(await row.textContent()).toContain("board=sim");
    await page.screenshot({ path: `${ARTIFACTS}/health-checks.png`, fullPage: true });
    await row.getByRole("button", { name: "Edit boot-smoke" }).click();
    await page.getByLabel("Interval").fill("2h");
    await page.getByRole("button", { name: "Save check" }).click();
    await page.locator('tr[data-check="boot-smoke"]', { hasText: "every 2h" }).waitFor(WAIT);
    page.once("dialog", (dialog) => void dialog.accept());
    await row.getByRole("button", { name: "Delete boot-smoke" }).click();
    await row.waitFor({ state: "detached", ...WAIT });
  }, 60_000);

  it("lets an admin quarantine a host and return it to service from its page", async () => {
    await page.goto(`${c.url}/hosts/${vm}`);
    await page.locator('#host-health[data-health="healthy"]').waitFor(WAIT);
    await page.getByLabel("Reason").fill("fan noise");
    await page.getByRole("button", { name: "Quarantine" }).click();
    await page.locator('#host-health[data-health="quarantined"]').waitFor(WAIT);
    expect(await page.locator("#host-timeline li").first().textContent()).toContain("fan noise");
    await page.getByRole("button", { name: "Return to service" }).click();
    await page.locator('#host-health[data-health="healthy"]').waitFor(WAIT);
  }, 60_000);

  it("says so when the host does not exist", async () => {
    await page.goto(`${c.url}/hosts/no-such-host`);
    await page.getByRole("alert").filter({ hasText: "no-such-host not found" }).waitFor(WAIT);
  }, 30_000);
});
