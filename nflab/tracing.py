"""The packet-path tracer's side of the kit: tagged test packets, reading its
log, checking placement claims against it, and what became of each packet.

The suites, the negative variant test, the per-test reports (nflab/report.py),
the atlas and the unit tests all use these functions, so "the check that
catches a misplaced hook" is one piece of code. The lab (vm/) only carries the
frames (vm/wire.py) and runs the commands.

``/proc/net/<module>`` (see ``kmods/catalog/tracer/nflab_tracer.c.j2``)::

    point <family> <hook> <priority> <registered> <packets>      # the claims: the definition's (portdrop: its prio=)
    ring size=1024 used=3 dropped=0 seq=17
    entry seq=14 point=1 family=ipv4 hook=PRE_ROUTING priority=-450 in=eth1 out=- mark=0x0
          ct=none l3=ipv4 src=192.0.2.2 dst=198.51.100.2 proto=17 frag=0 len=92 tag=00010203
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shlex
import time
from dataclasses import dataclass, field

from ground.errors import VMError
from kmods import build, spec
from supply import kernels
from vm import lab, topology

MODULE = "nflab_tracer"
HOOK_ORDER = ("INGRESS", "PRE_ROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POST_ROUTING")
NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6", "netdev": "netdev"}
NFT_HOOK = {"PRE_ROUTING": "prerouting", "LOCAL_IN": "input", "FORWARD": "forward",
            "LOCAL_OUT": "output", "POST_ROUTING": "postrouting", "INGRESS": "ingress"}

# the documented priorities of the stock tables, defrag and conntrack
# (NF_IP_PRI_* == NF_IP6_PRI_*, include/uapi/linux/netfilter_ipv4.h): the one
# table the labels, fate() and the atlas (nflab/atlas.py) all read
DOCUMENTED = {"defrag": -400, "raw": -300, "conntrack": -200, "mangle": -150, "filter": 0, "security": 50}
# iptables-nft's own base chains (iptables' nft.c): security at 150, not NF_IP_PRI_SECURITY
DOCUMENTED_NFT = {**DOCUMENTED, "security": 150}
NAT_DOCUMENTED = {"PRE_ROUTING": -100, "LOCAL_OUT": -100, "LOCAL_IN": 100, "POST_ROUTING": 100}


def documented(backend: str | None = None) -> dict:
    """The stock priorities of *backend*: ``nft``/``iptables-nft`` (an nft-only
    kernel's tables are iptables-nft base chains, security at 150), anything
    else the kernel's own xt tables (``legacy``, the default)."""
    return DOCUMENTED_NFT if backend in ("nft", "iptables-nft") else DOCUMENTED


# which stock tables sit at each hook (the kernel's valid_hooks): defrag, raw and
# conntrack's entry where packets enter (PRE_ROUTING, LOCAL_OUT), nat's DNAT there
# too and its SNAT where they leave or are delivered; conntrack's confirm at
# LOCAL_IN/POST_ROUTING runs last (INT_MAX), after every tracer point
_AT_HOOK = {
    "INGRESS": (),
    "PRE_ROUTING": ("defrag", "raw", "conntrack", "mangle", "nat"),
    "LOCAL_IN": ("mangle", "filter", "security", "nat"),
    "FORWARD": ("mangle", "filter", "security"),
    "LOCAL_OUT": ("defrag", "raw", "conntrack", "mangle", "nat", "filter", "security"),
    "POST_ROUTING": ("mangle", "nat"),
}


def stock_at(hook: str, backend: str | None = None) -> dict:
    """priority -> name of the stock tables (defrag, conntrack) at *hook* with
    *backend*'s priorities (:func:`documented`), for messages and point labels."""
    prios = documented(backend)
    out = {}
    for name in _AT_HOOK.get(hook, ()):
        if name == "nat":
            prio = NAT_DOCUMENTED[hook]
            name = "nat dst" if prio < 0 else "nat src"
        else:
            prio = prios[name]
        out[prio] = name
    return dict(sorted(out.items()))


# the kernel's xt tables (iptables-legacy); iptables-nft: stock_at(hook, "nft")
STOCK_AT = {hook: stock_at(hook) for hook in _AT_HOOK}

FORWARD = ("PRE_ROUTING", "FORWARD", "POST_ROUTING")
LOCAL_IN = ("PRE_ROUTING", "LOCAL_IN")
LOCAL_OUT = ("LOCAL_OUT", "POST_ROUTING")


@dataclass(frozen=True)
class Point:
    index: int
    family: str
    hook: str
    priority: int
    registered: bool
    packets: int

    @property
    def key(self) -> tuple:
        return (self.family, self.hook, self.priority)


@dataclass(frozen=True)
class Entry:
    seq: int
    point: int
    family: str
    hook: str
    priority: int
    indev: str
    outdev: str
    mark: int
    ct: str
    l3: str
    src: str
    dst: str
    proto: int
    frag: bool
    len: int
    tag: int

    @property
    def key(self) -> tuple:
        return (self.family, self.hook, self.priority)

    def __str__(self) -> str:
        return (f"#{self.seq} {self.family}/{self.hook}/{self.priority} in={self.indev} "
                f"out={self.outdev} mark={self.mark:#x} ct={self.ct} {self.src}->{self.dst} "
                f"proto={self.proto}{' frag' if self.frag else ''} len={self.len} tag={self.tag:08x}")


@dataclass
class Log:
    points: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    size: int = 0
    used: int = 0
    dropped: int = 0
    next_seq: int = 0

    def tagged(self, tag: int) -> list:
        return [e for e in self.entries if e.tag == tag]

    def text(self, tag: int | None = None) -> str:
        entries = self.entries if tag is None else self.tagged(tag)
        return "\n".join(str(e) for e in entries) or "(no entries)"


_KV = re.compile(r"(\w+)=(\S*)")


def parse(text: str) -> Log:
    """Parse the proc file; unknown lines are ignored, malformed entries raise ValueError."""
    log = Log()
    index = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "point" and len(parts) == 6:
            log.points.append(Point(index, parts[1], parts[2], int(parts[3]),
                                    parts[4] == "1", int(parts[5])))
            index += 1
        elif parts[0] == "ring":
            kv = dict(_KV.findall(line))
            log.size, log.used = int(kv["size"]), int(kv["used"])
            log.dropped, log.next_seq = int(kv["dropped"]), int(kv["seq"])
        elif parts[0] == "entry":
            kv = dict(_KV.findall(line))
            try:
                log.entries.append(Entry(
                    seq=int(kv["seq"]), point=int(kv["point"]), family=kv["family"],
                    hook=kv["hook"], priority=int(kv["priority"]), indev=kv["in"],
                    outdev=kv["out"], mark=int(kv["mark"], 16), ct=kv["ct"], l3=kv["l3"],
                    src=kv["src"], dst=kv["dst"], proto=int(kv["proto"]),
                    frag=kv["frag"] == "1", len=int(kv["len"]), tag=int(kv["tag"], 16)))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"malformed tracer entry {line!r}: {exc}") from exc
    return log


# ---------------------------------------------------------------- placement checks

def expected_path(points, family: str, hooks, *, ingress: bool = False, skip=None) -> list:
    """The (family, hook, priority) visits a packet of *family* must make along
    *hooks*: netdev INGRESS points first if *ingress*, then every point of each
    hook in the order of the priorities the definition claims."""
    want = []
    if ingress:
        want += sorted((p.key for p in points if p.family == "netdev" and p.hook == "INGRESS"),
                       key=lambda k: k[2])
    for hook in hooks:
        want += sorted((p.key for p in points if p.family == family and p.hook == hook),
                       key=lambda k: k[2])
    if skip:
        want = [k for k in want if not skip(k)]
    return want


def _fmt(keys) -> str:
    return " ".join(f"{h}/{p}" for _, h, p in keys) or "(none)"


def path_problems(entries, points, family: str, hooks, *, ingress: bool = False,
                  skip=None) -> list[str]:
    """Why the visits in *entries* (one packet, log order) differ from the claimed
    path; empty when the packet visited exactly the expected points in claimed
    priority order. This is the placement check every suite uses."""
    observed = [e.key for e in entries]
    expected = expected_path(points, family, hooks, ingress=ingress, skip=skip)
    if observed == expected:
        return []
    problems = []
    missing = [k for k in expected if k not in observed]
    extra = [k for k in observed if k not in expected]
    if missing:
        problems.append(f"never visited: {_fmt(missing)}")
    if extra:
        problems.append(f"unexpected visits: {_fmt(extra)}")
    # same visits, different order: a point ran at another priority than it claims
    for i, (a, b) in enumerate(zip(observed, observed[1:])):
        if a[1] == b[1] and a[0] == b[0] and a[2] > b[2]:
            problems.append(f"{a[0]} {a[1]}: the point claiming priority {a[2]} ran before the "
                            f"one claiming {b[2]} (visit {i + 1}); it is registered elsewhere "
                            "than its definition claims")
    problems.append(f"expected: {_fmt(expected)}")
    problems.append(f"observed: {_fmt(observed)}")
    return problems


def at(entries, hook: str, priority: int, family: str | None = None) -> list:
    return [e for e in entries if e.hook == hook and e.priority == priority
            and (family is None or e.family == family)]


class HookRow(tuple):
    """One ``nft list hooks`` row: unpacks, indexes and compares with a plain tuple
    as (family, hook, priority, function, module); :attr:`device` is the netdev
    device the hook is attached to ("" for the other families). Two rows compare
    equal only on the same device, so rows of different devices stay distinct in
    sets and dicts."""

    def __new__(cls, family, hook, priority, function, module, device=""):
        row = super().__new__(cls, (family, hook, priority, function, module))
        row.device = device
        return row

    def __eq__(self, other):
        if isinstance(other, HookRow) and self.device != other.device:
            return False
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return f"HookRow{tuple.__repr__(self)[:-1]}, device={self.device!r})"

    def __reduce__(self):
        return (HookRow, (*self, self.device))


def nft_hooks_command(device: str) -> str:
    """The guest command whose ``nft list hooks`` output reads the same with the
    guests' nftables 1.0.6 (bookworm) and 1.1.x (trixie): the ip and ip6 hooks,
    then netdev's on *device* only. A plain ``nft list hooks`` differs: 1.0.6
    lists no netdev hooks, >= 1.1.1 those of every interface."""
    return f"nft list hooks ip; nft list hooks ip6; nft list hooks netdev device {shlex.quote(device)}"


# a hook line: "-0000000150 iptable_mangle_hook [iptable_mangle]", an nf_tables base
# chain "chain ip mangle PREROUTING [nf_tables]", a flowtable (nftables >= 1.1.4)
# "flowtable inet t ft [nf_tables]", a BPF program (>= 1.0.8) "nf_hook_run_bpf id 7",
# or the priority alone (no function name)
_HOOK_ROW = re.compile(r"([+-]?\d+)(?: (.+?))?(?: \[(\S+)\])?$")


def nft_hook_lines(text: str, device: str | None = None) -> list[HookRow]:
    """``nft list hooks`` as :class:`HookRow` (family, hook, priority, function,
    module; .device) rows.

    nftables >= 1.1 names a netdev hook's device (``hook ingress device eth1 {``),
    1.0.6 does not (``hook ingress {``): its netdev rows get *device*, the one the
    listing was asked for (``nft list hooks netdev device X``). A netdev hook
    block listed a second time (the same family, hook and device: a plain
    ``nft list hooks`` of nftables >= 1.1.1 walks every interface, then an
    explicit ``netdev device X`` lists X again) adds no rows."""
    rows: list[HookRow] = []
    family = hook = dev = None
    seen_blocks: set = set()
    skip = False
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"family (\S+) \{$", s)
        if m:
            family, hook, skip = m.group(1), None, False
            continue
        m = re.match(r"hook (\S+)(?: device (\S+))? \{$", s)
        if m:
            hook, dev = m.group(1), m.group(2) or (device if family == "netdev" else None) or ""
            block = (family, hook, dev)
            skip = family == "netdev" and block in seen_blocks
            seen_blocks.add(block)
            continue
        if s == "}":
            continue
        m = _HOOK_ROW.match(s)
        if m and family and hook and not skip:
            rows.append(HookRow(family, hook, int(m.group(1)), m.group(2) or "", m.group(3) or "",
                                dev))
    return rows


def _where(key: tuple) -> str:
    family, hook, prio, dev = key
    return f"{family} {hook}{f' device {dev}' if dev else ''} {prio}"


def nft_problems(text: str, points, module: str = MODULE, device: str | None = None) -> list[str]:
    """Compare where the kernel says *module*'s hooks run (``nft list hooks``) with
    the points the definition claims. *device*: the device the definition's
    netdev points attach to (its ``ingress_dev``); a netdev hook of *module* on
    any other device is one the definition does not claim. Without *device*
    netdev rows match whatever device they are on."""
    seen: dict = {}
    for row in nft_hook_lines(text, device):
        family, hook, prio, _fn, mod = row
        if mod == module:
            key = (family, hook, prio, row.device if family == "netdev" else "")
            seen[key] = seen.get(key, 0) + 1
    problems = []
    for p in points:
        fam, hook = NFT_FAMILY[p.family], NFT_HOOK[p.hook]
        if fam == "netdev":
            devs = [device] if device is not None else \
                sorted({k[3] for k in seen if k[:3] == (fam, hook, p.priority)}) or [""]
        else:
            devs = [""]
        key = next((k for k in ((fam, hook, p.priority, d) for d in devs) if seen.get(k)), None)
        if key is None:
            on = f" on {device}" if fam == "netdev" and device is not None else ""
            others = [f"{prio} on {dev}" if dev else str(prio)
                      for prio, dev in sorted(k[2:] for k in seen if k[:2] == (fam, hook))]
            problems.append(f"{p.family} {p.hook}: claims priority {p.priority}{on}, the kernel has "
                            f"{module} at {', '.join(others) or 'none'} there")
        else:
            seen[key] -= 1
    leftover = sorted(k for k, n in seen.items() if n > 0)
    if leftover:
        problems.append(f"{module} hooks no definition claims: "
                        + ", ".join(_where(k) for k in leftover))
    return problems


# ---------------------------------------------------------------- the tracer in a guest

TRACER_HINT = "is the tracer loaded in this VM? invoke install --name=tracer"


class Tracer:
    """The tracer's proc file through a ``run(cmd) -> (rc, stdout, stderr)``."""

    def __init__(self, run, module: str = MODULE):
        self.run = run
        self.module = module
        self.proc = f"/proc/net/{module}"

    def read(self) -> Log:
        rc, out, err = self.run(f"cat {self.proc}")
        if rc != 0:
            raise VMError(f"cannot read {self.proc}: {err.strip()}",
                          hint=TRACER_HINT)
        return parse(out)

    def clear(self) -> None:
        rc, out, err = self.run(f"echo clear > {self.proc}")
        if rc != 0:
            raise VMError(f"cannot clear {self.proc}: {err.strip()}",
                          hint=TRACER_HINT)

    def wait(self, tag: int, count: int, *, timeout: float = 5.0, settle: float = 0.0) -> Log:
        """Read until at least *count* entries carry *tag* (or *timeout*); with
        *settle*, keep reading until the count has not grown for that long."""
        deadline = time.monotonic() + timeout
        last, stable_since = -1, time.monotonic()
        while True:
            log = self.read()
            n = len(log.tagged(tag))
            if n != last:
                last, stable_since = n, time.monotonic()
            if n >= count and time.monotonic() - stable_since >= settle:
                return log
            if time.monotonic() > deadline:
                return log
            time.sleep(0.05)


def ensure_loaded(vm: str, module: str = MODULE) -> str | None:
    """The catalog tracer in kit VM *vm*: built for its kernel and inserted without
    parameters (the definition's defaults) unless this very build is already loaded
    (same srcversion, ``/root/<module>.ko`` present: what the suites' ``tracer``
    fixture checks too, so they do not insert it again). Returns a note for the
    report when it had to load it, None when it was there."""
    st = lab.require(vm)
    art = build.build_extension(spec.load("tracer"), kernels.by_release(st.release), with_plugin=False)
    dest = f"/root/{module}.ko"
    res = lab.exec(vm, f"cat /sys/module/{module}/srcversion 2>/dev/null; "
                       f"test -e {dest} && echo present", timeout=60)
    if res.stdout.split() == [art.srcversion, "present"]:
        return None
    lab.copy_to(vm, art.ko, dest, mode=0o644)
    lab.exec(vm, f"rmmod {module} 2>/dev/null; insmod {dest}", timeout=60, check=True)
    return f"{module} was loaded for this report (srcversion {art.srcversion})"


def host_runner(host):
    """A run(cmd) for a testinfra host."""
    def run(cmd):
        res = host.run(cmd)
        return res.rc, res.stdout, res.stderr
    return run


def q(s: str) -> str:
    return shlex.quote(s)


# ---------------------------------------------------------------- tagged payloads

MAGIC_DEFAULT = b"NFLbTRC!"


@functools.lru_cache(maxsize=None)
def magic() -> bytes:
    """The tracer's payload magic, from its definition (``test.magic``); read once
    (suites match thousands of frames against tags)."""
    try:
        return spec.load("tracer").test["magic"].encode("ascii")
    except Exception:
        return MAGIC_DEFAULT


def payload(tag: int, size: int = 64, *, magic_bytes: bytes | None = None) -> bytes:
    """*size* bytes of (magic + 4-byte big-endian tag) repeated, so any slice of
    at least twice the unit (24 bytes) - every IP fragment - carries one whole copy."""
    unit = (magic_bytes or magic()) + int(tag).to_bytes(4, "big")
    reps = size // len(unit) + 1
    return (unit * reps)[:size]


def has_tag(pkt, tag: int, *, magic_bytes: bytes | None = None) -> bool:
    """True if *pkt*'s bytes carry the magic + *tag* unit."""
    unit = (magic_bytes or magic()) + int(tag).to_bytes(4, "big")
    return unit in bytes(pkt)


def tags_in(pkt, *, magic_bytes: bytes | None = None) -> set[int]:
    """Every tag *pkt* carries (its magic + 4-byte tag units), in one pass over
    its bytes: for matching many frames against many tags."""
    m = magic_bytes or magic()
    raw, out, i = bytes(pkt), set(), 0
    while (i := raw.find(m, i)) >= 0 and i + len(m) + 4 <= len(raw):
        out.add(int.from_bytes(raw[i + len(m):i + len(m) + 4], "big"))
        i += len(m) + 4
    return out


# ---------------------------------------------------------------- test packets

def addrs(family: str) -> dict:
    """client/server peer and guest addresses of *family* (vm/topology.py)."""
    t, v6 = topology, family == "ipv6"
    return {"client": t.CLIENT.peer6 if v6 else t.CLIENT.peer4,
            "server": t.SERVER.peer6 if v6 else t.SERVER.peer4,
            "guest_client": t.CLIENT.guest6 if v6 else t.CLIENT.guest4,
            "guest_server": t.SERVER.guest6 if v6 else t.SERVER.guest4}


def packet(family: str, proto: str, src: str, dst: str, tag: int, *, sport: int | None = None,
           dport: int = 9, size: int = 64):
    """A tagged scapy packet (no Ether: the wire adds it)."""
    import scapy.all as sc     # start-up cost: scapy takes about a second to import

    data = payload(tag, size)
    sport = sport or 20000 + tag % 40000
    l3 = sc.IP(src=src, dst=dst, ttl=64) if family == "ipv4" else sc.IPv6(src=src, dst=dst, hlim=64)
    if proto == "udp":
        return l3 / sc.UDP(sport=sport, dport=dport) / data
    if proto == "tcp":
        return l3 / sc.TCP(sport=sport, dport=dport, flags="S", seq=tag) / data
    if proto == "icmp":
        if family == "ipv4":
            return l3 / sc.ICMP(type=8, id=sport, seq=1) / data
        return l3 / sc.ICMPv6EchoRequest(id=sport, seq=1, data=data)
    raise ValueError(f"unknown proto {proto!r}")


def fragments(family: str, src: str, dst: str, tag: int, *, size: int = 1000, fragsize: int = 400):
    """A tagged UDP datagram as IP fragments; returns (fragments, the whole payload)."""
    import scapy.all as sc     # start-up cost: scapy takes about a second to import

    data = payload(tag, size)
    sport = 20000 + tag % 40000
    if family == "ipv4":
        pkt = sc.IP(src=src, dst=dst, id=tag & 0xffff) / sc.UDP(sport=sport, dport=9) / data
        return sc.fragment(pkt, fragsize=fragsize), data
    pkt = (sc.IPv6(src=src, dst=dst) / sc.IPv6ExtHdrFragment(id=tag)
           / sc.UDP(sport=sport, dport=9) / data)
    return sc.fragment6(pkt, fragsize + 48), data


def reassembled_payload(family: str, frames) -> bytes | None:
    """UDP payload of the datagram the *frames* (its fragments, or it whole) carry;
    None if fragments are missing."""
    import scapy.all as sc     # start-up cost: scapy takes about a second to import
    parts = {}
    for f in frames:
        if family == "ipv4":
            ip = f[sc.IP]
            if not (ip.flags.MF or ip.frag):
                return bytes(ip[sc.UDP].payload)
            parts[ip.frag * 8] = (bytes(ip.payload)[:ip.len - ip.ihl * 4], bool(ip.flags.MF))
        else:
            ip = f[sc.IPv6]
            if not ip.haslayer(sc.IPv6ExtHdrFragment):
                return bytes(ip[sc.UDP].payload)
            fh = ip[sc.IPv6ExtHdrFragment]
            parts[fh.offset * 8] = (bytes(fh.payload), bool(fh.m))
    data, off = b"", 0
    for start in sorted(parts):
        if start != off:
            return None
        chunk, more = parts[start]
        data += chunk
        off += len(chunk)
        if not more:
            return bytes(sc.UDP(data).payload)
    return None


def bash_udp(dst: str, tag: int, *, port: int = 9, size: int = 48) -> str:
    """A guest command that sends one tagged UDP datagram (bash's /dev/udp).

    bash line-buffers its stdout, so printf alone would send one datagram per
    0x0a byte of the payload (a tag byte can be one): dd gathers the whole
    payload (iflag=fullblock) and writes it once."""
    esc = "".join(f"\\x{b:02x}" for b in payload(tag, size))
    return "bash -c " + shlex.quote(f"printf '{esc}' | dd bs=64k iflag=fullblock status=none "
                                    f"> /dev/udp/{dst}/{port}")


def ping(dst: str, tag: int, family: str = "ipv4", *, wait: float = 0.5) -> str:
    """A guest ping whose payload pattern is the tag unit (not answered: bounded by -W)."""
    pattern = (magic() + int(tag).to_bytes(4, "big")).hex()
    return f"ping -{4 if family == 'ipv4' else 6} -n -c1 -W{wait} -s 56 -p {pattern} {dst}"


# ---------------------------------------------------------------- per-test reports

# What a test report collects after each test, in one guest command (one SSH
# round trip): the tracer log (then cleared, so the next test sees only its own
# packets), the rules with their counters on both iptables backends, and nftables.
# A listing tool runs only where its backend has tables (shell builtins decide,
# no extra process in the guest): the legacy tools when the kernel lists a
# table of theirs (/proc/net/ip*_tables_names has a line; proc files have no
# size, so `test -s` cannot tell), the nft ones when the ruleset ($NFT, listed
# first) has a table of that family.
REPORT_SOURCES = (
    ("tracer", "cat /proc/net/{module} && echo clear > /proc/net/{module}"),
    ("iptables-legacy-save -c",
     "if read -r t 2>/dev/null < /proc/net/ip_tables_names; then iptables-legacy-save -c; fi"),
    ("ip6tables-legacy-save -c",
     "if read -r t 2>/dev/null < /proc/net/ip6_tables_names; then ip6tables-legacy-save -c; fi"),
    ("iptables-nft-save -c", 'case "$NFT" in *"table ip "*) iptables-nft-save -c;; esac'),
    ("ip6tables-nft-save -c", 'case "$NFT" in *"table ip6 "*) ip6tables-nft-save -c;; esac'),
    ("nft list ruleset", 'printf "%s\\n" "$NFT"; exit $NFT_RC'),
    # the state of every other nflab hook module (pktlog's counters, limit, filter)
    ("nflab hook modules", 'for f in /proc/net/nflab_*; do [ -e "$f" ] || continue; '
                           'case "${{f##*/}}" in {module}) continue;; esac; '
                           'echo "# ${{f##*/}}"; grep -v "^point " "$f"; done; true'),
)
_MARK = "@@nflab-report@@"


def report_command(module: str = MODULE) -> str:
    """The guest shell command that prints every REPORT_SOURCES section, each
    framed by a marker line and followed by its exit status."""
    parts = ["NFT=$(nft list ruleset 2>&1); NFT_RC=$?"]
    for i, (_name, cmd) in enumerate(REPORT_SOURCES):
        parts.append(f"echo '{_MARK} {i}'; ( {cmd.format(module=module)} ) 2>&1; "
                     f"echo \"{_MARK} rc $?\"")
    return "; ".join(parts)


def parse_report(text: str) -> dict:
    """Output of :func:`report_command` -> {section name: (rc, text)}; a section
    whose end marker is missing (the command was cut short) gets rc None."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith(_MARK + " "):
            word = line[len(_MARK) + 1:].split()
            if word[:1] == ["rc"] and name is not None:
                out[name] = (int(word[1]) if len(word) > 1 and word[1].isdigit() else None,
                             "\n".join(lines))
                name, lines = None, []
            elif word and word[0].isdigit() and int(word[0]) < len(REPORT_SOURCES):
                if name is not None:
                    out[name] = (None, "\n".join(lines))
                name, lines = REPORT_SOURCES[int(word[0])][0], []
            continue
        if name is not None:
            lines.append(line)
    if name is not None:
        out[name] = (None, "\n".join(lines))
    return out


def tag_of(raw: bytes, magic_bytes: bytes | None = None) -> int | None:
    """The tag a frame (or packet) carries after the tracer's magic, if any."""
    m = magic_bytes or magic()
    i = raw.find(m)
    if i < 0 or i + len(m) + 4 > len(raw):
        return None
    return int.from_bytes(raw[i + len(m):i + len(m) + 4], "big")


def frame_addrs(raw: bytes) -> tuple[str, str] | None:
    """(src, dst) of an Ethernet frame's IPv4/IPv6 header, compressed like the
    tracer prints them; None for anything else. No scapy."""
    if len(raw) < 14:
        return None
    et = raw[12:14]
    if et == b"\x08\x00" and len(raw) >= 34:
        return str(ipaddress.IPv4Address(raw[26:30])), str(ipaddress.IPv4Address(raw[30:34]))
    if et == b"\x86\xdd" and len(raw) >= 54:
        return str(ipaddress.IPv6Address(raw[22:38])), str(ipaddress.IPv6Address(raw[38:54]))
    return None


def walks(entries) -> list[list]:
    """Split one tag's entries (log order) into walks: the visits of one packet
    through the hooks, in order. An entry continues the open walk whose last
    visit comes before it on a packet's way (a later priority of the same hook,
    or a later hook) with the same addresses, or, for a NAT rewrite, one of them;
    otherwise it starts a new walk (the next packet with this tag, the reply, a
    second fragment)."""
    out: list[list] = []
    for e in entries:
        best, best_rank = None, None
        for i in range(len(out) - 1, -1, -1):
            last = out[i][-1]
            if last.l3 != e.l3 or not _continues(last, e):
                continue
            if (last.src, last.dst) == (e.src, e.dst):
                rank = 0
            elif last.src == e.src or last.dst == e.dst:
                rank = 1
            else:
                continue
            if best_rank is None or rank < best_rank:
                best, best_rank = i, rank
            if rank == 0:
                break
        if best is None:
            out.append([e])
        else:
            out[best].append(e)
    return out


def _continues(a, b) -> bool:
    """True if *b* can be the visit after *a* on one packet's walk."""
    order = {h: i for i, h in enumerate(HOOK_ORDER)}
    if a.hook == b.hook:
        return b.priority > a.priority
    if (a.hook, b.hook) in (("PRE_ROUTING", "LOCAL_OUT"), ("LOCAL_IN", "FORWARD"),
                            ("LOCAL_IN", "LOCAL_OUT"), ("FORWARD", "LOCAL_OUT"),
                            ("LOCAL_IN", "POST_ROUTING")):
        return False            # different paths, not one after the other
    return order.get(b.hook, 0) > order.get(a.hook, 0)


def point_label(hook: str, priority: int, backend: str | None = None) -> str:
    """Where a hook point at *priority* sits among *hook*'s stock tables of
    *backend* (:func:`documented`; the tracer's labels, at most 40 characters,
    are the legacy tables')."""
    stock = stock_at(hook, backend)
    before = [p for p in sorted(stock) if p < priority]
    after = [p for p in sorted(stock) if p > priority]
    prev = f"{stock[before[-1]]} {before[-1]}" if before else ""
    nxt = f"{stock[after[0]]} {after[0]}" if after else ""
    if prev and nxt:
        return f"after {prev}, before {nxt}"
    if nxt:
        return f"first, before {nxt}"
    return f"after {prev}" if prev else "no stock table at this hook"


def fate(flow, points, arrived: list[str] | None = None, backend: str | None = None) -> str:
    """What became of one direction of a packet, from the last tracer point it
    reached and the wires it was seen on afterwards (*arrived*: side names);
    the tables named between two points are *backend*'s (:func:`documented`:
    iptables-nft's security sits at 150, the kernel's at 50)."""
    if arrived:
        return "arrived on the " + " and ".join(f"{s} wire" for s in arrived)
    if not flow:
        return "not seen by the tracer and not on any wire"
    last = flow[-1]
    same = sorted(p.priority for p in points if p.family == last.family and p.hook == last.hook)
    later = [p for p in same if p > last.priority]
    where = f"{last.hook}/{last.priority}"
    if later:
        stock = stock_at(last.hook, backend)
        if last.frag and -400 in stock and last.priority < -400 < later[0]:
            return (f"fragment held after {where} by defrag (-400), reassembled into the packet "
                    "that goes on")
        between = [f"{stock[p]} {p}" for p in sorted(stock) if last.priority < p < later[0]]
        return (f"stopped after {where}: dropped, stolen or queued before {last.hook}/{later[0]} "
                f"(the next tracer point){'; between them: ' + ', '.join(between) if between else ''}")
    if last.hook == "LOCAL_IN":
        return "delivered to the guest's local stack (passed every LOCAL_IN point)"
    if last.hook == "POST_ROUTING":
        return (f"left netfilter (passed POST_ROUTING/{last.priority}) on {last.outdev}, "
                "not seen on a wire")
    return f"stopped after {where}, the last point of {last.hook} (routing or a later hook dropped it)"
