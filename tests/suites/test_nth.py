"""nth: every Nth packet of a counter, proven with forwarded packets and with
traffic from both vCPUs at once. Both families, both iptables backends.

The kit's nth keeps 16 global counters (module state: they start at 0 when
the module loads and are never reset by a rule). Without ``--packet`` every
evaluation of a rule naming counter c takes the next step n of c and the
rule matches when ``(n + start) % every == 0``. With ``--packet P`` (the
patch-o-matic load-balancing form: one rule per P on one counter) a rule
matches only while the counter stands at P, and only that match moves the
counter on. The tests reload the module first where they need to know where
the counters stand.

* positions: ``--every 3`` matches packets 1, 4, 7; three ``--packet 0/1/2``
  rules of ``--every 3`` on one counter take the packets round robin (each
  packet matches exactly one of them, 3 each of 9); ``--start 3`` of 5
  matches 3 and 8; rules on different counters step independently, two
  rules on one counter share its steps; arrivals on the server wire and the
  rule counters must agree exactly;
* both CPUs: two processes pinned to CPU 0 and CPU 1 send 7 * 300
  datagrams through a ``--every 7`` rule and a set of seven ``--packet``
  rules at the same time: exactly 300 match the first, and the set's
  matches are S consecutive positions dealt out round robin (no position
  taken twice or skipped), with S at least half the datagrams (a datagram
  falls through the whole set only when the other CPU takes a step while it
  walks the set). This proves both CPUs step the one counter and the totals
  are exact, NOT that the steps are atomic: the kit runs QEMU's TCG
  single-threaded (README, "Single-threaded TCG"), one host thread runs both
  vCPUs and switches between them only between translated blocks, so a
  read-then-set counter passes too (tried). Only a guest on KVM, whose vCPUs
  run at once, can catch a non-atomic variant here;
* rule replacement: the counters are global, so adding a rule to the table
  (iptables-legacy replaces the whole table), replacing the nth rule itself
  (``-R``) and zeroing the counters (``-Z``) do not restart the count, on
  both backends.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, l3, send_tagged,
                                          sentinel)
from tests.suites.guest_traffic import (clean_filter, flush_script, parallel_script,  # noqa: F401
                                        parse_senders, reload_script, save_rules, sink,
                                        param_scope, positions_batch)

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
    from nflab.tracing import payload
    c, s = PEERS[family]
    return l3(family)(src=c, dst=s) / UDP(sport=33000, dport=port) / payload(tag, 48)


def _base(family, backend):
    return 41500 + (40 if family == "ipv6" else 0) + (20 if backend == "nft" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_positions_on_the_wire(host, wire, fresh, family, backend, tag):
    a, b, c, d, e, f, g = (_base(family, backend) + i for i in range(7))
    # (port, nth options, target, 1-based positions among that port's packets the rule matches)
    rules = [(a, "--every 3", "DROP", {1, 4, 7}),
             # patch-o-matic's load balancing: one rule per --packet value on one counter,
             # each packet matches exactly one of them, round robin
             (b, "--every 3 --counter 1 --packet 0", "DROP", {1, 4, 7}),
             (b, "--every 3 --counter 1 --packet 1", "ACCEPT", {2, 5, 8}),
             (b, "--every 3 --counter 1 --packet 2", "DROP", {3, 6, 9}),
             (c, "--every 5 --counter 2 --start 3", "DROP", {3, 8}),
             (d, "--every 2 --counter 3", "DROP", {1, 3}),           # d and e interleaved,
             (e, "--every 2 --counter 4 --start 1", "DROP", {2, 4}),  # own counters
             (f, "--every 2 --counter 5", "DROP", {1, 2, 3}),         # f and g interleaved, ONE
             (g, "--every 2 --counter 5", "DROP", set())]             # counter: f takes the even steps
    order = [a] * 9 + [b] * 9 + [c] * 10 + [d, e] * 4 + [f, g] * 3
    tool = f"{TOOLS[family]}-{backend} -w"
    host.run_test(" && ".join(f"{tool} -A FORWARD -p udp --dport {p} -m nth {o} -j {target}"
                              for p, o, target, _ in rules))
    pkts, meta, seen = {}, {}, {}
    for port in order:
        k = seen[port] = seen.get(port, 0) + 1
        t = tag()
        pkts[t] = _udp(family, port, t)
        # the first rule of the port that matches position k decides
        first = next(((o, target) for p, o, target, m in rules if p == port and k in m), ("", "ACCEPT"))
        meta[t] = (f"port {port} packet {k} (-m nth {first[0] or '...: no match'})", first[1] != "DROP")
    arrived = send_tagged(wire, pkts, timeout=8.0, sentinel=sentinel(family, tag()))
    wrong = [f"{meta[t][0]}: {'arrived' if t in arrived else 'dropped'}" for t in pkts
             if (t in arrived) != meta[t][1]]
    assert not wrong, "\n".join(wrong)
    counts = [n for n, _, _ in save_rules(host.check_output(f"{TOOLS[family]}-{backend}-save -c -t filter"),
                                          "FORWARD")]
    assert counts == [len(m) for _, _, _, m in rules], f"rule counters {counts}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_cpus_take_every_step_once(host, loaded, clean_filter, sink, family, backend):
    """Both vCPUs step counters 6 and 7 at once: --every takes exactly every 7th, the
    --packet set S consecutive positions round robin with S >= half the datagrams.
    Under the kit's single-threaded TCG this proves the totals, not atomicity (a
    non-atomic counter is caught only on KVM)."""
    every, rounds = 7, 300
    total = every * rounds
    port = _base(family, backend) + 10
    tool = f"{TOOLS[family]}-{backend} -w"
    match = f"-o {sink} -p udp --dport {port}"
    rules = [f"{tool} -A OUTPUT {match} -m nth --every {every} --counter 6"]
    rules += [f"{tool} -A OUTPUT {match} -m nth --every {every} --counter 7 --packet {p} -j ACCEPT"
              for p in range(every)]
    rules.append(f"{tool} -A OUTPUT {match}")            # what no --packet rule took
    host.run_test(" && ".join(rules))
    res = host.run(parallel_script("udp", family, port, 64, total // 2,
                                   after=f"{TOOLS[family]}-{backend}-save -c -t filter"))
    assert res.rc == 0, res.stderr
    senders = parse_senders(res.stdout)
    assert senders.ok == total, f"not every datagram was sent: {senders}"
    got = [n for n, _, _ in save_rules(res.stdout, "OUTPUT")]
    assert got[0] == rounds, f"{total} packets from 2 CPUs through --every {every}: {got[0]} matched, want {rounds}"
    dealt, rest = got[1:every + 1], got[-1]
    taken = sum(dealt)
    # the set took consecutive positions s..s+taken-1 (s: where counter 7 stood; other
    # parametrizations used it), each once, position i by the rule --packet i % every
    rr = [[sum(1 for i in range(s, s + taken) if i % every == p) for p in range(every)] for s in range(every)]
    assert dealt in rr and taken + rest == total, \
        f"--packet 0..{every - 1} matched {dealt} and {rest} fell through: not {taken} consecutive " \
        f"positions dealt round robin, or not {total} in all"
    # A datagram falls through all seven rules only if the counter moves while it walks
    # them, i.e. the other CPU's datagram takes a step meanwhile; each step is inside one
    # walk of the other CPU (one datagram in flight per CPU), so at most `taken` fall through.
    assert taken >= rest, \
        f"--packet 0..{every - 1} took {taken} of {total} datagrams and {rest} fell through: " \
        f"expected at least {total // 2} taken (every datagram, bar one per step the other CPU takes)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_counter_survives_rule_replacement(host, wire, fresh, family, backend, tag):
    port = _base(family, backend) + 12
    other = port + 1                        # the rule added later; its packets are the sentinel
    tool = f"{TOOLS[family]}-{backend} -w"
    rule = f"-p udp --dport {port} -m nth --every 4 --counter 8 -j DROP"
    host.run_test(f"{tool} -A FORWARD {rule}")

    batch = positions_batch(wire, tag, lambda t: _udp(family, port, t), lambda t: _udp(family, other, t))
    first = batch(2)                        # steps 0, 1: the first is dropped
    host.run_test(f"{tool} -A FORWARD -p udp --dport {other} -j ACCEPT && {tool} -R FORWARD 1 {rule} && "
                  f"{tool} -Z FORWARD")
    second = batch(3)                       # steps 2, 3, 4: only the third is dropped
    assert (first, second) == ([2], [1, 2]), \
        f"before replacement {first}, after {second}; a counter restarted by the replacement " \
        f"would give [2], [2, 3]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_positions_are_refused_by_the_plugin(host, loaded, backend, xtables):
    """--packet and --start must be below --every: the plugin says so itself,
    where the kernel's checkentry would refuse the rule with only EINVAL."""
    if xtables.skip_reason(backend):
        pytest.skip(xtables.skip_reason(backend))
    for opt, value in (("packet", 5), ("start", 3)):
        res = host.run(f"iptables-{backend} -w -A FORWARD -m nth --every 3 --{opt} {value} -j ACCEPT")
        assert res.rc != 0 and f"--{opt} {value} is not below --every 3" in res.stderr, res.stderr


def test_help_names_the_declared_defaults(host, loaded):
    """The plugin's help line of an option with a declared default ends with
    it, taken from ext.toml (the kit appends it; the help text never says it)."""
    res = host.run("iptables -m nth --help")
    assert res.rc == 0, res.stderr
    assert "--counter n\n\t\tuse counter 0..15 (default 0)\n" in res.stdout, res.stdout
    assert "--start n\n\t\tinitialize the counter at this value (< every) (default 0)\n" \
        in res.stdout, res.stdout
    assert "--every n\n\t\tmatch every Nth packet\n" in res.stdout, res.stdout
