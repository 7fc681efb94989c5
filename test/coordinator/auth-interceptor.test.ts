import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { newSecret } from "../../coordinator/auth.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";

/** The code a call ends with ("OK" when it succeeds). */

describe("the coordinator's authentication of callers", () => {
  let c: TestCoordinator;
  beforeAll(async () => {
    c = await startTestCoordinator();
  });
  afterAll(async () => {
    await c?.stop();
  });

  const listJobs = (token?: string) => c.client(JobService, token).listJobs({});

  it("lets a call with a valid user token or host credential through to the handler", async () => {
    const user = await c.createUser();
    const host = await c.createHost();
    // The handler is reached: what it answers is its own business.
    expect(await codeOf(listJobs(user.token))).not.toBe("Unauthenticated");
    expect(await codeOf(listJobs(host.credential))).not.toBe("Unauthenticated");
  });

  it("refuses an unknown, malformed, revoked or expired token, and a disabled user's", async () => {
    expect(await codeOf(listJobs(newSecret("user")))).toBe("Unauthenticated");
    expect(await codeOf(listJobs(newSecret("host")))).toBe("Unauthenticated");
    expect(await codeOf(listJobs("not-a-treadmill-token"))).toBe("Unauthenticated");

    const revoked = await c.createUser();
    await c.sql`update api_tokens set revoked_at = now() where user_id = ${revoked.id}`;
    expect(await codeOf(listJobs(revoked.token))).toBe("Unauthenticated");

    const expired = await c.createUser();
    await c.sql`update api_tokens set expires_at = now() - interval '1 second' where user_id = ${expired.id}`;
    expect(await codeOf(listJobs(expired.token))).toBe("Unauthenticated");

    const disabled = await c.createUser();
    await c.sql`update users set disabled = true where id = ${disabled.id}`;
    expect(await codeOf(listJobs(disabled.token))).toBe("Unauthenticated");
  });

  it("records when a token was last used", async () => {
    const user = await c.createUser();
    await listJobs(user.token).catch(() => undefined);
    const [row] = await c.sql`select last_used_at from api_tokens where user_id = ${user.id}`;
    expect(row.last_used_at).toBeInstanceOf(Date);
  });
});
