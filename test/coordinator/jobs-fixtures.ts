// The job system's fixtures moved to test/support/jobs.ts; test/e2e/ (the
// lead's files this round) still imports them from here. Remove this file
// once those imports name test/support/jobs.ts.
export * from "../support/jobs.js";
