"""Exercise 1: a per-hook packet and byte counter at PRE_ROUTING.

Green when /proc/net/nflab_ex01_count has a registered IPv4 PRE_ROUTING
point, forwarded packets from the client wire are counted there (packets, and
IP bytes: each packet's length once; other traffic, e.g. this suite's SSH,
adds a bounded little), and ``echo clear`` zeroes the bytes too.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (CLIENT4, SERVER4, assert_kit_module,
                                         proc_lines, send_tagged)
from tests.workshop.conftest import proc_points

pytestmark = pytest.mark.vm

MODULE = "nflab_ex01_count"
PROC = f"/proc/net/{MODULE}"
# packets large next to this suite's own SSH (it enters PRE_ROUTING too): a byte count
# twice too big cannot hide in the slack the SSH needs
N, SIZE = 10, 1400
SSH_SLACK = 1500


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


def _read(host):
    points = proc_points(host, MODULE)
    nbytes = {(w[1], w[2]): int(w[3]) for w in proc_lines(host, MODULE, "bytes")}
    return points, nbytes


def _bytes(host) -> int:
    """The PRE_ROUTING byte counter (one read: one SSH command)."""
    found = {(w[1], w[2]): int(w[3]) for w in proc_lines(host, MODULE, "bytes")}
    assert ("ipv4", "PRE_ROUTING") in found, f"no bytes line for ipv4 PRE_ROUTING in {PROC}"
    return found[("ipv4", "PRE_ROUTING")]


def _send(wire, tag, port=40101):
    from scapy.all import IP, UDP
    from nflab.tracing import payload

    pkts = {}
    for _ in range(N):
        t = tag()
        pkts[t] = IP(src=CLIENT4, dst=SERVER4) / UDP(sport=33000 + t % 20000, dport=port) / payload(t, SIZE)
    arrived = send_tagged(wire, pkts)
    assert arrived == set(pkts), f"only {len(arrived)} of {N} forwarded packets arrived"
    return len(bytes(next(iter(pkts.values()))))


def _counted(host, wire, tag):
    """(bytes PRE_ROUTING counted while N packets were forwarded, their IP length, the
    most this suite's SSH may add: twice what one idle read added, plus SSH_SLACK)."""
    first = _bytes(host)
    before = _bytes(host)
    ip_len = _send(wire, tag)
    got = _bytes(host) - before
    return got, ip_len, 2 * max(before - first, 0) + SSH_SLACK


def test_point_registered_at_pre_routing(host, loaded):
    points = proc_points(host, MODULE)
    assert ("ipv4", "PRE_ROUTING") in points, \
        f"{PROC} shows no ipv4 PRE_ROUTING point, only {sorted(points)}: see the [[hooks]] entry"
    assert points[("ipv4", "PRE_ROUTING")][1] == 1, "the PRE_ROUTING point is not registered"


def test_forwarded_packets_counted(host, wire, forwarding, loaded, tag):
    before, _ = _read(host)
    assert ("ipv4", "PRE_ROUTING") in before, f"no PRE_ROUTING point in {PROC}"
    _send(wire, tag)
    after, _ = _read(host)
    got = after[("ipv4", "PRE_ROUTING")][2] - before[("ipv4", "PRE_ROUTING")][2]
    assert got >= N, f"PRE_ROUTING counted {got} packets while {N} were forwarded"


def test_forwarded_bytes_counted(host, wire, forwarding, loaded, tag):
    got, ip_len, slack = _counted(host, wire, tag)
    want = N * ip_len
    assert want <= got <= want + slack, (
        f"PRE_ROUTING counted {got} bytes, expected {want} ({N} packets of {ip_len} IP bytes) "
        f"plus at most {slack} of this suite's SSH: add each packet's skb->len once")


def test_clear_zeroes_bytes(host, wire, forwarding, loaded, tag):
    got, ip_len, _ = _counted(host, wire, tag)
    want = N * ip_len
    assert got >= want, (
        f"PRE_ROUTING counted {got} bytes, expected at least {want} ({N} packets of {ip_len} "
        "IP bytes): nothing to clear yet; fix the byte count first (test_forwarded_bytes_counted)")
    host.run_test(f"echo clear > {PROC}")
    left = _bytes(host)
    # only what arrived since (a few SSH segments of this very command) may show
    assert left < want // 2, \
        f"after clear the PRE_ROUTING bytes are {left}, expected under {want // 2}: clear must zero them"
