"""Exercise 2: a hook between mangle (-150) and nat (-100), proven with packets.

The module counts UDP packets that carry ``skb->mark == mark`` and go to
destination port ``port`` (its parameters). The suite marks such packets in
the mangle table's PREROUTING and, in the second test, DNATs them to
``port + 1`` in the nat table's PREROUTING. Only a hook after mangle sees the
mark; only a hook before nat still sees the original port: both counts must
equal what was sent.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (CLIENT4, SERVER4, assert_kit_module,
                                         proc_lines, send_tagged)
from tests.workshop.conftest import module_param, proc_points

pytestmark = pytest.mark.vm

MODULE = "nflab_ex02_prio"
PROC = f"/proc/net/{MODULE}"
MANGLE, NAT = -150, -100
N = 8


@pytest.fixture(scope="module")
def params(host):
    assert_kit_module(host, MODULE)
    return module_param(host, MODULE, "mark"), module_param(host, MODULE, "port")


def _seen(host) -> int:
    lines = proc_lines(host, MODULE, "seen")
    assert lines, f"{PROC} has no `seen` line"
    return int(lines[0][1])


def _send(host, wire, tag, port):
    """N tagged UDP packets client -> server:port (fresh source ports: no stale
    conntrack/NAT entry applies); returns the frames that reached the server."""
    from scapy.all import IP, UDP
    from nflab.tracing import has_tag, payload

    pkts = {}
    for _ in range(N):
        t = tag()
        pkts[t] = IP(src=CLIENT4, dst=SERVER4) / UDP(sport=20000 + t % 40000, dport=port) / payload(t, 64)
    host.run_test(f"echo clear > {PROC}")
    since = wire.mark("server")
    arrived = send_tagged(wire, pkts)
    assert arrived == set(pkts), f"only {len(arrived)} of {N} packets were forwarded"
    return wire.sniff("server", lambda p: any(has_tag(p, t) for t in pkts), count=N, timeout=1.0,
                      since=since)


def test_declared_between_mangle_and_nat(host, params):
    points = proc_points(host, MODULE)
    prio, registered, _ = points[("ipv4", "PRE_ROUTING")]
    assert registered == 1
    assert MANGLE < prio < NAT, \
        f"the hook sits at {prio}: mangle is {MANGLE}, nat (DNAT) {NAT}; it must be strictly between"


def test_sees_the_mangle_mark(host, wire, forwarding, params, rules, tag):
    mark, port = params
    rules.add("ipv4", "mangle", "PREROUTING", f"-p udp --dport {port} -j MARK --set-mark {mark}")
    _send(host, wire, tag, port)
    seen = _seen(host)
    assert seen == N, (f"the hook counted {seen} of {N} packets marked {mark} by the mangle table "
                       f"({MANGLE}): {why_unseen(_priority(host), port, dnat=False)}")


def test_sees_the_port_before_nat(host, wire, forwarding, params, rules, tag):
    from scapy.all import UDP

    mark, port = params
    rules.add("ipv4", "mangle", "PREROUTING", f"-p udp --dport {port} -j MARK --set-mark {mark}")
    rules.add("ipv4", "nat", "PREROUTING",
              f"-p udp --dport {port} -j DNAT --to-destination {SERVER4}:{port + 1}")
    frames = _send(host, wire, tag, port)
    assert frames and all(f[UDP].dport == port + 1 for f in frames), \
        "the nat table did not rewrite the port: the proof needs DNAT to run"
    seen = _seen(host)
    assert seen == N, (f"the hook counted {seen} of {N} marked packets to port {port}: "
                       f"{why_unseen(_priority(host), port, dnat=True)}")


def _priority(host) -> int:
    """The priority the loaded module's PRE_ROUTING hook registered with."""
    return proc_points(host, MODULE)[("ipv4", "PRE_ROUTING")][0]


def why_unseen(prio: int, port: int, *, dnat: bool) -> str:
    """Why a hook at *prio* misses marked packets to *port* (*dnat*: nat rewrites the port)."""
    if prio <= MANGLE:
        return (f"the hook sits at {prio}, before mangle ({MANGLE}): the MARK is not set yet "
                "when it runs; move it after mangle")
    if prio >= NAT and dnat:
        return (f"the hook sits at {prio}, after nat ({NAT}): DNAT has already rewritten the "
                f"port to {port + 1}; move it before nat")
    return (f"the hook sits at {prio}, between mangle ({MANGLE}) and nat ({NAT}) where it sees "
            "both: the module's mark or port check must have changed")
