"""The tracer: definition, rendering, its log parser and the placement checks."""

from __future__ import annotations

import socket
import subprocess

import pytest

from kmods import render, spec
from nflab import tracing

PRIOS = [-450, -250, -175, -125, -75, 25, 75, 125]


@pytest.fixture(scope="module")
def ext():
    return spec.load("tracer")


def _points(ext):
    return [tracing.Point(i, h.family, h.hook, h.priority, True, 0) for i, h in enumerate(ext.hooks)]


def _entry(seq, point, **kw):
    base = dict(seq=seq, point=point.index, family=point.family, hook=point.hook,
                priority=point.priority, indev="eth1", outdev="-", mark=0, ct="none", l3="ipv4",
                src="192.0.2.2", dst="198.51.100.2", proto=17, frag=False, len=92, tag=7)
    base.update(kw)
    return tracing.Entry(**base)


def _walk(points, family, hooks, ingress=True, swap=None):
    keys = tracing.expected_path(points, family, hooks, ingress=ingress)
    if swap:
        keys = swap(keys)
    by_key = {p.key: p for p in points}
    return [_entry(i, by_key[k]) for i, k in enumerate(keys)]


def test_definition_brackets_every_stock_priority(ext):
    assert ext.module == "nflab_tracer" and ext.kind == "hook"
    for fam in ("ipv4", "ipv6"):
        for hook in spec.INET_HOOKS:
            assert sorted(h.priority for h in ext.hooks if (h.family, h.hook) == (fam, hook)) == PRIOS
    assert [(h.family, h.hook) for h in ext.hooks if h.family == "netdev"] == [("netdev", "INGRESS")]
    assert all(h.label for h in ext.hooks)
    assert len(ext.test["magic"].encode()) == 8


def test_rendered_source_has_the_pieces(ext):
    src = render.render(ext)["nflab_tracer.c"]
    assert f'static const char tracer_magic[] = "{ext.test["magic"]}";' in src
    assert "#define TRACER_RING\t1024" in src
    assert "skb_header_pointer(skb, off, len, buf)" in src
    assert src.count("kvfree(pn->ring);") == 1      # tracer_state_exit: init unwind and .exit
    assert "ops->priority = point->priority;" in src
    assert src.count(".priority\t= -175,") == 10


def test_parse_proc_file():
    text = """# family hook priority registered packets
point netdev INGRESS 0 1 12
point ipv4 PRE_ROUTING -450 1 40
ring size=1024 used=2 dropped=3 seq=44
entry seq=42 point=0 family=netdev hook=INGRESS priority=0 in=eth1 out=- mark=0x0 ct=none l3=ipv6 src=2001:db8:1::2 dst=2001:db8:2::2 proto=44 frag=1 len=448 tag=0001e240
entry seq=43 point=1 family=ipv4 hook=PRE_ROUTING priority=-450 in=eth1 out=- mark=0x2a ct=established-reply l3=ipv4 src=192.0.2.2 dst=198.51.100.2 proto=17 frag=0 len=92 tag=00000007
"""
    log = tracing.parse(text)
    assert [p.key for p in log.points] == [("netdev", "INGRESS", 0), ("ipv4", "PRE_ROUTING", -450)]
    assert (log.size, log.used, log.dropped, log.next_seq) == (1024, 2, 3, 44)
    e0, e1 = log.entries
    assert e0.tag == 123456 and e0.frag and e0.l3 == "ipv6" and e0.proto == 44
    assert e1.mark == 0x2a and e1.ct == "established-reply" and e1.key == ("ipv4", "PRE_ROUTING", -450)
    assert log.tagged(7) == [e1]
    with pytest.raises(ValueError, match="malformed"):
        tracing.parse("entry seq=1 point=x")


def test_path_check_accepts_the_claimed_order(ext):
    pts = _points(ext)
    for fam in ("ipv4", "ipv6"):
        for hooks, ingress in ((tracing.FORWARD, True), (tracing.LOCAL_IN, True), (tracing.LOCAL_OUT, False)):
            assert tracing.path_problems(_walk(pts, fam, hooks, ingress), pts, fam, hooks,
                                         ingress=ingress) == []


def test_path_check_catches_a_point_registered_at_0_that_claims_minus_175(ext):
    pts = _points(ext)

    def misplace(keys):           # what a point really at 0 looks like in the log
        k = ("ipv4", "PRE_ROUTING", -175)
        keys = [x for x in keys if x != k]
        i = keys.index(("ipv4", "PRE_ROUTING", 25))
        return keys[:i] + [k] + keys[i:]
    entries = _walk(pts, "ipv4", tracing.FORWARD, swap=misplace)
    problems = tracing.path_problems(entries, pts, "ipv4", tracing.FORWARD, ingress=True)
    assert any("claiming priority -175 ran before" in p or "-175" in p for p in problems)
    assert any(p.startswith("ipv4 PRE_ROUTING: the point claiming priority -75 ran before the one "
                            "claiming -175") for p in problems), problems


def test_path_check_reports_missing_and_extra(ext):
    pts = _points(ext)
    entries = _walk(pts, "ipv4", tracing.FORWARD)
    dropped = [e for e in entries if e.hook != "POST_ROUTING"]
    problems = tracing.path_problems(dropped, pts, "ipv4", tracing.FORWARD, ingress=True)
    assert problems[0].startswith("never visited: POST_ROUTING/-450")
    extra = _walk(pts, "ipv4", tracing.LOCAL_IN)
    problems = tracing.path_problems(extra, pts, "ipv4", tracing.FORWARD, ingress=True)
    assert any(p.startswith("unexpected visits: LOCAL_IN/") for p in problems)


NFT_SAMPLE = """family ip {
\thook prerouting {
\t\t-0000000450 tracer_hook [nflab_tracer]
\t\t-0000000300 iptable_raw_hook [iptable_raw]
\t\t-0000000175 tracer_hook [nflab_tracer]
\t\t+0000000025 tracer_hook [nflab_tracer]
\t}
}
family netdev {
\thook ingress device eth1 {
\t\t 0000000000 tracer_hook [nflab_tracer]
\t}
}
"""


@pytest.mark.parametrize("tag", [0x0a0a_0101, 0x2b0a_0107, 0x1234_010a, 0x0000_0102])
def test_bash_udp_sends_the_whole_payload_in_one_datagram(tag):
    """bash line-buffers stdout: a printf alone split the datagram at every 0x0a
    tag byte, and the tracer (magic + 4 tag bytes) saw none of the pieces; CI's
    atlas once lost a whole guest's local-out path that way. Sent here over
    127.0.0.1 to a socket of this test."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        cmd = tracing.bash_udp("127.0.0.1", tag, port=sock.getsockname()[1])
        subprocess.run(cmd, shell=True, check=True, timeout=30)
        assert sock.recv(4096) == tracing.payload(tag, 48)
        sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            sock.recv(4096)


def test_nft_hooks_parser_and_check():
    rows = tracing.nft_hook_lines(NFT_SAMPLE)
    assert ("ip", "prerouting", -300, "iptable_raw_hook", "iptable_raw") in rows
    assert ("ip", "prerouting", 25, "tracer_hook", "nflab_tracer") in rows
    assert ("netdev", "ingress", 0, "tracer_hook", "nflab_tracer") in rows
    claims = [tracing.Point(0, "ipv4", "PRE_ROUTING", p, True, 0) for p in (-450, -175, 25)]
    claims.append(tracing.Point(3, "netdev", "INGRESS", 0, True, 0))
    assert tracing.nft_problems(NFT_SAMPLE, claims) == []
    wrong = list(claims)
    wrong[1] = tracing.Point(1, "ipv4", "PRE_ROUTING", -125, True, 0)
    problems = tracing.nft_problems(NFT_SAMPLE, wrong)
    assert any("claims priority -125" in p for p in problems)
    assert any("no definition claims" in p for p in problems)


def test_broken_variant_renders_a_misregistration(tmp_path):
    from tests.suites.test_placement import broken_variant
    bad = broken_variant(tmp_path)
    assert bad.module == "nflab_tracerbad"
    assert [(h.family, h.hook, h.priority) for h in bad.hooks] == \
        [(h.family, h.hook, h.priority) for h in spec.load("tracer").hooks]
    src = render.render(bad)["nflab_tracerbad.c"]
    assert "ops->priority = point->priority == -175 ? 0 : point->priority;" in src
    assert '.priority\t= -175,' in src          # the claim is unchanged
    # the tracer body follows the variant's prefix (it once hard-coded tracer_*)
    assert "struct tracer_net" not in src and "tracer_points" not in src
    assert "struct tracerbad_net *pn" in src and "&tracerbad_points[e->index]" in src


def test_ingress_dev_default_comes_from_the_definition(ext):
    """The netdev point attaches to the definition's ingress_dev ([[params]]);
    the hook template's generic eth0 default is not emitted next to it."""
    assert [p for p in ext.params if p["name"] == "ingress_dev"] == \
        [{"name": "ingress_dev", "type": "charp", "default": "eth1",
          "help": "device whose netdev INGRESS hook point attaches to, per netns"}]
    src = render.render(ext)["nflab_tracer.c"]
    assert 'static char *ingress_dev = "eth1";' in src
    assert src.count("module_param(ingress_dev, charp, 0444);") == 1
    assert '"eth0"' not in src
    from tests.suites.conftest import tracer_ingress_dev
    assert tracer_ingress_dev(ext) == "eth1"


def test_hook_template_keeps_eth0_default_without_a_declared_param(ext):
    import copy
    plain = copy.copy(ext)
    plain.params = [p for p in ext.params if p["name"] != "ingress_dev"]
    src = render.render(plain)["nflab_tracer.c"]
    assert 'static char *ingress_dev = "eth0";' in src
    assert src.count("module_param(ingress_dev, charp, 0444);") == 1


@pytest.mark.slow
def test_tracer_builds_on_both_kernels(kernel, build_root):
    from kmods.build import build_extension
    art = build_extension("tracer", kernel)
    assert art.ko.is_file() and art.vermagic.startswith(kernel.release)
    assert "warning" not in (art.dir / "build.log").read_text().lower()


@pytest.mark.slow
def test_broken_variant_builds_on_both_kernels(kernel, build_root, tmp_path):
    """The negative placement test inserts this variant in a VM: it must compile."""
    from kmods.build import build_extension
    from tests.suites.test_placement import broken_variant
    art = build_extension(broken_variant(tmp_path), kernel, with_plugin=False)
    assert art.ko.is_file() and art.ko.name == "nflab_tracerbad.ko"
    assert "warning" not in (art.dir / "build.log").read_text().lower()


def test_every_point_label_names_its_own_hooks_tables(ext):
    """A label (shown in reports) says where the point sits among the tables of its
    hook: FORWARD/-450 is "first, before mangle -150", never "before defrag -400
    and raw -300" (neither runs at FORWARD)."""
    labels = {(h.family, h.hook, h.priority): h.label for h in ext.hooks if h.family != "netdev"}
    assert labels and all(lbl == tracing.point_label(hook, prio) and len(lbl) <= 40
                          for (_, hook, prio), lbl in labels.items()), labels
    assert labels[("ipv4", "FORWARD", -450)] == "first, before mangle -150"
    assert labels[("ipv6", "PRE_ROUTING", -250)] == "after raw -300, before conntrack -200"
    assert labels[("ipv4", "POST_ROUTING", -125)] == "after mangle -150, before nat src 100"
    assert labels[("ipv4", "LOCAL_OUT", 125)] == "after security 50"


@pytest.mark.parametrize("hook, prio, between", [
    ("FORWARD", -450, None),                      # next point -250: no defrag or raw at FORWARD
    ("LOCAL_IN", -450, None),
    ("POST_ROUTING", -125, None),                 # next -75: nat dst is not at POST_ROUTING
    ("PRE_ROUTING", 75, None),                    # next 125: nat src is not at PRE_ROUTING
    ("LOCAL_OUT", -450, "; between them: defrag -400, raw -300"),
    ("LOCAL_IN", 75, "; between them: nat src 100"),
])
def test_a_stopped_packets_fate_names_only_tables_of_its_hook(ext, hook, prio, between):
    points = _points(ext)
    last = next(p for p in points if (p.family, p.hook, p.priority) == ("ipv4", hook, prio))
    said = tracing.fate([_entry(1, last)], points)
    assert said.startswith(f"stopped after {hook}/{prio}"), said
    if between:
        assert said.endswith(between), said
    else:
        assert "between them" not in said, said
