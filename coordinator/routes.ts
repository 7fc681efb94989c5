import type { ConnectRouter } from "@connectrpc/connect";
import { AuthService } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { EventService } from "../gen/treadmill/coordinator/v1/event_service_pb.js";
import { HealthService } from "../gen/treadmill/coordinator/v1/health_service_pb.js";
import { HostService } from "../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../gen/treadmill/coordinator/v1/image_service_pb.js";
import { JobService } from "../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseService } from "../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { RegistryService } from "../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { SubscriptionService } from "../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { SupervisorService } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { UserService } from "../gen/treadmill/coordinator/v1/user_service_pb.js";
import type { CoordinatorContext } from "./context.js";
import type { FeedSystem } from "./feed/feed-system.js";
import type { JobSystem } from "./jobs/job-system.js";
import type { LeaseSystem } from "./leases/lease-system.js";
import type { SubscriptionSystem } from "./subscriptions/subscription-system.js";
import { registerCatalogServices } from "./services/index.js";

/** Every service of `treadmill.coordinator.v1`, in the order of DESIGN.md §2. */
export const coordinatorServices = [
  AuthService,
  UserService,
  HostService,
  ImageService,
  JobService,
  SupervisorService,
  RegistryService,
  HealthService,
  LeaseService,
  EventService,
  SubscriptionService,
] as const;

/** The coordinator's routes: the catalog services, the job system, leases, the event feed and its subscriptions. */
export function coordinatorRoutes(ctx: CoordinatorContext, jobs: JobSystem, leases: LeaseSystem, feed: FeedSystem, subscriptions: SubscriptionSystem) {
  return (router: ConnectRouter): void => {
    registerCatalogServices(router, ctx);
    jobs.register(router);
    leases.register(router);
    feed.register(router);
    subscriptions.register(router);
  };
}
