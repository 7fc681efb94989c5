import type { ConnectRouter } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { RegistryService } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import type { CoordinatorContext } from "../context.js";
import { AuthServiceImpl } from "./auth-service.js";
import { HostServiceImpl } from "./host-service.js";
import { HostWatchHub } from "./host-watch.js";
import { ImageServiceImpl } from "./image-service.js";
import { RegistryServiceImpl } from "./registry-service.js";
import { UserServiceImpl } from "./user-service.js";

/** Users, tokens, hosts, the image catalog and the registry. */
export function registerCatalogServices(router: ConnectRouter, ctx: CoordinatorContext): void {
  const hub = new HostWatchHub(ctx.notifications, ctx.logger.child({ subsystem: "host-watch" }));
  router.service(AuthService, new AuthServiceImpl(ctx));
  router.service(UserService, new UserServiceImpl(ctx));
  router.service(HostService, new HostServiceImpl(ctx, hub));
  router.service(ImageService, new ImageServiceImpl(ctx));
  router.service(RegistryService, new RegistryServiceImpl(ctx));
}
