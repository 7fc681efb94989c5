import type { ConnectRouter } from "@connectrpc/connect";
import { RendezvousService } from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { createServingComponent, type ServingComponent } from "../lib/component.js";
import type { Logger } from "../lib/logger.js";
import type { ProxyConfig } from "./config.js";

/**
 * A rendezvous proxy: `RendezvousService` for supervisors, `TunnelService`
 * for clients. Both answer `Unimplemented` until the proxy issue gives them
 * behaviour.
 */
export function createProxy({ config, logger }: { config: ProxyConfig; logger: Logger }): ServingComponent {
  return createServingComponent({
    name: "proxy",
    config,
    logger,
    routes: (router: ConnectRouter) => {
      router.service(RendezvousService, {});
      router.service(TunnelService, {});
    },
  });
}
