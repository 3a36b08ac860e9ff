"""Exercise 6: ``-m ex06_v6range --dst-range A-B`` right on 6.1 and on 6.12.

One FORWARD rule drops UDP to 2001:db8:3::10-2001:db8:3::20 (routed via the
server wire). The bounds test sends A-1, A, B-1, B, B+1; the byte-order test
sends addresses outside the range that differ from it only in the higher
bytes of the last 32-bit word (::115, ::1:15): a comparison of network-order
words as host integers puts them inside.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import CLIENT6, assert_kit_module, send_tagged, sentinel

pytestmark = pytest.mark.vm

MODULE, MATCH = "xt_ex06_v6range", "ex06_v6range"
NET, VIA = "2001:db8:3::/64", "2001:db8:2::2"
RANGE = "2001:db8:3::10-2001:db8:3::20"


@pytest.fixture(scope="module")
def loaded(host, routed):
    assert_kit_module(host, MODULE)
    host.run_test(f"ip -6 route replace {NET} via {VIA}")


def _check(host, wire, rules, tag, port, addrs: dict):
    """addrs: {address: expected to be dropped}; asserts the wire agrees."""
    from scapy.all import UDP, IPv6
    from nflab.tracing import payload

    rules.add("ipv6", "filter", "FORWARD", f"-p udp --dport {port} -m {MATCH} --dst-range {RANGE} -j DROP")
    pkts, addr_of = {}, {}
    for addr in addrs:
        t = tag()
        pkts[t] = IPv6(src=CLIENT6, dst=addr) / UDP(sport=33000, dport=port) / payload(t, 48)
        addr_of[t] = addr
    arrived = send_tagged(wire, pkts, sentinel=sentinel("ipv6", tag()))
    wrong = [f"{addr_of[t]}: {'arrived' if t in arrived else 'dropped'}, expected "
             f"{'dropped' if addrs[addr_of[t]] else 'to arrive'}"
             for t in pkts if (t in arrived) == addrs[addr_of[t]]]
    assert not wrong, f"--dst-range {RANGE}:\n" + "\n".join(wrong)


def test_range_bounds(host, wire, forwarding, loaded, rules, tag):
    _check(host, wire, rules, tag, 40601, {
        "2001:db8:3::f": False, "2001:db8:3::10": True, "2001:db8:3::1f": True,
        "2001:db8:3::20": True, "2001:db8:3::21": False})


def test_byte_order(host, wire, forwarding, loaded, rules, tag):
    _check(host, wire, rules, tag, 40602, {
        "2001:db8:3::115": False, "2001:db8:3::1:15": False, "2001:db8:3::18": True})
