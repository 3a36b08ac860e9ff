"""Hook placement and priority, proven with real packets and the packet-path tracer.

The tracer (kmods/catalog/tracer) has points at -450, -250, -175, -125, -75,
25, 75 and 125 on every inet hook of both families, and one netdev INGRESS
point on eth1. Every test crafts tagged packets with scapy on the host, sends
them over the client (eth1) or server (eth2) wire, sniffs the far wire, and
reads the guest's tracer log through testinfra. The checks:

* each path visits exactly the expected points in claimed priority order
  (``tracing.path_problems``: the same function the negative variant test
  proves catches a misregistered point);
* where the stock tables sit, by what each point sees: MARK (mangle -150),
  DNAT (nat -100), filter DROP (0), conntrack (-200), raw NOTRACK (-300);
* on kernels with nfnetlink_hook, ``nft list hooks`` agrees with the definition
  (the netdev point on the definition's ingress_dev, eth1).
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import pytest

from ground.errors import NflabError
from nflab import tracing
from nflab.tracing import FORWARD, LOCAL_IN, LOCAL_OUT, addrs, at, packet
from nflab.tracing import has_tag, payload
from supply import kernels
from tests.suites.catalog_helpers import KERNEL_TROUBLE

pytestmark = pytest.mark.vm

FAMILIES = ["ipv4", "ipv6"]
ARRIVE = 5.0     # seconds a packet may take across the TCG guest
QUIET = 0.6      # seconds we wait to be sure something does NOT arrive
TRACED = 10.0    # upper bound for a packet's entries to show in the tracer log
                 # (returns as soon as they are all there; the host has 2 busy cores)


def _problems_text(problems, log, t):
    return "\n".join(problems) + "\ntracer log:\n" + log.text(t)


def _forward(wire, trace, family, proto, t, *, dst=None, arrive=True, sport=None):
    """Send one tagged packet client -> server; return (log entries of it, frames on server)."""
    a = addrs(family)
    pkt = packet(family, proto, a["client"], dst or a["server"], t, sport=sport)
    got = wire.exchange("client", pkt, "server", lambda p: has_tag(p, t),
                        timeout=ARRIVE if arrive else QUIET)
    return got


def _points(log, family):
    return [p for p in log.points if p.family == family]


# ---------------------------------------------------------------- paths

@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_path_visits_pre_forward_post_in_order(host, wire, trace, tag, family, proto):
    t = tag()
    got = _forward(wire, trace, family, proto, t)
    assert got, f"{family}/{proto}: the forwarded packet never reached the server wire"
    log = trace.read()
    want = tracing.expected_path(log.points, family, FORWARD, ingress=True)
    log = trace.wait(t, len(want), timeout=TRACED)
    entries = log.tagged(t)
    problems = tracing.path_problems(entries, log.points, family, FORWARD, ingress=True)
    assert not problems, _problems_text(problems, log, t)
    first = entries[0]
    assert (first.family, first.hook, first.indev) == ("netdev", "INGRESS", "eth1")
    for e in entries[1:]:
        # ip_output()/ip6_output() hand POST_ROUTING the skb's device before they
        # switch it to the output device: a forwarded packet still shows its input
        # device there (what nft's iifname in postrouting matches on)
        want_out = "eth2" if e.hook in ("FORWARD", "POST_ROUTING") else "-"
        assert (e.indev, e.outdev) == ("eth1", want_out), str(e)
        assert e.l3 == family and not e.frag


def test_ipv6_chain_ending_in_no_next_header_is_proto_59(host, wire, trace, tag):
    """A forwarded IPv6 packet whose destination options header ends the chain (next
    header 59, the tag in the bytes after it): every point reports proto 59, not the
    first header's number (60, what ipv6_skip_exthdr leaves when it returns -1)."""
    from scapy.all import IPv6, IPv6ExtHdrDestOpt, Raw

    t = tag()
    a = addrs("ipv6")
    pkt = IPv6(src=a["client"], dst=a["server"]) / IPv6ExtHdrDestOpt(nh=59) / Raw(payload(t, 48))
    assert wire.exchange("client", pkt, "server", lambda p: has_tag(p, t), timeout=ARRIVE), \
        "the packet never reached the server wire"
    log = trace.read()
    log = trace.wait(t, len(tracing.expected_path(log.points, "ipv6", FORWARD, ingress=True)),
                     timeout=TRACED)
    entries = log.tagged(t)
    assert entries and all(e.proto == 59 for e in entries), log.text(t)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_delivery_and_reply_paths(host, wire, trace, tag, family):
    """Echo request to the guest: INGRESS, PRE_ROUTING, LOCAL_IN; the echo reply
    (same payload, same tag): LOCAL_OUT, POST_ROUTING."""
    t = tag()
    a = addrs(family)
    pkt = packet(family, "icmp", a["client"], a["guest_client"], t)
    got = wire.exchange("client", pkt, "client", lambda p: has_tag(p, t), timeout=ARRIVE)
    assert got, "no echo reply on the client wire"
    log = trace.read()
    n = (len(tracing.expected_path(log.points, family, LOCAL_IN, ingress=True))
         + len(tracing.expected_path(log.points, family, LOCAL_OUT)))
    log = trace.wait(t, n, timeout=TRACED)
    entries = log.tagged(t)
    request = [e for e in entries if e.src == a["client"]]
    reply = [e for e in entries if e.src == a["guest_client"]]
    assert len(request) + len(reply) == len(entries), log.text(t)
    problems = tracing.path_problems(request, log.points, family, LOCAL_IN, ingress=True)
    assert not problems, "request: " + _problems_text(problems, log, t)
    problems = tracing.path_problems(reply, log.points, family, LOCAL_OUT)
    assert not problems, "reply: " + _problems_text(problems, log, t)
    assert entries.index(request[-1]) < entries.index(reply[0]), "reply traced before the request"
    assert all((e.indev, e.outdev) == ("-", "eth1") for e in reply), log.text(t)


@pytest.mark.parametrize("how", ["ping", "udp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_locally_generated_path(host, wire, trace, tag, family, how):
    t = tag()
    a = addrs(family)
    cmd = tracing.ping(a["server"], t, family) if how == "ping" else tracing.bash_udp(a["server"], t)
    since = wire.mark("server")
    host.run(cmd)                  # ping exits 1: nobody answers it
    got = wire.sniff("server", lambda p: has_tag(p, t), timeout=ARRIVE, since=since)
    assert got, f"the guest's {how} never reached the server wire"
    log = trace.read()
    log = trace.wait(t, len(tracing.expected_path(log.points, family, LOCAL_OUT)), timeout=TRACED)
    entries = log.tagged(t)
    problems = tracing.path_problems(entries, log.points, family, LOCAL_OUT)
    assert not problems, _problems_text(problems, log, t)
    # a locally generated skb has no input device, not even at POST_ROUTING
    assert all(e.src == a["guest_server"] and (e.indev, e.outdev) == ("-", "eth2")
               for e in entries), log.text(t)
    # conntrack's LOCAL_OUT hook runs at -200 too: a new flow is "new" after it only
    ct = {e.priority: e.ct for e in entries if e.hook == "LOCAL_OUT"}
    assert {ct[p] for p in ct if p < -200} == {"none"}, ct
    assert {ct[p] for p in ct if p > -200} == {"new"}, ct


@pytest.mark.parametrize("family", FAMILIES)
def test_fragments_ingress_sees_each_defrag_reassembles(host, wire, trace, tag, family):
    """INGRESS and PRE_ROUTING -450 (before defrag at -400) see every fragment;
    every later point sees one reassembled datagram; the server gets it all."""
    t = tag()
    a = addrs(family)
    frags, data = tracing.fragments(family, a["client"], a["server"], t)
    n = len(frags)
    assert n >= 3
    since = wire.mark("server")
    wire.send("client", frags)
    got = wire.sniff("server", lambda p: has_tag(p, t), count=n, timeout=ARRIVE, since=since)
    assert tracing.reassembled_payload(family, got) == data, \
        f"the server wire did not get the whole datagram ({len(got)} frames)"
    log = trace.read()
    after = tracing.expected_path(log.points, family, FORWARD,
                                  skip=lambda k: k[1] == "PRE_ROUTING" and k[2] < -400)
    log = trace.wait(t, 2 * n + len(after), timeout=TRACED, settle=0.3)
    entries = log.tagged(t)
    ingress = [e for e in entries if e.hook == "INGRESS"]
    first = at(entries, "PRE_ROUTING", -450, family)
    assert len(ingress) == n and all(e.frag for e in ingress), log.text(t)
    assert len(first) == n and all(e.frag for e in first), log.text(t)
    rest = [e for e in entries if e not in ingress and e not in first]
    assert all(not e.frag for e in rest), log.text(t)
    problems = tracing.path_problems(rest, log.points, family, FORWARD,
                                     skip=lambda k: k[1] == "PRE_ROUTING" and k[2] < -400)
    assert not problems, _problems_text(problems, log, t)
    assert rest[0].len > max(e.len for e in first), "the point after defrag saw a fragment-sized packet"


# ---------------------------------------------------------------- stock tables by effect

@pytest.mark.parametrize("family", FAMILIES)
def test_mangle_mark_seen_after_mangle_not_before(host, wire, trace, rules, tag, family):
    a = addrs(family)
    rules.add(family, "mangle", "PREROUTING", f"-s {a['client']} -j MARK --set-mark 0x2a")
    t = tag()
    assert _forward(wire, trace, family, "udp", t)
    entries = trace.wait(t, 1 + 8 * 3, timeout=TRACED).tagged(t)
    marks = {e.priority: e.mark for e in entries if e.hook == "PRE_ROUTING"}
    assert marks[-450] == 0 and marks[-250] == 0 and marks[-175] == 0, marks
    assert marks[-125] == 0x2a and marks[125] == 0x2a, marks
    assert all(e.mark == 0x2a for e in entries if e.hook in ("FORWARD", "POST_ROUTING"))


@pytest.mark.parametrize("family", FAMILIES)
def test_dnat_original_before_nat_dst_translated_after(host, wire, trace, rules, tag, family,
                                                       kernel_release):
    missing = _not_configured(kernel_release, "NETFILTER_XT_NAT")
    if missing:         # Debian's rt flavour of the newest lines drops it with legacy xtables
        pytest.skip(f"{missing}: no iptables DNAT target")
    a = addrs(family)
    vip = "198.51.100.99" if family == "ipv4" else "2001:db8:2::99"
    rules.add(family, "nat", "PREROUTING", f"-d {vip} -p udp -j DNAT --to-destination {a['server']}")
    t = tag()
    got = _forward(wire, trace, family, "udp", t, dst=vip)
    assert got, "the DNAT'ed packet did not reach the server"
    ip = got[0].payload
    assert ip.dst == a["server"], f"server got dst {ip.dst}"
    entries = trace.wait(t, 1 + 8 * 3, timeout=TRACED).tagged(t)
    pre = {e.priority: e.dst for e in entries if e.hook == "PRE_ROUTING"}
    assert pre[-125] == vip, pre
    assert pre[-75] == a["server"], pre
    assert all(e.dst == a["server"] for e in entries if e.hook in ("FORWARD", "POST_ROUTING"))


@pytest.mark.parametrize("family", FAMILIES)
def test_filter_drop_hides_packet_from_points_after_filter(host, wire, trace, rules, tag, family):
    a = addrs(family)
    rules.add(family, "filter", "FORWARD", f"-s {a['client']} -p udp -j DROP")
    t = tag()
    got = _forward(wire, trace, family, "udp", t, arrive=False)
    assert not got, "a packet filter DROPs arrived on the server wire"
    log = trace.wait(t, 1 + 8 + 5, timeout=TRACED, settle=0.3)
    entries = log.tagged(t)
    fwd = sorted(e.priority for e in entries if e.hook == "FORWARD")
    assert fwd == [-450, -250, -175, -125, -75], log.text(t)
    assert at(entries, "FORWARD", -175) and not at(entries, "FORWARD", 25), log.text(t)
    assert not [e for e in entries if e.hook == "POST_ROUTING"], log.text(t)


@pytest.mark.parametrize("family", FAMILIES)
def test_conntrack_state_only_after_conntrack(host, wire, trace, tag, family):
    a = addrs(family)
    t = tag()
    sport = 40000 + t % 20000
    assert _forward(wire, trace, family, "udp", t, sport=sport)
    entries = trace.wait(t, 25, timeout=TRACED).tagged(t)
    pre = {e.priority: e.ct for e in entries if e.hook == "PRE_ROUTING"}
    assert pre[-450] == "none" and pre[-250] == "none", pre
    assert all(pre[p] == "new" for p in (-175, -125, -75, 25, 75, 125)), pre
    # the reply direction, then the original again: conntrack says so after -200 only
    trace.clear()
    import scapy.all as sc
    L3 = sc.IP if family == "ipv4" else sc.IPv6
    reply = L3(src=a["server"], dst=a["client"]) / sc.UDP(sport=9, dport=sport) / payload(t, 64)
    assert wire.exchange("server", reply, "client", lambda p: has_tag(p, t), timeout=ARRIVE)
    assert _forward(wire, trace, family, "udp", t, sport=sport)
    log = trace.wait(t, 24 + 25, timeout=TRACED)
    back = [e for e in log.tagged(t) if e.src == a["server"]]
    again = [e for e in log.tagged(t) if e.src == a["client"]]
    assert {e.ct for e in back if e.hook == "PRE_ROUTING" and e.priority < -200} == {"none"}
    assert {e.ct for e in back if e.priority > -200 or e.hook != "PRE_ROUTING"} == {"established-reply"}, log.text(t)
    assert {e.ct for e in again if e.hook == "PRE_ROUTING" and e.priority > -200} == {"established"}, log.text(t)


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_notrack_untracked_after_raw(host, wire, trace, rules, tag, family):
    a = addrs(family)
    rules.add(family, "raw", "PREROUTING", f"-s {a['client']} -p udp -j CT --notrack")
    t = tag()
    assert _forward(wire, trace, family, "udp", t)
    entries = trace.wait(t, 25, timeout=TRACED).tagged(t)
    pre = {e.priority: e.ct for e in entries if e.hook == "PRE_ROUTING"}
    assert pre[-450] == "none", pre                     # before raw (-300)
    assert pre[-250] == "untracked", pre                # after raw, before conntrack
    assert pre[-175] == "untracked", pre                # conntrack (-200) left it alone
    assert {e.ct for e in entries if e.hook in ("FORWARD", "POST_ROUTING")} == {"untracked"}


# ---------------------------------------------------------------- the kernel's own view

def _not_configured(release: str, option: str) -> str | None:
    """Why the kernel lacks CONFIG_*option*, from its config (a feature, not a version),
    or None if it has it (or is no kit kernel, whose config the kit cannot read)."""
    try:
        kernel = kernels.by_release(release)
    except NflabError:
        return None                                     # not a kit kernel: no config to read
    if kernel.config_value(option) in ("y", "m"):
        return None
    return f"CONFIG_{option} is not set in {release}'s config"


def _no_netlink_hook(release: str) -> str | None:
    """Why the kernel has no nfnetlink_hook (5.10 predates it, Debian's 6.1 leaves it
    off), or None if it should have one."""
    return _not_configured(release, "NETFILTER_NETLINK_HOOK")


def _nft_hooks(host, kernel_release, device):
    """The ip, ip6 and *device*'s netdev hooks: the same listing with nftables 1.0.6
    (bookworm) and 1.1.x (trixie), whose plain `nft list hooks` adds every
    interface's netdev hooks (tracing.nft_hooks_command)."""
    res = host.run("modprobe nfnetlink_hook")
    if res.rc != 0:
        why = _no_netlink_hook(kernel_release)
        if why:
            pytest.skip(f"{why}: no `nft list hooks`; the measured intervals are the proof here")
        pytest.fail(f"modprobe nfnetlink_hook: {res.stderr.strip()}")
    out = host.check_output(tracing.nft_hooks_command(device))
    return out


def test_nft_list_hooks_agrees_with_the_definition(host, trace, kernel_release):
    from kmods import spec
    from tests.suites.conftest import tracer_ingress_dev
    ext = spec.load("tracer")
    dev = tracer_ingress_dev(ext)                       # where its netdev point must be
    text = _nft_hooks(host, kernel_release, dev)
    claims = ext.hooks
    problems = tracing.nft_problems(text, claims, device=dev)
    assert not problems, "\n".join(problems) + "\n" + text[-3000:]
    # and the proc file's claims are the definition's
    log = trace.read()
    assert [p.key for p in log.points] == [(h.family, h.hook, h.priority) for h in claims]
    assert all(p.registered for p in log.points)


# ---------------------------------------------------------------- broken on purpose

BROKEN_TEMPLATE = """{% extends "nflab_tracer.c.j2" %}
{# broken on purpose: the definition claims -175, registration uses 0 #}
{% block register_priority %}
		ops->priority = point->priority == -175 ? 0 : point->priority;
{% endblock %}
"""


def broken_variant(dest):
    """Render a tracer variant whose template ignores the claimed -175 (registers 0)."""
    from kmods import spec
    src = spec.CATALOG / "tracer"
    d = dest / "tracerbad"
    d.mkdir(parents=True, exist_ok=True)
    text = (src / "ext.toml").read_text().replace('name = "tracer"', 'name = "tracerbad"', 1)
    (d / "ext.toml").write_text(text)
    shutil.copy(src / "nflab_tracer.c.j2", d / "nflab_tracer.c.j2")
    (d / "nflab_tracerbad.c.j2").write_text(BROKEN_TEMPLATE)
    return spec.load_file(d / "ext.toml")


@pytest.mark.slow
def test_misregistered_priority_is_caught(host, guest, wire, trace, kit_vm, kernel_release,
                                          tag, tmp_path):
    if not kit_vm:
        pytest.skip("builds and inserts a variant module: needs a kit VM")
    from tests.suites.conftest import _install_tracer
    ext = broken_variant(tmp_path)
    module = ext.module
    assert module == "nflab_tracerbad"
    _install_tracer(guest, kit_vm, module=module, ext=ext)
    try:
        bad = tracing.Tracer(tracing.host_runner(host), module)
        bad.clear()
        t = tag()
        assert _forward(wire, trace, "ipv4", "udp", t)
        log = bad.wait(t, 25, timeout=TRACED)
        assert [p.priority for p in log.points if p.hook == "PRE_ROUTING" and p.family == "ipv4"] \
            == [-450, -250, -175, -125, -75, 25, 75, 125], "the variant must still claim -175"
        problems = tracing.path_problems(log.tagged(t), log.points, "ipv4", FORWARD, ingress=True)
        assert problems, "the placement check did not notice a point registered at 0 claiming -175"
        assert any("-175" in p for p in problems), problems
        # and the kernel's own view disagrees with the claim where it can tell
        res = host.run("modprobe nfnetlink_hook")
        if res.rc == 0:
            from tests.suites.conftest import tracer_ingress_dev
            dev = tracer_ingress_dev(ext)
            text = host.check_output(tracing.nft_hooks_command(dev))
            nft = tracing.nft_problems(text, log.points, module, device=dev)
            assert any("claims priority -175" in p for p in nft), nft
    finally:
        host.run(f"rmmod {module}")


@pytest.mark.slow
def test_unload_with_packets_in_flight(host, guest, wire, trace, kit_vm, tag):
    """rmmod/insmod the tracer while tagged packets stream through every point."""
    if not kit_vm:
        pytest.skip("reloads the module from the kit's build: needs a kit VM")
    from vm import lab
    a = addrs("ipv4")
    t = tag()
    stop = threading.Event()
    sent = [0]

    def flood():
        pkt = packet("ipv4", "udp", a["client"], a["server"], t)
        while not stop.is_set():
            wire.send("client", [pkt] * 20)
            sent[0] += 20
            time.sleep(0.005)

    th = threading.Thread(target=flood, daemon=True)
    before = int(host.check_output("dmesg | wc -l"))
    th.start()
    try:
        # no parameters: the definition's ingress_dev default ([[params]]) must hold
        res = host.run("for i in 1 2 3; do rmmod nflab_tracer && "
                       "insmod /root/nflab_tracer.ko || exit 1; done")
    finally:
        stop.set()
        th.join(timeout=5)
    assert res.rc == 0, res.stderr
    lab.check_health(lab.require(kit_vm))
    # every kernel line since the reloads began, not a tail a burst could push past
    dmesg = host.check_output(f"dmesg | tail -n +{before + 1}")
    assert not re.search(KERNEL_TROUBLE, dmesg), dmesg
    assert sent[0] > 100
    from tests.suites.conftest import tracer_ingress_dev
    assert host.file("/sys/module/nflab_tracer/parameters/ingress_dev").content_string.strip() \
        == tracer_ingress_dev(), "the module's ingress_dev default is not the definition's"
    # the flood's last packets may have filled the reloaded tracer's log, which drops
    # entries once full (24 of 25 points seen on a busy host): a packet that crossed
    # after them (frames keep their order) means they are all in; then the log is emptied
    assert _forward(wire, trace, "ipv4", "udp", tag()), "no packet crosses the router after the reloads"
    trace.clear()
    # the reloaded tracer traces: a fresh packet walks every point of the forward path
    t2 = tag()
    assert _forward(wire, trace, "ipv4", "udp", t2), "no packet crosses the router after the reloads"
    want = tracing.expected_path(trace.read().points, "ipv4", FORWARD, ingress=True)
    entries = trace.wait(t2, len(want), timeout=TRACED).tagged(t2)
    assert len(entries) == len(want), f"the reloaded tracer logged {len(entries)} of {len(want)} points"
