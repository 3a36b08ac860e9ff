"""The workshop suites' own verdicts, against a simulated guest: a wrong answer is
red and the assertion says what was counted and what was expected (no VM)."""

from __future__ import annotations

import pytest

from tests.workshop import test_ex01_count as ex01
from tests.workshop import test_ex02_prio as ex02

SSH_BYTES = 300         # what one SSH command of the suite adds at PRE_ROUTING


class _File:
    def __init__(self, text):
        self.content_string = text
        self.exists = True


class CounterGuest:
    """ex01's module: *per_packet(len)* bytes per packet; each SSH command adds SSH_BYTES."""

    def __init__(self, per_packet, clears=True):
        self.per_packet, self.clears = per_packet, clears
        self.packets = self.nbytes = 0

    def receive(self, length):
        self.packets += 1
        self.nbytes += self.per_packet(length)

    def file(self, path):
        self.receive(SSH_BYTES)
        return _File(f"point ipv4 PRE_ROUTING -300 1 {self.packets}\n"
                     f"bytes ipv4 PRE_ROUTING {self.nbytes}\n")

    def run_test(self, cmd):
        self.receive(SSH_BYTES)
        if self.clears and cmd.startswith("echo clear"):
            self.packets = self.nbytes = 0


def _tags():
    counter = iter(range(1000, 2000))
    return lambda: next(counter)


def _wire_into(monkeypatch, module, guest):
    def send_tagged(wire, pkts):
        for pkt in pkts.values():
            guest.receive(len(bytes(pkt)))
        return set(pkts)
    monkeypatch.setattr(module, "send_tagged", send_tagged)


@pytest.mark.parametrize("per_packet", [lambda n: n, lambda n: 2 * n, lambda n: 1],
                         ids=["len", "len*2", "one"])
def test_ex01_bytes_need_each_length_once(monkeypatch, per_packet):
    guest = CounterGuest(per_packet)
    _wire_into(monkeypatch, ex01, guest)
    if per_packet(7) == 7:
        ex01.test_forwarded_bytes_counted(guest, None, None, None, _tags())
        return
    with pytest.raises(AssertionError) as info:
        ex01.test_forwarded_bytes_counted(guest, None, None, None, _tags())
    want = ex01.N * (20 + 8 + ex01.SIZE)
    assert f"expected {want} ({ex01.N} packets of {20 + 8 + ex01.SIZE} IP bytes)" in str(info.value)


def test_ex01_clear_blames_the_count_not_clear(monkeypatch):
    guest = CounterGuest(lambda n: 1)
    _wire_into(monkeypatch, ex01, guest)
    with pytest.raises(AssertionError) as info:
        ex01.test_clear_zeroes_bytes(guest, None, None, None, _tags())
    text = str(info.value)
    assert "counted 11 bytes, expected at least 14280" in text and "byte count first" in text


@pytest.mark.parametrize("clears", [True, False])
def test_ex01_clear(monkeypatch, clears):
    guest = CounterGuest(lambda n: n, clears=clears)
    _wire_into(monkeypatch, ex01, guest)
    if clears:
        ex01.test_clear_zeroes_bytes(guest, None, None, None, _tags())
        return
    with pytest.raises(AssertionError, match="after clear the PRE_ROUTING bytes are"):
        ex01.test_clear_zeroes_bytes(guest, None, None, None, _tags())


class PrioGuest:
    """ex02's module at *prio*: it sees the marked packets only between mangle and nat."""

    def __init__(self, prio):
        self.prio = prio

    def file(self, path):
        seen = ex02.N if ex02.MANGLE < self.prio < ex02.NAT else 0
        return _File(f"point ipv4 PRE_ROUTING {self.prio} 1 0\nseen {seen}\n")

    def run_test(self, cmd):
        pass


class _Rules:
    def add(self, *args):
        pass


class _Wire:
    def __init__(self, port):
        self.port = port

    def mark(self, side):
        return 0

    def sniff(self, side, match, count, timeout, since):
        from scapy.all import IP, UDP
        return [IP() / UDP(dport=self.port + 1)] * count


@pytest.mark.parametrize("prio,words", [
    (-175, "before mangle (-150): the MARK is not set yet"),
    (-150, "before mangle (-150): the MARK is not set yet"),
    (-100, "after nat (-100): DNAT has already rewritten the port to 40201"),
    (0, "after nat (-100): DNAT has already rewritten the port to 40201"),
])
def test_ex02_port_test_names_the_real_reason(monkeypatch, prio, words):
    monkeypatch.setattr(ex02, "send_tagged", lambda wire, pkts: set(pkts))
    with pytest.raises(AssertionError) as info:
        ex02.test_sees_the_port_before_nat(PrioGuest(prio), _Wire(40200), None, (42, 40200),
                                           _Rules(), _tags())
    assert f"the hook sits at {prio}, {words}" in str(info.value)
    if prio <= ex02.MANGLE:
        assert "DNAT" not in str(info.value)


def test_ex02_mark_test_before_mangle(monkeypatch):
    monkeypatch.setattr(ex02, "send_tagged", lambda wire, pkts: set(pkts))
    with pytest.raises(AssertionError, match="sits at -175, before mangle"):
        ex02.test_sees_the_mangle_mark(PrioGuest(-175), _Wire(40200), None, (42, 40200),
                                       _Rules(), _tags())
    ex02.test_sees_the_mangle_mark(PrioGuest(-125), _Wire(40200), None, (42, 40200),
                                   _Rules(), _tags())
