/**
 * The addresses webhooks may not reach (`subscription-webhook-deny`): the
 * list's parsing, apart from the HTTP client (webhook.ts) so that the
 * coordinator's configuration checks it without loading the client.
 */
import { BlockList, isIP } from "node:net";

/** The addresses webhooks may not reach by default: link-local (cloud metadata services) and unspecified. */
export const DEFAULT_WEBHOOK_DENY = ["169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128"];

/** The addresses in `cidrs` ("10.0.0.0/8", "fd00::/8", a bare address); throws on one that is not. */
export function webhookDenyList(cidrs: readonly string[]): BlockList {
  const list = new BlockList();
  for (const cidr of cidrs) {
    const [address, bits] = cidr.trim().split("/");
    const family = isIP(address);
    if (family === 0) throw new Error(`${JSON.stringify(cidr)} is not an address or CIDR range`);
    const type = family === 6 ? "ipv6" : "ipv4";
    const prefix = bits === undefined ? (family === 6 ? 128 : 32) : Number(bits);
    if (!Number.isInteger(prefix) || prefix < 0 || prefix > (family === 6 ? 128 : 32)) throw new Error(`${JSON.stringify(cidr)} has no valid prefix length`);
    list.addSubnet(address, prefix, type);
  }
  return list;
}

/** Whether `list` holds `address`. */
export const denied = (list: BlockList, address: string) => list.check(address, isIP(address) === 6 ? "ipv6" : "ipv4");

