/**
 * The few DOM helpers the pages share. Text always goes in as text nodes
 * (never innerHTML), so nothing a server or a job prints can become markup.
 */

import { errorText } from "./api.js";

export type Child = Node | string | number | null | undefined | false;
export type Attributes = Record<string, string | boolean | undefined | ((event: Event) => void)>;

/** Creates an element: attributes (`on<event>` for listeners, booleans for presence) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attributes = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (typeof value === "function") el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

/** Appends children, skipping empty ones. */
export function append(el: Element, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.append(typeof child === "number" ? String(child) : child);
  }
}

/** A link handled by the client-side router. */
export function link(href: string, ...children: Child[]): HTMLAnchorElement {
  return h("a", { href }, ...children);
}

/** A table with a header row; each row's cells get `data-label` for the narrow (phone) layout. */
export function table(caption: string, headers: string[], rows: Child[][], attrs: Attributes = {}): HTMLElement {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs,
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, ...headers.map((label) => h("th", { scope: "col" }, label)))),
      h("tbody", {}, ...rows.map((cells) => tableRow(headers, cells))),
    ),
  );
}

export function tableRow(headers: string[], cells: Child[], attrs: Attributes = {}): HTMLTableRowElement {
  return h("tr", attrs, ...cells.map((cell, i) => h("td", { "data-label": headers[i] }, cell)));
}

/** A definition list of label/value pairs (job and image details). */
export function facts(pairs: [string, Child][]): HTMLElement {
  const dl = h("dl", { class: "facts" });
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === false || value === "") continue;
    dl.append(h("dt", {}, label), h("dd", {}, value));
  }
  return dl;
}

/** A status message area that screen readers announce. */
export function notice(kind: "error" | "info", text: string): HTMLElement {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/**
 * A "load more" button over a paged list call: `page(token)` loads one page
 * and returns the next page's token ("" on the last). Returns the loader of
 * the next page.
 */
export function pager(more: HTMLButtonElement, status: HTMLElement, signal: AbortSignal, page: (token: string) => Promise<string>): () => Promise<void> {
  let token = "";
  const load = async () => {
    more.disabled = true;
    try {
      token = await page(token);
      more.hidden = token === "";
    } catch (err) {
      if (!signal.aborted) status.replaceChildren(notice("error", errorText(err)));
    } finally {
      more.disabled = false;
    }
  };
  more.addEventListener("click", () => void load());
  return load;
}
