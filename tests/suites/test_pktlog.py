"""pktlog: matching packets as generic netlink events (kmods/catalog/pktlog).

The listeners are the shipped ``pktlog-listen`` (``--json``), run in the guest
in the background; each writes its pid to a ready file once it has joined
the group, so nothing is sent before it listens. Checked:

* forwarded tagged UDP (both families) gives each of two listeners the same
  events, three per packet in order (PRE_ROUTING -140, FORWARD 10,
  POST_ROUTING 110), with the packet's addresses, ports, length, protocol
  and devices;
* events, filter, limit and counters are per network namespace: a listener
  in another netns sees only the packets of its own;
* an IPv6 datagram in three fragments (before reassembly) is udp in all
  three events, ports only in the first;
* unloading the module with listeners open: rmmod succeeds, the plain
  listener says the family went away and exits 0, a ``--follow`` listener
  picks the reloaded family up and receives again; no kernel warning;
* a bounded, seeded fuzz run in the guest (tests/suites/pktlog_fuzz.py):
  every malformed request refused, every valid one accepted, the netns's
  state exactly what the valid ones made it;
* a two-CPU flood through a rate limit of 20/s (burst 5): the events stay
  within burst + rate x elapsed, the rest is counted (``ratelimited``) and
  reported in band (``lost`` of the next event); counters add up;
* a listener that does not read overflows its socket: counted (``overrun``)
  and told (ENOBUFS, which the listener reports);
* permissions, /proc "clear", GET's reset, bad module parameters.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.suites.catalog_helpers import (GUEST_DIR, KERNEL_TROUBLE, PEERS, assert_kit_module, l3,
                                          proc_lines, reload_module, send_tagged, sentinel)
from tests.suites.guest_traffic import REMOTE, parallel_script, parse_senders, sink  # noqa: F401
from vm import remote

pytestmark = pytest.mark.vm
MOD = "nflab_pktlog"
PORT = 40300
FUZZ = Path(__file__).with_name("pktlog_fuzz.py")
FUZZ_SEED, FUZZ_COUNT = 18, 2000
NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"
COUNTERS = ("unheard", "ratelimited", "failed", "events", "overrun")
# pings to 127.0.0.1 as they leave: the request and the reply of each
LOOP_PINGS = "--filter hook=LOCAL_OUT --filter l4proto=icmp --filter daddr4=127.0.0.1"
RESET = "pktlog-listen stats --reset > /dev/null"     # counters to zero, quietly


def sh(host, script: str) -> str:
    """Run *script* in the guest (one round trip, any length); its stdout. Fails on rc != 0."""
    res = remote.run(host, script)
    assert res.rc == 0, f"guest script exited {res.rc}:\n{script}\n{res.stdout}{res.stderr}"
    return res.stdout


def stats(host, netns: str = "") -> dict:
    out = sh(host, f"{netns_prefix(netns)}pktlog-listen stats --json")
    return json.loads(out.strip().splitlines()[-1])


def netns_prefix(netns: str) -> str:
    return f"ip netns exec {netns} " if netns else ""


def add_up(st: dict) -> bool:
    """Every matching packet is in exactly one outcome counter."""
    return st["matched"] == sum(st[c] for c in COUNTERS)


@dataclass
class Listener:
    """One ``pktlog-listen --json`` in the background of the guest."""

    name: str
    args: str = ""
    netns: str = ""
    rc: int | None = None
    events: list = field(default_factory=list)
    err: str = ""

    @property
    def base(self) -> str:
        return f"/tmp/pktlog.{self.name}"

    def start(self) -> str:
        """Shell: start it, then wait (bounded) until it has joined the group."""
        b = self.base
        cmd = (f"{netns_prefix(self.netns)}pktlog-listen --json --ready {b}.ready {self.args} "
               f"> {b}.out 2> {b}.err; echo $? > {b}.rc")
        return (f"rm -f {b}.ready {b}.out {b}.err {b}.rc\n"
                # in a subshell: not a job of this shell, whose `wait` must not wait for it
                f"( setsid sh -c {shlex.quote(cmd)} < /dev/null > /dev/null 2>&1 & )\n"
                f"for i in $(seq 200); do [ -s {b}.ready ] && break; sleep 0.05; done\n"
                f"[ -s {b}.ready ] || {{ echo 'listener {self.name} did not subscribe'; cat {b}.err; exit 1; }}")

    def signal(self, sig: str) -> str:
        return f"kill -{sig} $(cat {self.base}.ready)"

    def wait(self, seconds: float = 30) -> str:
        """Shell: wait (bounded) for it to exit, then print what it left."""
        b, steps = self.base, int(seconds / 0.05)
        return (f"for i in $(seq {steps}); do [ -s {b}.rc ] && break; sleep 0.05; done\n"
                f"echo '@@{self.name} rc' $(cat {b}.rc 2>/dev/null || echo none)\n"
                f"echo '@@{self.name} out'; cat {b}.out\necho '@@{self.name} err'; cat {b}.err\n"
                f"echo '@@{self.name} end'")

    def parse(self, text: str) -> "Listener":
        m = re.search(rf"^@@{self.name} rc (\S+)\n@@{self.name} out\n(.*?)@@{self.name} err\n"
                      rf"(.*?)@@{self.name} end$", text, re.S | re.M)
        assert m, f"no output of listener {self.name} in:\n{text}"
        self.rc = int(m.group(1)) if m.group(1).isdigit() else None
        self.events = [json.loads(line) for line in m.group(2).splitlines() if line.strip()]
        self.err = m.group(3)
        return self


@pytest.fixture
def pktlog(host, routed):
    """The module loaded, this netns's filter reset to every packet, the limit to
    the module's defaults and the counters to zero; listeners the test started
    stopped afterwards."""
    assert_kit_module(host, MOD)
    params = f"/sys/module/{MOD}/parameters"
    restore = (f"pktlog-listen set --all --rate $(cat {params}/rate) --burst $(cat {params}/burst) && "
               "pktlog-listen stats --reset > /dev/null")
    sh(host, restore)
    yield
    host.run("for f in /tmp/pktlog.*.ready; do [ -s \"$f\" ] || continue; "
             "kill $(cat \"$f\") 2>/dev/null; kill -CONT $(cat \"$f\") 2>/dev/null; done; rm -f /tmp/pktlog.*")
    if host.file(f"/sys/module/{MOD}").exists:
        host.run(restore)


def test_loaded_family_and_points(host, pktlog):
    points = proc_lines(host, MOD, "point")
    assert len(points) == 10 and all(p[4] == "1" for p in points), points
    genl = dict(kv.split("=") for kv in proc_lines(host, MOD, "genl")[0][1:])
    table = json.loads(host.file("/usr/share/nflab/pktlog/attrs.json").content_string)
    assert genl["family"] == table["family"] == "nflab_pktlog" and genl["group"] == "events"
    assert int(genl["layout"], 16) == table["layout"] == stats(host)["layout"]
    from kmods import spec
    assert table == json.loads(json.dumps(spec.load("pktlog").netlink.table())), \
        "the guest's decoder table is not the one the definition gives"


def _ifindex(host) -> dict:
    out = sh(host, "cat /sys/class/net/eth1/ifindex /sys/class/net/eth2/ifindex").split()
    return {"eth1": int(out[0]), "eth2": int(out[1])}


def _by_packet(events: list) -> dict:
    """{source port: its events in order}. The events of one packet come in
    hook order; those of different packets may interleave (the driver hands
    the stack a batch of frames, and PRE_ROUTING runs for the whole list)."""
    out = {}
    for ev in events:
        out.setdefault(ev.get("sport"), []).append(ev)
    return out


def _expected(family: str, pkts: dict, idx: dict) -> dict:
    """{source port: the events of that forwarded packet}: (hook, priority, in,
    out). ip_output() and ip6_output() hand POST_ROUTING the device the packet
    came in on as well."""
    client, server = PEERS[family]
    out = []
    for pkt in pkts.values():
        for hook, prio, indev, outdev in (("PRE_ROUTING", -140, "eth1", None), ("FORWARD", 10, "eth1", "eth2"),
                                          ("POST_ROUTING", 110, "eth1", "eth2")):
            v = "4" if family == "ipv4" else "6"
            ev = {"hook": hook, "priority": prio, "nfproto": family, "l4proto": "udp", "lost": 0,
                  f"saddr{v}": client, f"daddr{v}": server, "sport": pkt.sport, "dport": PORT,
                  "len": len(bytes(pkt)), "mark": 0}
            if indev:
                ev.update(indev=indev, iif=idx[indev])
            if outdev:
                ev.update(outdev=outdev, oif=idx[outdev])
            out.append(ev)
    return _by_packet(out)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_forwarded_packets_reach_both_listeners(host, wire, pktlog, family, tag):
    from scapy.all import UDP
    from nflab.tracing import payload

    client, server = PEERS[family]
    pkts = {}
    for i in range(4):
        t = tag()
        pkts[t] = l3(family)(src=client, dst=server) / UDP(sport=33100 + i, dport=PORT) / payload(t, 40 + 8 * i)
    a = Listener("a", f"--count {3 * len(pkts)} --timeout 30")
    b = Listener("b", f"--count {3 * len(pkts)} --timeout 30")
    sh(host, f"pktlog-listen set --filter dport={PORT} --filter nfproto={family}\n{a.start()}\n{b.start()}")
    assert send_tagged(wire, pkts, sentinel=sentinel(family, tag())) == set(pkts)
    out = sh(host, f"{a.wait()}\n{b.wait()}")
    a.parse(out), b.parse(out)
    assert (a.rc, b.rc) == (0, 0), (a.err, b.err)
    assert a.events == b.events, "the two listeners received different events"
    got, want = _by_packet(a.events), _expected(family, pkts, _ifindex(host))
    assert got == want, f"events per source port:\n got  {got}\n want {want}"
    st = stats(host)
    assert st["events"] == 3 * len(pkts) and st["ratelimited"] == st["failed"] == 0 and add_up(st), st


def test_events_stay_in_their_netns(host, pktlog):
    ns = "nflabpl"
    here, there = Listener("m", "--count 4 --timeout 30"), Listener("n", "--count 6 --timeout 30", netns=ns)
    try:
        sh(host, f"ip netns del {ns} 2>/dev/null; ip netns add {ns} && ip -n {ns} link set lo up\n"
                 f"pktlog-listen set {LOOP_PINGS}\nip netns exec {ns} pktlog-listen set {LOOP_PINGS} --rate 77\n"
                 f"{here.start()}\n{there.start()}\n"
                 f"ping -c2 -i0.2 127.0.0.1 > /dev/null && "
                 f"ip netns exec {ns} ping -c3 -i0.2 127.0.0.1 > /dev/null")
        out = sh(host, f"{here.wait()}\n{there.wait()}")
        here.parse(out), there.parse(out)
        main, other = stats(host), stats(host, ns)
    finally:
        host.run(f"ip netns del {ns}")
    assert (here.rc, there.rc) == (0, 0), (here.err, there.err)
    # each ping: the echo request and the reply leave through LOCAL_OUT
    assert len(here.events) == 4 and len(there.events) == 6
    assert all(e["hook"] == "LOCAL_OUT" and e["l4proto"] == "icmp" for e in here.events + there.events)
    assert (main["events"], other["events"]) == (4, 6), (main, other)
    assert other["rate"] == 77 and main["rate"] != 77, "the limit is per netns"


def test_ipv6_fragments_carry_the_upper_protocol(host, pktlog):
    """A UDP datagram sent in three fragments between two fresh netns, seen at
    PRE_ROUTING before reassembly (no conntrack, so no defragmentation, there):
    every fragment is l4proto udp, as nft's meta l4proto says, not 44 (the
    fragment header), so a filter on udp hears all three; only the first has ports."""
    a, b = "nflabfa", "nflabfb"
    listener = Listener("g", "--count 3 --timeout 15", netns=b)
    send = (f"python3 -c 'import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
            f"s.sendto(bytes(3000), (\"fd00:f::2\", {PORT}))'")
    try:
        sh(host, f"ip netns del {a} 2>/dev/null; ip netns del {b} 2>/dev/null\n"
                 f"ip netns add {a} && ip netns add {b} && ip link add fa netns {a} type veth peer fb netns {b}\n"
                 f"ip -n {a} addr add fd00:f::1/64 dev fa nodad && ip -n {b} addr add fd00:f::2/64 dev fb nodad\n"
                 f"ip -n {a} link set fa up && ip -n {b} link set fb up\n"
                 f"ip netns exec {b} pktlog-listen set --filter hook=PRE_ROUTING --filter l4proto=udp\n"
                 f"{listener.start()}\nip netns exec {a} {send}")
        listener.parse(sh(host, listener.wait(20)))
    finally:
        host.run(f"ip netns del {a}; ip netns del {b}")
    assert listener.rc == 0 and len(listener.events) == 3, (listener.err, listener.events)
    assert all(e["l4proto"] == "udp" and e["nfproto"] == "ipv6" for e in listener.events), listener.events
    # 8 + 3000 bytes of UDP in pieces of (1500 - 40 - 8) & ~7 = 1448, each behind
    # the 40-byte IPv6 header and the 8-byte fragment header
    assert sorted(e["len"] for e in listener.events) == [48 + 112, 48 + 1448, 48 + 1448], listener.events
    assert [e.get("dport") for e in listener.events].count(PORT) == 1, listener.events


def test_unload_with_listeners_open(host, pktlog):
    plain, follow = Listener("u1", "--timeout 60"), Listener("u2", "--follow --timeout 60")
    b = follow.base
    script = (f"n=$(dmesg | wc -l)\n{plain.start()}\n{follow.start()}\n"
              f"rmmod {MOD}\necho rmmod=$?\n{plain.wait(20)}\n"
              f"insmod {GUEST_DIR}/{MOD}.ko && pktlog-listen set {LOOP_PINGS}\n"
              f"for i in $(seq 200); do grep -q back {b}.err && break; sleep 0.05; done\n"
              f"ping -c1 127.0.0.1 > /dev/null\n"
              f"for i in $(seq 200); do grep -q icmp {b}.out && break; sleep 0.05; done\n"
              f"{follow.signal('TERM')}\n{follow.wait(20)}\n"
              f"echo '@@dmesg'; dmesg | tail -n +$((n + 1))")
    out = sh(host, script)
    assert "rmmod=0" in out
    plain.parse(out), follow.parse(out)
    assert plain.rc == 0 and "family nflab_pktlog removed" in plain.err, plain.err
    assert "removed" in follow.err and "back" in follow.err, follow.err
    assert any(e["hook"] == "LOCAL_OUT" and e["l4proto"] == "icmp" for e in follow.events), follow.events
    assert not re.search(KERNEL_TROUBLE, out.split("@@dmesg", 1)[1]), out
    assert_kit_module(host, MOD)


def _feature(kernel_release: str, name: str) -> bool:
    """A probe result of the pktlog build for this kernel (its nflab_features.h)."""
    from ground.paths import build_dir
    text = (build_dir() / kernel_release / "pktlog" / "nflab_features.h").read_text()
    m = re.search(rf"#define NFLAB_HAVE_{name.upper()} ([01])", text)
    assert m, f"no probe {name} in the pktlog build for {kernel_release}"
    return m.group(1) == "1"


def test_fuzz_refuses_bad_messages(host, pktlog, kernel_release):
    from kmods import spec

    nl = spec.load("pktlog").netlink
    reserved = "refused" if _feature(kernel_release, "genl_resv_start_op") else "any"
    out = sh(host, f"cat > /tmp/pktlog_fuzz.py <<'NFLAB_EOF'\n{FUZZ.read_text()}\nNFLAB_EOF\n"
                   "n=$(dmesg | wc -l)\n"
                   f"python3 /tmp/pktlog_fuzz.py --seed {FUZZ_SEED} --count {FUZZ_COUNT} "
                   f"--rate-max {nl.rate_max} --burst-max {nl.burst_max} --reserved {reserved}; "
                   "echo \"@@rc $?\"\n"
                   "echo '@@dmesg'; dmesg | tail -n +$((n + 1))")
    report = json.loads(out.split("@@rc", 1)[0].strip().splitlines()[-1])
    assert "@@rc 0" in out and report["mismatches"] == [], json.dumps(report["mismatches"], indent=1)
    assert report["sent"] == FUZZ_COUNT and report["state_ok"], (report["kernel"], report["model"])
    kinds = {k.split(":")[0] for k in report["kinds"]}
    assert len(kinds) == 20, f"not every kind of message was sent: {sorted(kinds)}"
    assert {"EINVAL", "ERANGE"} <= set(report["errnos"]), report["errnos"]
    assert not re.search(KERNEL_TROUBLE, out.split("@@dmesg", 1)[1]), out
    # and the family still works
    check = Listener("z", "--count 2 --timeout 30")
    sh(host, f"pktlog-listen set {LOOP_PINGS} --rate 100 --burst 10\n"
             f"{check.start()}\nping -c1 127.0.0.1 > /dev/null")
    check.parse(sh(host, check.wait()))
    assert check.rc == 0 and len(check.events) == 2, check.err


def test_flood_is_rate_limited_and_drops_are_reported(host, pktlog, sink):
    rate, burst, per_cpu = 20, 5, 1500
    listener = Listener("f", "--timeout 120")
    flt = f"--filter hook=LOCAL_OUT --filter l4proto=udp --filter dport={PORT}"
    last = (f"python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto(b\"last\", (\"{REMOTE['ipv4']}\", {PORT}))'")
    # the bucket is full (burst) when set; t0 is taken before, t1 after the last packet
    out = sh(host, f"t0=$(date +%s.%N)\n"
                   f"pktlog-listen set --rate {rate} --burst {burst} {flt} && {RESET}\n"
                   f"{listener.start()}\n{parallel_script('udp', 'ipv4', PORT, 16, per_cpu)}\n"
                   f"sleep 0.5\n{last}\nt1=$(date +%s.%N)\necho \"@@elapsed $t0 $t1\"")
    senders = parse_senders(out)
    t0, t1 = map(float, re.search(r"@@elapsed (\S+) (\S+)", out).groups())
    st = stats(host)
    wait = (f"for i in $(seq 400); do [ $(wc -l < {listener.base}.out) -ge {st['events']} ] && break; "
            f"sleep 0.05; done\n{listener.signal('TERM')}\n{listener.wait()}")
    listener.parse(sh(host, wait))
    assert senders.ok == 2 * per_cpu
    assert st["matched"] == senders.ok + 1 and add_up(st), st
    assert st["unheard"] == st["overrun"] == 0, st
    assert 0 < st["events"] <= burst + rate * (t1 - t0) + 1, (st, t1 - t0)
    assert st["ratelimited"] > 0, st
    assert len(listener.events) == st["events"], listener.err
    # what was held back is said in band: the last event carries the rest
    assert sum(e["lost"] for e in listener.events) == st["ratelimited"] + st["failed"]
    assert listener.events[-1]["lost"] > 0 and listener.events[-1]["len"] == 20 + 8 + 4
    assert f"{st['events']} events, {st['ratelimited'] + st['failed']} lost" in listener.err


def _drained(listener: "Listener", seconds: float = 20) -> str:
    """Shell that waits (bounded) until *listener* has written as many events as the
    kernel says it queued for it (`stats`: events), instead of a fixed sleep."""
    return (f"n=$(pktlog-listen stats --json | tail -1 | python3 -c "
            f"'import json,sys; print(json.load(sys.stdin)[\"events\"])')\n"
            f"for i in $(seq {int(seconds / 0.05)}); do "
            f"[ $(wc -l < {listener.base}.out) -ge $n ] && break; sleep 0.05; done")


def test_listener_overrun_is_counted_and_told(host, pktlog, sink):
    listener = Listener("o", "--rcvbuf 4096 --timeout 120")
    flt = f"--filter hook=LOCAL_OUT --filter l4proto=udp --filter dport={PORT}"
    out = sh(host, f"pktlog-listen set --rate 1000000 --burst 10000 {flt} && {RESET}\n"
                   f"{listener.start()}\n{listener.signal('STOP')}\n"
                   f"{parallel_script('udp', 'ipv4', PORT, 16, 400, cpus=(0,))}\n"
                   f"{listener.signal('CONT')}\n{_drained(listener)}\n{listener.signal('TERM')}\n"
                   f"{listener.wait()}")
    parse_senders(out, cpus=(0,))
    listener.parse(out)
    st = stats(host)
    assert st["matched"] == 400 and add_up(st) and st["ratelimited"] == 0, st
    assert st["overrun"] > 0 and st["events"] > 0 and st["unheard"] == 0, st
    assert "overrun: the kernel dropped events for this listener" in listener.err
    assert len(listener.events) == st["events"], (len(listener.events), st)


def test_permissions(host, pktlog):
    res = {cmd: host.run(f"{NOBODY} pktlog-listen {cmd}") for cmd in
           ("stats", "stats --reset", "set --all", "--count 1 --timeout 5")}
    assert res["stats"].rc == 0, res["stats"].stderr
    for cmd in ("stats --reset", "set --all"):
        assert res[cmd].rc == 1 and "Operation not permitted" in res[cmd].stderr, (cmd, res[cmd].stderr)
    assert res["--count 1 --timeout 5"].rc == 1
    assert "needs CAP_NET_ADMIN" in res["--count 1 --timeout 5"].stderr


def test_clear_and_reset(host, pktlog):
    sh(host, f"pktlog-listen set {LOOP_PINGS} && {RESET} && ping -c2 127.0.0.1 > /dev/null")
    first = json.loads(sh(host, "pktlog-listen stats --reset --json").strip())
    assert first["matched"] == 4 and first["unheard"] == 4, first      # requests and replies
    after = stats(host)
    assert after["matched"] == 0
    assert after["filter"] == {"hook": "LOCAL_OUT", "l4proto": "icmp", "daddr4": "127.0.0.1"}
    sh(host, f"ping -c1 127.0.0.1 > /dev/null && echo clear > /proc/net/{MOD}")
    assert stats(host)["matched"] == 0
    assert host.run(f"echo nonsense > /proc/net/{MOD}").rc != 0


@pytest.mark.parametrize("params", ["rate=0", "rate=1000001", "burst=0", "burst=10001"])
def test_bad_params_refused(host, pktlog, params):
    try:
        assert reload_module(host, MOD, params).rc != 0
        assert not host.file(f"/sys/module/{MOD}").exists
    finally:
        assert reload_module(host, MOD).rc == 0
