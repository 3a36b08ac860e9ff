"""Host-side L2 over a VM's packet wires: send and sniff Ethernet frames with scapy.

QEMU connects guest ``eth1`` (client side) and ``eth2`` (server side) to UDP
sockets on 127.0.0.1 (``-netdev dgram``, one Ethernet frame per datagram; see
``vm/qemu.py``): QEMU binds ``Wire.guest`` and sends the guest's frames to
``Wire.host``. A :class:`Wire` binds every ``Wire.host`` port and sends frames
to ``Wire.guest``, so the host plays the client and the server peers of
``vm/topology.py``.

* one receiver thread per side reads frames into a bounded buffer; each frame
  gets a sequence number, so a test takes a :meth:`Wire.mark` before it sends
  and sniffs only what arrived after it (no race with fast replies);
* the receiver answers ARP and IPv6 neighbour solicitations for the peer
  addresses (the guest has static neighbours too, see ``vm/topology.py``);
* scapy is imported once, in this process; nothing runs scapy in the guest.

Every wait is bounded: :meth:`Wire.sniff` returns what it has at its timeout.
"""

from __future__ import annotations

import collections
import importlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from ground.errors import VMError
from vm import lab, topology

BUFFER_FRAMES = 20000
JOURNAL_MAX = 500    # sent-frame summaries kept for the test report
RECV_POLL = 0.1      # seconds the receiver blocks before checking for stop


def _scapy():
    """scapy.all, imported on first use (about a second, once per process)."""
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    return importlib.import_module("scapy.all")


@dataclass
class Frame:
    n: int            # per-side sequence number
    at: float         # time.monotonic() when received
    raw: bytes
    _pkt: object = field(default=None, repr=False)

    @property
    def pkt(self):
        """The frame parsed by scapy (once)."""
        if self._pkt is None:
            self._pkt = _scapy().Ether(self.raw)
        return self._pkt


class _Port:
    """One side of the wire: a UDP socket, its receiver thread and frame buffer."""

    def __init__(self, side: topology.Side, host_port: int, guest_port: int, addr: str):
        self.side = side
        self.guest_addr = (addr, guest_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self.sock.bind((addr, host_port))
        except OSError as exc:
            self.sock.close()
            raise VMError(f"cannot bind the {side.name} wire on {addr}:{host_port}: {exc}",
                          hint="another process (a second test run?) holds this VM's wire") from exc
        self.sock.settimeout(RECV_POLL)
        self.frames: collections.deque[Frame] = collections.deque(maxlen=BUFFER_FRAMES)
        self.next_n = 0
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.sent = 0
        self.answered = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._receive, name=f"wire-{side.name}",
                                       daemon=True)
        self.thread.start()

    # -- receiving ----------------------------------------------------------
    def _receive(self):
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                if self._answer(raw):
                    continue
            except Exception as exc:  # never let a bad frame kill the receiver
                self.errors.append(f"auto-reply: {exc!r}")
            with self.cond:
                self.frames.append(Frame(self.next_n, time.monotonic(), raw))
                self.next_n += 1
                self.cond.notify_all()

    def _answer(self, raw: bytes) -> bool:
        """Answer ARP / NDP solicitations for the peer; True if *raw* was one."""
        if len(raw) < 14:
            return False
        ethertype = raw[12:14]
        s = self.side
        if ethertype == b"\x08\x06":
            sc = _scapy()
            pkt = sc.Ether(raw)
            arp = pkt[sc.ARP]
            if arp.op == 1 and arp.pdst == s.peer4:
                reply = (sc.Ether(src=s.peer_mac, dst=arp.hwsrc)
                         / sc.ARP(op=2, hwsrc=s.peer_mac, psrc=s.peer4,
                                  hwdst=arp.hwsrc, pdst=arp.psrc))
                self._send_raw(bytes(reply))
                self.answered += 1
            return True
        # IPv6 (no extension headers) + ICMPv6 type 135 (neighbour solicitation)
        if ethertype == b"\x86\xdd" and len(raw) > 54 and raw[20] == 58 and raw[54] == 135:
            sc = _scapy()
            pkt = sc.Ether(raw)
            ns = pkt[sc.ICMPv6ND_NS]
            if ns.tgt == s.peer6 or ipv6_equal(ns.tgt, s.peer6):
                ip6 = pkt[sc.IPv6]
                dst = ip6.src if ip6.src != "::" else "ff02::1"
                reply = (sc.Ether(src=s.peer_mac, dst=pkt.src)
                         / sc.IPv6(src=s.peer6, dst=dst, hlim=255)
                         / sc.ICMPv6ND_NA(tgt=s.peer6, R=0, S=int(ip6.src != "::"), O=1)
                         / sc.ICMPv6NDOptDstLLAddr(lladdr=s.peer_mac))
                self._send_raw(bytes(reply))
                self.answered += 1
            return True
        return False

    # -- sending ------------------------------------------------------------
    def _send_raw(self, raw: bytes):
        self.sock.sendto(raw, self.guest_addr)
        self.sent += 1

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2 * RECV_POLL + 1)
        self.sock.close()


def ipv6_equal(a: str, b: str) -> bool:
    return socket.inet_pton(socket.AF_INET6, a) == socket.inet_pton(socket.AF_INET6, b)


@dataclass(frozen=True)
class Sent:
    """One frame the host sent (the report's "packets sent")."""
    side: str
    summary: str
    raw: bytes

    def __str__(self) -> str:
        return f"{self.side} -> guest: {self.summary}"


class Wire:
    """Both wires of one VM, host side. Use as a context manager or call close()."""

    def __init__(self, ports: dict, *, addr: str = "127.0.0.1"):
        """*ports*: guest NIC name -> ``vm.qemu.Wire`` (or a dict with guest/host)."""
        self.ports: dict[str, _Port] = {}
        self.journal: list[Sent] = []
        try:
            for name, s in topology.SIDES.items():
                w = ports.get(s.dev)
                if w is None:
                    raise VMError(f"the VM has no wire for {s.dev} ({name} side)",
                                  hint="boot it with a kit that wires eth1/eth2 (invoke vm-up)")
                guest, host = (w["guest"], w["host"]) if isinstance(w, dict) else (w.guest, w.host)
                self.ports[name] = _Port(s, int(host), int(guest), addr)
        except BaseException:
            self.close()
            raise
        _scapy()  # warm: pay the import now, not inside a test's timeout

    @classmethod
    def for_vm(cls, vm: str = "default") -> "Wire":
        """The wire of running kit VM *vm* (ports from its ``vm.json``)."""
        return cls(lab.require(vm).wire)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for port in self.ports.values():
            port.close()
        self.ports = {}

    def _port(self, side: str) -> _Port:
        topology.side(side)
        try:
            return self.ports[side]
        except KeyError:
            raise VMError("the wire is closed") from None

    # -- API ----------------------------------------------------------------
    def mark(self, side: str | None = None) -> dict[str, int] | int:
        """Sequence number(s) of the next frame: pass as ``since`` to :meth:`sniff`."""
        if side is not None:
            port = self._port(side)
            with port.cond:
                return port.next_n
        return {name: self.mark(name) for name in self.ports}

    def frame(self, side: str, pkt):
        """*pkt* as an Ethernet frame from the *side* peer to the guest (adds Ether)."""
        sc = _scapy()
        s = topology.side(side)
        if not pkt.haslayer(sc.Ether):
            pkt = sc.Ether(src=s.peer_mac, dst=s.guest_mac) / pkt
        return pkt

    def send(self, side: str, pkts) -> int:
        """Send one scapy packet or a list (e.g. fragments) from the *side* peer."""
        port = self._port(side)
        if not isinstance(pkts, (list, tuple)) and not hasattr(pkts, "res"):
            pkts = [pkts]
        n = 0
        for pkt in pkts:
            frame = self.frame(side, pkt)
            raw = bytes(frame)
            port._send_raw(raw)
            self.journal.append(Sent(side, frame.summary(), raw))
            n += 1
        del self.journal[:-JOURNAL_MAX]
        return n

    def take_sent(self) -> list["Sent"]:
        """The frames sent since the last take (side, summary, bytes), for test reports."""
        out, self.journal[:] = list(self.journal), []
        return out

    def received_since(self, since: dict) -> list[tuple[str, bytes]]:
        """(side, raw frame) of every frame still buffered that arrived after *since*
        (a :meth:`mark`); nothing is parsed."""
        out = []
        for name, port in self.ports.items():
            first = since.get(name, 0) if isinstance(since, dict) else 0
            with port.cond:
                frames = [f for f in port.frames if f.n >= first]
            out += [(name, f.raw) for f in frames]
        return out

    def sniff(self, side: str, filter_fn=None, *, count: int = 1, timeout: float = 3.0,
              since: int | dict | None = None) -> list:
        """Frames (scapy packets) received on *side* after *since* that pass
        *filter_fn*; returns as soon as *count* matched, or what matched by *timeout*.
        ``since`` defaults to every frame still buffered."""
        port = self._port(side)
        if isinstance(since, dict):
            since = since.get(side)
        since = since or 0
        deadline = time.monotonic() + max(0.0, timeout)
        checked = since
        found = []
        with port.cond:
            while True:
                for f in list(port.frames):
                    if f.n < checked:
                        continue
                    checked = f.n + 1
                    if filter_fn is None or filter_fn(f.pkt):
                        found.append(f.pkt)
                        if len(found) >= count:
                            return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return found
                port.cond.wait(min(left, 0.5))

    def exchange(self, out_side: str, pkts, in_side: str, filter_fn=None, *, count: int = 1,
                 timeout: float = 3.0) -> list:
        """Send *pkts* on *out_side*, then sniff *in_side* for frames that arrive after."""
        since = self.mark(in_side)
        self.send(out_side, pkts)
        return self.sniff(in_side, filter_fn, count=count, timeout=timeout, since=since)

    def stats(self) -> dict:
        return {name: {"received": p.next_n, "sent": p.sent, "answered": p.answered,
                       "errors": list(p.errors[-5:])} for name, p in self.ports.items()}
