import net from "node:net";
import { once } from "node:events";
import { describe, expect, it } from "@jest/globals";
import { createServingComponent, type ServerConfig, type ServingComponent, type ServingComponentOptions } from "../../lib/component.js";
import { silentLogger } from "../../lib/logger.js";
import { DEFAULT_GRACE_MS, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, DEFAULT_READ_MAX_BYTES } from "../../lib/server.js";

const config: ServerConfig = {
  host: "127.0.0.1",
  port: 0,
  tlsCertFile: "",
  tlsKeyFile: "",
  corsOrigins: [],
  readMaxBytes: DEFAULT_READ_MAX_BYTES,
  graceMs: DEFAULT_GRACE_MS,
  connectionIdleTimeoutMs: DEFAULT_IDLE_TIMEOUT_MS,
  maxConnectionsPerAddress: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
  logLevel: "silent",
};

/** Whether something accepts TCP connections on the port. */
async function listening(port: number): Promise<boolean> {
  const socket = net.connect(port, "127.0.0.1");
  try {
    await once(socket, "connect");
    return true;
  } catch {
    return false;
  } finally {
    socket.destroy();
  }
}

/**
 * A component on `config` whose open and close record themselves in `steps`;
 * `hooks` adds hooks or replaces those two.
 */
function recordingComponent(steps: string[], hooks: Partial<ServingComponentOptions>): ServingComponent {
  return createServingComponent({
    name: "test-server",
    config,
    logger: silentLogger(),
    open: async () => void steps.push("open"),
    close: async () => void steps.push("close"),
    ...hooks,
  });
}

describe("createServingComponent", () => {
  it("opens, listens, then runs its background work; stop aborts that work first, drains the server, then closes, once", async () => {
    const steps: string[] = [];
    let port = 0;
    const component = recordingComponent(steps, {
      prepare: () => void steps.push("prepare"),
      started: async () => void steps.push("started"),
      background: (signal) => [
        new Promise<void>((resolve) =>
          signal.addEventListener("abort", () => {
            steps.push("background ended");
            resolve();
          }),
        ),
      ],
      stopping: () => void steps.push("stopping"),
      drain: () => void steps.push("drain"),
      close: async () => {
        steps.push(`close (listening: ${await listening(port)})`);
      },
    });
    await component.start();
    port = component.address().port;
    expect(await listening(port)).toBe(true);
    await Promise.all([component.stop(), component.stop()]);
    await component.stop();
    expect(steps).toEqual(["open", "prepare", "started", "background ended", "stopping", "drain", "close (listening: false)"]);
  });

  it("stops the server and closes what it opened when start fails after binding", async () => {
    const steps: string[] = [];
    let port = 0;
    const component = recordingComponent(steps, {
      started: async () => {
        port = component.address().port;
        throw new Error("loops would not start");
      },
    });
    await expect(component.start()).rejects.toThrow("loops would not start");
    expect(steps).toEqual(["open", "close"]);
    expect(await listening(port)).toBe(false);
  });
});
