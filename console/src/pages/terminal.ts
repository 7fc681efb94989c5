import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { errorText } from "../api.js";
import { h, link } from "../dom.js";
import type { PageContext } from "../main.js";

/** The subprotocol the proxy selects; the token rides beside it (docs/proxy.md). */
const WS_PROTOCOL = "treadmill.tunnel.v1";

/** Close codes of the proxy's WebSocket entrance, as words. */
const CLOSE_TEXT: Record<number, string> = {
  1000: "the console closed",
  1006: "the connection to the proxy was lost",
  4003: "the job's supervisor went away",
  4005: "the job ended (its console was withdrawn)",
  4006: "closed after being idle",
  4008: "the session expired",
  4009: "the proxy is shutting down",
  4105: "the console is not available (yet)",
  4108: "too many open consoles",
  4114: "the proxy cannot reach the job",
};

/**
 * An interactive console of a running job: OpenJobSession gives the proxy's
 * WebSocket URL and a tunnel:dial token; xterm.js draws the bytes.
 */
export async function terminalPage({ api, main, signal, params }: PageContext): Promise<void> {
  const jobId = params[0];
  document.title = `Console ${jobId.slice(-8)} · Treadmill`;
  allowTerminalStyles();
  const status = h("span", { class: "live", id: "console-status", role: "status" }, "connecting…");
  const reconnect = h("button", { type: "button", hidden: true }, "Reconnect");
  const screen = h("div", { class: "terminal", id: "terminal" });
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", { tabindex: "-1" }, "Console of job ", h("code", {}, jobId.slice(-8))),
      status,
      reconnect,
      link(`/jobs/${encodeURIComponent(jobId)}`, "Back to the job"),
    ),
    screen,
  );

  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    fontSize: 14,
    scrollback: 5000,
    screenReaderMode: false,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  term.textarea?.setAttribute("aria-label", "Job console input");
  fit.fit();
  const encoder = new TextEncoder();
  let ws: WebSocket | undefined;
  let resizable = false;

  const send = (data: Uint8Array) => {
    if (ws?.readyState === WebSocket.OPEN) ws.send(data);
  };
  term.onData((d) => send(encoder.encode(d)));
  term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
  term.onResize(({ cols, rows }) => {
    if (resizable && ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  const onWindowResize = () => fit.fit();
  window.addEventListener("resize", onWindowResize);

  const connect = async () => {
    reconnect.hidden = true;
    status.textContent = "connecting…";
    try {
      const session = await api.client(JobService).openJobSession({ jobId, portName: "console" }, { signal, timeoutMs: 15_000 });
      const url = new URL(session.websocketUrl);
      url.searchParams.set("cols", String(term.cols));
      url.searchParams.set("rows", String(term.rows));
      const socket = new WebSocket(url, [WS_PROTOCOL, `bearer.${session.dialToken?.token ?? ""}`]);
      socket.binaryType = "arraybuffer";
      ws = socket;
      socket.onmessage = (event: MessageEvent<ArrayBuffer | string>) => {
        if (typeof event.data !== "string") {
          term.write(new Uint8Array(event.data));
          return;
        }
        const control = JSON.parse(event.data) as { type?: string; exposure?: { resizable?: boolean } };
        if (control.type === "opened") {
          resizable = control.exposure?.resizable === true;
          status.textContent = "connected";
          term.focus();
        } else if (control.type === "half-close") {
          status.textContent = "the job closed its side";
        }
      };
      socket.onclose = (event) => {
        if (ws !== socket || signal.aborted) return;
        status.textContent = CLOSE_TEXT[event.code] ?? (event.reason || `closed (${event.code})`);
        reconnect.hidden = false;
      };
    } catch (err) {
      if (signal.aborted) return;
      status.textContent = errorText(err);
      reconnect.hidden = false;
    }
  };
  reconnect.addEventListener("click", () => void connect());

  signal.addEventListener(
    "abort",
    () => {
      window.removeEventListener("resize", onWindowResize);
      ws?.close(1000, "left the page");
      term.dispose();
    },
    { once: true },
  );
  await connect();
}

let stylesAllowed = false;

/**
 * xterm.js adds `<style>` elements for its theme and cell sizes. The page's
 * Content-Security-Policy admits only styles that carry its nonce (given in
 * `<meta name="csp-nonce">`), so style elements created from here on get it.
 */
function allowTerminalStyles(): void {
  if (stylesAllowed) return;
  stylesAllowed = true;
  const nonce = document.querySelector<HTMLMetaElement>('meta[name="csp-nonce"]')?.content ?? "";
  if (nonce === "") return;
  const createElement = document.createElement.bind(document) as (tag: string, options?: ElementCreationOptions) => HTMLElement;
  document.createElement = ((tag: string, options?: ElementCreationOptions) => {
    const el = createElement(tag, options);
    if (tag.toLowerCase() === "style") el.setAttribute("nonce", nonce);
    return el;
  }) as typeof document.createElement;
}
