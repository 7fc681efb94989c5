import { describe, expect, it } from "@jest/globals";
import { deliveryId } from "../../coordinator/subscriptions/worker.js";

const DEST = "01a25117-0000-7000-8000-0000000000d1";
const OTHER = "01a25117-0000-7000-8000-0000000000d2";

describe("delivery ids", () => {
  it("are the same when a new leader matches an event again, and differ per event and destination", () => {
    const at = Date.UTC(2026, 11, 8, 3, 0, 0, 123);
    const id = deliveryId("41", DEST, at);
    expect(deliveryId("41", DEST, at)).toBe(id);
    expect(deliveryId("42", DEST, at)).not.toBe(id);
    expect(deliveryId("41", OTHER, at)).not.toBe(id);
    // "4" + "1/..." must not collide with "41" + "/...".
    expect(deliveryId("4", `1/${DEST}`, at)).not.toBe(id);
  });

  it("are UUIDv7 of the event's time, so the log sorts them by it", () => {
    const at = Date.UTC(2026, 11, 8, 3, 0, 0, 123);
    const id = deliveryId("41", DEST, at);
    expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(parseInt(id.replace(/-/g, "").slice(0, 12), 16)).toBe(at);
    expect(deliveryId("41", DEST, at + 1) > id).toBe(true);
  });
});
