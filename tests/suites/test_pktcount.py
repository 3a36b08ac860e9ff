"""pktcount: per-hook packet/byte counters read from /proc/net/nflab_pktcount.

Forwarded tagged UDP packets must be counted exactly once at PRE_ROUTING,
FORWARD and POST_ROUTING of their family (FORWARD exactly: nothing else is
forwarded), with the bytes of their IP packets; "clear" zeroes everything.
"""

from __future__ import annotations

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
    from scapy.all import UDP
    from nflab.tracing import payload

    client, server = PEERS[family]
    host.run_test(f"echo clear > /proc/net/{MOD}")
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
    fwd = after[(family, "FORWARD")]
    assert fwd["packets"] == len(pkts) and fwd["bytes"] == nbytes, fwd
    for hook in ("PRE_ROUTING", "POST_ROUTING"):
        assert after[(family, hook)]["packets"] >= len(pkts)
        assert after[(family, hook)]["bytes"] >= nbytes
    other = "ipv6" if family == "ipv4" else "ipv4"
    assert after[(other, "FORWARD")]["packets"] == 0


def test_clear(host):
    host.run_test(f"echo clear > /proc/net/{MOD}")
    fwd = _read(host)
    assert fwd[("ipv4", "FORWARD")]["packets"] == 0 and fwd[("ipv6", "FORWARD")]["bytes"] == 0
    assert host.run(f"echo nonsense > /proc/net/{MOD}").rc != 0
