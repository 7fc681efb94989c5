import { mkdir } from "node:fs/promises";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import { chromium, type Browser, type Locator, type Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { join } from "node:path";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 60_000 };

/** Waits until one of the elements shows the text (Playwright watches the DOM; no polling here). */
function shows(locator: Locator, text: string | RegExp, timeout = WAIT.timeout): Promise<void> {
  return locator.filter({ hasText: text }).first().waitFor({ timeout });
}

/**
 * The web console in headless Chromium against the all-in-one testbed: the
 * coordinator serves the built console at `/`; the page calls the
 * coordinator, the log server, the image stores and the proxy as a user's
 * browser would. Any console error or uncaught exception fails the test.
 */
describe("the web console in headless Chromium", () => {
  let tb: RunningTestbed;
  let browser: Browser;
  let page: Page;
  let origin: string;
  const errors: string[] = [];

  beforeAll(async () => {
    await buildConsole();
    await mkdir(ARTIFACTS, { recursive: true });
    tb = await startTestbed({ supervisors: 2 });
    await tb.pushShellImage("test/echo:1");
    origin = tb.coordinatorUrl;
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
    });
    page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    page.on("console", (message) => {
      if (message.type() === "error") errors.push(`console: ${message.text()} at ${message.location().url}`);
    });
    page.on("pageerror", (err) => errors.push(`page: ${String(err)}`));
  }, 180_000);

  afterAll(async () => {
    await browser?.close();
    await tb?.stop();
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  const shot = (name: string) => page.screenshot({ path: `${ARTIFACTS}/${name}.png`, fullPage: true });
  const submit = async (image: string, script: string) => {
    const res = await tb.client(JobService).submitJob({ spec: { image, parameters: [{ name: "script", value: script }] } });
    return res.job!.id;
  };

  it("sends a visitor to the login page and logs the admin in", async () => {
    await page.goto(`${origin}/jobs`);
    await page.waitForURL(/\/login\?next=%2Fjobs$/, WAIT);
    await page.getByLabel("User").fill(tb.testbed.admin().name);
    await page.getByLabel("Password").fill("not the password");
    await page.getByRole("button", { name: "Log in" }).click();
    await shows(page.getByRole("alert"), "password");
    await page.getByLabel("Password").fill(tb.testbed.admin().password);
    await shot("login");
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByRole("heading", { name: "Jobs", level: 1 }).waitFor(WAIT);
    expect(new URL(page.url()).pathname).toBe("/jobs");
    expect(await page.locator("header .user").textContent()).toBe("admin (admin)");
  }, 90_000);

  it("submits a job from the form, shows field errors, then follows its log live to the end", async () => {
    await page.getByRole("link", { name: "Submit", exact: true }).click();
    await page.getByLabel("Image").fill("test/echo:1");
    // The server's InvalidArgument shows under the field it names.
    await page.getByLabel("Job timeout").fill("99999h");
    await page.getByRole("button", { name: "Submit job", exact: true }).click();
    await shows(page.locator("#submit-job-timeout-error"), "job_timeout");
    expect(await page.getByLabel("Job timeout").getAttribute("aria-invalid")).toBe("true");
    // Checked in the page before sending.
    await page.getByLabel("Job timeout").fill("5m");
    await page.getByLabel("Parameters").fill("9bad=x");
    await page.getByRole("button", { name: "Submit job", exact: true }).click();
    await shows(page.locator("#submit-parameters-error"), "line 1");
    await shot("submit");
    const script = "for i in 1 2 3; do echo line-$i; sleep 2; done; printf '\\033[31mred-done\\033[0m\\n'";
    await page.getByLabel("Parameters").fill(`script=${script}\nsecret TOKEN=hunter2-secret`);
    await page.getByRole("button", { name: "Submit job", exact: true }).click();
    await page.waitForURL(/\/jobs\/[0-9a-f-]{36}$/, WAIT);
    const jobId = new URL(page.url()).pathname.split("/").pop()!;

    // The first line shows while the job still runs: the log is live.
    const log = page.getByRole("region", { name: "Job log" });
    await shows(log, "line-1");
    const job = await tb.client(JobService).getJob({ jobId });
    expect(job.job!.state).toBeLessThan(JobState.FINALIZED);
    await shows(page.locator("#job-state"), /^success/);
    await shows(log, "line-3");
    // ANSI red becomes the palette's red class.
    await shows(log.locator("span.f1"), /^red-done$/);
    await shows(page.locator("#log-status"), /^end of log$/);
    // The secret parameter is masked; its value is nowhere on the page.
    const params = await page.locator("#job-parameters").textContent();
    expect(params).toContain("TOKEN");
    expect(params).toContain("(secret)");
    expect(await page.content()).not.toContain("hunter2-secret");
    expect(await page.locator("#job-timeline").textContent()).toContain("submitted");
    await shot("job");
  }, 120_000);

  it("shows a new job in the list live and cancels it from its page", async () => {
    await page.getByRole("link", { name: "Jobs", exact: true }).click();
    await page.getByRole("heading", { name: "Jobs", level: 1 }).waitFor(WAIT);
    await shows(page.locator(".live").first(), /^live$/);
    const jobId = await submit("test/echo:1", "sleep 300");
    const row = page.locator(`tr[data-job-id="${jobId}"]`);
    await row.waitFor(WAIT); // WatchJobs brought it in
    await page.locator(`tr[data-job-id="${jobId}"][data-state="running"]`).waitFor(WAIT);
    await shot("jobs");
    // Filters: by state, in the query string.
    await page.getByLabel("State").selectOption("running");
    await page.waitForURL(/state=running/, WAIT);
    await row.waitFor(WAIT);
    await row.getByRole("link").click();
    await page.getByRole("button", { name: "Cancel job" }).click();
    await shows(page.locator("#job-state"), /^canceled$/);
    await page.getByRole("button", { name: "Cancel job" }).waitFor({ state: "hidden", ...WAIT });
  }, 120_000);

  it("opens a running job's console, types a command and reads its answer", async () => {
    const jobId = await submit("example/shell:latest", "");
    await tb.waitState(jobId, JobState.RUNNING);
    await page.goto(`${origin}/jobs/${jobId}`);
    await page.getByRole("link", { name: "Open console" }).click();
    await shows(page.locator("#console-status"), /^connected$/);
    await page.locator(".xterm-helper-textarea").focus();
    await page.keyboard.type("echo answer-$((6*7))");
    await page.keyboard.press("Enter");
    await shows(page.locator(".xterm-rows"), "answer-42");
    await shot("console");
    await page.keyboard.type("exit");
    await page.keyboard.press("Enter");
    await shows(page.locator("#console-status"), /^(?!connected$)./);
    await tb.waitFinalized(jobId);
  }, 120_000);

  it("power-cycles a running board job's host from its page; the board boots again and the job runs on to its end", async () => {
    // Firmware that counts its boots in the simulated board's directory and ends the job on its second.
    const script = `n=$(cat boots-console 2>/dev/null || echo 0); n=$((n+1)); echo $n > boots-console\necho "boot number $n"\n[ $n -ge 2 ] && echo TREADMILL_EXIT=0\nwhile true; do sleep 1; done\n`;
    await pushTestImage(tb.admin, await buildFirmwareImage({ dir: join(tb.dir, "images"), script }), "test/boots:1");
    const { job } = await tb.client(JobService).submitJob({ spec: { image: "test/boots:1", hosts: { hostCount: 1, tags: { board: "sim" } } } });
    const jobId = job!.id;
    await tb.waitState(jobId, JobState.RUNNING);
    await page.goto(`${origin}/jobs/${jobId}`);
    await page.getByRole("button", { name: "Power-cycle" }).click();
    await shows(page.locator(".status-area"), "Host board-1: board board-1 power-cycled.");
    await shows(page.locator("#job-state"), /^success \(exit 0\)$/);
    await page.locator("#host-control").waitFor({ state: "hidden", ...WAIT });
    expect(await page.locator("#job-timeline").textContent()).toContain("power-cycle of host board-1 requested by admin");
    await shot("job-host-control");
  }, 120_000);

  it("renders a 100k-line log with a few dozen rows in the page", async () => {
    const jobId = await submit("test/echo:1", "seq 1 100000");
    await page.goto(`${origin}/jobs/${jobId}`);
    await shows(page.locator("#log-status"), /^end of log$/, 90_000);
    const log = page.getByRole("region", { name: "Job log" });
    // Following the end: the last line is in sight; only lines near it are in the DOM.
    await shows(log.locator(".log-line"), /^100000$/);
    expect(await log.locator(".log-line").count()).toBeLessThan(200);
    const height = await log.evaluate((el) => el.scrollHeight);
    expect(height).toBeGreaterThanOrEqual(100_000 * 18);
    // Scrolling to the top brings the first lines in.
    await log.evaluate((el) => el.scrollTo(0, 0));
    await shows(log.locator(".log-line").first(), /^1$/);
  }, 150_000);

  it("lists images with their layers and stores", async () => {
    await page.getByRole("link", { name: "Images", exact: true }).click();
    await page.getByRole("link", { name: "test/echo:1" }).click();
    await page.locator("#image-layers tbody tr").first().waitFor(WAIT);
    expect(await page.locator("#image-layers tbody tr").count()).toBe(1);
    expect(await page.locator("#image-layers").textContent()).toContain("rootfs.tar+gzip");
    await page.getByText("digest verified").waitFor(WAIT);
    expect(await page.locator("#image-locations tbody tr").count()).toBeGreaterThan(0);
    await shot("image");
    await page.goBack();
    await shows(page.locator("#images-table"), "example/shell:latest");
    await shot("images");
  }, 90_000);

  it("shows hosts live: drain and enable as admin, and a host going offline when its supervisor stops", async () => {
    await page.getByRole("link", { name: "Hosts", exact: true }).click();
    const sup1 = page.locator('tr[data-host="sup-1"]');
    const sup2 = page.locator('tr[data-host="sup-2"]');
    await page.locator('tr[data-host="sup-2"][data-online="true"]').waitFor(WAIT);
    await sup1.getByRole("button", { name: "Drain sup-1" }).click();
    await shows(sup1, "draining");
    await sup1.getByRole("button", { name: "Enable sup-1" }).click();
    await shows(sup1, "enabled");
    await shot("hosts");
    await tb.testbed.stopSupervisor("sup-2");
    await page.locator('tr[data-host="sup-2"][data-online="false"]').waitFor(WAIT);
    expect(await sup2.textContent()).toContain("offline");
  }, 90_000);

  it("is usable at a phone's width", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${origin}/jobs`);
    await page.locator("#jobs-table tbody tr").first().waitFor(WAIT);
    // Cards, not a wide table: nothing scrolls sideways.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    expect(overflow).toBeLessThanOrEqual(0);
    await shot("jobs-phone");
    await page.setViewportSize({ width: 1280, height: 860 });
  }, 60_000);

  it("returns to the login page with a message when the token is revoked, and logs out", async () => {
    const stored = await page.evaluate(() => localStorage.getItem("treadmill.console.session"));
    const { tokenId } = JSON.parse(stored!) as { tokenId: string };
    await tb.client(AuthService).revokeToken({ tokenId });
    await page.goto(`${origin}/hosts`);
    await page.waitForURL(/\/login/, WAIT);
    await shows(page.getByRole("status"), "expired or was revoked");
    // Log in again, then out: the token is revoked on the server.
    await page.getByLabel("User").fill(tb.testbed.admin().name);
    await page.getByLabel("Password").fill(tb.testbed.admin().password);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForURL(/\/hosts$/, WAIT);
    await page.getByRole("button", { name: "Log out" }).click();
    await page.waitForURL(/\/login$/, WAIT);
    expect(await page.evaluate(() => localStorage.getItem("treadmill.console.session"))).toBeNull();
  }, 60_000);
});
