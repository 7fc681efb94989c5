import { Code, ConnectError } from "@connectrpc/connect";

/** "OK", or the name of the code the call failed with ("NotFound"). */
export async function codeOf(call: Promise<unknown>): Promise<string> {
  try {
    await call;
    return "OK";
  } catch (err) {
    return Code[ConnectError.from(err).code];
  }
}

/** "ok", or the Code the call failed with. */
export async function errorCodeOf(call: Promise<unknown>): Promise<Code | "ok"> {
  try {
    await call;
    return "ok";
  } catch (err) {
    return ConnectError.from(err).code;
  }
}
