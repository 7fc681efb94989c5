/**
 * Every text field of every request is free of NUL before a handler sees
 * it, checked once here rather than at each of the places where a string
 * reaches PostgreSQL (which refuses NUL in text and jsonb, an error that
 * would surface as Internal).
 *
 * Why one walk over the request rather than the handlers' own checks: the
 * handlers validate the shape of what they use (names, ids, tags) and some
 * strings reach SQL only as lookup keys (a login name, a reference), where a
 * forgotten check is invisible until PostgreSQL refuses the statement. A walk
 * driven by the message's descriptor covers every field of every RPC, new
 * ones included, nested messages, lists, map keys and values alike.
 *
 * Invalid UTF-8 never arrives as such: the binary decoder turns it into
 * U+FFFD and the JSON decoder refuses a lone surrogate, both before any
 * interceptor. NUL is valid UTF-8, and the one character that gets through.
 */
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { isReflectMessage, reflect, type ReflectMessage } from "@bufbuild/protobuf/reflect";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

/** Whether `value` is text PostgreSQL stores as given (no NUL). */
function isStorableText(value: string): boolean {
  return !value.includes("\u0000");
}

/** The message, once every text field in it is storable; InvalidArgument naming the first that is not. */
export function checkTextFields<S extends DescMessage>(schema: S, message: MessageShape<S>): MessageShape<S> {
  const field = badTextField(reflect(schema, message, false), "");
  if (field !== undefined) throw new ConnectError(`${field} must not contain a nul character`, Code.InvalidArgument);
  return message;
}

/**
 * An interceptor that runs checkTextFields on every request message (each
 * message of a request stream as it arrives).
 */
export function textInterceptor(): Interceptor {
  return (next) => async (request) => {
    const schema = request.method.input;
    if (!request.stream) {
      checkTextFields(schema, request.message);
      return next(request);
    }
    const messages = request.message;
    return next({
      ...request,
      message: (async function* () {
        for await (const message of messages) yield checkTextFields(schema, message);
      })(),
    });
  };
}

/** The path (proto names: `spec.parameters["k"]`, `hosts[2].name`) of the first field that is not storable text. */
function badTextField(message: ReflectMessage, prefix: string): string | undefined {
  for (const field of message.fields) {
    if (!message.isSet(field)) continue;
    const path = prefix + field.name;
    switch (field.fieldKind) {
      case "scalar": {
        const bad = badValue(message.get(field), path);
        if (bad !== undefined) return bad;
        break;
      }
      case "message": {
        const bad = badTextField(message.get(field), `${path}.`);
        if (bad !== undefined) return bad;
        break;
      }
      case "list": {
        let index = 0;
        for (const value of message.get(field)) {
          const bad = badValue(value, `${path}[${index++}]`);
          if (bad !== undefined) return bad;
        }
        break;
      }
      case "map":
        for (const [key, value] of message.get(field)) {
          if (typeof key === "string" && !isStorableText(key)) return `${path} key`;
          const bad = badValue(value, `${path}[${JSON.stringify(String(key).slice(0, 64))}]`);
          if (bad !== undefined) return bad;
        }
        break;
      case "enum":
        break;
    }
  }
  return undefined;
}

function badValue(value: unknown, path: string): string | undefined {
  if (typeof value === "string") return isStorableText(value) ? undefined : path;
  if (isReflectMessage(value)) return badTextField(value, `${path}.`);
  return undefined;
}
