"""layer7: real application protocols through the guest router.

A client and a server namespace inside the guest (``guest_apps``) talk
through the guest's FORWARD chain: Python's HTTP server and urllib, the
guest's dropbear and OpenSSH client (the banner exchange and key exchange),
a TLS ClientHello from Python's ``ssl``, glibc's resolver against a small
DNS server. Each exchange is first run under counting rules for every
pattern of the kit's set (only its own protocol may count packets, the
other six are the negatives), then again under a DROP rule for its own
protocol, which must stop it; on both backends, IPv4 and IPv6.

Scripted TCP clients send byte strings one acknowledged segment at a time
(``chunks``): the verdict held by every later packet of the connection in
both directions (exact counts: only the handshake precedes the match), a
signature split over two segments, the byte budget (maxdatalen, 2048: a
signature ending on byte 2048 matches, one ending on byte 2049 does not;
NULs are not counted; letters in any case), the packet budget (num_packets,
10), and a signature split over two UDP datagrams. State: records of
connections that are gone are freed by the GC; with max_conns=4, a flood of
idle connections fills the table, the overflow is counted as untracked,
the idle ones are evicted and new connections are classified again.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.suites.catalog_helpers import (BACKENDS, TOOLS, add_rules, assert_kit_module,  # noqa: F401
                                          clean_forward, rule_counters)
from tests.suites.guest_apps import ADDR, apps, client_cmd, run, start_server  # noqa: F401
from tests.suites.guest_traffic import reload_script

pytestmark = pytest.mark.vm

PROTOS = ("http", "ssh", "ssl", "dns", "bittorrent", "smtp", "ftp")
EXCHANGES = ("http", "ssh", "ssl", "dns")
TESTDIR = "/tmp/nflab_l7test"          # a --l7dir with the suite's own patterns
NEEDLE = f"--l7dir {TESTDIR} --l7proto needle"
PROC = "/proc/net/nflab_layer7"
MAXDATALEN, NUM_PACKETS = 2048, 10     # the module's defaults (ext.toml [[params]])
SSH = ("ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
       "-o ConnectTimeout={wait} -p {port} nobody@{addr} true")
# what a client waits for an answer before it calls the exchange blocked: long
# enough for a TCG guest on a loaded host to get through
WAIT = 8
# ... and under a DROP rule, whose own counter proves the drop (drop_count), so a
# short wait cannot pass a slow exchange off as a blocked one
BLOCKED_WAIT = 3
TLS_ALERT = "15030300020228"        # alert record, TLS 1.2: fatal, handshake_failure


@pytest.fixture(scope="module")
def loaded(host, apps):  # noqa: F811
    assert_kit_module(host, "xt_layer7")
    res = host.run(f"mkdir -p {TESTDIR} && printf 'needle\\nneedle[0-9]+x\\n' > {TESTDIR}/needle.pat && "
                   f"printf 'endanchor\\nabc$\\n' > {TESTDIR}/endanchor.pat")
    assert res.rc == 0, res.stderr


def exchange(host, proto: str, family: str = "ipv4", wait: int = WAIT) -> tuple[bool, dict]:
    """One real exchange of *proto* from the client to the server namespace, the
    client waiting *wait* seconds for each answer: (did it get through, both
    sides' reports)."""
    addr = ADDR[family][1]
    if proto == "http":
        rep = run(host, ("http", family, 8080), ("http", family, 8080, {"timeout": wait}))
        return rep["client"].get("ok", False), rep
    if proto == "ssh":
        rep = run(host, ("ssh", family, 2222),
                  ("cmd", family, 0, {"cmd": SSH.format(port=2222, addr=addr, wait=wait),
                                      "timeout": 3 * wait}))
        # the server's banner and key exchange came through: it refuses the login
        return "Permission denied" in rep["client"]["output"], rep
    if proto == "ssl":
        # the server answers the ClientHello with a TLS alert (handshake_failure):
        # the client ends at once instead of waiting for a ServerHello
        rep = run(host, ("tcp", family, 8443, {"idle": 3, "reply": TLS_ALERT}),
                  ("tls", family, 8443, {"timeout": wait}))
        return rep["server"].get("received", "").startswith("1603"), rep
    # glibc's resolver (getent) with this namespace's resolv.conf naming the server
    cmd = (f"printf 'nameserver {addr}\\noptions timeout:{max(wait // 2, 1)} attempts:2\\n' "
           "> /etc/resolv.conf && getent ahostsv4 www.example.test")
    rep = run(host, ("dns", family, 53, {"idle": 1}), ("cmd", family, 0, {"cmd": cmd, "timeout": 3 * wait}))
    return rep["client"]["rc"] == 0 and "10.77.2.99" in rep["client"]["output"], rep


def l7_counts(host, family, backend) -> dict:
    """{l7proto: packets} of the FORWARD rules without a target (counting rules)."""
    out = host.check_output(f"{TOOLS[family]}-{backend}-save -c -t filter")
    counts = {}
    for m in re.finditer(r"^\[(\d+):\d+\] -A FORWARD (.*)$", out, re.M):
        p = re.search(r"--l7proto (\S+)", m.group(2))
        if p and "-j" not in m.group(2).split():
            counts[p.group(1)] = counts.get(p.group(1), 0) + int(m.group(1))
    return counts


def drop_count(host, family, backend) -> int:
    """Packets the FORWARD chain's DROP rules stopped."""
    return sum(rule_counters(host, TOOLS[family], backend, key=r"(-j DROP)$").values())


def classes(host) -> dict:
    """{proto: {stat: value}} from /proc/net/nflab_layer7."""
    out = {}
    for line in host.file(PROC).content_string.splitlines():
        if line.startswith("class "):
            words = line.split()
            out[words[1]] = {k: int(v) for k, v in (w.split("=") for w in words[2:])}
    return out


@pytest.mark.parametrize("proto", EXCHANGES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_exchange_is_classified_then_dropped(host, loaded, clean_forward, backend, proto):
    ipt = f"iptables-{backend} -w"
    add_rules(host, [f"{ipt} -A FORWARD -m layer7 --l7proto {p}" for p in PROTOS])
    ok, rep = exchange(host, proto)
    assert ok, f"the {proto} exchange failed under counting rules only: {rep}"
    counts = l7_counts(host, "ipv4", backend)
    assert counts[proto] > 0, f"{proto} traffic did not match --l7proto {proto}: {counts}"
    others = {p: n for p, n in counts.items() if p != proto and n}
    assert not others, f"{proto} traffic matched other protocols' patterns: {others}"
    add_rules(host, [f"{ipt} -I FORWARD 1 -m layer7 --l7proto {proto} -j DROP"])
    ok, rep = exchange(host, proto, wait=BLOCKED_WAIT)
    assert not ok, f"the {proto} exchange got through -m layer7 --l7proto {proto} -j DROP: {rep}"
    assert drop_count(host, "ipv4", backend) > 0, f"the {proto} exchange failed, but not at the DROP rule: {rep}"


@pytest.mark.parametrize("backend", ["nft"])
def test_ipv6_exchanges(host, loaded, clean_forward, backend):
    """The same exchanges over IPv6 (ip6tables-nft): classified, nothing else counts."""
    add_rules(host, [f"ip6tables-nft -w -A FORWARD -m layer7 --l7proto {p}" for p in PROTOS])
    before = l7_counts(host, "ipv6", "nft")
    for proto in EXCHANGES:
        ok, rep = exchange(host, proto, "ipv6")
        assert ok, f"the {proto} exchange over IPv6 failed: {rep}"
        after = l7_counts(host, "ipv6", "nft")
        grew = {p for p in PROTOS if after[p] > before[p]}
        assert grew == {proto}, f"{proto} over IPv6 counted for {sorted(grew)}"
        before = after
    add_rules(host, ["ip6tables-nft -w -I FORWARD 1 -m layer7 --l7proto http -j DROP"])
    assert not exchange(host, "http", "ipv6", wait=BLOCKED_WAIT)[0], "HTTP over IPv6 got through the DROP rule"
    assert drop_count(host, "ipv6", "nft") > 0, "HTTP over IPv6 failed, but not at the DROP rule"


def _chunks(host, port, chunks, family="ipv4", reply=""):
    """Send *chunks*, each one TCP segment acknowledged before the next (a chunk
    not acknowledged within 3 s was dropped: the client stops there)."""
    return run(host, ("tcp", family, port, {"reply": reply.encode().hex()}),
               ("chunks", family, port, {"chunks": ",".join(c.hex() for c in chunks), "idle": 3}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_verdict_held_by_later_packets_both_directions(host, loaded, clean_forward, backend):
    """Once the request matched, every later packet of the connection matches,
    in both directions, whatever it carries: the rules count all packets but
    the handshake (SYN and ACK from the client, SYN-ACK from the server)."""
    port, ipt = 5001, f"iptables-{backend} -w"
    c, s = "-i l7c0 -o l7s0 -p tcp --dport 5001", "-i l7s0 -o l7c0 -p tcp --sport 5001"
    add_rules(host, [f"{ipt} -A FORWARD {c} -m layer7 --l7proto http",
                     f"{ipt} -A FORWARD {s} -m layer7 --l7proto http",
                     f"{ipt} -A FORWARD {c}", f"{ipt} -A FORWARD {s}"])
    rep = _chunks(host, port, [b"GET /held HTTP/1.1\r\nHost: l7s\r\n\r\n", b"later bytes 1", b"zz" * 40],
                  reply="anything, not HTTP\n")
    assert rep["client"]["acked"] == [True, True, True], rep
    out = host.check_output(f"iptables-{backend}-save -c -t filter")
    n = [int(x) for x in re.findall(r"^\[(\d+):\d+\] -A FORWARD", out, re.M)]
    orig_l7, reply_l7, orig_all, reply_all = n
    assert (orig_all - orig_l7, reply_all - reply_l7) == (2, 1), \
        f"unmatched packets: client {orig_all - orig_l7} of {orig_all}, server {reply_all - reply_l7} " \
        f"of {reply_all}; expected only the handshake (2 and 1)"
    assert orig_l7 >= 3 and reply_l7 >= 3, (orig_l7, reply_l7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signature_split_across_segments(host, loaded, clean_forward, backend):
    """"GET / HT" + "TP/1.1": the first segment passes (no match yet), the
    second completes the request line and is dropped, as is everything after."""
    add_rules(host, [f"iptables-{backend} -w -A FORWARD -p tcp --dport 5002 -m layer7 --l7proto http -j DROP"])
    rep = _chunks(host, 5002, [b"GET / HT", b"TP/1.1\r\n\r\n"])
    assert rep["client"]["acked"] == [True, False], rep
    assert bytes.fromhex(rep["server"]["received"]) == b"GET / HT", rep
    rep = _chunks(host, 5003, [b"GET / HT", b"XP/1.1\r\n\r\n", b"more"])
    assert rep["client"]["acked"] == [True, True, True], f"a near miss was dropped: {rep}"


def test_byte_budget(host, loaded, clean_forward, xtables):
    """maxdatalen: the signature must end within the first 2048 payload bytes
    (NULs not counted, letters in any case); one byte later it is never seen."""
    add_rules(host, [f"{xtables.tool('ipv4')} -w -A FORWARD -p tcp --dport 5004 -m layer7 {NEEDLE} -j DROP"])
    needle = b"NeEdLe12X"
    cases = {   # label: (chunks, the last one dropped)
        "ends on byte 2048": ([b"f" * 1000, b"f" * (MAXDATALEN - 1000 - len(needle)), needle], True),
        "ends on byte 2049": ([b"f" * 1000, b"f" * (MAXDATALEN - 1000 - len(needle) + 1), needle], False),
        "after 3000 NULs": ([b"\0" * 3000, needle], True),
        "after 3000 NULs and 2048 bytes": ([b"\0" * 3000, b"f" * MAXDATALEN, needle], False),
    }
    for label, (chunks, dropped) in cases.items():
        acked = _chunks(host, 5004, chunks)["client"]["acked"]
        want = [True] * (len(chunks) - 1) + [not dropped]
        assert acked == want, f"{label}: acknowledged {acked}, expected {want}"


def test_packet_budget(host, loaded, clean_forward, xtables):
    """num_packets: the signature in the 10th payload packet matches, in the 11th it does not."""
    tool = xtables.tool("ipv4", xtables.usable[-1])       # nft where both exist: the other one
    add_rules(host, [f"{tool} -w -A FORWARD -p tcp --dport 5005 -m layer7 {NEEDLE} -j DROP"])
    for n, dropped in ((NUM_PACKETS, True), (NUM_PACKETS + 1, False)):
        chunks = [b"f%d" % i for i in range(n - 1)] + [b"needle7x"]
        acked = _chunks(host, 5005, chunks)["client"]["acked"]
        assert acked == [True] * (n - 1) + [not dropped], f"signature in packet {n}: {acked}"


def test_udp_datagrams(host, loaded, clean_forward, xtables):
    """A signature over two datagrams of one UDP flow: the second and every later
    one are dropped."""
    add_rules(host, [f"{xtables.tool('ipv4')} -w -A FORWARD -p udp --dport 5006 -m layer7 {NEEDLE} -j DROP"])
    grams = [b"xx need", b"le42x", b"later", b"later again"]
    rep = run(host, ("udp", "ipv4", 5006),
              ("chunks", "ipv4", 5006, {"proto": "udp", "chunks": ",".join(g.hex() for g in grams)}))
    assert [bytes.fromhex(d) for d in rep["server"]["datagrams"]] == [b"xx need"], rep


def test_records_freed_when_connections_end(host, loaded, clean_forward, xtables):
    add_rules(host, [f"{xtables.tool('ipv4')} -w -A FORWARD -m layer7 --l7proto http"])
    assert exchange(host, "http")[0]
    assert classes(host)["http"]["conns"] >= 1
    host.run_test("conntrack -D -p tcp --dport 8080 >/dev/null 2>&1 || true")
    deadline = time.monotonic() + 10
    while classes(host)["http"]["conns"] and time.monotonic() < deadline:
        time.sleep(0.5)
    st = classes(host)["http"]
    assert st["conns"] == 0 and st["freed"] >= 1 and st["matched"] >= 1, st


def test_flood_is_bounded_and_evicted(host, loaded, clean_forward, xtables):
    """max_conns=4: six idle connections leave four records and two untracked;
    the idle records are evicted (the table is over 3/4 full) and a new
    connection is classified again."""
    res = host.run(reload_script("xt_layer7", params="max_conns=4"))
    assert res.rc == 0, res.stderr
    try:
        add_rules(host, [f"{xtables.tool('ipv4')} -w -A FORWARD -p tcp -m layer7 {NEEDLE} -j DROP"])
        script = "\n".join([
            start_server("hold", "ipv4", 5007),
            # in the background, its output to a file: the idle connections stay
            # open while the GC evicts them (finally: stopped)
            client_cmd("hold", "ipv4", 5007, count=6, timeout=60) + " > /tmp/nflab_hold.out 2>&1 &",
            "for i in $(seq 600); do grep -q opened /tmp/nflab_hold.out && break; sleep 0.05; done",
            "sleep 0.5", f"cat {PROC}",
        ])
        full = host.run(script).stdout
        m = re.search(r"class needle .*", full)
        assert m and "conns=4 " in m.group(0) and "untracked=2 " in m.group(0), full
        deadline = time.monotonic() + 12
        while classes(host)["needle"]["evicted"] < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        st = classes(host)["needle"]
        assert st["evicted"] >= 4 and st["conns"] == 0, st
        acked = _chunks(host, 5008, [b"a needle1x"])["client"]["acked"]
        assert acked == [False], "a new connection after the eviction was not classified"
    finally:
        host.run(f"pkill -f '[n]flab_apps.py (client|server) hold'; {xtables.tool('ipv4')} -w -F FORWARD")
        res = host.run(reload_script("xt_layer7"))
        assert res.rc == 0, res.stderr


def test_pattern_errors_name_the_file_and_construct(host, loaded, clean_forward, xtables):
    first, last = (xtables.tool("ipv4", b) for b in (xtables.usable[0], xtables.usable[-1]))
    res = host.run(f"{first} -w -A FORWARD -m layer7 --l7dir {TESTDIR} --l7proto endanchor")
    assert res.rc != 0 and f"{TESTDIR}/endanchor.pat" in res.stderr and "'$'" in res.stderr, res.stderr
    res = host.run(f"{last} -w -A FORWARD -m layer7 --l7proto nosuchproto")
    assert res.rc != 0 and "no pattern file nosuchproto.pat in /etc/l7-protocols" in res.stderr, res.stderr


def test_save_round_trip_and_shared_classes(host, loaded, clean_forward, xtables):
    """Rules save as they were given (--l7dir first, as l7-filter required); two
    rules with one pattern share one class, on each backend and family."""
    for family, tool in TOOLS.items():
        for backend in xtables.usable:
            ipt = f"{tool}-{backend} -w"
            add_rules(host, [f"{ipt} -A FORWARD -p tcp -m layer7 ! --l7proto ssh -j ACCEPT",
                             f"{ipt} -A FORWARD -m layer7 --l7dir {TESTDIR} --l7proto needle -j DROP",
                             f"{ipt} -A FORWARD -m layer7 --l7dir {TESTDIR} --l7proto needle"])
            saved = host.check_output(f"{tool}-{backend}-save -t filter")
            assert "-A FORWARD -p tcp -m layer7 ! --l7proto ssh -j ACCEPT" in saved, saved
            assert f'-A FORWARD -m layer7 --l7dir "{TESTDIR}" --l7proto needle -j DROP' in saved, saved
    st, n = classes(host), len(xtables.usable)
    assert st["needle"]["rules"] == 4 * n and st["ssh"]["rules"] == 2 * n, st
