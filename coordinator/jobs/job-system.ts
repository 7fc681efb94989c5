import type { ConnectRouter } from "@connectrpc/connect";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { SupervisorService } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { CoordinatorContext } from "../context.js";

/** Jobs, the scheduler and the supervisor stream: one unit with one life. */
export interface JobSystem {
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
}

/** Not built yet: JobService and SupervisorService answer Unimplemented. */
export function createJobSystem(_ctx: CoordinatorContext): JobSystem {
  return {
    register(router) {
      router.service(JobService, {});
      router.service(SupervisorService, {});
    },
    async start() {},
    async stop() {},
  };
}
