"""ipp2p: real peer-to-peer handshakes built with scapy, and look-alikes.

For each family and iptables backend one DROP rule per protocol selection
sits in FORWARD (``--edk``, ``--kazaa``, ``--bit``, ``--dc``, ``--gnu``,
``--ipp2p`` and ``--edk --kazaa --bit``), each on its own destination port
for TCP and UDP. Every sample - a real handshake of one protocol, or a
look-alike that must match nothing - is sent from the client wire to every
port; what reaches the server wire, and the rule counters, must be exactly
"dropped where the rule names the sample's protocol". Packets are told apart
by their source port (the handshakes are byte-exact, there is no room for a
payload tag: eDonkey UDP messages have fixed lengths).
"""

from __future__ import annotations

import struct

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, clean_forward,  # noqa: F401
                                          SENTINEL_PORT, add_rules, l3, rule_counters)

pytestmark = pytest.mark.vm

PROTOS = ("edk", "kazaa", "bit", "dc", "gnu")
# dport -> (rule options, protocols it names)
RULES = {
    40701: ("--edk", {"edk"}),
    40702: ("--kazaa", {"kazaa"}),
    40703: ("--bit", {"bit"}),
    40704: ("--dc", {"dc"}),
    40705: ("--gnu", {"gnu"}),
    40706: ("--ipp2p", set(PROTOS)),
    40707: ("--edk --kazaa --bit", {"edk", "kazaa", "bit"}),
}
HASH = bytes(range(0x10, 0x20))                     # a 16-byte eDonkey/MD4 hash
INFO_HASH = bytes(range(0x40, 0x54))                # 20-byte SHA-1 info hash
PEER_ID = b"-NF0001-" + b"abcdefghijkl"             # 20-byte peer id


def edk_tcp(opcode=0x01, body=None, length_delta=0, proto=0xe3):
    """eDonkey TCP message: proto, u32 LE length of opcode+body, opcode, body."""
    if body is None:   # hello: hash size, user hash, client id, port, 1 tag (name), server ip:port
        name = b"nflab"
        body = (b"\x10" + HASH + struct.pack("<IH", 0x0100007f, 4662) + struct.pack("<I", 1)
                + b"\x02\x01\x00\x01" + struct.pack("<H", len(name)) + name + struct.pack("<IH", 0, 0))
    msg = bytes([opcode]) + body
    return bytes([proto]) + struct.pack("<I", len(msg) + length_delta) + msg


def http(first, *headers):
    return (first + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


# (label, protocol or None for a look-alike, "tcp"/"udp", payload, tcp flags)
SAMPLES = [
    # eDonkey / eMule
    ("edk TCP hello", "edk", "tcp", edk_tcp(), "PA"),
    ("edk TCP hello answer (0x4c)", "edk", "tcp", edk_tcp(0x4c), "PA"),
    ("eMule TCP hello (0xc5)", "edk", "tcp", edk_tcp(proto=0xc5), "PA"),
    ("edk UDP server status request", "edk", "udp", b"\xe3\x96" + b"\x11\x22\x33\x44", None),
    ("eMule UDP reask file ping", "edk", "udp", b"\xc5\x90" + HASH, None),
    ("0xe3 with a wrong length", None, "tcp", edk_tcp(length_delta=1), "PA"),
    ("0xe3, right length, unknown opcode 0x02", None, "tcp", edk_tcp(0x02), "PA"),
    ("0xe3 0x96 UDP of 7 bytes", None, "udp", b"\xe3\x96" + b"\x11\x22\x33\x44\x55", None),
    # KaZaA
    ("KaZaA GET /.hash=", "kazaa", "tcp",
     http("GET /.hash=" + "0123456789abcdef0123456789abcdef01234567" + " HTTP/1.1", "Host: 198.51.100.2:1214",
          "UserAgent: KazaaClient Jul 24 2003 15:23:18", "X-Kazaa-Username: nflab",
          "X-Kazaa-Network: KaZaA"), "PA"),
    ("KaZaA GET / with X-Kazaa- headers", "kazaa", "tcp",
     http("GET /1234/song.mp3 HTTP/1.1", "Host: 198.51.100.2:1214", "X-Kazaa-Username: nflab",
          "X-Kazaa-SupernodeIP: 192.0.2.2:1214"), "PA"),
    ("KaZaA GIVE", "kazaa", "tcp", b"GIVE 1234:0123456789abcdef\r\n", "PA"),
    ("KaZaA UDP (ends KaZaA\\0)", "kazaa", "udp", b"\x27\x00\x00\x00\xa9\x80KaZaA\x00", None),
    ("plain GET /index.html", None, "tcp",
     http("GET /index.html HTTP/1.1", "Host: www.example.org", "User-Agent: curl/8.0"), "PA"),
    ("X-Kazaa- only in the body", None, "tcp",
     http("GET /index.html HTTP/1.1", "Host: www.example.org") + b"X-Kazaa-Username: body\r\n", "PA"),
    ("UDP text mentioning KaZaA", None, "udp", b"KaZaA is a file sharing network\n", None),
    # BitTorrent
    ("BitTorrent peer handshake", "bit", "tcp",
     b"\x13BitTorrent protocol" + b"\x00" * 5 + b"\x10\x00\x05" + INFO_HASH + PEER_ID, "PA"),
    ("BitTorrent tracker announce", "bit", "tcp",
     http("GET /announce?info_hash=%40%41%42%43%44%45%46%47%48%49%4a%4b%4c%4d%4e%4f%50%51%52%53"
          "&peer_id=-NF0001-abcdefghijkl&port=6881&uploaded=0&downloaded=0&left=1000 HTTP/1.0",
          "Host: tracker.example.org"), "PA"),
    ("BitTorrent DHT ping", "bit", "udp", b"d1:ad2:id20:" + PEER_ID + b"e1:q4:ping1:t2:aa1:y1:qe", None),
    ("BitTorrent UDP tracker connect", "bit", "udp",
     struct.pack(">QII", 0x41727101980, 0, 0x1234abcd), None),
    ("handshake bytes at offset 2", None, "tcp",
     b"xx\x13BitTorrent protocol" + b"\x00" * 8 + INFO_HASH + PEER_ID, "PA"),
    ("text with BitTorrent protocol", None, "tcp",
     http("GET /wiki/BitTorrent_protocol HTTP/1.1", "Host: en.wikipedia.org"), "PA"),
    ("UDP text quoting d1:ad2:id20:", None, "udp", b"the DHT query starts d1:ad2:id20: and ends in e", None),
    ("handshake in a FIN segment", None, "tcp",
     b"\x13BitTorrent protocol" + b"\x00" * 8 + INFO_HASH + PEER_ID, "FA"),
    # Direct Connect, Gnutella
    ("DC $MyNick", "dc", "tcp", b"$MyNick nflab|", "PA"),
    ("DC $Lock", "dc", "tcp", b"$Lock EXTENDEDPROTOCOLABCABCABCABCABCABC Pk=DCPLUSPLUS0.706|", "PA"),
    ("$MyNick without the closing |", None, "tcp", b"$MyNick nflab", "PA"),
    ("Gnutella CONNECT", "gnu", "tcp",
     http("GNUTELLA CONNECT/0.6", "User-Agent: LimeWire/4.12.6", "X-Ultrapeer: False"), "PA"),
    ("Gnutella UDP GND", "gnu", "udp", b"GND\x02\x00\x01\x01\x01" + b"\x00" * 8, None),
    ("text starting GNUTELLA", None, "tcp", b"GNUTELLA is a protocol\r\n", "PA"),
]


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, "xt_ipp2p")


def _packet(family, sport, dport, proto, data, flags):
    from scapy.all import TCP, UDP
    c, s = PEERS[family]
    l4 = (TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=1) if proto == "tcp"
          else UDP(sport=sport, dport=dport))
    return l3(family)(src=c, dst=s) / l4 / data


def _sport(p):
    from scapy.all import TCP, UDP
    for L4 in (TCP, UDP):
        if p.haslayer(L4):
            return p[L4].sport
    return None


SENTINEL_SPORT = 19999


def _send_keyed(wire, pkts: dict, family: str, timeout=8.0) -> set:
    """Send {sport: packet} from the client wire, then a sentinel no rule drops
    (UDP to the sentinel port, sport 19999): frames keep their order through the
    guest, so once it is out, every verdict is in. The set of sports that arrived."""
    from scapy.all import UDP
    c, s = PEERS[family]
    since = wire.mark("server")
    wire.send("client", list(pkts.values())
              + [l3(family)(src=c, dst=s) / UDP(sport=SENTINEL_SPORT, dport=SENTINEL_PORT) / b"nflab"])
    if not wire.sniff("server", lambda p: _sport(p) == SENTINEL_SPORT, timeout=timeout, since=since):
        raise AssertionError(f"the sentinel (UDP {SENTINEL_SPORT} -> {SENTINEL_PORT}), which no rule "
                             f"drops, did not come out on the server wire within {timeout}s")
    got = wire.sniff("server", lambda p: _sport(p) in pkts, count=len(pkts) + 1, timeout=0, since=since)
    return {_sport(p) for p in got}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_handshakes_and_look_alikes(host, wire, loaded, clean_forward, family, backend):
    tool = TOOLS[family]
    ipt = f"{tool}-{backend} -w"
    add_rules(host, [f"{ipt} -A FORWARD -p {l4} --dport {port} -m ipp2p {opts} -j DROP"
                     for port, (opts, _) in RULES.items() for l4 in ("tcp", "udp")])
    pkts, meta = {}, {}
    sport = 20000 + (1000 if family == "ipv6" else 0) + (500 if backend == "nft" else 0)
    for label, proto, l4, data, flags in SAMPLES:
        for port, (opts, names) in RULES.items():
            sport += 1
            pkts[sport] = _packet(family, sport, port, l4, data, flags)
            meta[sport] = (f"{label} -> -m ipp2p {opts}", port, proto in names)
    arrived = _send_keyed(wire, pkts, family)
    wrong = [f"{meta[s][0]}: {'arrived' if s in arrived else 'dropped'}, expected "
             f"{'dropped' if meta[s][2] else 'to arrive'}" for s in pkts if (s in arrived) == meta[s][2]]
    assert not wrong, "\n".join(wrong)
    counts = rule_counters(host, tool, backend)
    for port, (opts, _) in RULES.items():
        want = sum(1 for s in pkts if meta[s][1] == port and meta[s][2])
        assert counts.get(str(port)) == want, f"-m ipp2p {opts}: counter {counts.get(str(port))}, expected {want}"


def test_save_round_trip(host, loaded, clean_forward, xtables):
    for backend in xtables.usable:
        ipt = f"iptables-{backend} -w"
        host.run_test(f"{ipt} -A FORWARD -p tcp -m ipp2p --bit --kazaa --edk -j DROP")
        saved = host.check_output(f"iptables-{backend}-save -t filter")
        assert "-A FORWARD -p tcp -m ipp2p --edk --kazaa --bit -j DROP" in saved, saved
