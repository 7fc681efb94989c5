import { create, toBinary, type DescFile, type DescService } from "@bufbuild/protobuf";
import { nestedTypes } from "@bufbuild/protobuf/reflect";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ConnectRouter } from "@connectrpc/connect";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";

/**
 * gRPC server reflection (v1 and v1alpha: grpcurl and older clients still ask
 * v1alpha) over the descriptors compiled into gen/. Both versions carry the
 * same messages under different package names, so one resolver answers both
 * and two thin adapters convert.
 */

/** A reflection question, in the shape both versions share. */
type Question =
  | { case: "fileByFilename"; value: string }
  | { case: "fileContainingSymbol"; value: string }
  | { case: "fileContainingExtension"; value: { containingType: string; extensionNumber: number } }
  | { case: "allExtensionNumbersOfType"; value: string }
  | { case: "listServices"; value: string }
  | { case: undefined; value?: undefined };

/** A reflection answer, in the shape both versions share. */
type Answer =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

/** Every file reachable from the services, indexed by file name and by symbol. */
class DescriptorIndex {
  readonly services: string[];
  readonly #files = new Map<string, DescFile>();
  readonly #symbols = new Map<string, DescFile>();
  /** "extendee#number" -> the file declaring that extension. */
  readonly #extensions = new Map<string, DescFile>();
  readonly #extensionNumbers = new Map<string, number[]>();

  constructor(services: DescService[]) {
    this.services = [...new Set(services.map((s) => s.typeName))].sort();
    for (const service of services) this.#addFile(service.file);
  }

  #addFile(file: DescFile): void {
    if (this.#files.has(file.proto.name)) return;
    this.#files.set(file.proto.name, file);
    for (const type of nestedTypes(file)) {
      this.#symbols.set(type.typeName, file);
      if (type.kind === "service") {
        for (const method of type.methods) this.#symbols.set(`${type.typeName}.${method.name}`, file);
      } else if (type.kind === "extension") {
        const extendee = type.extendee.typeName;
        this.#extensions.set(`${extendee}#${type.number}`, file);
        this.#extensionNumbers.set(extendee, [...(this.#extensionNumbers.get(extendee) ?? []), type.number]);
      }
    }
    for (const dependency of file.dependencies) this.#addFile(dependency);
  }

  answer(question: Question): Answer {
    switch (question.case) {
      case "listServices":
        return { case: "listServicesResponse", value: { service: this.services.map((name) => ({ name })) } };
      case "fileByFilename":
        return this.#withDependencies(this.#files.get(question.value), `file "${question.value}" not found`);
      case "fileContainingSymbol":
        return this.#withDependencies(this.#symbols.get(question.value), `symbol "${question.value}" not found`);
      case "fileContainingExtension": {
        const { containingType, extensionNumber } = question.value;
        return this.#withDependencies(
          this.#extensions.get(`${containingType}#${extensionNumber}`),
          `extension ${extensionNumber} of "${containingType}" not found`,
        );
      }
      case "allExtensionNumbersOfType": {
        if (!this.#symbols.has(question.value)) return notFound(`type "${question.value}" not found`);
        const numbers = this.#extensionNumbers.get(question.value) ?? [];
        return {
          case: "allExtensionNumbersResponse",
          value: { baseTypeName: question.value, extensionNumber: numbers },
        };
      }
      default:
        return { case: "errorResponse", value: { errorCode: Code.InvalidArgument, errorMessage: "empty request" } };
    }
  }

  /**
   * The file and all its transitive dependencies, the file first. A client
   * needs the whole closure to build a descriptor pool; sending a file twice on
   * one stream is allowed, so this keeps no per-stream state.
   */
  #withDependencies(file: DescFile | undefined, missing: string): Answer {
    if (file === undefined) return notFound(missing);
    const closure: DescFile[] = [];
    const visit = (f: DescFile) => {
      if (closure.includes(f)) return;
      closure.push(f);
      f.dependencies.forEach(visit);
    };
    visit(file);
    return {
      case: "fileDescriptorResponse",
      value: { fileDescriptorProto: closure.map((f) => toBinary(FileDescriptorProtoSchema, f.proto)) },
    };
  }
}

function notFound(message: string): Answer {
  return { case: "errorResponse", value: { errorCode: Code.NotFound, errorMessage: message } };
}

/**
 * Registers grpc.reflection.v1 and v1alpha ServerReflection. `services` is read
 * on the first question, after every route is registered, so the answers
 * include the services registered after this call (and reflection itself).
 */
export function registerReflectionServices(router: ConnectRouter, services: () => DescService[]): void {
  let index: DescriptorIndex | undefined;
  const resolve = (question: Question): Answer => (index ??= new DescriptorIndex(services())).answer(question);

  router.service(v1.ServerReflection, {
    async *serverReflectionInfo(requests) {
      for await (const request of requests) {
        yield create(v1.ServerReflectionResponseSchema, {
          validHost: request.host,
          originalRequest: request,
          messageResponse: resolve(request.messageRequest),
        });
      }
    },
  });
  router.service(v1alpha.ServerReflection, {
    async *serverReflectionInfo(requests) {
      for await (const request of requests) {
        yield create(v1alpha.ServerReflectionResponseSchema, {
          validHost: request.host,
          originalRequest: request,
          messageResponse: resolve(request.messageRequest),
        });
      }
    },
  });
}
