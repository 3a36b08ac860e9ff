"""TTLSET: the IPv4 TTL / IPv6 hop limit of forwarded packets is set,
decremented or incremented in mangle FORWARD (after the router's own
decrement), the IPv4 header checksum stays valid, and the rule continues
(a later counting rule sees the packet). Both families, both backends."""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, flush_chains,
                                          add_rules, l3, rule_counters)

pytestmark = pytest.mark.vm
SENT_TTL = 64
# port -> (target options, TTL expected on the server wire; the router took 1 already)
CASES = {40401: ("--ttl-set 42", 42), 40402: ("--ttl-dec 5", 58), 40403: ("--ttl-inc 10", 73),
         40404: ("--ttl-dec 200", 0), 40405: ("--ttl-inc 250", 255)}


@pytest.fixture
def mangle(host, routed):
    assert_kit_module(host, "xt_TTLSET")
    chains = (("mangle", "FORWARD"),)
    flush_chains(host, chains)
    yield
    flush_chains(host, chains)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ttl_rewritten_and_continues(host, wire, mangle, family, backend, tag):
    from scapy.all import IP, UDP
    from nflab.tracing import has_tag, payload

    tool = f"{TOOLS[family]}-{backend} -w -t mangle"
    # per port: TTLSET, then a rule that only counts (it sees the packet: XT_CONTINUE)
    add_rules(host, [cmd for port, (opts, _) in CASES.items()
                     for cmd in (f"{tool} -A FORWARD -p udp --dport {port} -j TTLSET {opts}",
                                 f"{tool} -A FORWARD -p udp --dport {port}")])
    client, server = PEERS[family]
    hop = {"ttl": SENT_TTL} if family == "ipv4" else {"hlim": SENT_TTL}
    pkts = {}
    for port in CASES:
        t = tag()
        pkts[t] = (port, l3(family)(src=client, dst=server, **hop) / UDP(sport=33000, dport=port) / payload(t, 48))
    since = wire.mark("server")
    wire.send("client", [p for _, p in pkts.values()])
    got = wire.sniff("server", lambda p: any(has_tag(p, t) for t in pkts), count=len(pkts),
                     timeout=5.0, since=since)
    seen = {}
    for p in got:
        for t, (port, _) in pkts.items():
            if has_tag(p, t):
                seen[port] = p
    assert set(seen) == set(CASES), f"missing: {set(CASES) - set(seen)}"
    wrong = []
    for port, p in seen.items():
        if family == "ipv4":
            ttl = p[IP].ttl
            raw = bytes(p[IP])
            fixed = IP(raw)
            del fixed.chksum
            if IP(bytes(fixed)).chksum != p[IP].chksum:
                wrong.append(f"{CASES[port][0]}: bad IPv4 header checksum {p[IP].chksum:#06x}")
        else:
            ttl = p["IPv6"].hlim
        if ttl != CASES[port][1]:
            wrong.append(f"{CASES[port][0]}: arrived with {ttl}, expected {CASES[port][1]}")
    assert not wrong, "\n".join(wrong)
    counts = rule_counters(host, TOOLS[family], backend, table="mangle")
    # each port has two rules (TTLSET and the counting one): both saw the packet once
    assert all(counts.get(str(p)) == 2 for p in CASES), counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_action_per_rule_is_checked_by_the_plugin(host, mangle, backend, xtables):
    """No action, or two, is the plugin's error with what to do (as stock
    libipt_TTL's), not the kernel's bare EINVAL."""
    if xtables.skip_reason(backend):
        pytest.skip(xtables.skip_reason(backend))
    for opts, says in (("", "give one action"), ("--ttl-set 5 --ttl-dec 1", "one action per rule")):
        res = host.run(f"iptables-{backend} -w -t mangle -A FORWARD -j TTLSET {opts}")
        assert res.rc != 0 and f"TTLSET: {says}" in res.stderr, res.stderr
