/**
 * A virtualised view of an AnsiLog: the scroll area is as tall as every line,
 * but only the lines in sight (plus a margin) are in the DOM, re-rendered at
 * most once per animation frame. A log of 100k lines therefore costs the DOM
 * a few dozen rows. While the view is scrolled to the bottom it follows new
 * lines; scrolling up stops following until the bottom is reached again.
 */
import { AnsiLog, BOLD, DEFAULT_COLOUR, DIM, INVERSE, ITALIC, RGB_BASE, STRIKE, UNDERLINE, paletteColour, rgbColour, type Style } from "./ansi.js";
import { h } from "./dom.js";

/** Must match `.log-line` height in styles.css. */
export const LINE_HEIGHT = 18;
const OVERSCAN = 20;

export class LogView {
  readonly element: HTMLElement;
  readonly #spacer: HTMLElement;
  readonly #rows: HTMLElement;
  #log: AnsiLog;
  #frame = 0;
  #following = true;
  #rendered = { first: -1, last: -1, count: -1 };

  constructor(label: string) {
    this.#log = new AnsiLog();
    this.#rows = h("div", { class: "log-rows" });
    this.#spacer = h("div", { class: "log-spacer" }, this.#rows);
    this.element = h("div", { class: "log-view", tabindex: "0", role: "region", "aria-label": label }, this.#spacer);
    this.element.addEventListener("scroll", () => {
      const el = this.element;
      this.#following = el.scrollTop + el.clientHeight >= el.scrollHeight - LINE_HEIGHT;
      this.#schedule();
    });
  }

  get log(): AnsiLog {
    return this.#log;
  }

  /** Whether new lines scroll the view (it sits at the bottom). */
  get following(): boolean {
    return this.#following;
  }

  /** Empties the view (a new channel or attempt). */
  reset(): void {
    this.#log = new AnsiLog();
    this.#following = true;
    this.#rendered = { first: -1, last: -1, count: -1 };
    this.#schedule();
  }

  write(text: string): void {
    this.#log.write(text);
    this.#schedule();
  }

  /** Renders now (tests and the first paint); otherwise rendering waits for a frame. */
  render(): void {
    this.#frame = 0;
    const count = this.#log.lineCount;
    this.#spacer.style.height = `${count * LINE_HEIGHT}px`;
    const el = this.element;
    if (this.#following) el.scrollTop = el.scrollHeight;
    const first = Math.max(0, Math.floor(el.scrollTop / LINE_HEIGHT) - OVERSCAN);
    const last = Math.min(count, Math.ceil((el.scrollTop + el.clientHeight) / LINE_HEIGHT) + OVERSCAN);
    // The line in progress may have grown: always redraw when it is in sight.
    const r = this.#rendered;
    if (r.first === first && r.last === last && r.count === count && last < count - 1) return;
    this.#rendered = { first, last, count };
    const rows: HTMLElement[] = [];
    for (let i = first; i < last; i++) rows.push(this.#renderLine(i));
    this.#rows.style.transform = `translateY(${first * LINE_HEIGHT}px)`;
    this.#rows.replaceChildren(...rows);
  }

  #schedule(): void {
    if (this.#frame === 0) this.#frame = requestAnimationFrame(() => this.render());
  }

  #renderLine(i: number): HTMLElement {
    const line = this.#log.line(i);
    const row = h("div", { class: "log-line" });
    for (const segment of line) {
      if (segment.style === 0) {
        row.append(segment.text);
        continue;
      }
      const span = h("span", {}, segment.text);
      applyStyle(span, this.#log.styles[segment.style]);
      row.append(span);
    }
    return row;
  }
}

/** Classes for the 16 theme colours and flags; CSSOM properties (allowed by the CSP) for the rest. */
function applyStyle(span: HTMLElement, style: Style): void {
  let { fg, bg } = style;
  const { flags } = style;
  if (flags & INVERSE) {
    [fg, bg] = [bg, fg];
    if (fg === DEFAULT_COLOUR) span.classList.add("inv-fg");
    if (bg === DEFAULT_COLOUR) span.classList.add("inv-bg");
  }
  colour(span, fg, "f", "color");
  colour(span, bg, "b", "backgroundColor");
  if (flags & BOLD) span.classList.add("bold");
  if (flags & DIM) span.classList.add("dim");
  if (flags & ITALIC) span.classList.add("italic");
  if (flags & UNDERLINE) span.classList.add("underline");
  if (flags & STRIKE) span.classList.add("strike");
}

function colour(span: HTMLElement, c: number, prefix: string, property: "color" | "backgroundColor"): void {
  if (c === DEFAULT_COLOUR) return;
  if (c < 16) span.classList.add(`${prefix}${c}`);
  else span.style[property] = c >= RGB_BASE ? rgbColour(c) : paletteColour(c);
}
