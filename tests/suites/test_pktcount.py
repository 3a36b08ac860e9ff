"""pktcount: per-hook packet/byte counters read from /proc/net/nflab_pktcount.

Forwarded tagged UDP packets must be counted exactly once at PRE_ROUTING,
FORWARD and POST_ROUTING of their family, with the bytes of their IP packets,
and not at all at LOCAL_IN, LOCAL_OUT or in the other family; "clear" zeroes
every point.

The guest is also reached over SSH (IPv4, through PRE_ROUTING, LOCAL_IN,
LOCAL_OUT and POST_ROUTING), and what else it forwards meanwhile (a late
retransmission of an earlier suite's in-guest TCP) crosses FORWARD. An nft
table beside the module counts, per hook and family, every packet that is not
one of the test's datagrams. Neither count can be read at the same instant as
the other, so each snapshot reads the module, then nft, then the module again:
what the module counted of the test's datagrams lies between the first read
less nft's count and the second read less nft's count, and the test's number
must lie within those bounds (a point that counted each packet twice is off by
the whole flow, SSH included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from tests.suites.catalog_helpers import PEERS, assert_kit_module, l3, send_tagged

pytestmark = pytest.mark.vm
MOD = "nflab_pktcount"
TEST_PORT = 40200
HOOK_CHAIN = {"PRE_ROUTING": "prerouting", "LOCAL_IN": "input", "FORWARD": "forward",
              "LOCAL_OUT": "output", "POST_ROUTING": "postrouting"}
FAMILIES = ("ipv4", "ipv6")
POINTS = [(f, h) for f in FAMILIES for h in HOOK_CHAIN]
SNAPSHOT = f"cat /proc/net/{MOD}; echo @@; nft list table inet nflabstray; echo @@; cat /proc/net/{MOD}"


def _points_of(text: str) -> dict:
    """{(family, hook): {"registered", "packets", "bytes"}} from the module's /proc text."""
    points = {}
    for w in (ln.split() for ln in text.splitlines()):
        if w and w[0] == "point":               # point family hook prio registered packets
            points[(w[1], w[2])] = {"registered": int(w[4]), "packets": int(w[5])}
        elif w and w[0] == "bytes":             # bytes index family hook bytes
            points[(w[2], w[3])]["bytes"] = int(w[4])
    return points


def _read(host) -> dict:
    return _points_of(host.file(f"/proc/net/{MOD}").content_string)


def _strays_of(text: str) -> dict:
    """{(family, hook): {"packets", "bytes"}} from `nft list table inet nflabstray`."""
    hooks = {chain: hook for hook, chain in HOOK_CHAIN.items()}
    got, hook = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*chain (\w+) \{", line)
        if m:
            hook = hooks[m.group(1)]
        m = re.search(r"nfproto (ipv[46]) counter packets (\d+) bytes (\d+)", line)
        if m:
            got[(m.group(1), hook)] = {"packets": int(m.group(2)), "bytes": int(m.group(3))}
    assert sorted(got) == sorted(POINTS), text
    return got


@dataclass
class Snapshot:
    first: dict      # the module's points
    strays: dict     # nft's counts of everything but the test's datagrams, read after first
    last: dict       # the module's points again, read after strays


def _snapshot(host) -> Snapshot:
    first, strays, last = host.check_output(SNAPSHOT).split("@@")
    return Snapshot(_points_of(first), _strays_of(strays), _points_of(last))


def _bounds(before: Snapshot, after: Snapshot, point, key: str) -> tuple[int, int]:
    """The least and the most the module can have counted of the test's datagrams at
    *point* between the two snapshots (*key*: packets or bytes)."""
    def own(points, snap):
        return points[point][key] - snap.strays[point][key]
    return own(after.first, after) - own(before.last, before), own(after.last, after) - own(before.first, before)


@pytest.fixture
def strays(host):
    """The nft table counting, per hook and family, every packet but the test's datagrams."""
    cmds = ["nft add table inet nflabstray"]
    for chain in HOOK_CHAIN.values():
        cmds += [f"nft add chain inet nflabstray {chain} '{{ type filter hook {chain} priority -300; }}'",
                 f"nft add rule inet nflabstray {chain} udp dport {TEST_PORT} return",
                 *(f"nft add rule inet nflabstray {chain} meta nfproto {f} counter" for f in FAMILIES)]
    host.run_test(" && ".join(cmds))
    yield
    host.run("nft delete table inet nflabstray")


def test_loaded_and_registered(host):
    assert_kit_module(host, MOD)
    points = _read(host)
    assert sorted(points) == sorted(POINTS)
    assert all(p["registered"] == 1 for p in points.values()), points


@pytest.mark.parametrize("family", FAMILIES)
def test_forwarded_packets_are_counted_per_hook(host, wire, routed, strays, family, tag):
    pkts = _forwarded(family, tag, 7)
    before = _snapshot(host)
    assert send_tagged(wire, pkts) == set(pkts)
    after = _snapshot(host)
    nbytes = sum(len(p) for p in pkts.values())
    for point in POINTS:
        counted = point[0] == family and point[1] in ("PRE_ROUTING", "FORWARD", "POST_ROUTING")
        for key, want in (("packets", len(pkts)), ("bytes", nbytes)):
            lo, hi = _bounds(before, after, point, key)
            want = want if counted else 0
            assert lo <= want <= hi, f"{point} {key}: the module counted {lo}..{hi} of the test's, want {want}"


def _forwarded(family: str, tag, n: int) -> dict:
    """*n* tagged UDP datagrams from the client peer to the server peer, sizes apart."""
    from scapy.all import UDP
    from nflab.tracing import payload

    client, server = PEERS[family]
    return {t: l3(family)(src=client, dst=server) / UDP(sport=33000, dport=TEST_PORT) / payload(t, 40 + 10 * i)
            for i, t in enumerate(tag() for _ in range(n))}


def test_clear(host, wire, routed, strays, tag):
    """Every point counts something first (datagrams forwarded in both families,
    pings over the loopback in both); after "clear" no point holds more than nft
    saw cross it from before the clear to after the read."""
    for family in FAMILIES:
        pkts = _forwarded(family, tag, 2)
        assert send_tagged(wire, pkts) == set(pkts)
    host.run_test("ping -c 2 -i 0.2 -W 1 127.0.0.1 >/dev/null && ping -6 -c 2 -i 0.2 -W 1 ::1 >/dev/null")
    full = _read(host)
    assert all(full[p]["packets"] > 0 and full[p]["bytes"] > 0 for p in POINTS), full
    n0, cleared, n1 = host.check_output(
        f"nft list table inet nflabstray; echo @@; echo clear > /proc/net/{MOD}; "
        f"cat /proc/net/{MOD}; echo @@; nft list table inet nflabstray").split("@@")
    n0, n1, cleared = _strays_of(n0), _strays_of(n1), _points_of(cleared)
    for p in POINTS:
        for key in ("packets", "bytes"):
            crossed = n1[p][key] - n0[p][key]
            assert cleared[p][key] <= crossed, f"{p} {key}: {cleared[p][key]} after clear, {crossed} crossed"
    assert host.run(f"echo nonsense > /proc/net/{MOD}").rc != 0
