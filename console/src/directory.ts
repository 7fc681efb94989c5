/**
 * Names for ids: users (admins may list them; others know only themselves)
 * and hosts, fetched once per page visit.
 */
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import type { Api } from "./api.js";

/** User id -> name. */
export async function userNames(api: Api, signal: AbortSignal): Promise<Map<string, string>> {
  const names = new Map<string, string>();
  const me = api.session.current;
  if (me) names.set(me.userId, me.userName);
  if (!me?.admin) return names;
  try {
    const res = await api.client(UserService).listUsers({ pageSize: 500 }, { signal, timeoutMs: 15_000 });
    for (const user of res.users) names.set(user.id, user.name);
  } catch {
    // Names are a nicety: ids are shown instead.
  }
  return names;
}

/** Host id -> name. */
export async function hostNames(api: Api, signal: AbortSignal): Promise<Map<string, string>> {
  const names = new Map<string, string>();
  try {
    const res = await api.client(HostService).listHosts({ pageSize: 1000 }, { signal, timeoutMs: 15_000 });
    for (const host of res.hosts) names.set(host.id, host.name);
  } catch {
    // Ids are shown instead.
  }
  return names;
}
