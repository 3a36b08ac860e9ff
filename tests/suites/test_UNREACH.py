"""UNREACH: a forwarded UDP packet hitting the rule never reaches the server;
the client gets an ICMP (v4 type 3) / ICMPv6 (type 1) destination unreachable
with the chosen code, quoting the packet; the rule is terminating (a later
rule for the same packet never counts). Both families, both backends."""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, clean_forward,  # noqa: F401
                                          add_rules, l3, rule_counters, sentinel)

pytestmark = pytest.mark.vm
# port -> (--reject-with, ICMP code, ICMPv6 code)
CASES = {40501: (None, 3, 4), 40502: ("port-unreach", 3, 4), 40503: ("host-unreach", 1, 3),
         40504: ("net-unreach", 0, 0), 40505: ("admin-prohib", 13, 1)}


@pytest.fixture(scope="module")
def no_icmp_ratelimit(host):
    """The kernel rate-limits ICMP errors per peer (a burst of 6, then 1/s): four
    back-to-back runs of five errors each would lose some. Lift it for this module."""
    keys = ["net.ipv4.icmp_ratelimit", "net.ipv6.icmp.ratelimit"]
    old = {k: host.sysctl(k) for k in keys}
    host.run_test(" && ".join(f"sysctl -qw {k}=0" for k in keys))
    yield
    host.run(" ; ".join(f"sysctl -qw {k}={v}" for k, v in old.items()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_rejected_with_icmp(host, wire, clean_forward, no_icmp_ratelimit, family, backend, tag):
    from scapy.all import ICMP, UDP, ICMPv6DestUnreach
    from nflab.tracing import has_tag, payload

    assert_kit_module(host, "xt_UNREACH")
    tool = f"{TOOLS[family]}-{backend} -w"
    add_rules(host, [f"{tool} -A FORWARD -p udp --dport {port} -j UNREACH"
                     + (f" --reject-with {kind}" if kind else "") for port, (kind, _, _) in CASES.items()]
              + [f"{tool} -A FORWARD -p udp --dport {port}" for port in CASES])   # never reached
    client, server = PEERS[family]
    pkts = {}
    for port in CASES:
        t = tag()
        pkts[t] = (port, l3(family)(src=client, dst=server) / UDP(sport=33000, dport=port) / payload(t, 48))
    since = wire.mark()
    stag, spkt = sentinel(family, tag())
    wire.send("client", [p for _, p in pkts.values()] + [spkt])
    errors = wire.sniff("client", lambda p: any(has_tag(p, t) for t in pkts), count=len(pkts),
                        timeout=5.0, since=since["client"])
    # the sentinel, sent last and rejected by no rule, reaching the server means
    # every rejected packet had its chance to leak before it
    assert wire.sniff("server", lambda p: has_tag(p, stag), timeout=5.0, since=since["server"]), \
        "the sentinel packet never reached the server: the forward path is broken"
    leaked = wire.sniff("server", lambda p: any(has_tag(p, t) for t in pkts), count=1,
                        timeout=0, since=since["server"])
    assert not leaked, "a rejected packet reached the server"
    codes = {}
    for p in errors:
        port = next(pt for t, (pt, _) in pkts.items() if has_tag(p, t))
        if family == "ipv4":
            assert p.haslayer(ICMP) and p[ICMP].type == 3, p.summary()
            assert p["IP"].src == "192.0.2.1"
            codes[port] = p[ICMP].code
        else:
            assert p.haslayer(ICMPv6DestUnreach), p.summary()
            codes[port] = p[ICMPv6DestUnreach].code
    want = {port: (c4 if family == "ipv4" else c6) for port, (_, c4, c6) in CASES.items()}
    assert codes == want
    counts = rule_counters(host, TOOLS[family], backend)
    assert all(counts.get(str(p)) == 1 for p in CASES), counts   # UNREACH rule once, the next rule 0
