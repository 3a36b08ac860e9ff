"""string: byte patterns in forwarded packets, both families, both backends.

* one DROP rule per port: --string with bm and kmp, ! --string, --icase,
  --hex-string; packets with and without the needle;
* --from/--to at the exact boundaries, bm and kmp (offsets count from the
  network header; a match must lie entirely inside [from, to));
* patterns that straddle boundaries: across two IPv4 fragments of one
  datagram (conntrack's defrag hands FORWARD one skb whose data is split
  over several blocks) KMP finds the needle, Boyer-Moore does not, as the
  textsearch API documents; across two datagrams, no algorithm matches;
* one rule, one encoding (as the classic plugin): a rule given with
  --hex-string of printable bytes, --from 0 and --to 65535 is saved as
  stock saves it, and that text, or any other spelling of the same rule,
  finds it with -C and deletes it with -D, both families and backends.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, clean_forward,  # noqa: F401
                                          add_rules, l3, rule_counters, send_tagged, sentinel)

pytestmark = pytest.mark.vm
NEEDLE = b"nflab-needle"
L3_LEN = {"ipv4": 20, "ipv6": 40}
UDP_LEN = 8


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, "xt_string")


def _udp(family, port, tag, data):
    from scapy.all import UDP
    c, s = PEERS[family]
    return l3(family)(src=c, dst=s) / UDP(sport=33000, dport=port) / data


def _run(host, wire, family, backend, rules, cases, tag):
    """rules: {port: match options}; cases: [(label, port, data_fn(tag) -> bytes, dropped)]"""
    tool = f"{TOOLS[family]}-{backend} -w"
    add_rules(host, [f"{tool} -A FORWARD -p udp --dport {port} -m string {opts} -j DROP"
                     for port, opts in rules.items()])
    pkts, meta = {}, {}
    for label, port, data_fn, dropped in cases:
        t = tag()
        pkts[t] = _udp(family, port, t, data_fn(t))
        meta[t] = (label, dropped)
    arrived = send_tagged(wire, pkts, sentinel=sentinel(family, tag()))
    wrong = [f"{meta[t][0]}: {'arrived' if t in arrived else 'dropped'}" for t in pkts
             if (t in arrived) == meta[t][1]]
    assert not wrong, "\n".join(wrong)
    # each port has one DROP rule: its counter is exactly the packets it dropped
    counts = rule_counters(host, TOOLS[family], backend)
    want = {str(p): sum(1 for t in pkts if meta[t][1] and pkts[t].dport == p) for p in rules}
    assert {p: counts.get(p, 0) for p in want} == want, f"rule counters {counts}, expected {want}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_patterns(host, wire, loaded, clean_forward, family, backend, tag):
    from nflab.tracing import payload

    rules = {40601: '--string "nflab-needle" --algo bm',
             40602: '--string "nflab-needle" --algo kmp',
             40603: '! --string "nflab-needle" --algo bm',
             40604: '--string "NFLAB-Needle" --algo bm --icase',
             40605: '--hex-string "|6e666c61 62|-needle" --algo kmp',
             40606: '--string "NFLAB-Needle" --algo kmp'}  # case-sensitive: matches neither
    with_n = lambda t: payload(t, 30) + NEEDLE + payload(t, 30)           # noqa: E731
    upper = lambda t: payload(t, 30) + NEEDLE.upper() + payload(t, 30)    # noqa: E731
    without = lambda t: payload(t, 30) + b"nflab-needl3" + payload(t, 30)  # noqa: E731
    cases = []
    for port, opts in rules.items():
        neg = opts.startswith("!")
        case_sensitive_upper = port == 40606
        cases += [(f"{opts} / needle", port, with_n, not neg and not case_sensitive_upper),
                  (f"{opts} / NEEDLE", port, upper, (port == 40604) != neg),
                  (f"{opts} / look-alike", port, without, neg)]
    _run(host, wire, family, backend, rules, cases, tag)


@pytest.mark.parametrize("algo", ["bm", "kmp"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_from_to_boundaries(host, wire, loaded, clean_forward, family, algo, tag, xtables):
    from nflab.tracing import payload

    lead = 36                                          # payload bytes before the needle
    start = L3_LEN[family] + UDP_LEN + lead            # needle offset from the network header
    end = start + len(NEEDLE)
    rules = {40611: f"--from {start} --to {end}",      # exactly fits: match
             40612: f"--from {start + 1}",             # starts after it: no match
             40613: f"--to {end - 1}",                 # cut off by one: no match
             40614: f"--from {start - 1} --to {end + 1}"}
    rules = {p: f'--string "nflab-needle" --algo {algo} {o}' for p, o in rules.items()}
    data = lambda t: payload(t, lead) + NEEDLE + payload(t, 24)   # noqa: E731
    cases = [(rules[p], p, data, p in (40611, 40614)) for p in rules]
    _run(host, wire, family, xtables.primary, rules, cases, tag)


def test_straddling_fragments_and_datagrams(host, wire, loaded, clean_forward, conntrack_on, tag,
                                            xtables):
    """IPv4 fragments of 256 bytes; the needle spans the boundary at UDP payload 248."""
    from scapy.all import IP, UDP, fragment
    from nflab.tracing import has_tag, payload

    bm, kmp = 40621, 40622
    tool = f"{xtables.tool('ipv4')} -w"
    add_rules(host, [f"{tool} -A FORWARD -p udp --dport {port} -m string --string nflab-needle --algo {algo} -j DROP"
                     for port, algo in ((bm, "bm"), (kmp, "kmp"))])
    c, s = PEERS["ipv4"]
    boundary = 256 - UDP_LEN
    results = {}
    for where, lead in (("inside the first fragment", 100), ("straddling the fragments", boundary - 5)):
        for port in (bm, kmp):
            t = tag()
            data = payload(t, lead) + NEEDLE + payload(t, 400)
            frags = fragment(IP(src=c, dst=s, id=t & 0xffff) / UDP(sport=33000, dport=port) / data, fragsize=256)
            assert len(frags) >= 2
            # a sentinel after them: once it is out, the datagram has arrived or been dropped
            stag, spkt = sentinel("ipv4", tag())
            since = wire.mark("server")
            wire.send("client", frags + [spkt])
            assert wire.sniff("server", lambda p, s_=stag: has_tag(p, s_), timeout=4.0, since=since), \
                "the sentinel did not come out on the server wire: the path is broken"
            got = wire.sniff("server", lambda p, t=t: has_tag(p, t), count=1, timeout=0, since=since)
            results[(where, "bm" if port == bm else "kmp")] = "arrived" if got else "dropped"
    assert results == {("inside the first fragment", "bm"): "dropped",
                       ("inside the first fragment", "kmp"): "dropped",
                       ("straddling the fragments", "bm"): "arrived",
                       ("straddling the fragments", "kmp"): "dropped"}, results
    # a needle split over two datagrams is in no packet: nothing matches
    pkts = {}
    for port in (bm, kmp):
        t1, t2 = tag(), tag()
        pkts[t1] = IP(src=c, dst=s) / UDP(sport=33001, dport=port) / (payload(t1, 40) + NEEDLE[:6])
        pkts[t2] = IP(src=c, dst=s) / UDP(sport=33001, dport=port) / (NEEDLE[6:] + payload(t2, 40))
    assert send_tagged(wire, pkts, sentinel=sentinel("ipv4", tag())) == set(pkts)


# spellings of one rule: the first is how it is added, the second how stock
# iptables-save prints it, the rest must find the same rule
SPELLINGS = ['--hex-string "|6e666c6162|" --algo bm --from 0 --to 65535',
             '--string "nflab" --algo bm',
             '--string "nflab" --algo bm --from 0',
             '--hex-string "nfl|6162|" --algo bm --to 65535']


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_saved_text_finds_the_rule(host, loaded, clean_forward, family, backend):
    tool = f"{TOOLS[family]}-{backend} -w"
    rule = "FORWARD -p udp --dport 40631 -m string {} -j DROP"
    add_rules(host, [f"{tool} -A {rule.format(SPELLINGS[0])}"])
    saved = [ln for ln in host.check_output(f"{TOOLS[family]}-{backend}-save -t filter").splitlines()
             if ln.startswith("-A FORWARD")]
    want = rule.format(SPELLINGS[1]).replace("-p udp", "-p udp -m udp")
    assert saved == [f"-A {want}"], saved
    missing = [s for s in SPELLINGS[1:] if host.run(f"{tool} -C {rule.format(s)}").rc != 0]
    assert not missing, f"-C does not find the rule added as {SPELLINGS[0]!r} by: {missing}"
    add_rules(host, [f"{tool} -D {rule.format(SPELLINGS[-1])}"])
    assert host.run(f"{tool} -C {rule.format(SPELLINGS[1])}").rc != 0, "-D left the rule"
