/**
 * Artifact caps and retention (docs/artifacts.md), spread into the
 * coordinator's schema (coordinator/config.ts). Keys become `--<key>` flags
 * and `TREADMILL_COORDINATOR_<KEY>` environment variables.
 */
import type { ConfigOf } from "../../lib/config.js";

const GIB = 1024 ** 3;
const DAY = 24 * 3600_000;

export const artifactConfigFields = {
  artifactMaxFileBytes: {
    type: "int",
    default: 4 * GIB,
    min: 0,
    description: "largest artifact file a supervisor uploads; a larger one is skipped with a timeline event",
  },
  artifactMaxJobBytes: {
    type: "int",
    default: 16 * GIB,
    min: 0,
    description: "most bytes of artifacts per job attempt and host; files past it are skipped with a timeline event",
  },
  artifactMaxFiles: {
    type: "int",
    default: 128,
    min: 1,
    max: 128,
    description: "most artifact files per job attempt and host (one store manifest lists them)",
  },
  artifactMaxAgeMs: {
    type: "duration",
    default: 30 * DAY,
    min: 0,
    description: "artifacts older than this are removed by retention (0: kept by age)",
  },
  artifactMaxUserBytes: {
    type: "int",
    default: 0,
    min: 0,
    description: "most bytes of artifacts one user keeps; the oldest are removed past it (0: no cap)",
  },
  artifactSweepIntervalMs: {
    type: "duration",
    default: 60_000,
    min: 10,
    description: "period of the artifact retention keeper",
  },
} as const;

export type ArtifactConfig = ConfigOf<typeof artifactConfigFields>;
