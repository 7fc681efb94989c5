/**
 * The fetch API's `Headers`, for `tml`'s bundle only: scripts/build.mjs
 * injects this class wherever the bundled code (connect, our transports)
 * names the global `Headers`. Node defines the global lazily by loading its
 * whole fetch implementation (undici), which cost `tml` a sixth of its start
 * for one small class; tml never hands headers to node's fetch. Behaves as
 * the global does for every method (test/cli/headers.test.ts compares the
 * two): names are case-insensitive and validated, values trimmed and
 * validated, `get` joins repeated values with ", ", iteration is in name
 * order with each set-cookie apart.
 */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const FORBIDDEN_IN_VALUE = /[\0\r\n]/;

type Init = Iterable<readonly [string, string]> | Record<string, string> | LeanHeaders;

export class LeanHeaders {
  readonly #values = new Map<string, string[]>();

  constructor(init?: Init) {
    if (init === undefined || init === null) return;
    if (typeof init !== "object") throw new TypeError("Headers: init must be an object or an iterable of pairs");
    if (Symbol.iterator in init) {
      for (const pair of init as Iterable<readonly [string, string]>) {
        if (pair.length !== 2) throw new TypeError("Headers: every header of init must be a name and a value");
        this.append(pair[0], pair[1]);
      }
    } else {
      for (const [name, value] of Object.entries(init)) this.append(name, value);
    }
  }

  append(name: string, value: string): void {
    const key = checkName(name);
    const values = this.#values.get(key);
    if (values === undefined) this.#values.set(key, [checkValue(value)]);
    else values.push(checkValue(value));
  }

  set(name: string, value: string): void {
    this.#values.set(checkName(name), [checkValue(value)]);
  }

  delete(name: string): void {
    this.#values.delete(checkName(name));
  }

  get(name: string): string | null {
    return this.#values.get(checkName(name))?.join(", ") ?? null;
  }

  getSetCookie(): string[] {
    return [...(this.#values.get("set-cookie") ?? [])];
  }

  has(name: string): boolean {
    return this.#values.has(checkName(name));
  }

  forEach(callback: (value: string, name: string, headers: LeanHeaders) => void, thisArg?: unknown): void {
    for (const [name, value] of this) callback.call(thisArg, value, name, this);
  }

  *entries(): IterableIterator<[string, string]> {
    for (const name of [...this.#values.keys()].sort()) {
      const values = this.#values.get(name)!;
      if (name === "set-cookie") for (const value of values) yield [name, value];
      else yield [name, values.join(", ")];
    }
  }

  *keys(): IterableIterator<string> {
    for (const [name] of this.entries()) yield name;
  }

  *values(): IterableIterator<string> {
    for (const [, value] of this.entries()) yield value;
  }

  [Symbol.iterator](): IterableIterator<[string, string]> {
    return this.entries();
  }

  get [Symbol.toStringTag](): string {
    return "Headers";
  }
}

function checkName(name: string): string {
  const text = String(name);
  if (!TOKEN.test(text)) throw new TypeError(`Headers: invalid header name ${JSON.stringify(text)}`);
  return text.toLowerCase();
}

function checkValue(value: string): string {
  // HTTP whitespace (tab, space, CR, LF) is trimmed at both ends; what is left may not hold NUL, CR or LF.
  const text = String(value).replace(/^[\t\n\r ]+|[\t\n\r ]+$/g, "");
  if (FORBIDDEN_IN_VALUE.test(text)) throw new TypeError(`Headers: invalid value for a header`);
  return text;
}

export { LeanHeaders as Headers };
