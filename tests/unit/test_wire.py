"""vm/wire.py against a fake QEMU end: real UDP sockets on 127.0.0.1, real scapy."""

from __future__ import annotations

import socket
import time

import pytest

from nflab.tracing import has_tag, magic, payload
from vm import qemu, topology
from vm.wire import Wire

sc = pytest.importorskip("scapy.all")


class FakeGuest:
    """The QEMU side of both wires: binds each Wire.guest port, sends to Wire.host."""

    def __init__(self):
        self.ports = qemu.allocate_ports()
        self.socks = {}
        for nic, w in self.ports.wire.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", w.guest))
            s.settimeout(2.0)
            self.socks[nic] = s

    def send(self, nic, pkt):
        self.socks[nic].sendto(bytes(pkt), ("127.0.0.1", self.ports.wire[nic].host))

    def recv(self, nic):
        raw, _ = self.socks[nic].recvfrom(65535)
        return sc.Ether(raw)

    def close(self):
        for s in self.socks.values():
            s.close()


@pytest.fixture
def fake():
    g = FakeGuest()
    w = Wire(g.ports.wire)
    yield g, w
    w.close()
    g.close()


def test_payload_every_fragment_carries_the_tag():
    data = payload(0x01020304, 1400)
    unit = magic() + bytes([1, 2, 3, 4])
    assert len(data) == 1400 and data.startswith(unit)
    for off in range(0, 1400 - 24, 8):       # IP fragment data starts on 8-byte offsets
        assert unit in data[off:off + 24]
    pkt = sc.IP(dst="198.51.100.2") / sc.UDP(dport=9) / data
    frags = sc.fragment(pkt, fragsize=256)
    assert len(frags) > 3
    assert all(has_tag(f, 0x01020304) for f in frags)
    assert not has_tag(frags[0], 0x01020305)


def test_magic_comes_from_the_tracer_definition():
    from kmods import spec
    assert magic() == spec.load("tracer").test["magic"].encode()
    assert len(magic()) == 8


def test_send_reaches_the_guest_side_with_peer_macs(fake):
    g, w = fake
    w.send("client", sc.IP(src="192.0.2.2", dst="198.51.100.2") / sc.UDP() / payload(7))
    got = g.recv("eth1")
    assert got.src == topology.CLIENT.peer_mac and got.dst == topology.CLIENT.guest_mac
    assert got[sc.IP].dst == "198.51.100.2" and has_tag(got, 7)
    w.send("server", [sc.IPv6(src="2001:db8:2::2", dst="2001:db8:1::2") / sc.UDP()] * 2)
    assert g.recv("eth2")[sc.IPv6].src == "2001:db8:2::2"
    assert g.recv("eth2")[sc.IPv6].src == "2001:db8:2::2"


def test_sniff_since_mark_and_filter(fake):
    g, w = fake
    s = topology.SERVER
    old = sc.Ether(src=s.guest_mac, dst=s.peer_mac) / sc.IP(dst=s.peer4) / sc.UDP() / payload(1)
    g.send("eth2", old)
    assert len(w.sniff("server", lambda p: has_tag(p, 1), timeout=2)) == 1
    mark = w.mark("server")
    for tag in (2, 3, 2):
        g.send("eth2", sc.Ether(src=s.guest_mac, dst=s.peer_mac) / sc.IP(dst=s.peer4)
               / sc.UDP() / payload(tag))
    got = w.sniff("server", lambda p: has_tag(p, 2), count=2, timeout=2, since=mark)
    assert len(got) == 2
    assert w.sniff("server", lambda p: has_tag(p, 1), since=mark, timeout=0.2) == []


def test_sniff_timeout_is_bounded(fake):
    _, w = fake
    t0 = time.monotonic()
    assert w.sniff("client", timeout=0.3) == []
    assert time.monotonic() - t0 < 1.0


def test_answers_arp_for_the_peer(fake):
    g, w = fake
    c = topology.CLIENT
    g.send("eth1", sc.Ether(src=c.guest_mac, dst="ff:ff:ff:ff:ff:ff")
           / sc.ARP(op=1, hwsrc=c.guest_mac, psrc=c.guest4, pdst=c.peer4))
    rep = g.recv("eth1")
    assert rep[sc.ARP].op == 2 and rep[sc.ARP].hwsrc == c.peer_mac and rep[sc.ARP].psrc == c.peer4
    # an ARP for someone else is swallowed, not answered, not buffered
    g.send("eth1", sc.Ether(src=c.guest_mac, dst="ff:ff:ff:ff:ff:ff")
           / sc.ARP(op=1, hwsrc=c.guest_mac, psrc=c.guest4, pdst="192.0.2.99"))
    time.sleep(0.3)
    assert w.stats()["client"]["answered"] == 1
    assert w.sniff("client", timeout=0.1) == []


def test_answers_neighbour_solicitation_for_the_peer(fake):
    g, w = fake
    s = topology.SERVER
    snm = "ff02::1:ff00:2"
    g.send("eth2", sc.Ether(src=s.guest_mac, dst="33:33:ff:00:00:02")
           / sc.IPv6(src=s.guest6, dst=snm, hlim=255)
           / sc.ICMPv6ND_NS(tgt=s.peer6) / sc.ICMPv6NDOptSrcLLAddr(lladdr=s.guest_mac))
    rep = g.recv("eth2")
    na = rep[sc.ICMPv6ND_NA]
    assert na.tgt == s.peer6 and na.S == 1 and rep[sc.ICMPv6NDOptDstLLAddr].lladdr == s.peer_mac
    assert rep[sc.IPv6].dst == s.guest6 and rep.dst == s.guest_mac


def test_bind_clash_is_a_clear_error(fake):
    g, _ = fake
    from ground.errors import VMError
    with pytest.raises(VMError, match="cannot bind"):
        Wire(g.ports.wire)


def test_missing_nic_is_a_clear_error():
    from ground.errors import VMError
    with pytest.raises(VMError, match="no wire for eth1"):
        Wire({})


def test_tags_in_finds_every_tag_a_frame_carries():
    from nflab.tracing import has_tag, payload, tags_in
    data = payload(7, 48) + b"xx" + payload(0x01020304, 30)
    assert tags_in(data) == {7, 0x01020304}
    assert tags_in(b"no magic here") == set()
    assert all(has_tag(data, t) for t in tags_in(data))
