import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type MethodImpl, type ServiceImpl } from "@connectrpc/connect";
import type { UniversalHandlerOptions } from "@connectrpc/connect/protocol";

type HandlerOptions = Partial<UniversalHandlerOptions>;

/**
 * A ConnectRouter that registers the given procedures (e.g.
 * "/treadmill.image.v1.ImageStoreService/GetBlob") without compression and
 * everything else unchanged.
 *
 * Why: connectNodeAdapter gzips every response message over 1 KiB for clients
 * that accept gzip, which all do; on incompressible bulk data (disk images)
 * that costs most of the throughput (FACTS.md). Connect takes handler options
 * per registration, so the bulk procedures get `acceptCompression: []` on the
 * same adapter, and the component's `routes` runs once.
 */
export function withUncompressedProcedures(router: ConnectRouter, procedures: readonly string[]): ConnectRouter {
  if (procedures.length === 0) return router;
  const bulk = new Set(procedures);
  const isBulk = (method: DescMethod) => bulk.has(`/${method.parent.typeName}/${method.name}`);
  const optionsFor = (method: DescMethod, options?: HandlerOptions): HandlerOptions | undefined =>
    isBulk(method) ? { ...options, acceptCompression: [] } : options;

  const wrapped: ConnectRouter = {
    get handlers() {
      return router.handlers;
    },
    service<T extends DescService>(service: T, implementation: Partial<ServiceImpl<T>>, options?: HandlerOptions) {
      if (!service.methods.some(isBulk)) {
        router.service(service, implementation, options);
        return this;
      }
      // Register method by method, as router.service() would, so that each
      // can have its own options.
      for (const method of service.methods) {
        router.rpc(method, methodImpl(service, implementation, method), optionsFor(method, options));
      }
      return this;
    },
    rpc<M extends DescMethod>(method: M, impl: MethodImpl<M>, options?: HandlerOptions) {
      router.rpc(method, impl, optionsFor(method, options));
      return this;
    },
  };
  return wrapped;
}

/** The implementation of one method, bound to its service object, or Unimplemented. */
function methodImpl<T extends DescService>(
  service: T,
  implementation: Partial<ServiceImpl<T>>,
  method: DescMethod,
): MethodImpl<DescMethod> {
  // ServiceImpl is keyed by the literal method names of T, which a loop over
  // service.methods cannot name; the method and its implementation match by
  // construction.
  const fn = (implementation as Record<string, unknown>)[method.localName];
  if (typeof fn === "function") return fn.bind(implementation) as MethodImpl<DescMethod>;
  const message = `${service.typeName}.${method.name} is not implemented`;
  return (() => {
    throw new ConnectError(message, Code.Unimplemented);
  }) as MethodImpl<DescMethod>;
}
