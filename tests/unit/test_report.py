"""The --html packet report: tags to packets, walks, verdicts, rendering.

The inputs are what the plugin collects in a run: real scapy frames (as the
wire sends and receives them) and tracer logs in the proc file's format, built
from the tracer definition's points (as ``/proc/net/nflab_tracer`` prints them).
"""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser

import pytest

from kmods import spec
from nflab import report as rep
from nflab import tracing
from nflab.tracing import payload
from vm.wire import Sent

sc = pytest.importorskip("scapy.all")

CLIENT4, SERVER4, GUEST4 = "192.0.2.2", "198.51.100.2", "192.0.2.1"
CLIENT6, SERVER6 = "2001:db8:1::2", "2001:db8:2::2"
CMAC, GMAC = "02:00:00:00:01:02", "52:54:00:00:01:01"


@pytest.fixture(scope="module")
def points():
    return [tracing.Point(i, h.family, h.hook, h.priority, True, 0)
            for i, h in enumerate(spec.load("tracer").hooks)]


class Trace:
    """Builds a proc file the way the tracer prints it."""

    def __init__(self, points):
        self.points = points
        self.lines = []
        self.seq = 0

    def walk(self, tag, family, hooks, *, ingress=True, src=CLIENT4, dst=SERVER4, upto=None,
             indev="eth1", outdev="eth2", frag=False, rewrite=None, only=None, proto=17):
        by_key = {p.key: p for p in self.points}
        keys = tracing.expected_path(self.points, family, hooks, ingress=ingress)
        if only:
            keys = [k for k in keys if only(k)]
        for k in keys:
            p = by_key[k]
            s, d = rewrite(k, src, dst) if rewrite else (src, dst)
            out = outdev if p.hook in ("FORWARD", "POST_ROUTING", "LOCAL_OUT") else "-"
            self.lines.append(
                f"entry seq={self.seq} point={p.index} family={p.family} hook={p.hook} "
                f"priority={p.priority} in={indev} out={out} mark=0x0 ct=none "
                f"l3={'ipv6' if ':' in s else 'ipv4'} src={s} dst={d} proto={proto} "
                f"frag={int(frag)} len=92 tag={tag:08x}")
            self.seq += 1
            if upto and k == upto:
                break

    def text(self):
        head = [f"point {p.family} {p.hook} {p.priority} 1 0" for p in self.points]
        return "\n".join(head + [f"ring size=1024 used={len(self.lines)} dropped=0 seq={self.seq}"]
                         + self.lines) + "\n"

    def log(self):
        return tracing.parse(self.text())


def udp4(tag, src=CLIENT4, dst=SERVER4, dport=9):
    return sc.Ether(src=CMAC, dst=GMAC) / sc.IP(src=src, dst=dst) / sc.UDP(sport=20000, dport=dport) \
        / payload(tag, 48)


def sent(side, frame):
    return Sent(side, frame.summary(), bytes(frame))


# ---------------------------------------------------------------- tags and frames

def test_tag_and_addresses_from_real_frames():
    f4 = udp4(0x00a1b2c3)
    assert tracing.tag_of(bytes(f4)) == 0x00a1b2c3
    assert tracing.frame_addrs(bytes(f4)) == (CLIENT4, SERVER4)
    f6 = sc.Ether() / sc.IPv6(src="2001:db8:1:0::2", dst=SERVER6) / sc.UDP() / payload(9, 40)
    assert tracing.frame_addrs(bytes(f6)) == (CLIENT6, SERVER6)     # compressed like the tracer
    assert tracing.tag_of(bytes(f6)) == 9
    arp = sc.Ether() / sc.ARP()
    assert tracing.tag_of(bytes(arp)) is None and tracing.frame_addrs(bytes(arp)) is None
    # a magic at the very end without its 4 tag bytes is no tag
    assert tracing.tag_of(b"xx" + payload(5, 8)) is None


# ---------------------------------------------------------------- walks

def test_forwarded_packet_is_one_walk_in_order(points):
    tr = Trace(points)
    tr.walk(7, "ipv4", tracing.FORWARD)
    walks = tracing.walks(tr.log().tagged(7))
    assert len(walks) == 1
    text = rep.path_text(walks[0])
    assert text.startswith("INGRESS/0 → PRE_ROUTING/-450 → PRE_ROUTING/-250")
    assert "PRE_ROUTING/125 → FORWARD/-450" in text and text.endswith("POST_ROUTING/125")


def test_request_and_reply_with_one_tag_are_two_walks(points):
    tr = Trace(points)
    tr.walk(7, "ipv4", tracing.LOCAL_IN, dst=GUEST4)
    tr.walk(7, "ipv4", tracing.LOCAL_OUT, ingress=False, src=GUEST4, dst=CLIENT4, indev="-",
            outdev="eth1")
    walks = tracing.walks(tr.log().tagged(7))
    assert [(w[0].hook, w[-1].hook) for w in walks] == [("INGRESS", "LOCAL_IN"),
                                                         ("LOCAL_OUT", "POST_ROUTING")]


def test_the_same_packet_twice_is_two_walks(points):
    tr = Trace(points)
    tr.walk(7, "ipv4", tracing.FORWARD)
    tr.walk(7, "ipv4", tracing.FORWARD)
    walks = tracing.walks(tr.log().tagged(7))
    assert [len(w) for w in walks] == [25, 25]


def test_dnat_rewrite_stays_one_walk(points):
    vip = "198.51.100.99"

    def dnat(key, src, dst):            # nat dst (-100) rewrites before -75
        fam, hook, prio = key
        return src, (vip if hook in ("INGRESS",) or (hook == "PRE_ROUTING" and prio < -100) else dst)
    tr = Trace(points)
    tr.walk(7, "ipv4", tracing.FORWARD, rewrite=dnat)
    walks = tracing.walks(tr.log().tagged(7))
    assert len(walks) == 1 and walks[0][0].dst == vip and walks[0][-1].dst == SERVER4


def test_fragments_split_and_the_reassembled_packet_goes_on(points):
    tr = Trace(points)
    for _ in range(3):                  # INGRESS and -450 see each fragment
        tr.walk(7, "ipv4", tracing.FORWARD, frag=True,
                only=lambda k: k[1] == "INGRESS" or (k[1] == "PRE_ROUTING" and k[2] == -450))
    tr.walk(7, "ipv4", tracing.FORWARD, ingress=False,
            only=lambda k: not (k[1] == "PRE_ROUTING" and k[2] == -450))
    log = tr.log()
    walks = tracing.walks(log.tagged(7))
    # the fragment that completes the datagram goes on as the reassembled packet
    # (the kernel's defrag hands the whole datagram on in its place)
    assert len(walks) == 3
    assert len(walks[-1]) == 2 + 23 and walks[-1][-1].hook == "POST_ROUTING"
    assert walks[-1][1].frag and not walks[-1][2].frag
    for w in walks[:-1]:
        assert [e.hook for e in w] == ["INGRESS", "PRE_ROUTING"]
        assert "held after PRE_ROUTING/-450 by defrag" in tracing.fate(w, log.points)


# ---------------------------------------------------------------- verdicts and mapping

def test_verdicts_arrived_dropped_local_and_guest_generated(points):
    tr = Trace(points)
    tr.walk(1, "ipv4", tracing.FORWARD)                                  # forwarded, arrives
    tr.walk(2, "ipv4", tracing.FORWARD, upto=("ipv4", "FORWARD", -75))   # filter FORWARD DROP
    tr.walk(3, "ipv4", tracing.LOCAL_IN, dst=GUEST4)                     # to the guest
    tr.walk(4, "ipv4", tracing.LOCAL_OUT, ingress=False, src="198.51.100.1", dst=SERVER4,
            indev="-")                                                   # the guest's own ping
    log = tr.log()
    frames = [udp4(1), udp4(2), udp4(3, dst=GUEST4), udp4(5)]
    sent_ = [sent("client", f) for f in frames]
    sent_.append(sent("client", sc.Ether(src=CMAC, dst=GMAC) / sc.IP(src=CLIENT4, dst=SERVER4) / sc.UDP()))
    received = [("server", bytes(sc.Ether() / sc.IP(src=CLIENT4, dst=SERVER4, ttl=63) / sc.UDP()
                               / payload(1, 48))),
                ("server", bytes(sc.Ether() / sc.IP(src="198.51.100.1", dst=SERVER4) / sc.ICMP()
                               / payload(4, 56)))]
    views = rep.build(sent_, log, received)
    by_tag = {v.tag: v for v in views}
    assert [v.tag for v in views] == [1, 2, 3, 5, 4, None]     # send order, then the guest's, then untagged
    assert by_tag[1].walks[0].fate == "arrived on the server wire"
    assert by_tag[2].walks[0].fate.startswith("stopped after FORWARD/-75: dropped")
    assert "before FORWARD/25 (the next tracer point); between them: filter 0" in by_tag[2].walks[0].fate
    assert by_tag[3].walks[0].fate.startswith("delivered to the guest's local stack")
    assert by_tag[4].origin == "guest" and not by_tag[4].sent
    assert by_tag[4].walks[0].fate == "arrived on the server wire"
    assert by_tag[5].walks[0].entries == [] and "tracer saw none of it" in by_tag[5].walks[0].fate
    assert by_tag[None].sent and "untagged" in by_tag[None].walks[0].fate


def test_a_frame_is_credited_to_one_walk_only(points):
    tr = Trace(points)
    tr.walk(1, "ipv4", tracing.FORWARD)
    tr.walk(1, "ipv4", tracing.FORWARD)
    received = [("server", bytes(udp4(1)))]
    views = rep.build([sent("client", udp4(1)), sent("client", udp4(1))], tr.log(), received)
    fates = [w.fate for w in views[0].walks]
    assert fates[0] == "arrived on the server wire"
    assert fates[1].startswith("left netfilter (passed POST_ROUTING/125) on eth2, not seen on a wire")


def test_without_tracer_arrival_by_tag_only():
    views = rep.build([sent("client", udp4(1)), sent("client", udp4(2))], None,
                      [("server", bytes(udp4(1)))])
    assert views[0].walks[0].fate == "arrived on the server wire (no tracer: no path)"
    assert views[1].walks[0].fate == "not seen on any wire (no tracer: no path)"


# ---------------------------------------------------------------- collecting

def test_report_command_is_valid_shell_and_names_every_source():
    cmd = tracing.report_command()
    subprocess.run(["sh", "-n", "-c", cmd], check=True)        # parse only, nothing runs
    for _name, c in tracing.REPORT_SOURCES:
        assert c.format(module=tracing.MODULE) in cmd
    assert "echo clear > /proc/net/nflab_tracer" in cmd


def test_parse_report_sections_and_a_cut_short_one():
    m = "@@nflab-report@@"
    text = (f"{m} 0\npoint ipv4 FORWARD 0 1 0\n{m} rc 0\n"
            f"{m} 1\n# Generated by iptables-save\n*filter\n[3:252] -A FORWARD -j DROP\nCOMMIT\n{m} rc 0\n"
            f"{m} 2\nip6tables-legacy-save: not found\n{m} rc 127\n"
            f"{m} 5\ntable inet nflab_ct {{\n")
    got = tracing.parse_report(text)
    assert got["tracer"] == (0, "point ipv4 FORWARD 0 1 0")
    assert got["iptables-legacy-save -c"][0] == 0 and "[3:252]" in got["iptables-legacy-save -c"][1]
    assert got["ip6tables-legacy-save -c"] == (127, "ip6tables-legacy-save: not found")
    assert got["nft list ruleset"] == (None, "table inet nflab_ct {")
    assert "iptables-nft-save -c" not in got


# ---------------------------------------------------------------- rendering

class _Balance(HTMLParser):
    VOID = {"br", "hr", "img", "meta", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_section_renders_paths_verdicts_and_counters(points):
    tr = Trace(points)
    tr.walk(1, "ipv4", tracing.FORWARD)
    tr.walk(2, "ipv4", tracing.FORWARD, upto=("ipv4", "FORWARD", -75))
    rules = "*filter\n:FORWARD ACCEPT [1:92]\n[1:92] -A FORWARD -p udp -m iprange --src-range 192.0.2.2-192.0.2.9 -j DROP\nCOMMIT"
    collected = {"tracer": (0, tr.text()), "iptables-legacy-save -c": (0, rules),
                 "ip6tables-legacy-save -c": (0, ""), "nft list ruleset": (0, "table ip x {\n}")}
    html = rep.section([sent("client", udp4(1)), sent("client", udp4(2))],
                       [("server", bytes(udp4(1)))], collected)
    p = _Balance()
    p.feed(html)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    text = "".join(p.text)
    assert "INGRESS/0 → PRE_ROUTING/-450" in text and "FORWARD/-75" in text
    assert "verdict: arrived on the server wire" in text
    assert "verdict: stopped after FORWARD/-75" in text
    assert "[1:92] -A FORWARD -p udp -m iprange" in text
    assert "no rules: ip6tables-legacy-save -c" in text
    assert "after conntrack -200, before mangle -150" in text        # the point's label
    assert "Ether / IP / UDP 192.0.2.2:20000 > 198.51.100.2:discard / Raw" in text
    assert 'data-tag="tag 0x00000001"' in html


def test_section_escapes_and_names_a_missing_tracer():
    collected = {"tracer": (1, "cat: /proc/net/nflab_tracer: No such file or directory"),
                 "nft list ruleset": (0, 'table ip t { comment "<script>x</script>" }')}
    html = rep.section([sent("client", udp4(1))], [], collected)
    assert "<script>x" not in html and "&lt;script&gt;x" in html
    assert "no tracer log (nflab_tracer not loaded)" in html
    assert "not seen on any wire" in html


def test_pytest_html_blob_round_trip(points):
    """The section survives pytest-html's JSON blob the way the integration test reads it."""
    import html as h
    tr = Trace(points)
    tr.walk(1, "ipv4", tracing.FORWARD)
    frag = rep.section([sent("client", udp4(1))], [], {"tracer": (0, tr.text())})
    page = f'<div id="data-container" data-jsonblob="{h.escape(json.dumps({"tests": {"t": [{"extras": [{"content": frag}]}]}}))}"></div>'
    blob = json.loads(h.unescape(re.search(r'data-jsonblob="([^"]*)"', page).group(1)))
    assert "FORWARD/-450" in blob["tests"]["t"][0]["extras"][0]["content"]


# ---------------------------------------------------------------- the plugin, without a VM

INNER = '''
import pytest
from vm import qemu
from nflab.tracing import packet
from vm.wire import Wire

@pytest.fixture(scope="session")
def wire():
    w = Wire(qemu.allocate_ports().wire)
    yield w
    w.close()

def test_sends_two(wire):
    wire.send("client", packet("ipv4", "udp", "192.0.2.2", "198.51.100.2", 0x4242))
    wire.send("server", packet("ipv6", "tcp", "2001:db8:2::2", "2001:db8:1::2", 0x4343))
    assert wire.mark()["client"] == 0

def test_sends_none():
    pass
'''


def test_plugin_adds_a_section_per_test_only_with_html(tmp_path):
    """pytest-html + the plugin on real UDP wires (127.0.0.1) without a guest: each
    test's row gets its section; the packets are listed, and that there is no
    tracer log (no guest) is said, not hidden."""
    import html as h
    import os
    import sys

    from ground.paths import REPO
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "NFLAB_VM"}
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / "r.html"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nflab.pytest_plugin",
            f"--rootdir={tmp_path}", "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")]
    res = subprocess.run(base + [f"--html={out}", "--self-contained-html"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    blob = json.loads(h.unescape(re.search(r'data-jsonblob="([^"]*)"', out.read_text()).group(1)))
    sections = {nodeid.split("::")[-1]: "".join(x["content"] for r in runs for x in r["extras"])
                for nodeid, runs in blob["tests"].items()}
    two = sections["test_sends_two"]
    assert "tag 0x00004242" in two and "tag 0x00004343" in two
    sport = 20000 + 0x4242 % 40000                       # tracing.packet's source port
    assert f"client -&gt; guest: Ether / IP / UDP 192.0.2.2:{sport} &gt; 198.51.100.2:discard" in two
    assert "server -&gt; guest: Ether / IPv6 / TCP" in two
    assert "the tracer could not be loaded: no target host" in two
    assert "not seen on any wire" in two
    assert "no packets sent and none traced" in sections["test_sends_none"]
    # without --html: the run is the same, and no report state exists to collect anything
    res = subprocess.run(base + ["-p", "no:html"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("content,runs", [(None, False), ("", False), ("filter\n", True)])
def test_legacy_listing_runs_only_when_the_kernel_lists_a_table(tmp_path, content, runs):
    """The guard of the legacy listings, run by a real sh: /proc/net/ip_tables_names
    missing (no ip_tables), empty, or naming a table. The listing tool itself is
    swapped for an echo: this host must never run iptables."""
    names = tmp_path / "ip_tables_names"
    if content is not None:
        names.write_text(content)
    cmd = dict(tracing.REPORT_SOURCES)["iptables-legacy-save -c"]
    assert "/proc/net/ip_tables_names" in cmd and "iptables-legacy-save -c" in cmd
    cmd = cmd.replace("/proc/net/ip_tables_names", str(names)).replace("iptables-legacy-save -c", "echo RAN")
    res = subprocess.run(["sh", "-c", f"( {cmd} ) 2>&1"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == ("RAN\n" if runs else "")


@pytest.mark.parametrize("ruleset,v4,v6", [("", False, False),
                                           ("table inet nflab_ct {\n}", False, False),
                                           ("table ip filter {\n}", True, False),
                                           ("# Warning: table ip6 filter is managed by iptables-nft\ntable ip6 filter {\n}", False, True)])
def test_nft_listings_run_only_for_a_family_with_tables(ruleset, v4, v6):
    src = dict(tracing.REPORT_SOURCES)
    out = {}
    for name, tool in (("iptables-nft-save -c", "iptables-nft-save -c"),
                       ("ip6tables-nft-save -c", "ip6tables-nft-save -c")):
        cmd = src[name].replace(tool, "echo RAN")
        res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env={"NFT": ruleset})
        out[name] = res.stdout == "RAN\n"
    assert out == {"iptables-nft-save -c": v4, "ip6tables-nft-save -c": v6}


def test_a_full_tracer_log_is_named_as_the_reason_for_a_missing_path(points):
    tr = Trace(points)
    tr.walk(1, "ipv4", tracing.FORWARD)
    text = tr.text().replace("dropped=0", "dropped=75")
    collected = {"tracer": (0, text)}
    html = rep.section([sent("client", udp4(1)), sent("client", udp4(2))],
                       [("server", bytes(udp4(2)))], collected)
    assert "the tracer log was full (1024 entries): 75 more were not recorded" in html
    assert ("verdict: arrived on the server wire; no path: the tracer log was full (1024 entries, "
            "75 more not recorded), this packet came after") in html


def test_a_walk_ending_where_the_log_filled_up_is_uncertain(points):
    tr = Trace(points)
    for t in range(1, 40):                               # 39 x 25 = 975 entries, all finished
        tr.walk(t, "ipv4", tracing.FORWARD)
    tr.walk(40, "ipv4", tracing.FORWARD, upto=("ipv4", "FORWARD", -75))   # cut by the full log
    log = tracing.parse(tr.text().replace("dropped=0", "dropped=300"))
    views = rep.build([sent("client", udp4(t)) for t in (1, 40)], log, [])
    early, cut = views[0].walks[0].fate, views[1].walks[0].fate
    assert early.startswith("left netfilter") and "uncertain" not in early
    assert cut.startswith("stopped after FORWARD/-75") and "(uncertain: the tracer log filled up" in cut
    # the same end without a full log is a drop, said plainly
    views = rep.build([sent("client", udp4(40))], tr.log(), [])
    assert "uncertain" not in views[0].walks[0].fate
