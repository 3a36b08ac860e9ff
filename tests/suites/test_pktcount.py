"""pktcount: per-hook packet/byte counters read from /proc/net/nflab_pktcount.

Forwarded tagged UDP packets must be counted exactly once at PRE_ROUTING,
FORWARD and POST_ROUTING of their family (FORWARD exactly), with the bytes of
their IP packets; "clear" zeroes everything. What else the router forwards in
that window (a late TCP retransmission of an earlier suite's in-guest
connections) is counted by an nft counter beside it and taken off.
"""

from __future__ import annotations

import re

import pytest

from tests.suites.catalog_helpers import PEERS, assert_kit_module, l3, proc_lines, send_tagged

pytestmark = pytest.mark.vm
MOD = "nflab_pktcount"


def _read(host):
    points = {}
    for w in proc_lines(host, MOD, "point"):          # point family hook prio registered packets
        points[(w[1], w[2])] = {"registered": int(w[4]), "packets": int(w[5])}
    for w in proc_lines(host, MOD, "bytes"):          # bytes index family hook bytes
        points[(w[2], w[3])]["bytes"] = int(w[4])
    return points


def test_loaded_and_registered(host):
    assert_kit_module(host, MOD)
    points = _read(host)
    assert len(points) == 10
    assert all(p["registered"] == 1 for p in points.values()), points


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_forwarded_packets_are_counted_per_hook(host, wire, routed, family, tag):
    host.run_test(STRAYS_ON)
    try:
        _count_forwarded(host, wire, family, tag)
    finally:
        host.run("nft delete table inet nflabstray")


STRAYS_ON = ("nft add table inet nflabstray && nft add chain inet nflabstray strays "
             "'{ type filter hook forward priority -300; }' && "
             "nft add rule inet nflabstray strays udp dport 40200 return && "
             "nft add rule inet nflabstray strays meta nfproto ipv4 counter && "
             "nft add rule inet nflabstray strays meta nfproto ipv6 counter")


def _strays(host) -> dict:
    """{family: (packets, bytes)} forwarded that are not the test's datagrams."""
    out = host.check_output("nft list chain inet nflabstray strays")
    got = {}
    for fam in ("ipv4", "ipv6"):
        m = re.search(rf"nfproto {fam} counter packets (\d+) bytes (\d+)", out)
        got[fam] = (int(m.group(1)), int(m.group(2)))
    return got


def _count_forwarded(host, wire, family, tag):
    from scapy.all import UDP
    from nflab.tracing import payload

    client, server = PEERS[family]
    host.run_test(f"echo clear > /proc/net/{MOD} && nft reset counters table inet nflabstray >/dev/null")
    zero = _read(host)
    assert zero[(family, "FORWARD")] == {"registered": 1, "packets": 0, "bytes": 0}
    pkts = {}
    for i in range(7):
        t = tag()
        pkts[t] = l3(family)(src=client, dst=server) / UDP(sport=33000, dport=40200) / payload(t, 40 + 10 * i)
    arrived = send_tagged(wire, pkts)
    assert arrived == set(pkts)
    nbytes = sum(len(p) for p in pkts.values())
    after = _read(host)
    strays = _strays(host)
    fwd = after[(family, "FORWARD")]
    packets, nbytes_stray = strays[family]
    assert (fwd["packets"] - packets, fwd["bytes"] - nbytes_stray) == (len(pkts), nbytes), (fwd, strays)
    for hook in ("PRE_ROUTING", "POST_ROUTING"):
        assert after[(family, hook)]["packets"] >= len(pkts)
        assert after[(family, hook)]["bytes"] >= nbytes
    other = "ipv6" if family == "ipv4" else "ipv4"
    assert after[(other, "FORWARD")]["packets"] == strays[other][0], (after, strays)


def test_clear(host):
    host.run_test(f"echo clear > /proc/net/{MOD}")
    fwd = _read(host)
    assert fwd[("ipv4", "FORWARD")]["packets"] == 0 and fwd[("ipv6", "FORWARD")]["bytes"] == 0
    assert host.run(f"echo nonsense > /proc/net/{MOD}").rc != 0
