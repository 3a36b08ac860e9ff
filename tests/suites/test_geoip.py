"""geoip: countries from the kit's CSV database, on the wire.

The database is built on the host from ``kmods/catalog/geoip/geoip.csv``
(``build_db.py``) and copied into the guest's ``/usr/share/nflab/geoip``,
where checkentry reads it. For each family and backend seven DROP rules
(``--src-cc``, ``!``, lists, ``--dst-cc``, both directions, both negated)
sit on seven UDP ports; every (source, destination) pair of addresses from
three fake countries is sent to every port and the verdict on the server
wire plus the rule counters must equal what the CSV says. A user-supplied
CSV, installed instead, changes the verdicts of newly added rules and makes
a country it lacks unusable. At the end the kit's database is installed
again (the ``.t`` rule-syntax files use it).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import ipaddress
import shlex
import sys
import tarfile

import pytest

from kmods import spec
from kmods.spec import CATALOG
from vm import remote
from tests.suites.catalog_helpers import (BACKENDS, GUEST_DIR, PEERS, TOOLS, assert_kit_module,
                                          clean_forward, flush_chains,  # noqa: F401
                                          add_rules, l3, rule_counters, send_tagged, sentinel)

pytestmark = pytest.mark.vm
DB_DIR = spec.load("geoip").test["db_dir"]
DST_ROUTE = {"ipv4": ("203.0.113.0/24", "198.51.100.2"), "ipv6": ("2001:db8:3::/48", "2001:db8:2::2")}
# Sources on the client wire, destinations behind the server: both sides of every
# place where two of geoip.csv's ranges meet (last address of one, first of the
# next), the last address of a range that ends a network, and one address inside.
# Not sent: 192.0.2.255 and 198.51.100.255, the wires' broadcast addresses.
ADDRS = {
    "ipv4": (["192.0.2.10", "192.0.2.63", "192.0.2.64", "192.0.2.127", "192.0.2.128", "192.0.2.200"],
             ["198.51.100.2", "203.0.113.10", "203.0.113.63", "203.0.113.64", "203.0.113.255"]),
    "ipv6": (["2001:db8:1::10", "2001:db8:1::3f", "2001:db8:1::40", "2001:db8:1::7f", "2001:db8:1::80",
              "2001:db8:1:0:ffff:ffff:ffff:ffff"],
             ["2001:db8:2::2", "2001:db8:3::10", "2001:db8:3::3f", "2001:db8:3::40",
              "2001:db8:3:ffff:ffff:ffff:ffff:ffff"]),
}
RULES = {40801: "--src-cc XA", 40802: "! --src-cc XA", 40803: "--src-cc XA,XC",
         40804: "--dst-cc XB", 40805: "! --dst-cc XB", 40806: "--src-cc XC --dst-cc XA",
         40807: "! --src-cc XB ! --dst-cc XC"}
USER_CSV = """\
# a user's database: the client network moves to XB, the server network to XA, no XC
start,end,CC
192.0.2.0,192.0.2.255,XB
198.51.100.0,198.51.100.255,XA
203.0.113.0,203.0.113.255,XB
2001:db8:1::,2001:db8:1:0:ffff:ffff:ffff:ffff,XB
2001:db8:2::,2001:db8:2:ffff:ffff:ffff:ffff:ffff,XA
2001:db8:3::,2001:db8:3:ffff:ffff:ffff:ffff:ffff,XB
"""


def builder():
    """kmods/catalog/geoip/build_db.py as a module (no __pycache__ in the catalog)."""
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        s = importlib.util.spec_from_file_location("nflab_geoip_build_db", CATALOG / "geoip" / "build_db.py")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        return mod
    finally:
        sys.dont_write_bytecode = old


def install_db(host, files: dict):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    b64 = base64.b64encode(buf.getvalue()).decode()
    res = remote.run(host, f"rm -rf {DB_DIR} && mkdir -p {DB_DIR} && echo {b64} | base64 -d | tar -xzf - -C {DB_DIR}")
    assert res.rc == 0, f"installing the geoip database: {res.stderr}"


@pytest.fixture(scope="module")
def db(host):
    assert_kit_module(host, "xt_geoip")
    b = builder()
    text = (CATALOG / "geoip" / "geoip.csv").read_text()
    install_db(host, b.build(text))
    yield b, text
    install_db(host, b.build(text))


@pytest.fixture
def routes(host, routed):
    host.run_test(" && ".join(f"ip {'-6 ' if fam == 'ipv6' else ''}route replace {net} via {via}"
                              for fam, (net, via) in DST_ROUTE.items()))


def _clauses(opts: str):
    """'! --src-cc XB --dst-cc XA' -> [("src", {"XB"}, True), ("dst", {"XA"}, False)]"""
    out, words, neg = [], opts.split(), False
    for i, w in enumerate(words):
        if w == "!":
            neg = True
        elif w in ("--src-cc", "--dst-cc"):
            out.append((w[2:5], set(words[i + 1].split(",")), neg))
            neg = False
    return out


def csv_country(csv_text: str, addr: str) -> str | None:
    """The country of *addr* read from the CSV's rows (start,end,CC, both ends
    inclusive) with plain ipaddress comparisons: an oracle independent of
    build_db, which builds the guest's database (a parser bug there must not
    move the expected verdicts along with the database)."""
    a = ipaddress.ip_address(addr)
    for line in csv_text.splitlines():
        row = [f.strip() for f in line.split(",")]
        if line.lstrip().startswith("#") or len(row) != 3 or row[0] == "start":
            continue
        lo, hi = ipaddress.ip_address(row[0]), ipaddress.ip_address(row[1])
        if lo.version == a.version and lo <= a <= hi:
            return row[2].upper()
    return None


def _expect(csv_text, opts, src, dst) -> bool:
    where = {"src": csv_country(csv_text, src), "dst": csv_country(csv_text, dst)}
    return all((where[d] in ccs) != neg for d, ccs, neg in _clauses(opts))


def _run(host, wire, family, backend, rules, csv_text, tag):
    from scapy.all import UDP
    from nflab.tracing import payload

    tool = f"{TOOLS[family]}-{backend} -w"
    add_rules(host, [f"{tool} -A FORWARD -p udp --dport {port} -m geoip {opts} -j DROP"
                     for port, opts in rules.items()])
    srcs, dsts = ADDRS[family]
    pkts, meta = {}, {}
    for port, opts in rules.items():
        for s in srcs:
            for d in dsts:
                t = tag()
                pkts[t] = l3(family)(src=s, dst=d) / UDP(sport=33000, dport=port) / payload(t, 48)
                meta[t] = (port, f"-m geoip {opts}: {s} ({csv_country(csv_text, s)}) -> "
                                 f"{d} ({csv_country(csv_text, d)})", _expect(csv_text, opts, s, d))
    arrived = send_tagged(wire, pkts, timeout=8.0, sentinel=sentinel(family, tag()))
    wrong = [f"{meta[t][1]}: {'arrived' if t in arrived else 'dropped'}, expected "
             f"{'dropped' if meta[t][2] else 'to arrive'}" for t in pkts if (t in arrived) == meta[t][2]]
    assert not wrong, "\n".join(wrong)
    counts = rule_counters(host, TOOLS[family], backend)
    for port, opts in rules.items():
        want = sum(1 for t in pkts if meta[t][0] == port and meta[t][2])
        assert counts.get(str(port)) == want, f"-m geoip {opts}: counter {counts.get(str(port))}, expected {want}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_countries_on_the_wire(host, wire, db, clean_forward, routes, family, backend, tag):
    _, shipped = db
    _run(host, wire, family, backend, RULES, shipped, tag)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_user_supplied_csv(host, wire, db, clean_forward, routes, family, tag):
    b, shipped = db
    rules = {40811: "--src-cc XB", 40812: "--dst-cc XA", 40813: "! --dst-cc XB"}
    srcs, dsts = ADDRS[family]
    assert any(_expect(shipped, o, s, d) != _expect(USER_CSV, o, s, d)
               for o in rules.values() for s in srcs for d in dsts), \
        "the rules' verdicts must differ between the shipped and the user's database"
    try:
        install_db(host, b.build(USER_CSV, "user.csv"))
        _run(host, wire, family, "nft", rules, USER_CSV, tag)
        # a country the user's database lacks is refused when the rule is added
        r = host.run(f"{TOOLS[family]}-nft -w -A FORWARD -m geoip --src-cc XC -j DROP")
        assert r.rc != 0, "a rule naming XC was accepted without XC in the database"
    finally:
        install_db(host, b.build((CATALOG / "geoip" / "geoip.csv").read_text()))


def test_save_round_trip(host, db, clean_forward, xtables):
    for backend in xtables.usable:
        host.run_test(f"iptables-{backend} -w -A FORWARD -m geoip ! --src-cc xc,xa --dst-cc XB -j DROP")
        saved = host.check_output(f"iptables-{backend}-save -t filter")
        assert "-A FORWARD -m geoip ! --src-cc XC,XA --dst-cc XB -j DROP" in saved, saved


def test_check_and_delete_by_rule_spec(host, db, clean_forward, xtables):
    """`iptables -C` and `-D` by rule spec find a geoip rule another iptables
    process added: the plugin's pointers to its ranges (different in every
    process) are outside the bytes iptables compares."""
    spec_ = "FORWARD -p udp --dport 40850 -m geoip --src-cc XA,XC ! --dst-cc XB -j DROP"
    for backend in xtables.usable:
        tool = f"iptables-{backend}"
        host.run_test(f"{tool} -w -A {spec_}")
        assert host.run(f"{tool} -w -C {spec_}").rc == 0, f"{tool} -C: the rule is not found"
        host.run_test(f"{tool} -w -D {spec_}")
        assert host.run(f"{tool} -w -C {spec_}").rc != 0, f"{tool} -D left the rule in place"


BIGGEST = (16 << 20) // 8      # IPv4 ranges in the most one country may hold: 16 MiB
WRITE_COUNTRY = """import array, struct, sys
n = int(sys.argv[2])
ranges = array.array("I", range(2 * n))     # (0, 1), (2, 3), ...: sorted, 8 bytes each
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<8sBBHI", b"NFLGEOIP", 1, 4, 0, n) + ranges.tobytes())
"""


def test_the_largest_country_is_taken_and_one_range_more_is_not(host, db, clean_forward, xtables):
    """A country of 16 MiB of ranges, the most the module takes, is what the plugin
    reads too (it once refused every file from 16 MiB on, its header included);
    one range more is refused by the plugin, which names the limit."""
    tool = f"iptables-{xtables.usable[0]} -w"
    for cc, n in (("XY", BIGGEST), ("XZ", BIGGEST + 1)):
        host.run_test(f"python3 -c {shlex.quote(WRITE_COUNTRY)} {DB_DIR}/{cc}.iv4 {n}")
    try:
        host.run_test(f"{tool} -A FORWARD -m geoip --src-cc XY -j DROP")
        assert _copies(host) == (1, BIGGEST * 8)
        over = host.run(f"{tool} -A FORWARD -m geoip --src-cc XZ -j DROP")
        assert over.rc != 0 and f"is over {16 * 2 ** 20 + 16} bytes" in over.stderr, over.stderr
    finally:
        flush_chains(host)
        host.run(f"rm -f {DB_DIR}/XY.iv4 {DB_DIR}/XZ.iv4")
    assert _copies_become(host, "0 0"), f"the rule gone, its copy must be freed: {_copies(host)}"


def _big_country(n: int) -> str:
    """CSV lines of country XD: n ranges 10.x.y.z-z+1, every 4th address (8 bytes each)."""
    return "".join(f"10.{i >> 14 & 255}.{i >> 6 & 255}.{(i & 63) * 4},"
                   f"10.{i >> 14 & 255}.{i >> 6 & 255}.{(i & 63) * 4 + 1},XD\n" for i in range(n))


BIG_XD = (200_000, _big_country(200_000))          # 1.6 MB of ranges in the kernel
CGROUP = "/sys/fs/cgroup"
COPIES = "/sys/module/xt_geoip/parameters/copies"


def _copies(host) -> tuple[int, int]:
    """What the module says its shared country copies are: (copies, bytes)."""
    n, size = host.check_output(f"cat {COPIES}").split()
    return int(n), int(size)


def _copies_become(host, want: str, tries: int = 50) -> bool:
    """Whether the copies parameter reads *want* ("<copies> <bytes>") within tries
    tenths of a second: nf_tables destroys removed rules, and the netns core a
    deleted netns, from a work item."""
    return host.run(f"for i in $(seq {tries}); do [ \"$(cat {COPIES})\" = '{want}' ] && exit 0; "
                    "sleep 0.1; done; exit 1").rc == 0


def test_rules_share_one_copy_of_a_country(host, db, clean_forward, xtables):
    """Rules naming one big country hold one copy of its ranges in the kernel,
    not one per rule (checkentry once read the file for each rule and kept
    its own copy; legacy re-read it on every table replace): after the first
    rule, 15 more (legacy and nft, or nft alone where the kernel has no legacy
    xtables) share it: the module holds one copy of XD's ranges, of its size.
    (MemFree, measured at first, moved by several MB either way with kernel
    caches and deferred frees; the module's own count does not.)"""
    b, _ = db
    n, big = BIG_XD
    shipped = (CATALOG / "geoip" / "geoip.csv").read_text()

    def add(backend, ports):
        rules = "".join(f"-A FORWARD -p udp --dport {p} -m geoip --src-cc XD -j DROP\\n" for p in ports)
        host.run_test(f"printf '*filter\\n{rules}COMMIT\\n' | iptables-{backend}-restore -w --noflush")

    try:
        install_db(host, b.build(shipped + big, "big.csv"))
        first_backend = xtables.primary                # legacy where the kernel has it
        add(first_backend, [40820])
        assert _copies(host) == (1, n * 8)
        add(first_backend, range(40821, 40828))
        add("nft", range(40828, 40836))
        assert _copies(host) == (1, n * 8), "16 rules on XD: not one shared copy"
        in_nft = range(40820 if first_backend == "nft" else 40828, 40836)
        assert rule_counters(host, "iptables", "nft").keys() == {str(p) for p in in_nft}
    finally:
        flush_chains(host)
        install_db(host, b.build(shipped))
    assert _copies_become(host, "0 0"), f"the last rule gone, the copy must be freed: {_copies(host)}"


def test_copies_cannot_be_set_at_load(host, clean_forward):
    """copies is read-only (0444), but the kernel hands a parameter given at
    load time (insmod, modprobe, an options line) to the parameter's .set
    whatever its mode: copies=1 is refused with EPERM and the kernel's own
    message, where a parameter without .set would oops. With no geoip rule
    left the module unloads and loads again as the suites installed it."""
    gone = host.run("for i in $(seq 50); do rmmod xt_geoip 2>/dev/null && exit 0; sleep 0.1; done; exit 1")
    assert gone.rc == 0, "xt_geoip is still in use with every chain flushed"
    try:
        res = host.run(f"insmod {GUEST_DIR}/xt_geoip.ko copies=1")
        assert res.rc != 0 and "Operation not permitted" in res.stderr, (res.rc, res.stderr)
        assert "`1' invalid for parameter `copies'" in host.check_output("dmesg | tail -n 20")
        assert not host.file("/sys/module/xt_geoip").exists
    finally:
        host.run_test(f"insmod {GUEST_DIR}/xt_geoip.ko")
    assert _copies(host) == (0, 0)


def _charged(host, group) -> int:
    """The memory cgroup's charge in bytes with the page cache dropped (the
    plugin's read of the database file is charged to it too)."""
    return int(host.check_output(f"sync; echo 3 > /proc/sys/vm/drop_caches; cat {group}/memory.current"))


def test_copies_are_charged_to_the_rule_writers_memory_cgroup(host, db, clean_forward, xtables):
    """A country's copy is charged to the memory cgroup of the process that
    adds the first rule naming it (GFP_KERNEL_ACCOUNT), so root in a container
    cannot hold 16 MiB a country outside its limit: the cgroup's charge falls
    by at least the copy's size when the last rule goes."""
    b, _ = db
    n, big = BIG_XD
    shipped = (CATALOG / "geoip" / "geoip.csv").read_text()
    group = f"{CGROUP}/nflab-geoip"
    host.run_test(f"mountpoint -q {CGROUP} || mount -t cgroup2 none {CGROUP}; "
                  f"echo +memory > {CGROUP}/cgroup.subtree_control; mkdir -p {group}")
    rule = "-A FORWARD -p udp --dport 40850 -m geoip --src-cc XD -j DROP"
    try:
        install_db(host, b.build(shipped + big, "big.csv"))
        host.run_test(f"sh -c 'echo $$ > {group}/cgroup.procs && exec {xtables.tool('ipv4')} -w {rule}'")
        assert _copies(host) == (1, n * 8)
        held = _charged(host, group)
        flush_chains(host)
        assert _copies_become(host, "0 0"), f"the rule gone, its copy must be freed: {_copies(host)}"
        freed = _charged(host, group)
        assert held - freed >= n * 8 * 9 // 10, \
            f"the cgroup held {held} bytes with the rule, {freed} without: the {n * 8}-byte copy was not charged"
    finally:
        flush_chains(host)
        install_db(host, b.build(shipped))
        host.run(f"rmdir {group}")


def test_each_netns_keeps_its_own_copies(host, db, clean_forward, xtables):
    """Rules share a country's copy only within their netns: the digest that
    decides the sharing is whatever the rule's author sends (root in a user
    namespace can send any), so the same rule in a second netns holds a second
    copy. Deleting that netns destroys its rules after the module's pernet
    exit has run; the copy goes with them and the first netns keeps its own."""
    rule = "-A FORWARD -p udp --dport 40840 -m geoip --src-cc XA -j DROP"
    tool = xtables.tool("ipv4")
    before = _copies(host)
    host.run_test(f"{tool} -w {rule}")
    one = _copies(host)
    size = one[1] - before[1]
    assert one[0] == before[0] + 1 and size > 0, (before, one)
    host.run_test(f"{tool} -w {rule.replace('40840', '40841')}")
    assert _copies(host) == one, "two rules in one netns: not one shared copy"
    try:
        host.run_test(f"ip netns add nflab-geoip && ip netns exec nflab-geoip {tool} -w {rule}")
        assert _copies(host) == (one[0] + 1, one[1] + size), "the second netns shares the first's copy"
    finally:
        host.run("ip netns del nflab-geoip")
    assert _copies_become(host, f"{one[0]} {one[1]}", tries=100), \
        f"the second netns deleted: its copy must go, the first's stay: {_copies(host)}"
    assert rule_counters(host, *tool.split("-", 1)).keys() >= {"40840", "40841"}
