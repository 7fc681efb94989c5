import { appendFileSync } from "node:fs";

// Prints the closing line CI counts: "N passed, N failed" alone on a line.
// Jest's own summary is printed after every reporter's onRunComplete, so the
// line is written when the process exits, to come last. When
// TREADMILL_TEST_SUMMARY_FILE is set (by .ci/run), the two numbers are also
// appended there so that CI can print the total of several runs.
export default class SummaryReporter {
  onRunComplete(_contexts, results) {
    const failed = results.numFailedTests + results.numRuntimeErrorTestSuites;
    const file = process.env.TREADMILL_TEST_SUMMARY_FILE;
    if (file) appendFileSync(file, `${results.numPassedTests} ${failed}\n`);
    process.once("exit", () => {
      process.stdout.write(`\n${results.numPassedTests} passed, ${failed} failed\n`);
    });
  }
}
