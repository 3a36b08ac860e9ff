"""Exercise 5: a target, ``-j ex05_mark --set-mark V``, that continues.

In mangle PREROUTING: rule 1 ``-j ex05_mark --set-mark 0x2a``, rule 2 only
counts packets that carry mark 0x2a (``-m mark``); in filter FORWARD a rule
drops packets with that mark. Green when rule 2 counted every packet (the
target set the mark and returned XT_CONTINUE) and none reached the server.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (PEERS, TOOLS, assert_kit_module,
                                         l3, rule_counters, send_tagged, sentinel)

pytestmark = pytest.mark.vm

MODULE, TARGET = "xt_ex05_mark", "ex05_mark"
MARK = 0x2a
N = 6


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_marks_and_continues(host, wire, forwarding, loaded, rules, tag, family):
    from scapy.all import UDP
    from nflab.tracing import payload

    port = 40501 if family == "ipv4" else 40502
    rules.add(family, "mangle", "PREROUTING", f"-p udp --dport {port} -j {TARGET} --set-mark {MARK:#x}")
    rules.add(family, "mangle", "PREROUTING", f"-p udp --dport {port} -m mark --mark {MARK:#x}")
    rules.add(family, "filter", "FORWARD", f"-p udp --dport {port} -m mark --mark {MARK:#x} -j DROP")
    src, dst = PEERS[family]
    pkts = {}
    for _ in range(N):
        t = tag()
        pkts[t] = l3(family)(src=src, dst=dst) / UDP(sport=33000, dport=port) / payload(t, 48)
    arrived = send_tagged(wire, pkts, sentinel=sentinel(family, tag()))
    after = rule_counters(host, TOOLS[family], rules.backend, table="mangle", chain="PREROUTING",
                          key=r"-m mark --mark (\S+)")
    counted = sum(after.values())
    assert counted == N, (f"{family}: the rule after the target counted {counted} of {N} marked "
                          "packets: did the target set the mark and return XT_CONTINUE?")
    assert not arrived, f"{family}: {len(arrived)} of {N} packets were forwarded without the mark"
