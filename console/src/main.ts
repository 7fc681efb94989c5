/**
 * The web console: a single-page application served by the coordinator at
 * `/`. Client routes (history API) map to pages; each page gets an
 * AbortSignal that ends its streams when the user leaves it.
 */
import "@xterm/xterm/css/xterm.css";
import "./styles.css";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { Api, Session } from "./api.js";
import { h } from "./dom.js";
import { healthChecksPage } from "./pages/health-checks.js";
import { hostPage } from "./pages/host.js";
import { hostsPage } from "./pages/hosts.js";
import { imagePage, imagesPage } from "./pages/images.js";
import { jobPage } from "./pages/job.js";
import { jobsPage } from "./pages/jobs.js";
import { leasePage } from "./pages/lease.js";
import { calendarPage, leasesPage } from "./pages/leases.js";
import { loginPage } from "./pages/login.js";
import { submitPage } from "./pages/submit.js";
import { subscriptionPage, subscriptionsPage } from "./pages/subscriptions.js";

export interface PageContext {
  app: App;
  api: Api;
  /** The page's area; empty when the page starts. */
  main: HTMLElement;
  /** Aborted when the user leaves the page. */
  signal: AbortSignal;
  /** The route's captured parts, decoded. */
  params: string[];
  query: URLSearchParams;
}

type Page = (ctx: PageContext) => void | Promise<void>;

const routes: [RegExp, Page, { public?: boolean; wide?: boolean }?][] = [
  [/^\/login$/, loginPage, { public: true }],
  [/^\/(?:jobs)?$/, jobsPage],
  [/^\/jobs\/new$/, submitPage],
  [/^\/jobs\/([^/]+)$/, jobPage],
  // xterm.js is most of the bundle's weight: loaded only for a console.
  [/^\/jobs\/([^/]+)\/console$/, async (ctx) => (await import("./pages/terminal.js")).terminalPage(ctx), { wide: true }],
  [/^\/hosts$/, hostsPage],
  [/^\/hosts\/([^/]+)$/, hostPage],
  [/^\/leases$/, leasesPage],
  [/^\/leases\/calendar$/, calendarPage],
  [/^\/leases\/([^/]+)$/, leasePage],
  [/^\/subscriptions$/, subscriptionsPage],
  [/^\/subscriptions\/([^/]+)$/, subscriptionPage],
  [/^\/health-checks$/, healthChecksPage],
  [/^\/images$/, imagesPage],
  [/^\/images\/(.+)$/, imagePage],
];

const NAV: [string, string][] = [
  ["/jobs", "Jobs"],
  ["/jobs/new", "Submit"],
  ["/hosts", "Hosts"],
  ["/leases", "Leases"],
  ["/subscriptions", "Subscriptions"],
  ["/health-checks", "Health checks"],
  ["/images", "Images"],
];

export class App {
  readonly api: Api;
  readonly #root: HTMLElement;
  #page: AbortController | undefined;
  /** Shown once on the next page (the login page's "session expired"). */
  flash = "";

  constructor(root: HTMLElement) {
    this.#root = root;
    const session = new Session(window.localStorage);
    this.api = new Api(session, window.location.origin);
    session.onExpired = () => {
      session.clear();
      this.flash = "Your session has expired or was revoked. Log in again.";
      this.navigate(`/login?next=${encodeURIComponent(window.location.pathname)}`, { replace: true });
    };
    window.addEventListener("popstate", () => void this.#render());
    document.addEventListener("click", (event) => this.#onClick(event));
  }

  start(): void {
    void this.#render();
  }

  navigate(path: string, options: { replace?: boolean } = {}): void {
    if (options.replace) history.replaceState(null, "", path);
    else history.pushState(null, "", path);
    void this.#render();
  }

  async logout(): Promise<void> {
    const session = this.api.session;
    const tokenId = session.current?.tokenId;
    if (tokenId) {
      // Revoke the token on the server too; leaving matters more than the answer.
      await this.api
        .client(AuthService)
        .revokeToken({ tokenId }, { timeoutMs: 5000 })
        .catch(() => undefined);
    }
    session.clear();
    this.flash = "You are logged out.";
    this.navigate("/login");
  }

  #onClick(event: MouseEvent): void {
    if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const a = (event.target as Element | null)?.closest?.("a");
    if (!a || a.target || a.hasAttribute("download") || a.getAttribute("href")?.startsWith("#")) return;
    const url = new URL(a.href, window.location.href);
    if (url.origin !== window.location.origin) return;
    event.preventDefault();
    this.navigate(url.pathname + url.search);
  }

  async #render(): Promise<void> {
    this.#page?.abort();
    const page = new AbortController();
    this.#page = page;
    const path = window.location.pathname;
    const match = routes.map(([re, fn, opts]) => ({ m: re.exec(path), fn, opts: opts ?? {} })).find((r) => r.m !== null);
    if (!match) {
      this.#shell(false).append(h("h1", { tabindex: "-1" }, "Not found"), h("p", {}, "There is no such page. ", h("a", { href: "/jobs" }, "Go to the jobs.")));
      return;
    }
    if (!match.opts.public && this.api.session.current === undefined) {
      this.navigate(`/login?next=${encodeURIComponent(path + window.location.search)}`, { replace: true });
      return;
    }
    const main = this.#shell(match.opts.wide ?? false, match.opts.public);
    const params = match.m!.slice(1).map((p) => decodeURIComponent(p));
    try {
      await match.fn({ app: this, api: this.api, main, signal: page.signal, params, query: new URLSearchParams(window.location.search) });
    } catch (err) {
      if (page.signal.aborted) return;
      throw err;
    }
    // Move focus to the new page's heading, so that keyboard and screen-reader users land on it.
    if (!page.signal.aborted) main.querySelector<HTMLElement>("h1")?.focus({ preventScroll: true });
  }

  /** Draws the header and navigation; returns the emptied main area. */
  #shell(wide: boolean, bare = false): HTMLElement {
    const session = this.api.session.current;
    const path = window.location.pathname;
    const main = h("main", { id: "main", class: wide ? "wide" : "" });
    const nav = h(
      "nav",
      { "aria-label": "Main" },
      h(
        "ul",
        {},
        ...NAV.map(([href, label]) => {
          const current =
            href === path || (href === "/jobs" && (path === "/" || /^\/jobs\/(?!new$)/.test(path))) || (href === "/hosts" && path.startsWith("/hosts/")) || (href === "/leases" && path.startsWith("/leases/")) || (href === "/subscriptions" && path.startsWith("/subscriptions/"));
          return h("li", {}, h("a", { href, "aria-current": current ? "page" : undefined }, label));
        }),
      ),
    );
    const header = h(
      "header",
      { class: "top" },
      h("a", { class: "brand", href: "/jobs" }, "Treadmill"),
      bare || !session ? null : nav,
      bare || !session
        ? null
        : h(
            "div",
            { class: "who" },
            h("span", { class: "user", title: session.userId }, session.userName, session.admin ? " (admin)" : ""),
            h("button", { type: "button", class: "link", onclick: () => void this.logout() }, "Log out"),
          ),
    );
    this.#root.replaceChildren(h("a", { class: "skip", href: "#main" }, "Skip to content"), header, main);
    return main;
  }
}

const root = document.getElementById("app");
if (root) new App(root).start();
