import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import type { Browser, Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { uuidv7 } from "../../coordinator/shared/common.js";
import { launchChromium, loggedInPage } from "../support/browser.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";

const ARTIFACTS = "test/artifacts/console";
const WAIT = { timeout: 30_000 };

/**
 * The web console's test results (docs/results.md) in headless Chromium,
 * against a coordinator serving a console built for this test, with two
 * finished jobs of one series seeded in the database: the job page's
 * results table with its counts, filtered by outcome and name, the
 * comparison with the series' previous job, and the counts in the jobs
 * list. Any console error fails the test.
 */
describe("the web console's test results in headless Chromium", () => {
  let c: TestCoordinator;
  let dist: string;
  let browser: Browser;
  let page: Page;
  const errors: string[] = [];
  let base = "";
  let job = "";

  /** A finalized job of `tags` with `cases` ([suite, name, outcome 1-4, message]). */
  async function seed(owner: string, tags: Record<string, string>, cases: [string, string, number, string][]): Promise<string> {
    const id = uuidv7(Date.now());
    await c.sql`
      insert into jobs (id, owner_id, spec, state, reason, exit_status, created_at, finalized_at)
      values (${id}, ${owner}, ${c.sql.json({ image: "test/shell:1", tags })}, 'finalized', 'workload_exited', 'success', now(), now())`;
    const count = (o: number) => cases.filter((k) => k[2] === o).length;
    await c.sql`
      insert into job_results (job_id, attempt, total, passed, failed, skipped, errored, complete)
      values (${id}, 1, ${cases.length}, ${count(1)}, ${count(2)}, ${count(3)}, ${count(4)}, true)`;
    for (const [i, [suite, name, outcome, message]] of cases.entries()) {
      await c.sql`insert into job_result_cases (job_id, attempt, idx, suite, name, outcome, message) values (${id}, 1, ${i}, ${suite}, ${name}, ${outcome}, ${message})`;
    }
    return id;
  }

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    await mkdir(ARTIFACTS, { recursive: true });
    c = await startTestCoordinator({ config: { consoleDir: dist } });
    const user = await c.createUser({ name: `results-user-${randomUUID().slice(0, 4)}` });
    const series = { suite: "smoke", board: "x86" };
    base = await seed(user.id, { ...series, commit: "aaa" }, [
      ["boot", "reaches shell", 1, ""],
      ["net", "dhcp", 1, ""],
    ]);
    job = await seed(user.id, { ...series, commit: "bbb" }, [
      ["boot", "reaches shell", 1, ""],
      ["net", "dhcp", 2, "no lease within 1 s\nretried 3 times"],
      ["net", "ipv6", 3, "no ipv6 in the lab"],
    ]);
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

  const rows = () => page.locator("#results-cases tr[data-case-index]");

  it("shows the job's cases with their counts and filters them by outcome and by name", async () => {
    await page.goto(`${c.url}/jobs/${job}`);
    await page.locator("#job-results").waitFor(WAIT);
    expect(await page.locator("#results-counts").textContent()).toBe("Attempt 1: 3 cases: 1 passed, 1 failed, 1 skipped, 0 errored.");
    await page.locator('#results-cases tr[data-case-index="2"]').waitFor(WAIT);
    expect(await rows().count()).toBe(3);
    expect(await page.locator('#results-cases tr[data-case-index="1"]').textContent()).toContain("no lease within 1 s");

    await page.getByLabel("Outcome").selectOption("failing");
    await page.waitForFunction(() => document.querySelectorAll("#results-cases tr[data-case-index]").length === 1, undefined, WAIT);
    expect(await rows().first().textContent()).toContain("dhcp");

    await page.getByLabel("Outcome").selectOption("");
    await page.getByLabel("Name", { exact: true }).fill("IPV");
    await page.getByRole("button", { name: "Apply" }).click();
    await page.waitForFunction(() => document.querySelectorAll("#results-cases tr[data-case-index]").length === 1, undefined, WAIT);
    expect(await rows().first().textContent()).toContain("ipv6");
  }, 60_000);

  it("compares the job with the previous job of its series", async () => {
    await page.goto(`${c.url}/jobs/${job}`);
    await page.locator("#results-newly-failing").waitFor(WAIT);
    expect(await page.locator("#results-compare").textContent()).toContain(base);
    expect(await page.locator("#results-newly-failing").textContent()).toBe("Newly failing: 1net / dhcp pass → fail");
    expect(await page.locator("#results-newly-passing h4").textContent()).toBe("Newly passing: 0");
    await page.screenshot({ path: `${ARTIFACTS}/job-results.png`, fullPage: true });
  }, 60_000);

  it("shows the counts in the jobs list", async () => {
    await page.goto(`${c.url}/jobs`);
    await page.locator(`tr[data-job-id="${job}"] .badge.results`).waitFor(WAIT);
    expect(await page.locator(`tr[data-job-id="${job}"] .badge.results`).textContent()).toBe("1/3 passed");
    expect(await page.locator(`tr[data-job-id="${base}"] .badge.results`).textContent()).toBe("2/2 passed");
  }, 60_000);
});
