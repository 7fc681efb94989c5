import type { ConnectRouter } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { RegistryService } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import type { CoordinatorContext } from "../context.js";

/** Users, tokens, hosts, the image catalog and the registry. Not built yet. */
export function registerCatalogServices(router: ConnectRouter, _ctx: CoordinatorContext): void {
  router.service(AuthService, {});
  router.service(UserService, {});
  router.service(HostService, {});
  router.service(ImageService, {});
  router.service(RegistryService, {});
}
