"""portdrop: drop by destination port at a load-time priority.

The module is reloaded with ``port``/``proto``/``prio``. Packets to the port
must vanish (others arrive); a raw-table PREROUTING rule (priority -300, the
kernel's primary iptables backend: legacy, or nft where legacy xtables is
missing) counts the dropped packets only when portdrop sits after it, which
proves the priority took effect. A packet that claims UDP without holding its
ports is dropped (IPv4 tinygram, IPv6 chain past the end). Bad parameters make
insmod fail.
"""

from __future__ import annotations

import pytest

from tests.suites.catalog_helpers import (PEERS, TOOLS, assert_kit_module, l3, proc_lines,
                                          reload_module, rule_counters, send_tagged, sentinel)

pytestmark = pytest.mark.vm
MOD = "nflab_portdrop"
PORT = 40100


@pytest.fixture
def portdrop(host, routed, xtables):
    assert_kit_module(host, MOD)
    yield lambda params: reload_module(host, MOD, params)
    host.run("; ".join(f"{xtables.tool(fam)} -w -t raw -F PREROUTING" for fam in TOOLS))
    reload_module(host, MOD)             # back to the default: drops nothing


def _effective(host):
    return dict(kv.split("=") for kv in proc_lines(host, MOD, "config")[0][1:])


@pytest.mark.parametrize("prio,raw_sees", [(-350, False), (-250, True)])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_drop_at_priority(host, wire, portdrop, family, prio, raw_sees, tag, xtables):
    from scapy.all import TCP, UDP
    from nflab.tracing import payload

    res = portdrop(f"port={PORT} proto=udp prio={prio}")
    assert res.rc == 0, res.stderr
    assert _effective(host) == {"port": str(PORT), "proto": "udp", "prio": str(prio)}
    # the points claim where they are registered: the atlas and the tracer read this
    assert {int(w[3]) for w in proc_lines(host, MOD, "point")} == {prio}
    tool = TOOLS[family]
    host.run_test(f"{xtables.tool(family)} -w -t raw -A PREROUTING -p udp --dport {PORT} -j ACCEPT")
    client, server = PEERS[family]
    L3 = l3(family)
    drop, keep = {}, {}
    for i in range(3):
        t = tag()
        drop[t] = L3(src=client, dst=server) / UDP(sport=33000 + i, dport=PORT) / payload(t, 48)
    t = tag()
    keep[t] = L3(src=client, dst=server) / UDP(sport=33000, dport=PORT + 1) / payload(t, 48)
    t = tag()   # proto=udp: TCP to the same port passes
    keep[t] = L3(src=client, dst=server) / TCP(sport=33000, dport=PORT, flags="S") / payload(t, 48)
    arrived = send_tagged(wire, {**drop, **keep}, sentinel=sentinel(family, tag()))
    assert arrived == set(keep), f"arrived {sorted(arrived)}, expected only {sorted(keep)}"
    raw = rule_counters(host, tool, xtables.primary, table="raw", chain="PREROUTING").get(str(PORT), 0)
    assert raw == (len(drop) if raw_sees else 0), \
        f"raw PREROUTING (-300) counted {raw} with portdrop at {prio}"
    dropped = {(w[2], w[3]): int(w[4]) for w in proc_lines(host, MOD, "dropped")}
    assert dropped[(family, "PRE_ROUTING")] == len(drop)


def test_proto_any_and_tcp(host, wire, portdrop, tag):
    from scapy.all import IP, TCP, UDP
    from nflab.tracing import payload

    c, s = PEERS["ipv4"]
    for proto, dropped_l4 in (("any", {"udp", "tcp"}), ("tcp", {"tcp"})):
        assert portdrop(f"port={PORT} proto={proto}").rc == 0
        pkts, gone = {}, set()
        for l4, hdr in (("udp", UDP(sport=1, dport=PORT)), ("tcp", TCP(sport=1, dport=PORT, flags="S"))):
            t = tag()
            pkts[t] = IP(src=c, dst=s) / hdr / payload(t, 48)
            if l4 in dropped_l4:
                gone.add(t)
        assert send_tagged(wire, pkts, sentinel=sentinel("ipv4", tag())) == set(pkts) - gone, proto


def test_packets_without_their_ports_are_dropped(host, wire, portdrop, tag):
    """A packet that claims UDP but does not hold its ports is dropped, as
    xt_tcpudp and ip6_tables hotdrop it: an IPv4 tinygram of 2 bytes, and an
    IPv6 packet whose destination options header claims 2048 bytes (the ports
    would be past its end); a whole UDP packet to another port still passes."""
    from scapy.all import IP, UDP, IPv6, Raw
    from nflab.tracing import payload

    # before rh0drop (-350), which drops a chain past the end as well
    assert portdrop(f"port={PORT} proto=udp prio=-380").rc == 0
    (c4, s4), (c6, s6) = PEERS["ipv4"], PEERS["ipv6"]
    t_cut, t_keep = tag(), tag()
    pkts = {t_cut: IPv6(src=c6, dst=s6, nh=60) / Raw(bytes([17, 255]) + bytes(6) + payload(t_cut, 56)),
            t_keep: IPv6(src=c6, dst=s6) / UDP(sport=33000, dport=PORT + 1) / payload(t_keep, 48)}
    wire.send("client", IP(src=c4, dst=s4, proto=17) / Raw(b"\x81\x01"))
    assert send_tagged(wire, pkts, sentinel=sentinel("ipv6", tag())) == {t_keep}
    dropped = {(w[2], w[3]): int(w[4]) for w in proc_lines(host, MOD, "dropped")}
    assert (dropped[("ipv4", "PRE_ROUTING")], dropped[("ipv6", "PRE_ROUTING")]) == (1, 1), dropped


def test_default_drops_nothing(host, wire, portdrop, tag):
    from scapy.all import IP, UDP
    from nflab.tracing import payload

    assert portdrop("").rc == 0
    assert _effective(host) == {"port": "0", "proto": "any", "prio": "1"}
    t = tag()
    c, s = PEERS["ipv4"]
    assert send_tagged(wire, {t: IP(src=c, dst=s) / UDP(dport=PORT) / payload(t, 48)}) == {t}


@pytest.mark.parametrize("params", ["proto=icmp", "port=70000"])
def test_bad_params_refused(host, portdrop, params):
    res = portdrop(params)
    assert res.rc != 0
    assert not host.file(f"/sys/module/{MOD}").exists
