"""nth: every Nth packet of a counter, proven with forwarded packets and with
traffic from both vCPUs at once. Both families, both iptables backends.

The kit's nth keeps 16 global counters (module state: they start at 0 when
the module loads and are never reset by a rule). Every evaluation of a
rule naming counter c takes the next step n of c; the rule matches when
``(n + start) % every == packet``. The tests reload the module first where
they need to know where the counters stand.

* positions: ``--every 3`` matches packets 1, 4, 7; ``--packet 3`` of 4
  matches 4 and 8; ``--start 3`` of 5 matches 3 and 8; rules on different
  counters step independently, two rules on one counter share its steps;
  arrivals on the server wire and the rule counters must agree exactly;
* concurrency: two processes pinned to CPU 0 and CPU 1 send 7 * 300
  datagrams through ``--every 7`` rules at the same time: exactly 300 match
  per rule, whatever the counter stood at (no step lost or taken twice);
* rule replacement: the counters are global, so adding a rule to the table
  (iptables-legacy replaces the whole table), replacing the nth rule itself
  (``-R``) and zeroing the counters (``-Z``) do not restart the count, on
  both backends.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import BACKENDS, PEERS, TOOLS, assert_kit_module, l3
from tests.suites.guest_traffic import (clean_filter, flush_script, parallel_script,  # noqa: F401
                                        parse_senders, reload_script, save_rules, send_collect, sink,
                                        param_scope)

pytestmark = pytest.mark.vm
FAMILIES = ["ipv4", "ipv6"]
MODULE = "xt_nth"


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


@pytest.fixture
def fresh(request, host, loaded, routed, sink):
    """No rule uses nth (FORWARD and OUTPUT flushed everywhere), the module
    reloaded: every counter at 0. One round trip; the test's own rules are
    flushed after it."""
    res = host.run(flush_script() + "; " + reload_script(MODULE))
    assert res.rc == 0, f"cannot reload {MODULE}: {res.stderr} (refcnt: " \
        f"{host.run(f'cat /sys/module/{MODULE}/refcnt').stdout.strip()})"
    yield
    host.run(flush_script(**param_scope(request)))


def _udp(family, port, tag):
    from scapy.all import UDP
    from vm.wire import payload
    c, s = PEERS[family]
    return l3(family)(src=c, dst=s) / UDP(sport=33000, dport=port) / payload(tag, 48)


def _base(family, backend):
    return 41500 + (40 if family == "ipv6" else 0) + (20 if backend == "nft" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_positions_on_the_wire(host, wire, fresh, family, backend, tag):
    a, b, c, d, e, f, g = (_base(family, backend) + i for i in range(7))
    # port: (nth options, 1-based positions among that port's packets it matches (drops))
    rules = {a: ("--every 3", {1, 4, 7}),
             b: ("--every 4 --counter 1 --packet 3", {4, 8}),
             c: ("--every 5 --counter 2 --start 3", {3, 8}),
             d: ("--every 2 --counter 3", {1, 3}),              # d and e interleaved, own counters
             e: ("--every 2 --counter 4 --packet 1", {2, 4}),
             f: ("--every 2 --counter 5", {1, 2, 3}),           # f and g interleaved, ONE counter:
             g: ("--every 2 --counter 5", set())}               # f takes the even steps, g the odd
    order = [a] * 9 + [b] * 8 + [c] * 10 + [d, e] * 4 + [f, g] * 3
    tool = f"{TOOLS[family]}-{backend} -w"
    host.run_test(" && ".join(f"{tool} -A FORWARD -p udp --dport {p} -m nth {o} -j DROP"
                              for p, (o, _) in rules.items()))
    pkts, meta, seen = {}, {}, {}
    for port in order:
        seen[port] = seen.get(port, 0) + 1
        t = tag()
        pkts[t] = _udp(family, port, t)
        meta[t] = (f"{rules[port][0]} (port {port}) packet {seen[port]}", seen[port] not in rules[port][1])
    expect = {t for t, (_, arrives) in meta.items() if arrives}
    arrived = send_collect(wire, pkts, expect, timeout=8.0)
    wrong = [f"{meta[t][0]}: {'arrived' if t in arrived else 'dropped'}" for t in pkts
             if (t in arrived) != meta[t][1]]
    assert not wrong, "\n".join(wrong)
    counts = [p for p, _, _ in save_rules(host.check_output(f"{TOOLS[family]}-{backend}-save -c -t filter"),
                                          "FORWARD")]
    assert counts == [len(m) for _, m in rules.values()], f"rule counters {counts}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_cpus_take_every_step_once(host, loaded, clean_filter, sink, family, backend):
    every, rounds = 7, 300
    total = every * rounds
    port = _base(family, backend) + 10
    tool = f"{TOOLS[family]}-{backend} -w"
    match = f"-o {sink} -p udp --dport {port}"
    host.run_test(f"{tool} -A OUTPUT {match} -m nth --every {every} --counter 6 && "
                  f"{tool} -A OUTPUT {match} -m nth --every {every} --counter 7 --packet 3 && "
                  f"{tool} -A OUTPUT {match}")
    res = host.run(parallel_script("udp", family, port, 64, total // 2,
                                   after=f"{TOOLS[family]}-{backend}-save -c -t filter"))
    assert res.rc == 0, res.stderr
    senders = parse_senders(res.stdout)
    assert senders.ok == total, f"not every datagram was sent: {senders}"
    got = [p for p, _, _ in save_rules(res.stdout, "OUTPUT")]
    assert got == [rounds, rounds, total], \
        f"{total} packets from 2 CPUs through --every {every}: counters {got}, want [{rounds}, {rounds}, {total}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_counter_survives_rule_replacement(host, wire, fresh, family, backend, tag):
    port = _base(family, backend) + 12
    other = port + 1                        # the rule added later; its packets are the sentinel
    tool = f"{TOOLS[family]}-{backend} -w"
    rule = f"-p udp --dport {port} -m nth --every 4 --counter 8 -j DROP"
    host.run_test(f"{tool} -A FORWARD {rule}")

    def batch(n):
        """n packets to the nth rule, then the sentinel; 1-based positions that arrived."""
        ts = [tag() for _ in range(n)]
        pkts = {t: _udp(family, port, t) for t in ts}
        sentinel = tag()
        pkts[sentinel] = _udp(family, other, sentinel)
        got = send_collect(wire, pkts, {sentinel})
        assert sentinel in got, "the sentinel packet (no rule drops it) did not arrive"
        return [ts.index(t) + 1 for t in ts if t in got]

    first = batch(2)                        # steps 0, 1: the first is dropped
    host.run_test(f"{tool} -A FORWARD -p udp --dport {other} -j ACCEPT && {tool} -R FORWARD 1 {rule} && "
                  f"{tool} -Z FORWARD")
    second = batch(3)                       # steps 2, 3, 4: only the third is dropped
    assert (first, second) == ([2], [1, 2]), \
        f"before replacement {first}, after {second}; a counter restarted by the replacement " \
        f"would give [2], [2, 3]"
