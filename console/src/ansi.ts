/**
 * A terminal log as lines of styled segments, parsed incrementally from text
 * chunks that may split lines and escape sequences anywhere. Understands SGR
 * (colours: 16, 256 and 24-bit; bold, dim, italic, underline, inverse,
 * strike-through), `\r\n`, and a lone `\r` (progress bars: the line starts
 * over); every other escape sequence (cursor movement, OSC titles) is dropped.
 * DOM-free, so that it is unit-tested with plain jest; log-view.ts renders it.
 */

/** Flags of a style. */
export const BOLD = 1;
export const DIM = 2;
export const ITALIC = 4;
export const UNDERLINE = 8;
export const INVERSE = 16;
export const STRIKE = 32;

/**
 * A colour: -1 is the default, 0-255 the xterm palette, and values from
 * RGB_BASE up a 24-bit colour (RGB_BASE + 0xRRGGBB).
 */
export type Colour = number;
export const DEFAULT_COLOUR = -1;
export const RGB_BASE = 0x1000000;

export interface Style {
  fg: Colour;
  bg: Colour;
  flags: number;
}

/** A run of text in one style (an index into AnsiLog.styles). */
export interface Segment {
  text: string;
  style: number;
}

export type Line = readonly Segment[];

const PLAIN: Style = { fg: DEFAULT_COLOUR, bg: DEFAULT_COLOUR, flags: 0 };
/** Longest escape sequence kept while waiting for its end; longer ones are dropped. */
const MAX_SEQUENCE = 256;
/** Longest line kept; the rest of a longer line is cut (one run-away line must not take the page down). */
const MAX_LINE = 64 * 1024;

type ParseState = "text" | "esc" | "csi" | "osc" | "osc-esc";

export class AnsiLog {
  /** Interned styles; index 0 is the plain style. */
  readonly styles: Style[] = [PLAIN];
  readonly #styleIds = new Map<string, number>([[styleKey(PLAIN), 0]]);
  readonly #lines: Line[] = [];
  readonly #sgrMemo = new Map<string, number>();
  /** Lines dropped from the front to respect maxLines. */
  #dropped = 0;

  #state: ParseState = "text";
  #sequence = "";
  #style = 0;
  #current: Segment[] = [];
  #run = "";
  #currentLength = 0;
  #pendingCR = false;

  constructor(private readonly maxLines = 1_000_000) {}

  /** Completed lines plus the line in progress, if it has text. */
  get lineCount(): number {
    return this.#lines.length + (this.#hasPartial() ? 1 : 0);
  }

  /** Lines dropped from the front because of maxLines. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Line `i` (0 is the oldest kept), the line in progress last. */
  line(i: number): Line {
    if (i < this.#lines.length) return this.#lines[i];
    if (i === this.#lines.length && this.#hasPartial()) return this.#partial();
    throw new RangeError(`line ${i} does not exist`);
  }

  /** The plain text of line `i`. */
  text(i: number): string {
    return this.line(i)
      .map((s) => s.text)
      .join("");
  }

  /** Parses a chunk of decoded text. */
  write(chunk: string): void {
    let i = 0;
    while (i < chunk.length) {
      const state = this.#state;
      if (state === "text") {
        // Fast path: copy the run of ordinary characters in one slice.
        let j = i;
        while (j < chunk.length) {
          const c = chunk.charCodeAt(j);
          if (c === 0x1b || c === 0x0a || c === 0x0d || c === 0x08) break;
          j++;
        }
        if (j > i) {
          if (this.#pendingCR) this.#carriageReturn();
          this.#append(chunk.slice(i, j));
          i = j;
          continue;
        }
        const c = chunk[i++];
        if (c === "\n") {
          this.#pendingCR = false;
          this.#newLine();
        } else if (c === "\r") {
          this.#pendingCR = true;
        } else if (c === "\b") {
          // Backspace: dropped (overstrike is rare in logs).
        } else {
          this.#state = "esc";
        }
      } else if (state === "esc") {
        const c = chunk[i++];
        if (c === "[") {
          this.#state = "csi";
          this.#sequence = "";
        } else if (c === "]") {
          this.#state = "osc";
        } else {
          this.#state = "text"; // a two-character escape (ESC 7, ESC =...): dropped
        }
      } else if (state === "csi") {
        const c = chunk.charCodeAt(i++);
        if (c >= 0x40 && c <= 0x7e) {
          if (c === 0x6d /* m */) this.#sgr(this.#sequence);
          this.#state = "text";
        } else if (this.#sequence.length < MAX_SEQUENCE) {
          this.#sequence += String.fromCharCode(c);
        } else {
          this.#state = "text";
        }
      } else {
        // OSC: ends with BEL or ESC \ (ST).
        const c = chunk[i++];
        if (c === "\x07") this.#state = "text";
        else if (c === "\x1b") this.#state = "osc-esc";
        else if (state === "osc-esc") this.#state = c === "\\" ? "text" : "osc";
      }
    }
  }

  #hasPartial(): boolean {
    return this.#current.length > 0 || this.#run !== "";
  }

  #partial(): Line {
    return this.#run === "" ? this.#current : [...this.#current, { text: this.#run, style: this.#style }];
  }

  #append(text: string): void {
    const room = MAX_LINE - this.#currentLength;
    if (room <= 0) return;
    const kept = text.length > room ? text.slice(0, room) : text;
    this.#run += kept;
    this.#currentLength += kept.length;
  }

  #flushRun(): void {
    if (this.#run === "") return;
    this.#current.push({ text: this.#run, style: this.#style });
    this.#run = "";
  }

  #newLine(): void {
    this.#flushRun();
    this.#lines.push(this.#current);
    this.#current = [];
    this.#currentLength = 0;
    if (this.#lines.length > this.maxLines) {
      const excess = this.#lines.length - this.maxLines;
      this.#lines.splice(0, excess);
      this.#dropped += excess;
    }
  }

  #carriageReturn(): void {
    this.#pendingCR = false;
    this.#current = [];
    this.#run = "";
    this.#currentLength = 0;
  }

  #sgr(params: string): void {
    // Logs repeat a few sequences many times: remember where each leads from each style.
    const memoKey = `${this.#style}|${params}`;
    const known = this.#sgrMemo.get(memoKey);
    if (known !== undefined) return this.#setStyle(known);
    const style: Style = { ...this.styles[this.#style] };
    // Sub-parameters (38:2:R:G:B) are read like parameters.
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let k = 0; k < codes.length; k++) {
      const code = codes[k];
      if (code === 0) Object.assign(style, PLAIN);
      else if (code === 1) style.flags |= BOLD;
      else if (code === 2) style.flags |= DIM;
      else if (code === 3) style.flags |= ITALIC;
      else if (code === 4) style.flags |= UNDERLINE;
      else if (code === 7) style.flags |= INVERSE;
      else if (code === 9) style.flags |= STRIKE;
      else if (code === 22) style.flags &= ~(BOLD | DIM);
      else if (code === 23) style.flags &= ~ITALIC;
      else if (code === 24) style.flags &= ~UNDERLINE;
      else if (code === 27) style.flags &= ~INVERSE;
      else if (code === 29) style.flags &= ~STRIKE;
      else if (code >= 30 && code <= 37) style.fg = code - 30;
      else if (code === 39) style.fg = DEFAULT_COLOUR;
      else if (code >= 40 && code <= 47) style.bg = code - 40;
      else if (code === 49) style.bg = DEFAULT_COLOUR;
      else if (code >= 90 && code <= 97) style.fg = code - 90 + 8;
      else if (code >= 100 && code <= 107) style.bg = code - 100 + 8;
      else if (code === 38 || code === 48) {
        let colour: Colour | undefined;
        if (codes[k + 1] === 5 && k + 2 < codes.length) {
          colour = clampByte(codes[k + 2]);
          k += 2;
        } else if (codes[k + 1] === 2 && k + 4 < codes.length) {
          colour = RGB_BASE + (clampByte(codes[k + 2]) << 16) + (clampByte(codes[k + 3]) << 8) + clampByte(codes[k + 4]);
          k += 4;
        } else {
          break; // malformed: ignore the rest
        }
        if (code === 38) style.fg = colour;
        else style.bg = colour;
      }
    }
    const id = this.#intern(style);
    if (this.#sgrMemo.size < 4096) this.#sgrMemo.set(memoKey, id);
    this.#setStyle(id);
  }

  #setStyle(id: number): void {
    if (id === this.#style) return;
    this.#flushRun();
    this.#style = id;
  }

  #intern(style: Style): number {
    const key = styleKey(style);
    let id = this.#styleIds.get(key);
    if (id === undefined) {
      id = this.styles.length;
      this.styles.push(style);
      this.#styleIds.set(key, id);
    }
    return id;
  }
}

function styleKey(s: Style): string {
  return `${s.fg},${s.bg},${s.flags}`;
}

function clampByte(n: number): number {
  return Number.isFinite(n) ? Math.max(0, Math.min(255, Math.trunc(n))) : 0;
}

/** The CSS colour of a palette entry from 16 to 255 (the first 16 come from the theme's CSS classes). */
export function paletteColour(n: number): string {
  if (n < 232) {
    const i = n - 16;
    const level = (v: number) => (v === 0 ? 0 : 55 + v * 40);
    return `rgb(${level(Math.floor(i / 36))}, ${level(Math.floor(i / 6) % 6)}, ${level(i % 6)})`;
  }
  const grey = 8 + (n - 232) * 10;
  return `rgb(${grey}, ${grey}, ${grey})`;
}

/** The CSS colour of a 24-bit colour. */
export function rgbColour(c: Colour): string {
  const v = c - RGB_BASE;
  return `rgb(${(v >> 16) & 255}, ${(v >> 8) & 255}, ${v & 255})`;
}
