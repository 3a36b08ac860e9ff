"""Helpers shared by the catalog suites (issue 5): tagged traffic through the
routed guest, kit-module checks, FORWARD chain hygiene, module reloads.

Every suite sends scapy packets from the host side of the client wire and
sniffs the server wire (see ``vm/wire.py``); what arrives is identified by the
tag in its payload (``nflab.tracing.payload``), never by timing alone.
"""

from __future__ import annotations

import re

import pytest

from vm import remote

GUEST_DIR = "/root/nflab"          # where vm/install.py puts the .ko and .so
CLIENT4, SERVER4 = "192.0.2.2", "198.51.100.2"
CLIENT6, SERVER6 = "2001:db8:1::2", "2001:db8:2::2"
PEERS = {"ipv4": (CLIENT4, SERVER4), "ipv6": (CLIENT6, SERVER6)}
TOOLS = {"ipv4": "iptables", "ipv6": "ip6tables"}
BACKENDS = ("legacy", "nft")
# what the kernel prints when something is wrong (a test scans dmesg for it)
KERNEL_TROUBLE = r"BUG:|WARNING:|Oops|KASAN|general protection|refcount_t|list_(add|del) corruption"


def l3(family):
    from scapy.all import IP, IPv6
    return IP if family == "ipv4" else IPv6


def assert_kit_module(host, module):
    """*module* is loaded in the guest and is the kit's (taint O, nflab- version)."""
    taint = host.file(f"/sys/module/{module}/taint")
    assert taint.exists, f"{module} is not loaded (run `invoke install --name=...`)"
    assert "O" in taint.content_string, f"the loaded {module} is not the kit's (taint {taint.content_string!r})"
    version = host.file(f"/sys/module/{module}/version")
    assert version.exists and version.content_string.startswith("nflab-"), f"{module}: no nflab version"


def flush_chains(host, chains=(("filter", "FORWARD"),)):
    """Flush *chains* and reset the FORWARD policy on both families and backends,
    in one SSH round trip (each costs ~0.1 s under TCG)."""
    cmds = []
    for family, tool in TOOLS.items():
        for backend in BACKENDS:
            cmds += [f"{tool}-{backend} -w -t {table} -F {chain}" for table, chain in chains]
            cmds.append(f"{tool}-{backend} -w -P FORWARD ACCEPT")
    host.run("; ".join(cmds))


def send_tagged(wire, pkts: dict, *, expect: int | None = None, out="client", into="server",
                timeout=4.0, settle=0.6, sentinel=None) -> set:
    """Send {tag: packet} from *out*; return the set of tags that arrived on *into*.

    Waits up to *timeout* for *expect* packets (default: all), then *settle*
    seconds more so packets that should have been dropped get their chance.

    With *sentinel* ``(tag, packet)``, a packet no rule of the test drops, sent
    last: frames keep their order through the guest (one virtio queue, one
    softirq, no RPS), so once the sentinel is out on *into* every packet sent
    before it has either arrived or been dropped, and no settle time is
    needed. A sentinel that does not arrive fails the test: the path itself
    is broken, whatever the rules say."""
    from nflab.tracing import has_tag, tags_in

    since = wire.mark(into)
    match = lambda p: bool(tags_in(p) & pkts.keys())            # noqa: E731
    arrived_in = lambda got: {t for p in got for t in tags_in(p)} & pkts.keys()  # noqa: E731
    if sentinel is not None:
        stag, spkt = sentinel
        wire.send(out, list(pkts.values()) + [spkt])
        if not wire.sniff(into, lambda p: has_tag(p, stag), timeout=timeout, since=since):
            raise AssertionError(
                f"the sentinel packet (tag {stag}: {spkt.summary()}), which no rule of the test "
                f"drops, did not come out on the {into} wire within {timeout}s: the {out} -> "
                f"{into} path through the guest is broken")
        return arrived_in(wire.sniff(into, match, count=len(pkts) + 1, timeout=0, since=since))
    wire.send(out, list(pkts.values()))
    want = len(pkts) if expect is None else expect
    got = wire.sniff(into, match, count=max(want, 1), timeout=timeout if want else settle,
                     since=since)
    arrived = arrived_in(got)
    if arrived == pkts.keys():      # all in: nothing is left to settle
        return arrived
    return arrived | arrived_in(wire.sniff(into, match, count=len(pkts) + 1, timeout=settle,
                                           since=wire.mark(into)))


def send_one_by_one(wire, pkts: dict, sentinels, *, out="client", into="server",
                    timeout=4.0) -> set:
    """Like send_tagged but one packet at a time, in order (stateful matches),
    each followed by a fresh sentinel ``sentinels()`` (see :func:`sentinel`):
    a dropped packet costs one sentinel round trip, not a timeout."""
    arrived = set()
    for tag, pkt in pkts.items():
        arrived |= send_tagged(wire, {tag: pkt}, out=out, into=into, timeout=timeout,
                               sentinel=sentinels())
    return arrived


def rule_counters(host, tool, backend, table="filter", chain="FORWARD", key=r"--dport (\d+)"):
    """{key match: packets} from ``iptables-save -c`` for rules of *chain*."""
    out = host.check_output(f"{tool}-{backend}-save -c -t {table}")
    counts = {}
    for line in out.splitlines():
        m = re.match(rf"\[(\d+):(\d+)\] -A {chain} (.*)$", line)
        if m:
            k = re.search(key, m.group(3))
            if k:
                counts[k.group(1)] = counts.get(k.group(1), 0) + int(m.group(1))
    return counts


def reload_module(host, module, params=""):
    """rmmod + insmod the kit's .ko with *params*; returns the insmod result."""
    host.run(f"rmmod {module} 2>/dev/null")
    return host.run(f"insmod {GUEST_DIR}/{module}.ko {params}")


def proc_lines(host, name, prefix):
    """Lines of /proc/net/<name> starting with *prefix*, split into words."""
    text = host.file(f"/proc/net/{name}").content_string
    return [ln.split() for ln in text.splitlines() if ln.startswith(prefix + " ")]


@pytest.fixture
def clean_forward(host, routed):
    flush_chains(host)
    yield
    flush_chains(host)


SENTINEL_PORT = 40999    # no catalog suite has a rule for it


def sentinel(family, tag: int, dport=SENTINEL_PORT):
    """``(tag, packet)`` for ``send_tagged(sentinel=...)``: tagged UDP from the
    client to the server peer on a port no suite's rules match."""
    from scapy.all import UDP
    from nflab.tracing import payload
    c, s = PEERS[family]
    return tag, l3(family)(src=c, dst=s) / UDP(sport=33000, dport=dport) / payload(tag, 48)


def add_rules(host, cmds):
    """Run iptables commands in one SSH round trip (each costs ~0.1 s under TCG);
    the first that fails fails the test, with the command in the message."""
    script = " && ".join(cmds)
    res = remote.run(host, script)
    assert res.rc == 0, f"`{script}` exited {res.rc}: {(res.stderr or res.stdout).strip()}"
