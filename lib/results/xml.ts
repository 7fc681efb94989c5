/**
 * A small streaming XML scanner: enough of XML 1.0 for test reports (JUnit
 * files), fed chunk by chunk, so a 30 MB report is never held whole. It
 * reports start tags with their attributes, end tags and character data
 * (entities and CDATA resolved); it skips the prolog, comments, processing
 * instructions and a DOCTYPE without an internal subset. It checks what a
 * reader of results must trust: tags nest and match, attributes are quoted
 * and unique, entities are known, one root element, nothing after it but
 * whitespace. Anything else is an XmlError naming the line and column.
 *
 * Why not a library: the subset is small, the errors are ours to word
 * (they reach the job's timeline), and the supervisor stays free of a
 * dependency for it.
 */

/** Malformed XML; the message names the line and column. */
export class XmlError extends Error {
  override readonly name = "XmlError";
}

export interface XmlHandler {
  open(name: string, attributes: Map<string, string>): void;
  close(name: string): void;
  text(text: string): void;
}

/** The longest name, attribute value or markup construct kept while scanning (a guard against a runaway token). */
const MAX_TOKEN = 1 << 20;

const ENTITIES: Record<string, string> = { lt: "<", gt: ">", amp: "&", quot: '"', apos: "'" };
const NAME = /^[A-Za-z_:][-A-Za-z0-9_:.]*$/;

export class XmlScanner {
  private buffer = "";
  /** Where scanning is within `buffer`. */
  private pos = 0;
  private readonly stack: string[] = [];
  private rootSeen = false;
  private rootClosed = false;
  /** Lines before `buffer` (what was dropped of it). */
  private linesBefore = 0;

  constructor(private readonly handler: XmlHandler) {}

  /** Scans a chunk; markup cut at its end waits for the next one. */
  write(chunk: string): void {
    if (this.pos > 0) {
      this.linesBefore += countLines(this.buffer, 0, this.pos);
      this.buffer = this.buffer.slice(this.pos);
      this.pos = 0;
    }
    this.buffer += chunk;
    this.scan(false);
  }

  /** The input is over: anything still open is an error. */
  end(): void {
    this.scan(true);
    if (this.buffer.slice(this.pos).trim() !== "") throw this.error("unexpected end of input inside markup");
    if (this.stack.length > 0) throw this.error(`unexpected end of input: <${this.stack[this.stack.length - 1]}> is not closed`);
    if (!this.rootSeen) throw this.error("no root element");
  }

  private error(message: string): XmlError {
    const line = this.linesBefore + countLines(this.buffer, 0, this.pos) + 1;
    const column = this.pos - this.buffer.lastIndexOf("\n", this.pos - 1);
    return new XmlError(`line ${line}, column ${column}: ${message}`);
  }

  private scan(final: boolean): void {
    const buf = this.buffer;
    for (;;) {
      const at = this.pos;
      if (at >= buf.length) return;
      const lt = buf.indexOf("<", at);
      if (lt !== at) {
        // Character data up to the next markup (or all of it, cut before a possible entity at the end).
        let end = lt < 0 ? buf.length : lt;
        if (lt < 0 && !final) {
          const amp = buf.lastIndexOf("&");
          if (amp >= at && buf.indexOf(";", amp) < 0) end = amp;
          if (end === at) return this.guard();
        }
        this.characters(buf.slice(at, end));
        this.pos = end;
        continue;
      }
      if (buf.startsWith("<!--", at)) {
        const close = buf.indexOf("-->", at + 4);
        if (close < 0) return this.more(final, "a comment is not closed");
        this.pos = close + 3;
      } else if (buf.startsWith("<![CDATA[", at)) {
        const close = buf.indexOf("]]>", at + 9);
        if (close < 0) return this.more(final, "a CDATA section is not closed");
        if (this.stack.length === 0) throw this.error("CDATA outside the root element");
        this.handler.text(buf.slice(at + 9, close));
        this.pos = close + 3;
      } else if (buf.startsWith("<?", at)) {
        const close = buf.indexOf("?>", at + 2);
        if (close < 0) return this.more(final, "a processing instruction is not closed");
        this.pos = close + 2;
      } else if (buf.startsWith("<!", at)) {
        if (buf.length - at < 9 && !final) return;
        if (!buf.startsWith("<!DOCTYPE", at)) throw this.error("unexpected markup <!");
        if (this.rootSeen) throw this.error("a DOCTYPE after the root element");
        const close = buf.indexOf(">", at);
        if (close < 0) return this.more(final, "a DOCTYPE is not closed");
        if (buf.slice(at, close).includes("[")) throw this.error("a DOCTYPE with an internal subset is not supported");
        this.pos = close + 1;
      } else {
        const close = tagEnd(buf, at);
        if (close === -2) throw this.error("a < inside a tag");
        if (close < 0) return this.more(final, "a tag is not closed");
        this.tag(buf.slice(at + 1, close));
        this.pos = close + 1;
      }
    }
  }

  /** Markup continues in the next chunk, unless the input is over. */
  private more(final: boolean, what: string): void {
    if (final) throw this.error(what);
    this.guard();
  }

  private guard(): void {
    if (this.buffer.length - this.pos > MAX_TOKEN) throw this.error(`a token longer than ${MAX_TOKEN} characters`);
  }

  private characters(raw: string): void {
    if (this.stack.length === 0) {
      if (raw.trim() !== "") throw this.error(this.rootClosed ? "text after the root element" : "text before the root element");
      return;
    }
    this.handler.text(this.decode(raw));
  }

  private decode(raw: string): string {
    if (!raw.includes("&")) return raw;
    return raw.replace(/&([^;&\s]{0,32});?/g, (whole, name: string) => {
      if (!whole.endsWith(";")) throw this.error(`a bare & (write &amp;)`);
      if (name.startsWith("#")) {
        const code = name[1] === "x" ? Number.parseInt(name.slice(2), 16) : Number.parseInt(name.slice(1), 10);
        if (!Number.isInteger(code) || code < 1 || code > 0x10ffff) throw this.error(`a bad character reference &${name};`);
        return String.fromCodePoint(code);
      }
      const value = ENTITIES[name];
      if (value === undefined) throw this.error(`an unknown entity &${name};`);
      return value;
    });
  }

  /** The inside of `<...>`. */
  private tag(inner: string): void {
    if (inner.startsWith("/")) {
      const name = inner.slice(1).trim();
      const open = this.stack.pop();
      if (open === undefined) throw this.error(`</${name}> closes nothing`);
      if (open !== name) throw this.error(`</${name}> closes <${open}>`);
      this.handler.close(name);
      if (this.stack.length === 0) this.rootClosed = true;
      return;
    }
    const selfClosing = inner.endsWith("/");
    const body = selfClosing ? inner.slice(0, -1) : inner;
    const m = /^([^\s/>]+)/.exec(body);
    if (!m || !NAME.test(m[1]!)) throw this.error(`a bad element name <${body.slice(0, 40)}`);
    const name = m[1]!;
    if (this.stack.length === 0 && this.rootClosed) throw this.error(`a second root element <${name}>`);
    const attributes = this.attributes(body.slice(name.length), name);
    this.rootSeen = true;
    this.stack.push(name);
    this.handler.open(name, attributes);
    if (selfClosing) {
      this.stack.pop();
      this.handler.close(name);
      if (this.stack.length === 0) this.rootClosed = true;
    }
  }

  private attributes(text: string, element: string): Map<string, string> {
    const attributes = new Map<string, string>();
    const re = /\s*([^\s=]+)\s*=\s*("([^"]*)"|'([^']*)')|\s*(\S)/gy;
    let m: RegExpExecArray | null;
    while ((m = re.exec(text)) !== null) {
      if (m[5] !== undefined) throw this.error(`a malformed attribute in <${element}>`);
      const name = m[1]!;
      if (!NAME.test(name)) throw this.error(`a bad attribute name ${name.slice(0, 40)} in <${element}>`);
      if (attributes.has(name)) throw this.error(`attribute ${name} twice in <${element}>`);
      const raw = m[3] ?? m[4] ?? "";
      if (raw.includes("<")) throw this.error(`a < in attribute ${name} of <${element}>`);
      attributes.set(name, this.decode(raw));
    }
    return attributes;
  }
}

/** Newlines in text[from, to). */
function countLines(text: string, from: number, to: number): number {
  let n = 0;
  for (let i = text.indexOf("\n", from); i >= 0 && i < to; i = text.indexOf("\n", i + 1)) n++;
  return n;
}

/** The index of the `>` that ends the tag starting at `at` (quotes respected); -1: not in the buffer yet; -2: a `<` comes first. */
function tagEnd(buf: string, at: number): number {
  let quote = "";
  for (let i = at + 1; i < buf.length; i++) {
    const c = buf[i];
    if (quote !== "") {
      if (c === quote) quote = "";
    } else if (c === '"' || c === "'") quote = c;
    else if (c === ">") return i;
    else if (c === "<") return -2;
  }
  return -1;
}
