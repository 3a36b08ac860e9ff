"""Stock table / hook attachment (the kernel's valid_hooks), measured with counters.

In every chain that each legacy table (the kernel's xt tables, the ones whose
priorities the placement suite brackets) offers, a counting rule matches the
tracer's payload magic. On a kernel without legacy xtables the same tables
are iptables-nft's base chains (nft_compat), registered at the same
priorities except security (iptables-nft: 150, the kernel's table: 50;
``tracing.documented``); ``xtables.primary`` says which. One tagged packet
per path — forward, local delivery, locally generated — with the counters
zeroed in between; a (table, chain)
counts a packet exactly when the table is attached to that hook:

    raw:      PRE_ROUTING, LOCAL_OUT
    mangle:   all five
    nat:      PRE_ROUTING, LOCAL_IN, LOCAL_OUT, POST_ROUTING  (first packet of a flow,
              with conntrack on in the netns)
    filter:   LOCAL_IN, FORWARD, LOCAL_OUT
    security: LOCAL_IN, FORWARD, LOCAL_OUT

A chain the table does not have must not exist at all.
"""

from __future__ import annotations

import re
import shlex

import pytest

from nflab import tracing
from nflab.tracing import addrs, packet
from nflab.tracing import has_tag, magic

pytestmark = pytest.mark.vm

CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
VALID = {
    "raw": {"PREROUTING", "OUTPUT"},
    "mangle": set(CHAINS),
    "nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
    "filter": {"INPUT", "FORWARD", "OUTPUT"},
    "security": {"INPUT", "FORWARD", "OUTPUT"},
}
# which chains a packet on each path passes (for a table that has them)
PATH_CHAINS = {
    "forward": {"PREROUTING", "FORWARD", "POSTROUTING"},
    "local-in": {"PREROUTING", "INPUT"},
    "local-out": {"OUTPUT", "POSTROUTING"},
}
COMMENT = "nflab-valid-hooks"
def expected(path: str) -> set:
    return {(table, chain) for table, chains in VALID.items() for chain in chains
            if chain in PATH_CHAINS[path]}


def counters(host, tool) -> dict:
    """(table, chain) -> packets of our counting rules, from ``<tool>-save -c``."""
    out = host.check_output(f"{tool}-save -c")
    counts, table = {}, None
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        m = re.match(r"\[(\d+):\d+\] -A (\S+) .*" + COMMENT, line)
        if m:
            counts[(table, m.group(2))] = counts.get((table, m.group(2)), 0) + int(m.group(1))
    return counts


def _send_path(host, wire, family, path, t):
    """Send one tagged packet along *path*; True once its effect is seen."""
    a = addrs(family)
    if path == "forward":
        pkt = packet(family, "tcp", a["client"], a["server"], t)
        return bool(wire.exchange("client", pkt, "server", lambda p: has_tag(p, t), timeout=5))
    if path == "local-in":
        # a SYN with data to a closed port: the guest's RST carries no payload (no tag)
        pkt = packet(family, "tcp", a["client"], a["guest_client"], t, dport=9)
        sport = pkt.payload.sport

        def is_rst(p):
            tcp = p.getlayer("TCP")
            return tcp is not None and tcp.dport == sport and "R" in str(tcp.flags)
        return bool(wire.exchange("client", pkt, "client", is_rst, timeout=5))
    since = wire.mark("server")
    host.run(tracing.bash_udp(a["server"], t))
    return bool(wire.sniff("server", lambda p: has_tag(p, t), timeout=5, since=since))


@pytest.fixture
def counting(host, routed, rules, conntrack_on, xtables):
    """Counting rules in every chain of every table; conntrack on, or nat (which
    acts on a flow's conntrack entry) would never see a packet."""
    def setup(family):
        tool = xtables.tool(family)
        match = (f"-m string --algo bm --string {shlex.quote(magic().decode())} "
                 f"-m comment --comment {COMMENT}")
        rules.add_many(family, [(table, chain, match) for table, chains in VALID.items()
                                for chain in CHAINS if chain in chains])
        absent = [(table, chain) for table, chains in VALID.items() for chain in CHAINS
                  if chain not in chains]
        out = host.run("; ".join(f"{tool} -w -t {t} -nL {c} >/dev/null 2>&1 && echo {t}/{c}"
                                 for t, c in absent)).stdout.split()
        return [f"{tc.split('/')[0]} has a {tc.split('/')[1]} chain" for tc in out]
    return setup


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_valid_hooks_by_counters(host, wire, routed, counting, tag, family, xtables):
    unexpected_chains = counting(family)
    assert not unexpected_chains, unexpected_chains
    tool = xtables.tool(family)
    wrong = []
    for path in PATH_CHAINS:
        host.run_test(" && ".join(f"{tool} -w -t {table} -Z" for table in VALID))
        t = tag()
        assert _send_path(host, wire, family, path, t), f"{path}: the packet's effect never showed"
        got = counters(host, tool)
        seen = {k for k, n in got.items() if n}
        want = expected(path)
        if seen != want:
            wrong.append(f"{family} {path}: counted in {sorted(seen - want)} unexpectedly, "
                         f"not in {sorted(want - seen)}")
        over = {k: n for k, n in got.items() if n > 1}
        if over:
            wrong.append(f"{family} {path}: more than one packet counted: {over}")
    assert not wrong, "\n".join(wrong)
