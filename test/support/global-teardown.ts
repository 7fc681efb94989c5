// Stops the server global-setup.ts started; no postgres process is left.
export default async function globalTeardown(): Promise<void> {
  const holder = globalThis as { treadmillTestPg?: { stop(): Promise<void> } };
  await holder.treadmillTestPg?.stop();
  holder.treadmillTestPg = undefined;
}
