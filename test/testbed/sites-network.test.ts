/**
 * The plan and policy of `npm run site`'s network (testbed/sites/network.ts),
 * as pure functions: names that two runs cannot share, addresses in one /24
 * that no host prefix overlaps, and a forward chain that opens only what
 * docs/sites-netns.md says. The interop test (test/interop/sites.test.ts)
 * shows the same policy on real namespaces.
 */
import { describe, expect, it } from "@jest/globals";
import { MAX_SITES, overlaps, planNetwork, routerRules } from "../../testbed/sites/network.js";

describe("the network plan of npm run site", () => {
  it("names every namespace and the user's veth after the run id, within the 15 characters of an interface name", () => {
    const plan = planNetwork("0a1b2c", "198.18.7", ["site-1", "site-2"]);
    expect([plan.router, plan.centre.ns, ...plan.sites.map((s) => s.ns)]).toEqual([
      "tm-0a1b2c-router",
      "tm-0a1b2c-centre",
      "tm-0a1b2c-site-1",
      "tm-0a1b2c-site-2",
    ]);
    expect(plan.user.device).toBe("tm0a1b2cu");
    // The longest veth name made in the root namespace: the last site's router end.
    expect(`tm0a1b2cs${MAX_SITES}r`.length).toBeLessThanOrEqual(15);
  });

  it("gives the user, the centre and each site a /30 of the run's /24, none shared", () => {
    const plan = planNetwork("0a1b2c", "198.18.7", Array.from({ length: MAX_SITES }, (_, i) => `site-${i + 1}`));
    expect(plan.subnet).toBe("198.18.7.0/24");
    expect([plan.user.address, plan.user.gateway, plan.centre.address]).toEqual(["198.18.7.1", "198.18.7.2", "198.18.7.6"]);
    expect(plan.sites[0].address).toBe("198.18.7.10");
    const addresses = [plan.user.address, plan.centre.address, ...plan.sites.map((s) => s.address)];
    expect(new Set(addresses).size).toBe(addresses.length);
    expect(Number(plan.sites[MAX_SITES - 1].address.split(".")[3])).toBeLessThan(255);
    expect(() => planNetwork("0a1b2c", "198.18.7", Array.from({ length: MAX_SITES + 1 }, (_, i) => `s${i}`))).toThrow(/at most 60 sites/);
    expect(() => planNetwork("not-hex", "198.18.7", [])).toThrow(/6 hex digits/);
  });

  it("tells overlapping prefixes from disjoint ones", () => {
    expect(overlaps("198.18.7.0/24", "198.18.7.10/32")).toBe(true);
    expect(overlaps("198.18.0.0/15", "198.19.200.0/24")).toBe(true);
    expect(overlaps("0.0.0.0/0", "198.18.7.0/24")).toBe(true);
    expect(overlaps("198.18.7.0/24", "198.18.8.0/24")).toBe(false);
    expect(overlaps("192.0.2.0/24", "198.18.7.0/24")).toBe(false);
  });

  it("forwards the user to the centre and to each site's public ports only, each site to the centre, and drops the rest", () => {
    const plan = planNetwork("0a1b2c", "198.18.7", ["site-1", "site-2"]);
    const rules = routerRules(plan, { ports: [7704, 7703], range: [7720, 7739] });
    expect(rules).toContain("policy drop;");
    expect(rules).toContain("ct state established,related accept");
    expect(rules).toContain('iifname "u" oifname "c" accept');
    expect(rules).toContain('iifname "u" oifname "s1" ip daddr 198.18.7.10 tcp dport { 7704, 7703, 7720-7739 } accept');
    expect(rules).toContain('iifname "u" oifname "s2" ip daddr 198.18.7.14 tcp dport { 7704, 7703, 7720-7739 } accept');
    expect(rules).toContain('iifname "s1" oifname "c" accept');
    expect(rules).toContain('iifname "s2" oifname "c" accept');
    // Nothing is forwarded from the centre, and nothing into a site but from the user.
    expect(rules).not.toMatch(/iifname "c"/);
    expect(rules.match(/oifname "s\d+"/g)).toHaveLength(2);
  });
});
