"""Exercise 4: the match of exercise 3 for IPv6 too, ``-m ex04_hl [!] --max-ttl N``.

The same rules and packets as exercise 3, once with iptables (TTL) and once
with ip6tables (hop limit): both families must give the same verdicts.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import PEERS, assert_kit_module, l3, send_tagged, sentinel

pytestmark = pytest.mark.vm

MODULE, MATCH = "xt_ex04_hl", "ex04_hl"
LIMIT = 10
SEEN = (9, 10, 11, 64)               # TTL / hop limit as FORWARD sees them


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


def _verdicts(wire, tag, family, port):
    from scapy.all import UDP
    from nflab.tracing import payload

    src, dst = PEERS[family]
    pkts, limit_of = {}, {}
    for value in SEEN:
        t = tag()
        hdr = l3(family)(src=src, dst=dst)
        if family == "ipv4":
            hdr.ttl = value + 1
        else:
            hdr.hlim = value + 1
        pkts[t] = hdr / UDP(sport=33000, dport=port) / payload(t, 48)
        limit_of[t] = value
    arrived = send_tagged(wire, pkts, sentinel=sentinel(family, tag()))
    return {limit_of[t]: t in arrived for t in pkts}


@pytest.mark.parametrize("negate", [False, True], ids=["max-ttl", "not-max-ttl"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_max_ttl(host, wire, forwarding, loaded, rules, tag, family, negate):
    port = 40401 + negate
    spec = f"-p udp --dport {port} -m {MATCH} {'! ' if negate else ''}--max-ttl {LIMIT} -j DROP"
    try:
        rules.add(family, "filter", "FORWARD", spec)
    except AssertionError as exc:
        raise AssertionError(f"{family}: the rule was refused; is the match registered for "
                             f"{family}? {exc}") from None
    got = _verdicts(wire, tag, family, port)
    want = {v: (v <= LIMIT) if negate else (v > LIMIT) for v in SEEN}
    assert got == want, f"{family} {'! ' if negate else ''}--max-ttl {LIMIT}: arrived {got}, expected {want}"
