"""iprange end to end: real packets through the guest's FORWARD chain.

For each family and iptables backend (legacy; nft, which goes through
nft_compat) four rules drop UDP to four ports: ``--src-range``,
``! --src-range``, ``--dst-range``, ``! --dst-range``. The host sends, from the
client wire, one packet per (port, boundary address) — A-1, A, B, B+1 — and
sniffs the server wire: what arrives, and the rule counters, must be exactly
what an inclusive range says.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from kmods import spec
from tests.suites.catalog_helpers import send_tagged

pytestmark = pytest.mark.vm

DEF = spec.load("iprange").test
DST_ROUTE = {"ipv4": ("203.0.113.0/24", "198.51.100.2"), "ipv6": ("2001:db8:3::/64", "2001:db8:2::2")}
FAM = {
    "ipv4": {"tool": "iptables", "src": DEF["src4"], "dst": "203.0.113.10-203.0.113.20",
             "client": "192.0.2.2", "server": "198.51.100.2"},
    "ipv6": {"tool": "ip6tables", "src": DEF["src6"], "dst": "2001:db8:3::10-2001:db8:3::20",
             "client": "2001:db8:1::2", "server": "2001:db8:2::2"},
}
# port -> (option, negated)
RULES = {40001: ("--src-range", False), 40002: ("--src-range", True),
         40003: ("--dst-range", False), 40004: ("--dst-range", True)}


def _edges(rng: str):
    lo, hi = (ipaddress.ip_address(a) for a in rng.split("-"))
    return {"A-1": lo - 1, "A": lo, "B": hi, "B+1": hi + 1}, lo, hi


def _expect_dropped(addr, lo, hi, negated) -> bool:
    inside = lo <= addr <= hi
    return inside != negated


@pytest.fixture(scope="module")
def iprange_loaded(host):
    taint = host.file("/sys/module/xt_iprange/taint")
    assert taint.exists, "xt_iprange is not loaded (run `invoke install --name=iprange`)"
    assert "O" in taint.content_string, "the loaded xt_iprange is the in-tree one, not the kit's"
    return True


@pytest.fixture
def clean_forward(host, routed):
    flush = "; ".join(f"{tool}-{backend} -w -F FORWARD; {tool}-{backend} -w -P FORWARD ACCEPT"
                      for tool in ("iptables", "ip6tables") for backend in ("legacy", "nft"))
    routes = " && ".join(f"ip {'-6 ' if fam == 'ipv6' else ''}route replace {net} via {via}"
                         for fam, (net, via) in DST_ROUTE.items())
    host.run_test(f"{flush}; {routes}")       # one SSH round trip: each costs ~0.1 s under TCG
    yield
    host.run(flush)


def _counters(host, tool, backend):
    out = host.check_output(f"{tool}-{backend}-save -c -t filter")
    counts = {}
    for line in out.splitlines():
        m = re.match(r"\[(\d+):\d+\] -A FORWARD .*--dport (\d+) ", line)
        if m:
            counts[int(m.group(2))] = int(m.group(1))
    return counts


@pytest.mark.parametrize("backend", ["legacy", "nft"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_iprange_verdicts_on_the_wire(host, wire, iprange_loaded, clean_forward, family, backend):
    from scapy.all import IP, UDP, IPv6
    from nflab.tracing import payload

    f = FAM[family]
    ipt = f"{f['tool']}-{backend} -w"
    rules = [f"{ipt} -A FORWARD -p udp --dport {port} -m iprange {'! ' if neg else ''}"
             f"{opt} {f['src'] if opt == '--src-range' else f['dst']} -j DROP"
             for port, (opt, neg) in RULES.items()]
    host.run_test(" && ".join(rules))
    L3 = IP if family == "ipv4" else IPv6
    sent, expected_drop = {}, {}
    tag = 1000 * (1 if family == "ipv4" else 2) + (10 if backend == "nft" else 0)
    for port, (opt, neg) in RULES.items():
        rng = f["src"] if opt == "--src-range" else f["dst"]
        edges, lo, hi = _edges(rng)
        for label, addr in edges.items():
            tag += 1
            src, dst = (str(addr), f["server"]) if opt == "--src-range" else (f["client"], str(addr))
            pkt = L3(src=src, dst=dst) / UDP(sport=33000, dport=port) / payload(tag, 48)
            sent[tag] = (port, opt, neg, label, src, dst)
            expected_drop[tag] = _expect_dropped(addr, lo, hi, neg)
    # sent last, dropped by none of the rules: once it is through, so is every verdict
    sentinel = (tag + 1, L3(src=f["client"], dst=f["server"]) / UDP(sport=33000, dport=40999)
                / payload(tag + 1, 48))
    arrived = send_tagged(wire, {t: L3(src=s[4], dst=s[5]) / UDP(sport=33000, dport=s[0])
                                 / payload(t, 48) for t, s in sent.items()}, sentinel=sentinel)
    wrong = [f"{sent[t][1]}{' (negated)' if sent[t][2] else ''} {sent[t][3]} "
             f"src={sent[t][4]} dst={sent[t][5]}: "
             f"{'arrived' if t in arrived else 'dropped'}, expected "
             f"{'dropped' if expected_drop[t] else 'to arrive'}"
             for t in sent if (t in arrived) == expected_drop[t]]
    assert not wrong, "\n".join(wrong)
    counts = _counters(host, f["tool"], backend)
    for port, (opt, neg) in RULES.items():
        dropped = sum(1 for t, s in sent.items() if s[0] == port and expected_drop[t])
        assert counts.get(port) == dropped, f"rule {opt} negated={neg}: counter {counts.get(port)}, expected {dropped}"


def test_kit_module_is_loaded_not_in_tree(host, iprange_loaded):
    version = host.file("/sys/module/xt_iprange/version").content_string.strip()
    assert version.startswith("nflab-"), version
    assert host.file("/sys/module/xt_iprange/srcversion").exists
