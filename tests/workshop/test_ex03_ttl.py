"""Exercise 3: a match with one option, ``-m ex03_ttl [!] --max-ttl N`` (IPv4).

Rules in FORWARD drop UDP to one port each: ``--max-ttl 10`` and
``! --max-ttl 10``. The router decrements the TTL before FORWARD, so packets
sent with TTL t are matched with t - 1; the suite sends TTLs that FORWARD
sees as 9, 10, 11 and 64 and checks which arrive.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (CLIENT4, SERVER4, assert_kit_module,
                                         send_tagged, sentinel)

pytestmark = pytest.mark.vm

MODULE, MATCH = "xt_ex03_ttl", "ex03_ttl"
LIMIT = 10
SEEN_TTLS = (9, 10, 11, 64)          # as FORWARD sees them


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


def _verdicts(wire, tag, port):
    """{ttl seen in FORWARD: arrived?} for one packet per TTL to *port*."""
    from scapy.all import IP, UDP
    from nflab.tracing import payload

    pkts, ttl_of = {}, {}
    for ttl in SEEN_TTLS:
        t = tag()
        pkts[t] = IP(src=CLIENT4, dst=SERVER4, ttl=ttl + 1) / UDP(sport=33000, dport=port) / payload(t, 48)
        ttl_of[t] = ttl
    arrived = send_tagged(wire, pkts, sentinel=sentinel("ipv4", tag()))
    return {ttl_of[t]: t in arrived for t in pkts}


def _rule(rules, port, negate):
    try:
        rules.add("ipv4", "filter", "FORWARD",
                  f"-p udp --dport {port} -m {MATCH} {'! ' if negate else ''}--max-ttl {LIMIT} -j DROP")
    except AssertionError as exc:
        raise AssertionError(f"iptables refused the rule{' (is ! allowed for --max-ttl?)' if negate else ''}: "
                             f"{exc}") from None


def test_max_ttl_drops_low_ttls(host, wire, forwarding, loaded, rules, tag):
    _rule(rules, 40301, negate=False)
    got = _verdicts(wire, tag, 40301)
    want = {ttl: ttl > LIMIT for ttl in SEEN_TTLS}
    assert got == want, f"--max-ttl {LIMIT}: arrived per TTL {got}, expected {want}"


def test_negated_max_ttl_drops_high_ttls(host, wire, forwarding, loaded, rules, tag):
    _rule(rules, 40302, negate=True)
    got = _verdicts(wire, tag, 40302)
    want = {ttl: ttl <= LIMIT for ttl in SEEN_TTLS}
    assert got == want, f"! --max-ttl {LIMIT}: arrived per TTL {got}, expected {want}"
