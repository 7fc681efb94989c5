/**
 * Headless Chromium for the console's interop tests: the browser (the
 * system's, or CHROMIUM_PATH), and a page logged in as a user by the session
 * the login page would have saved, whose console errors and uncaught
 * exceptions land in `errors` (a test fails on any).
 */
import { randomUUID } from "node:crypto";
import { chromium, type Browser, type Page } from "playwright-core";

export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
}

export async function loggedInPage(browser: Browser, who: { id: string; name: string; token: string }, admin: boolean, errors: string[]): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const session = { token: who.token, tokenId: randomUUID(), userId: who.id, userName: who.name, admin };
  await page.addInitScript((s) => window.localStorage.setItem("treadmill.console.session", s), JSON.stringify(session));
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(`console: ${message.text()} at ${message.location().url}`);
  });
  page.on("pageerror", (err) => errors.push(`page: ${String(err)}`));
  return page;
}
