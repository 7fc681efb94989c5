import { randomUUID } from "node:crypto";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import { chromium, type Browser, type Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { uuidv7 } from "../../coordinator/shared/common.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { waitUntil } from "../support/wait.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 30_000 };
const HOUR = 3_600_000;

/**
 * The web console's lease pages in headless Chromium, against a coordinator
 * (its lease keeper sweeping every 100 ms) serving a console built for this
 * test, with two boards that no supervisor runs (a lease books them all the
 * same): Reserve on a host's page opens the new lease's page, which holds
 * its keepalive and shows its hosts, the job running in it with console and
 * control links, its timeline, and extends and releases it; the leases page
 * lists leases and reserves by tags ahead of time; the timeline draws the
 * bookings; an admin revokes a lease and its holder's page says why. Any
 * console error fails the test.
 */
describe("the web console's lease pages in headless Chromium", () => {
  let c: TestCoordinator;
  let dist: string;
  let browser: Browser;
  let page: Page;
  let user: { id: string; name: string; token: string };
  let admin: { id: string; name: string; token: string };
  const errors: string[] = [];
  const benchA = `bench-a-${randomUUID().slice(0, 4)}`;
  const benchB = `bench-b-${randomUUID().slice(0, 4)}`;

  async function leaseRow(id: string) {
    const [row] = await c.sql<{ state: string; end_reason: string | null; ends_at: Date; keepalive_at: Date }[]>`
      select state, end_reason, ends_at, keepalive_at from leases where id = ${id}`;
    return row;
  }

  async function loggedIn(who: { id: string; name: string; token: string }, isAdmin: boolean): Promise<Page> {
    const p = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const session = { token: who.token, tokenId: randomUUID(), userId: who.id, userName: who.name, admin: isAdmin };
    await p.addInitScript((s) => window.localStorage.setItem("treadmill.console.session", s), JSON.stringify(session));
    p.on("console", (message) => {
      if (message.type() === "error") errors.push(`console: ${message.text()} at ${message.location().url}`);
    });
    p.on("pageerror", (err) => errors.push(`page: ${String(err)}`));
    return p;
  }

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    await mkdir(ARTIFACTS, { recursive: true });
    // A long supervisor grace: the job seeded as running on a board no supervisor runs is not dropped mid-test.
    c = await startTestCoordinator({ config: { consoleDir: dist, leaseSweepIntervalMs: 100, leaseKeepaliveIntervalMs: 200, supervisorGraceMs: 3_600_000 } });
    user = await c.createUser({ name: "lease-user" });
    admin = await c.createUser({ name: "lease-admin", role: "admin" });
    await c.createHost({ name: benchA, driverKind: "board", tags: { bench: "a" } });
    await c.createHost({ name: benchB, driverKind: "board", tags: { bench: "b" } });
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
    });
    page = await loggedIn(user, false);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await c?.stop();
    if (dist) await rm(dist, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  let reserved = "";

  it("reserves a host from its page and opens the lease's page, which holds its keepalive and extends it", async () => {
    await page.goto(`${c.url}/hosts/${benchA}`);
    await page.getByRole("heading", { name: `Reserve ${benchA}` }).waitFor(WAIT);
    await page.getByLabel("For", { exact: true }).fill("2h");
    await page.getByRole("button", { name: "Reserve" }).click();
    await page.waitForURL(/\/leases\/[0-9a-f-]{36}$/, WAIT);
    reserved = new URL(page.url()).pathname.split("/").pop()!;
    await page.locator('#lease-state[data-state="active"]').waitFor(WAIT);
    expect(await page.locator("#lease-hosts").textContent()).toContain(benchA);
    expect(await page.locator("#lease-hosts").textContent()).toContain("none");
    await page.locator("#lease-keepalive").waitFor(WAIT);
    expect(await page.locator("#lease-timeline li").count()).toBeGreaterThanOrEqual(3);
    expect(await page.locator('#lease-timeline li[data-kind="active"]').count()).toBe(1);

    // The open page is the lease's keepalive.
    const first = (await leaseRow(reserved)).keepalive_at.getTime();
    await waitUntil(async () => (await leaseRow(reserved)).keepalive_at.getTime() > first, "the page to renew the lease", 10_000);

    const before = (await leaseRow(reserved)).ends_at.getTime();
    await page.getByLabel("Extend by").fill("30m");
    await page.getByRole("button", { name: "Extend" }).click();
    await page.getByRole("status").filter({ hasText: "Extended: it now ends" }).waitFor(WAIT);
    expect((await leaseRow(reserved)).ends_at.getTime() - before).toBe(30 * 60_000);
    await page.locator('#lease-timeline li[data-kind="extended"]').waitFor(WAIT);
  }, 60_000);

  it("shows the job running in the lease with links to its console and host control", async () => {
    const [host] = await c.sql<{ id: string }[]>`select id from hosts where name = ${benchA}`;
    // As if its supervisor had just gone away: a host that never attached is
    // past any grace period, and the sweeper would end the job HOST_DROPPED.
    await c.sql`update hosts set detached_at = now() where id = ${host.id}`;
    const jobId = uuidv7(Date.now());
    await c.sql`
      insert into jobs (id, owner_id, spec, state, lease_id, created_at)
      values (${jobId}, ${user.id}, ${c.sql.json({ image: "test/shell:1" })}, 'running', ${reserved}, now())`;
    await c.sql`insert into job_hosts (job_id, host_id, attempt) values (${jobId}, ${host.id}, 1)`;
    await page.reload();
    await page.locator(`#lease-hosts a[href="/jobs/${jobId}/console"]`).waitFor(WAIT);
    await page.locator(`#lease-hosts a[href="/jobs/${jobId}"]`, { hasText: "Control" }).waitFor(WAIT);
    await page.screenshot({ path: `${ARTIFACTS}/lease.png`, fullPage: true });
    // The job's page links back to its lease.
    await page.goto(`${c.url}/jobs/${jobId}`);
    await page.locator(`a[href="/leases/${reserved}"] #job-lease`).waitFor(WAIT);
    await c.sql`update jobs set state = 'finalized', reason = 'canceled', finalized_at = now() where id = ${jobId}`;
    await c.sql`update job_hosts set released_at = now() where job_id = ${jobId}`;
  }, 60_000);

  let booked = "";

  it("lists the user's leases and reserves hosts by tags from a time ahead", async () => {
    await page.goto(`${c.url}/leases`);
    await page.locator(`tr[data-lease-id="${reserved}"][data-state="active"]`).waitFor(WAIT);
    await page.getByLabel("Host tags").fill("bench=b");
    await page.getByLabel("For", { exact: true }).fill("1h");
    const at = new Date(Date.now() + 3 * HOUR);
    const pad = (n: number) => String(n).padStart(2, "0");
    await page.getByLabel("Starting").fill(`${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}T${pad(at.getHours())}:${pad(at.getMinutes())}`);
    await page.getByRole("button", { name: "Reserve" }).click();
    await page.waitForURL(/\/leases\/[0-9a-f-]{36}$/, WAIT);
    booked = new URL(page.url()).pathname.split("/").pop()!;
    await page.locator('#lease-state[data-state="waiting"]').waitFor(WAIT);
    expect(await page.locator("#lease-hosts").textContent()).toContain(benchB);
  }, 60_000);

  it("draws the next 48 hours: each host a row, its leases as bars from their start", async () => {
    await page.goto(`${c.url}/leases/calendar`);
    const active = page.locator(`.cal-row[data-host="${benchA}"] .cal-bar.cal-lease-active[data-id="${reserved}"]`);
    const ahead = page.locator(`.cal-row[data-host="${benchB}"] .cal-bar.cal-lease-booked[data-id="${booked}"]`);
    await active.waitFor(WAIT);
    await ahead.waitFor(WAIT);
    const left = Number(/left: ([\d.]+)%/.exec((await ahead.getAttribute("style")) ?? "")![1]);
    // Three hours into a 48-hour window: 6.25% from its start.
    expect(left).toBeGreaterThan(6);
    expect(left).toBeLessThan(6.5);
    expect(await ahead.getAttribute("aria-label")).toMatch(/^lease booked of lease-user, .* \(1h\)$/);
    await page.screenshot({ path: `${ARTIFACTS}/leases-timeline.png`, fullPage: true });
    await ahead.click();
    await page.waitForURL(new RegExp(`/leases/${booked}$`), WAIT);
  }, 60_000);

  it("releases a lease from its page, and shows its holder why an admin revoked another", async () => {
    await page.goto(`${c.url}/leases/${reserved}`);
    await page.locator('#lease-state[data-state="active"]').waitFor(WAIT);
    page.once("dialog", (dialog) => void dialog.accept());
    await page.getByRole("button", { name: "Release" }).click();
    await page.locator("#lease-end").filter({ hasText: "Ended: released by lease-user; its hosts were reset and returned." }).waitFor(WAIT);
    expect((await leaseRow(reserved)).end_reason).toBe("released");

    const adminPage = await loggedIn(admin, true);
    await adminPage.goto(`${c.url}/leases/${booked}`);
    await adminPage.getByLabel("Reason to revoke").fill("bench rewiring");
    await adminPage.getByRole("button", { name: "Revoke" }).click();
    await adminPage.locator("#lease-end").filter({ hasText: "revoked by admin lease-admin: bench rewiring" }).waitFor(WAIT);
    await adminPage.close();
    await page.goto(`${c.url}/leases/${booked}`);
    await page.locator("#lease-end").filter({ hasText: "Ended: revoked by admin lease-admin: bench rewiring." }).waitFor(WAIT);
    await page.locator("#release-lease").waitFor({ state: "hidden", ...WAIT });
  }, 60_000);

  it("refuses a reservation whose duration it cannot read, saying so", async () => {
    await page.goto(`${c.url}/hosts/${benchA}`);
    await page.getByLabel("For", { exact: true }).fill("soon");
    await page.getByRole("button", { name: "Reserve" }).click();
    await page.getByRole("alert").filter({ hasText: "is not a duration" }).waitFor(WAIT);
  }, 60_000);
});
