import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AttachRequestSchema, JobResultsReportSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { JobResults } from "../../supervisor/job-results.js";

type Payload = MessageInitShape<typeof AttachRequestSchema>["payload"];
type Report = MessageInitShape<typeof JobResultsReportSchema> & { reportId: string };

/**
 * The supervisor's results reports (supervisor/job-results.ts) with the
 * stream replaced by a list: batches of at most 2,000 cases, each retained
 * until acknowledged and sent again at every attach, the job's end waiting
 * for them; a results directory read without following links or opening
 * what is not a regular file.
 */
describe("a job's results reports on the supervisor", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-results-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  function host(limits = { maxCases: 250_000, maxBytes: 1 << 20, collectMs: 5000 }) {
    const sent: Report[] = [];
    const results = new JobResults({
      logger: silentLogger(),
      send: (p: Payload) => {
        if (p?.case === "jobResultsReport") sent.push(p.value as Report);
      },
      changed: () => undefined,
      limits,
    });
    return { results, sent };
  }

  it("sends 5,000 cases as three batches, again after a reconnect until acknowledged, and lets the job's end go once they are", async () => {
    const { results, sent } = host();
    const attempt = results.open("job-1", 1, { console: false });
    const resultsDir = join(dir, "many");
    await mkdir(resultsDir);
    const cases = Array.from({ length: 5000 }, (_, i) => `<testcase name="c${i}"/>`).join("");
    await writeFile(join(resultsDir, "r.xml"), `<testsuite name="s">${cases}</testsuite>`);
    await attempt.collect(resultsDir);
    expect(sent.map((r) => [r.cases?.length, r.last])).toEqual([
      [2000, false],
      [2000, false],
      [1000, true],
    ]);
    let ended = false;
    const end = attempt.settled().then(() => (ended = true));
    results.acknowledged(sent[1]!.reportId);
    // A new stream: the two still unacknowledged go again, in order.
    results.attached();
    expect(sent.slice(3).map((r) => r.reportId)).toEqual([sent[0]!.reportId, sent[2]!.reportId]);
    results.acknowledged(sent[0]!.reportId);
    await Promise.resolve();
    expect(ended).toBe(false);
    expect(results.unacknowledged()).toBe(1);
    results.acknowledged(sent[2]!.reportId);
    await end;
    expect(results.unacknowledged()).toBe(0);
    results.attached();
    expect(sent).toHaveLength(5);
  });

  it("sends nothing for a job that reported nothing", async () => {
    const { results, sent } = host();
    const attempt = results.open("job-2", 1, { console: true });
    attempt.output("console", Buffer.from("booting\nok 1 - not tap: no version line\n"));
    await attempt.collect(join(dir, "missing"));
    await attempt.settled();
    expect(sent).toEqual([]);
  });

  it("follows no link and opens nothing but regular files in the results directory", async () => {
    const { results, sent } = host();
    const resultsDir = join(dir, "hostile");
    await mkdir(join(resultsDir, "sub"), { recursive: true });
    await writeFile(join(dir, "outside.xml"), '<testsuite name="outside"><testcase name="leaked"/></testsuite>');
    await symlink(join(dir, "outside.xml"), join(resultsDir, "a-link.xml"));
    await symlink(dir, join(resultsDir, "sub", "dir-link"));
    await promisify(execFile)("mkfifo", [join(resultsDir, "b-fifo.xml")]);
    await writeFile(join(resultsDir, "sub", "ok.xml"), '<testsuite name="inside"><testcase name="kept"/></testsuite>');
    const attempt = results.open("job-3", 1, { console: false });
    await attempt.collect(resultsDir);
    const [report] = sent;
    expect(report!.cases?.map((c) => `${c.suite}/${c.name}`)).toEqual(["inside/kept"]);
    expect(report!.problems).toEqual(["a-link.xml: a symbolic link, not followed"]);
  });
});
