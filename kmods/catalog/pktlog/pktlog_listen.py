#!/usr/bin/python3
"""pktlog-listen: the generic netlink events of nflab_pktlog, decoded.

    pktlog-listen [--json] [--count N] [--timeout S] [--follow]   # print events (listen)
    pktlog-listen stats [--reset] [--json]                         # counters, limit, filter
    pktlog-listen set [--rate N] [--burst N] [--filter F=V ...] [--all]

Python's own AF_NETLINK sockets, nothing else: the protocol is four
structures (nlmsghdr, genlmsghdr, nlattr, nlmsgerr) and the meaning of every
attribute comes from the decoder table the kit writes from the module's
definition (ext.toml), installed beside this program. The table's layout hash
must equal the one the module reports (GET), so a table and a module built
from different definitions refuse to talk instead of mis-decoding.

Exit status: 0 done (count reached, or the module was unloaded without
--follow), 1 an error (named on stderr), 2 table and module disagree, 3 the
timeout passed before --count events arrived.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import time

TABLE = "/usr/share/nflab/pktlog/attrs.json"

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_BROADCAST_ERROR = 4
NETLINK_EXT_ACK = 11
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG, NLMSGERR_ATTR_OFFS = 1, 2
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
GENL_ID_CTRL = 0x10
CTRL_CMD_NEWFAMILY, CTRL_CMD_DELFAMILY, CTRL_CMD_GETFAMILY = 1, 2, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_VERSION, CTRL_ATTR_MCAST_GROUPS = 1, 2, 3, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
NLMSGHDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
GENLHDR = struct.Struct("=BBH")         # cmd, version, reserved
NLAHDR = struct.Struct("=HH")           # len, type


class NetlinkError(Exception):
    """The kernel refused a request: errno and its extended-ack message."""

    def __init__(self, code: int, message: str = ""):
        self.code, self.message = code, message
        text = os.strerror(code) + (f" ({message})" if message else "")
        super().__init__(text)


# ---- wire format ------------------------------------------------------------

def align4(n: int) -> int:
    return (n + 3) & ~3


def nla(atype: int, payload: bytes = b"", nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes."""
    head = NLAHDR.pack(NLAHDR.size + len(payload), atype | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (align4(len(payload)) - len(payload))


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """[(type without flags, payload)]; stops at a truncated attribute."""
    out, off = [], 0
    while off + NLAHDR.size <= len(data):
        length, atype = NLAHDR.unpack_from(data, off)
        if length < NLAHDR.size or off + length > len(data):
            break
        out.append((atype & NLA_TYPE_MASK, data[off + NLAHDR.size:off + length]))
        off += align4(length)
    return out


def genl_message(family: int, cmd: int, attrs: bytes = b"", *, flags: int = NLM_F_REQUEST | NLM_F_ACK,
                 seq: int = 0, version: int = 1, reserved: int = 0) -> bytes:
    body = GENLHDR.pack(cmd, version, reserved) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, flags, seq, 0) + body


def split_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """[(type, flags, seq, payload)] of a datagram from the kernel."""
    out, off = [], 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            break
        out.append((mtype, flags, seq, data[off + NLMSGHDR.size:off + length]))
        off += align4(length)
    return out


def error_of(flags: int, payload: bytes) -> tuple[int, str]:
    """(errno, extended-ack message) of an NLMSG_ERROR payload; errno 0 is an ACK."""
    (code,) = struct.unpack_from("=i", payload)
    message = ""
    if flags & NLM_F_ACK_TLVS and len(payload) >= 4 + NLMSGHDR.size:
        inner_len = NLMSGHDR.unpack_from(payload, 4)[0]
        # the request comes back whole unless the kernel capped it to its header
        skip = 4 + (NLMSGHDR.size if flags & NLM_F_CAPPED else align4(inner_len))
        for atype, value in parse_attrs(payload[skip:]):
            if atype == NLMSGERR_ATTR_MSG:
                message = value.rstrip(b"\0").decode(errors="replace")
    return -code, message


# ---- the decoder table ------------------------------------------------------

class Table:
    """What every attribute id of the family means (written by the kit from ext.toml)."""

    SCALARS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "s32": "i", "be16": "!H"}

    def __init__(self, data: dict):
        self.data = data
        self.family, self.group = data["family"], data["group"]
        self.layout, self.commands = data["layout"], data["commands"]
        self.by_id = {a["id"]: a for a in data["attrs"]}
        self.by_name = {a["name"]: a for a in data["attrs"]}

    @classmethod
    def load(cls, path: str = TABLE) -> "Table":
        with open(path) as f:
            return cls(json.load(f))

    def id(self, name: str) -> int:
        return self.by_name[name]["id"]

    def decode(self, payload: bytes) -> dict:
        """{name: value} of a message's attributes; unknown ids as attr<N> hex."""
        out = {}
        for atype, value in parse_attrs(payload):
            attr = self.by_id.get(atype)
            if attr is None:
                out[f"attr{atype}"] = value.hex()
            elif attr["type"] != "pad":
                out[attr["name"]] = self.value(attr, value)
        return out

    def value(self, attr: dict, raw: bytes):
        kind = attr["type"]
        if kind in self.SCALARS:
            fmt = self.SCALARS[kind]
            number = struct.unpack(fmt if fmt.startswith("!") else "=" + fmt, raw)[0]
            return attr["names"].get(str(number), number) if attr["names"] else number
        if kind == "in_addr":
            return str(ipaddress.IPv4Address(raw))
        if kind == "in6_addr":
            return str(ipaddress.IPv6Address(raw))
        if kind == "ifname":
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        if kind == "flag":
            return True
        if kind == "nested":
            return self.decode(raw)
        return raw.hex()

    def encode(self, name: str, text: str) -> bytes:
        """The attribute for FIELD=VALUE as `set --filter` takes it."""
        attr = self.by_name.get(name)
        if attr is None or attr["role"] != "event":
            fields = ", ".join(a["name"] for a in self.data["attrs"] if a["role"] == "event")
            raise ValueError(f"unknown field {name!r} (fields: {fields})")
        kind = attr["type"]
        if kind in self.SCALARS:
            names = {v.lower(): int(k) for k, v in attr["names"].items()}
            number = names[text.lower()] if text.lower() in names else int(text, 0)
            fmt = self.SCALARS[kind]
            return nla(attr["id"], struct.pack(fmt if fmt.startswith("!") else "=" + fmt, number))
        if kind in ("in_addr", "in6_addr"):
            addr = ipaddress.ip_address(text)
            if (kind == "in_addr") != (addr.version == 4):
                raise ValueError(f"{name} takes an IPv{4 if kind == 'in_addr' else 6} address")
            return nla(attr["id"], addr.packed)
        if kind == "ifname":
            return nla(attr["id"], text.encode() + b"\0")
        raise ValueError(f"{name}: cannot filter on {kind}")


# ---- a generic netlink socket -------------------------------------------------

class Genl:
    """One NETLINK_GENERIC socket: requests with ACKs, family lookup, groups."""

    def __init__(self, rcvbuf: int = 0):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.seq = int(time.time()) & 0xFFFF

    def close(self):
        self.sock.close()

    def send(self, message: bytes):
        self.sock.send(message)

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def request(self, family: int, cmd: int, attrs: bytes = b"", *, flags: int = NLM_F_REQUEST | NLM_F_ACK,
                version: int = 1, reserved: int = 0) -> list[bytes]:
        """Send one request; the genl payloads of its answers (raises NetlinkError)."""
        seq = self.next_seq()
        self.send(genl_message(family, cmd, attrs, flags=flags, seq=seq, version=version,
                               reserved=reserved))
        return self.answers(seq)

    def answers(self, seq: int, timeout: float = 5.0) -> list[bytes]:
        """Payloads (after the genl header) of the replies to *seq*, up to its ACK."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no answer to request {seq} within {timeout}s")
            for mtype, flags, mseq, payload in split_messages(self.sock.recv(1 << 16)):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code, message = error_of(flags, payload)
                    if code:
                        raise NetlinkError(code, message)
                    return out
                if mtype == NLMSG_DONE:
                    return out
                out.append(payload)

    def family(self, name: str) -> dict:
        """{id, version, groups: {name: id}} of a registered family (ENOENT if none)."""
        (reply,) = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                                nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        return parse_family(reply[GENLHDR.size:])

    def join(self, group: int):
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)


def parse_family(attrs: bytes) -> dict:
    info = {"id": 0, "name": "", "version": 0, "groups": {}}
    for atype, value in parse_attrs(attrs):
        if atype == CTRL_ATTR_FAMILY_ID:
            info["id"] = struct.unpack("=H", value)[0]
        elif atype == CTRL_ATTR_FAMILY_NAME:
            info["name"] = value.rstrip(b"\0").decode()
        elif atype == CTRL_ATTR_VERSION:
            info["version"] = struct.unpack("=I", value)[0]
        elif atype == CTRL_ATTR_MCAST_GROUPS:
            for _index, group in parse_attrs(value):
                fields = dict(parse_attrs(group))
                gname = fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0").decode()
                if CTRL_ATTR_MCAST_GRP_ID in fields:
                    info["groups"][gname] = struct.unpack("=I", fields[CTRL_ATTR_MCAST_GRP_ID])[0]
    return info


def get_state(sock: Genl, table: Table, fam: dict, *, reset: bool = False) -> dict:
    """GET: counters, limit, layout and filter of this netns, decoded."""
    attrs = nla(table.id("reset")) if reset else b""
    (reply,) = sock.request(fam["id"], table.commands["get"], attrs)
    return table.decode(reply[GENLHDR.size:])


def check_layout(sock: Genl, table: Table, fam: dict):
    state = get_state(sock, table, fam)
    if state.get("layout") != table.layout:
        raise SystemExit(_die(f"the decoder table ({TABLE}, layout {table.layout:#010x}) and the "
                              f"loaded module (layout {state.get('layout', 0):#010x}) come from "
                              "different definitions: install both from one build", 2))


def _die(message: str, status: int = 1) -> int:
    print(f"pktlog-listen: {message}", file=sys.stderr)
    return status


# ---- listening ------------------------------------------------------------------

def describe(event: dict) -> str:
    """One human line: where, what, which flow."""
    src = event.get("saddr4") or event.get("saddr6") or "?"
    dst = event.get("daddr4") or event.get("daddr6") or "?"
    if "sport" in event:
        src, dst = f"{src}:{event['sport']}", f"{dst}:{event['dport']}"
    devs = f"in={event.get('indev', '-')} out={event.get('outdev', '-')}"
    lost = f" lost={event['lost']}" if event.get("lost") else ""
    return (f"{event.get('hook', '?')}/{event.get('priority', '?')} {event.get('nfproto', '?')} "
            f"{event.get('l4proto', '?')} {src} -> {dst} len={event.get('len', '?')} "
            f"mark={event.get('mark', 0):#x} {devs}{lost}")


class Listener:
    """Events of the family's group in this netns, plus the controller's notices
    (the family going away and coming back)."""

    def __init__(self, table: Table, args):
        self.table, self.args = table, args
        self.events = self.lost = self.overruns = 0
        self.sock = Genl(rcvbuf=args.rcvbuf)
        # an event this socket has no room for fails the kernel's send (ENOBUFS):
        # the module counts it as "overrun" instead of not knowing
        self.sock.sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
        self.req = Genl()       # requests on their own socket: no notice is read past
        self.fam = None

    def subscribe(self):
        self.fam = self.req.family(self.table.family)
        check_layout(self.req, self.table, self.fam)
        group = self.fam["groups"].get(self.table.group)
        if group is None:
            raise SystemExit(_die(f"family {self.table.family} has no group {self.table.group}"))
        try:
            self.sock.join(group)
        except PermissionError:
            raise SystemExit(_die(f"joining {self.table.family}/{self.table.group} needs "
                                  "CAP_NET_ADMIN in this network namespace"))

    def run(self) -> int:
        ctrl = self.req.family("nlctrl")
        self.sock.join(ctrl["groups"]["notify"])
        self.subscribe()
        if self.args.ready:
            with open(self.args.ready, "w") as f:
                f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + self.args.timeout if self.args.timeout else None
        while not self.args.count or self.events < self.args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return 3
            if not select.select([self.sock.sock], [], [], left)[0]:
                continue
            try:
                data = self.sock.sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                print("pktlog-listen: overrun: the kernel dropped events for this listener "
                      "(socket buffer full; see --rcvbuf)", file=sys.stderr)
                continue
            status = self.handle(data)
            if status is not None:
                return status
        return 0

    def handle(self, data: bytes) -> int | None:
        for mtype, _flags, _seq, payload in split_messages(data):
            cmd = payload[0] if payload else 0
            if mtype == GENL_ID_CTRL and cmd in (CTRL_CMD_DELFAMILY, CTRL_CMD_NEWFAMILY):
                if parse_family(payload[GENLHDR.size:])["name"] != self.table.family:
                    continue
                if cmd == CTRL_CMD_DELFAMILY:
                    print(f"pktlog-listen: family {self.table.family} removed (module unloaded)",
                          file=sys.stderr, flush=True)
                    if not self.args.follow:
                        return 0
                else:
                    self.subscribe()
                    print(f"pktlog-listen: family {self.table.family} back, id {self.fam['id']}",
                          file=sys.stderr, flush=True)
            elif self.fam and mtype == self.fam["id"] and cmd == self.table.commands["event"]:
                self.emit(self.table.decode(payload[GENLHDR.size:]))
        return None

    def emit(self, event: dict):
        self.events += 1
        self.lost += event.get("lost", 0)
        print(json.dumps(event, sort_keys=True) if self.args.json else describe(event), flush=True)

    def summary(self):
        print(f"pktlog-listen: {self.events} events, {self.lost} lost (reported by the kernel), "
              f"{self.overruns} overruns", file=sys.stderr, flush=True)


# ---- commands -------------------------------------------------------------------

def cmd_listen(table: Table, args) -> int:
    listener = Listener(table, args)
    try:
        return listener.run()
    finally:
        listener.summary()


def cmd_stats(table: Table, args) -> int:
    sock = Genl()
    fam = sock.family(table.family)
    check_layout(sock, table, fam)
    state = get_state(sock, table, fam, reset=args.reset)
    if args.json:
        print(json.dumps(state, sort_keys=True))
        return 0
    counters = [a["name"] for a in table.data["attrs"] if a["role"] == "counter"]
    print("stats " + " ".join(f"{name}={state.get(name, 0)}" for name in counters))
    print(f"limit rate={state.get('rate')} burst={state.get('burst')}")
    flt = state.get("filter") or {}
    print("filter " + (" ".join(f"{k}={v}" for k, v in flt.items()) or "all"))
    return 0


def cmd_set(table: Table, args) -> int:
    attrs = b""
    if args.rate is not None:
        attrs += nla(table.id("rate"), struct.pack("=I", args.rate))
    if args.burst is not None:
        attrs += nla(table.id("burst"), struct.pack("=I", args.burst))
    if args.filter or args.all:
        fields = b""
        for item in args.filter or []:
            name, sep, value = item.partition("=")
            if not sep:
                return _die(f"--filter {item!r}: use FIELD=VALUE")
            try:
                fields += table.encode(name, value)
            except (ValueError, KeyError) as exc:
                return _die(f"--filter {item!r}: {exc}")
        attrs += nla(table.id("filter"), fields, nested=True)
    if not attrs:
        return _die("nothing to set: give --rate, --burst, --filter or --all")
    sock = Genl()
    fam = sock.family(table.family)
    check_layout(sock, table, fam)
    sock.request(fam["id"], table.commands["set"], attrs)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pktlog-listen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default=TABLE, help="decoder table (default: %(default)s)")
    # without a command: listen
    ap.add_argument("--json", action="store_true", help="one JSON object per event")
    ap.add_argument("--count", type=int, default=0, help="exit after N events")
    ap.add_argument("--timeout", type=float, default=0, help="give up after S seconds (exit 3)")
    ap.add_argument("--follow", action="store_true", help="wait for a reloaded module")
    ap.add_argument("--ready", help="write the pid to FILE once subscribed")
    ap.add_argument("--rcvbuf", type=int, default=0, help="socket receive buffer, bytes")
    sub = ap.add_subparsers(dest="command")
    stats = sub.add_parser("stats", help="counters, rate limit and filter of this netns")
    stats.add_argument("--reset", action="store_true", help="zero the counters once read")
    stats.add_argument("--json", action="store_true")
    setp = sub.add_parser("set", help="change the filter or the rate limit of this netns")
    setp.add_argument("--rate", type=int, help="events per second")
    setp.add_argument("--burst", type=int, help="events at once")
    setp.add_argument("--filter", action="append", metavar="FIELD=VALUE",
                      help="report only packets with this field value (repeatable; replaces the filter)")
    setp.add_argument("--all", action="store_true", help="no filter: report every packet")
    return ap


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    # SIGTERM and SIGINT end a listener with its summary line, also when it was
    # started in the background of a shell (which would have SIGINT ignored)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    args = parser().parse_args(argv)
    try:
        table = Table.load(args.table)
    except (OSError, ValueError, KeyError) as exc:
        return _die(f"cannot read the decoder table {args.table}: {exc}")
    command = {"stats": cmd_stats, "set": cmd_set}.get(args.command, cmd_listen)
    try:
        return command(table, args)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return _die(f"no generic netlink family {table.family}: is the module loaded?")
        return _die(f"the kernel refused: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
