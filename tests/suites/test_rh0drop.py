"""rh0drop: IPv6 packets with a Type 0 Routing Header are dropped, wherever
the header sits in the chain; so are packets whose header chain runs past
their end (as ip6t_rt hotdrops them); other routing header types and plain
packets pass; without the module the same RH0 packet is forwarded (so the drop is
the module's)."""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (CLIENT6, SERVER6, assert_kit_module, proc_lines, reload_module,
                                          send_tagged, sentinel)

pytestmark = pytest.mark.vm
MOD = "nflab_rh0drop"


@pytest.fixture
def rh0(host, routed):
    assert_kit_module(host, MOD)
    host.run_test(f"echo clear > /proc/net/{MOD}")
    yield
    if not host.file(f"/sys/module/{MOD}").exists:
        reload_module(host, MOD)


def _packets(tag):
    from scapy.all import UDP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
    from nflab.tracing import payload

    base = lambda: IPv6(src=CLIENT6, dst=SERVER6)            # noqa: E731
    udp = lambda t: UDP(sport=33000, dport=40300) / payload(t, 48)  # noqa: E731
    cases = {}
    t = tag(); cases[t] = ("plain", False, base() / udp(t))                                       # noqa: E702
    t = tag(); cases[t] = ("rh0", True, base() / IPv6ExtHdrRouting(type=0, segleft=0, addresses=["2001:db8:9::1"]) / udp(t))  # noqa: E702,E501
    t = tag(); cases[t] = ("hbh+dst+rh0", True, base() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                           / IPv6ExtHdrRouting(type=0, segleft=0, addresses=["2001:db8:9::1"]) / udp(t))  # noqa: E702
    t = tag(); cases[t] = ("rh2", False, base() / IPv6ExtHdrRouting(type=2, segleft=0, addresses=["2001:db8:9::1"]) / udp(t))  # noqa: E702,E501
    t = tag(); cases[t] = ("look-alike: 0x2b0x00 in payload", False,                          # noqa: E702
                           base() / UDP(sport=33000, dport=40300) / (b"\x2b\x02\x00\x00" * 4 + payload(t, 48)))
    # a destination options header that claims 2048 bytes, in a packet of 64: the
    # chain runs past the end, so a routing header may hide in a later fragment
    t = tag(); cases[t] = ("chain past the end", True,                                        # noqa: E702
                           IPv6(src=CLIENT6, dst=SERVER6, nh=60) / (bytes([43, 255]) + bytes(6) + payload(t, 56)))
    return cases


def test_rh0_dropped_others_pass(host, wire, rh0, tag):
    cases = _packets(tag)
    arrived = send_tagged(wire, {t: c[2] for t, c in cases.items()}, sentinel=sentinel("ipv6", tag()))
    wrong = [f"{c[0]}: {'arrived' if t in arrived else 'dropped'}" for t, c in cases.items()
             if (t in arrived) == c[1]]
    assert not wrong, wrong
    seen = {w[1]: int(w[2].split("=")[1]) for w in proc_lines(host, MOD, "rh")}
    assert seen["type=0"] == 2 and seen["type=2"] == 1, seen
    dropped = {(w[2], w[3]): int(w[4]) for w in proc_lines(host, MOD, "dropped")}
    assert dropped[("ipv6", "PRE_ROUTING")] == 3       # two RH0 and the cut chain


def test_without_module_rh0_is_forwarded(host, wire, rh0, tag):
    cases = {t: c for t, c in _packets(tag).items() if c[0] == "rh0"}
    host.run_test(f"rmmod {MOD}")
    try:
        arrived = send_tagged(wire, {t: c[2] for t, c in cases.items()})
        assert arrived == set(cases), "the guest drops RH0 by itself: the test proves nothing"
    finally:
        assert reload_module(host, MOD).rc == 0
    arrived = send_tagged(wire, {t: c[2] for t, c in cases.items()}, sentinel=sentinel("ipv6", tag()))
    assert not arrived
