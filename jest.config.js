// Jest in native ESM mode (node --experimental-vm-modules), TypeScript through
// @swc/jest (no type-checking here: `npm run typecheck` does that).
export default {
  testEnvironment: "node",
  extensionsToTreatAsEsm: [".ts"],
  transform: {
    "^.+\\.ts$": [
      "@swc/jest",
      {
        jsc: { target: "es2022", parser: { syntax: "typescript" } },
        module: { type: "es6" },
      },
    ],
  },
  // Sources import siblings as "./x.js" (NodeNext style); map them to the .ts.
  moduleNameMapper: { "^(\\.{1,2}/.*)\\.js$": "$1" },
  testMatch: ["<rootDir>/test/**/*.test.ts"],
  testPathIgnorePatterns: ["/node_modules/", "<rootDir>/test/bench/", "<rootDir>/test/interop/"],
  globalSetup: "<rootDir>/test/support/global-setup.ts",
  globalTeardown: "<rootDir>/test/support/global-teardown.ts",
  reporters: ["default", "<rootDir>/test/support/summary-reporter.js"],
  testTimeout: 30000,
  // The suite waits far more than it computes (sockets, child processes,
  // PostgreSQL): on two cores, two workers finish it in 3m45s where one took
  // 8m06s, every test passing (issue #19). Jest's default (cores - 1) would be
  // one. No --detectOpenHandles: it forces a single worker; a test that leaks
  // a handle shows as a worker that "failed to exit gracefully".
  // `npm run test:interop` runs in band: its qemu guests under TCG and its
  // chaos run each want both cores.
  maxWorkers: 2,
};
