"""The atlas: interval logic, nft list hooks merge, SVG and Markdown renderers (no VM)."""

from __future__ import annotations

import os
import signal
import time
import xml.etree.ElementTree as ET

import pytest

from nflab import atlas as A

NFT_612 = """\
family ip {
	hook prerouting {
		-0000000450 tracer_hook [nflab_tracer]
		-0000000400 ipv4_conntrack_defrag [nf_defrag_ipv4]
		-0000000300 ipt_do_table [ip_tables]
		-0000000200 ipv4_conntrack_in [nf_conntrack]
		-0000000150 iptable_mangle_hook [iptable_mangle]
		-0000000100 nf_nat_ipv4_pre_routing [nf_nat]
	}
	hook input {
		-0000000150 iptable_mangle_hook [iptable_mangle]
		 0000000000 ipt_do_table [ip_tables]
		+0000000050 ipt_do_table [ip_tables]
		+0000000100 nf_nat_ipv4_local_in [nf_nat]
		+2147483647 ipv4_confirm [nf_conntrack]
	}
	hook postrouting {
		-0000000225 apparmor_ip_postroute
		-0000000150 iptable_mangle_hook [iptable_mangle]
		+0000000100 nf_nat_ipv4_out [nf_nat]
	}
}
family netdev {
	hook ingress device eth1 {
		 0000000000 tracer_hook [nflab_tracer]
	}
}
"""


def measured(fam, hook, name, lo, hi, kind="table"):
    return A.Entry(fam, hook, name, kind, interval=[lo, hi], source="measured")


def sample(exact: bool) -> A.Atlas:
    a = A.Atlas(kernel="6.12.117+deb12-cloud-amd64" if exact else "6.1.0-56-cloud-amd64",
                spec="6.12", exact=exact)
    a.entries = [
        measured("ipv4", "PRE_ROUTING", "raw", -450, -250),
        measured("ipv4", "PRE_ROUTING", "conntrack", -250, -175, kind="core"),
        measured("ipv4", "PRE_ROUTING", "mangle", -175, -125),
        measured("ipv4", "PRE_ROUTING", "nat", -125, -75),
        measured("ipv4", "LOCAL_IN", "mangle", -175, -125),
        measured("ipv4", "LOCAL_IN", "filter", -75, 25),
        measured("ipv4", "LOCAL_IN", "security", 25, 75),
        measured("ipv4", "LOCAL_IN", "nat", 75, 125),
        measured("ipv4", "POST_ROUTING", "mangle", -175, -125),
        measured("ipv4", "POST_ROUTING", "nat", 75, 125),
    ]
    a.counts = {"ipv4": {"filter": {"LOCAL_IN": {"forward": 0, "local-in": 1, "local-out": 0},
                                    "FORWARD": {"forward": 1, "local-in": 0, "local-out": 0},
                                    "LOCAL_OUT": {"forward": 0, "local-in": 0, "local-out": 1}},
                         "raw": {"PRE_ROUTING": {"forward": 1, "local-in": 1, "local-out": 0},
                                 "LOCAL_OUT": {"forward": 0, "local-in": 0, "local-out": 0}}}}
    a.paths = {"ipv4": {"forward": ["INGRESS", "PRE_ROUTING", "FORWARD", "POST_ROUTING"],
                        "local-in": ["INGRESS", "PRE_ROUTING", "LOCAL_IN"],
                        "local-out": ["LOCAL_OUT", "POST_ROUTING"]}}
    procs = {"nflab_tracer": [("netdev", "INGRESS", 0), ("ipv4", "PRE_ROUTING", -450)],
             "nflab_pktcount": [("ipv4", "LOCAL_IN", -120)]}
    nft = A.nft_hook_rows(NFT_612 + "family ip {\n hook input {\n -0000000120 h [nflab_pktcount]\n }\n}\n") \
        if exact else None
    A.merge(a, nft, procs)
    return a


# ---------------------------------------------------------------- intervals

def test_change_interval_one_step():
    seen = {p: p >= -125 for p in A.TRACER_POINTS}
    assert A.change_interval(seen) == ([-175, -125], None)


def test_change_interval_before_first_point_and_none():
    assert A.change_interval({p: True for p in A.TRACER_POINTS}) == ([None, -450], None)
    iv, problem = A.change_interval({p: False for p in A.TRACER_POINTS})
    assert iv is None and "no effect" in problem
    iv, problem = A.change_interval({-450: False, -250: True, -175: False})
    assert iv is None and "monotonic" in problem


def test_drop_interval():
    pts = list(A.TRACER_POINTS)
    assert A.drop_interval(pts, {-450, -250, -175, -125, -75}) == ([-75, 25], None)
    assert A.drop_interval(pts, set()) == ([None, -450], None)
    assert A.drop_interval(pts, set(pts))[0] is None
    iv, problem = A.drop_interval(pts, {-450, 25})
    assert iv is None and "still saw" in problem


# ---------------------------------------------------------------- nft list hooks

def test_nft_rows_and_classification():
    rows = A.nft_hook_rows(NFT_612)
    assert ("ipv4", "PRE_ROUTING", -150, "iptable_mangle_hook", "iptable_mangle") in rows
    assert ("netdev", "INGRESS", 0, "tracer_hook", "nflab_tracer") in rows
    assert ("ipv4", "POST_ROUTING", -225, "apparmor_ip_postroute", "") in rows
    assert A.classify_nft("ipt_do_table", "ip_tables") == (None, "xt")
    assert A.classify_nft("nf_nat_ipv4_out", "nf_nat") == ("nat", "table")
    assert A.classify_nft("ipv4_confirm", "nf_conntrack") == ("conntrack confirm", "core")
    assert A.classify_nft("ipv4_conntrack_defrag", "nf_defrag_ipv4") == ("defrag", "core")
    assert A.classify_nft("tracer_hook", "nflab_tracer") == ("nflab_tracer", "tracer")


def test_merge_gives_exact_priorities_inside_intervals():
    a = sample(exact=True)
    exp = {("PRE_ROUTING", "raw"): -300, ("PRE_ROUTING", "conntrack"): -200,
           ("PRE_ROUTING", "mangle"): -150, ("PRE_ROUTING", "nat"): -100,
           ("LOCAL_IN", "filter"): 0, ("LOCAL_IN", "security"): 50, ("LOCAL_IN", "nat"): 100,
           ("POST_ROUTING", "nat"): 100}
    for (hook, name), prio in exp.items():
        e = a.find("ipv4", hook, name)
        assert e.priority == prio and e.source == "nft+measured", (hook, name, e)
    assert a.find("ipv4", "PRE_ROUTING", "defrag").priority == -400
    assert a.find("ipv4", "LOCAL_IN", "conntrack confirm").priority == 2147483647
    assert a.find("ipv4", "POST_ROUTING", "apparmor_ip_postroute").kind == "other"
    assert a.find("netdev", "INGRESS", "nflab_tracer").source == "proc+nft"
    assert a.find("ipv4", "LOCAL_IN", "nflab_pktcount").priority == -120
    assert a.ok, [c.what for c in a.checks if not c.ok]


def test_merge_flags_an_interval_without_its_hook():
    a = A.Atlas(kernel="k", exact=True)
    a.entries = [measured("ipv4", "PRE_ROUTING", "mangle", -125, -75)]   # wrong on purpose
    A.merge(a, A.nft_hook_rows(NFT_612), {})
    assert not a.ok
    bad = " ".join(c.what for c in a.checks if not c.ok)
    assert "mangle" in bad and "(-125, -75)" in bad


# iptables-nft's base chains as `nft list hooks` prints them (6.12, iptables 1.8.9)
NFT_CHAINS = """\
family ip {
	hook prerouting {
		-0000000150 chain ip mangle PREROUTING [nf_tables]
		-0000000100 nf_nat_ipv4_pre_routing [nf_nat]
	}
	hook input {
		 0000000000 chain ip filter INPUT [nf_tables]
		+0000000100 nf_nat_ipv4_local_in [nf_nat]
		+0000000150 chain ip security INPUT [nf_tables]
	}
	hook forward {
		+0000000150 chain ip security FORWARD [nf_tables]
	}
}
"""


def test_nft_chain_rows_are_tables_only_when_measured_through_iptables_nft():
    rows = A.nft_hook_rows(NFT_CHAINS)
    assert ("ipv4", "LOCAL_IN", 0, "chain ip filter INPUT", "nf_tables") in rows
    assert ("ipv4", "LOCAL_IN", 150, "chain ip security INPUT", "nf_tables") in rows
    assert A.classify_nft("chain ip security INPUT", "nf_tables", True) == ("security", "table")
    assert A.classify_nft("chain ip security INPUT", "nf_tables") == ("nftables ip security INPUT", "other")
    assert A.classify_nft("chain inet nflab_ct pre", "nf_tables", True) == \
        ("nftables inet nflab_ct pre", "other")


def test_drop_result_past_the_last_tracer_point():
    every = set(A.TRACER_POINTS)
    forward = ["INGRESS", "PRE_ROUTING", "FORWARD", "POST_ROUTING"]
    # dropped between two points, as legacy's security at 50
    assert A.drop_result({-450, -250, -175, -125, -75, 25}, forward, "FORWARD", forward)[:2] == \
        ([25, 75], "DROP: seen at 25, gone from 75")
    # every point saw it and it never reached POST_ROUTING: dropped above 125
    iv, ev, problem, beyond = A.drop_result(every, forward, "FORWARD", forward[:3])
    assert iv == [125, None] and "gone before POST_ROUTING" in ev and not beyond
    # ... but it did reach POST_ROUTING: not dropped here
    iv, _, problem, beyond = A.drop_result(every, forward, "FORWARD", forward)
    assert iv is None and "not dropped" in problem and not beyond
    # the path ends at LOCAL_IN: the tracer cannot tell, nft list hooks decides
    local_in = ["INGRESS", "PRE_ROUTING", "LOCAL_IN"]
    iv, _, problem, beyond = A.drop_result(every, local_in, "LOCAL_IN", local_in)
    assert iv is None and beyond and "invisible to the tracer" in problem


def test_merge_through_iptables_nft_places_security_at_150():
    a = A.Atlas(kernel="k", backend="iptables-nft", exact=True)
    a.entries = [measured("ipv4", "PRE_ROUTING", "mangle", -175, -125),
                 measured("ipv4", "PRE_ROUTING", "nat", -125, -75),
                 measured("ipv4", "LOCAL_IN", "filter", -75, 25),
                 measured("ipv4", "LOCAL_IN", "nat", 75, 125),
                 measured("ipv4", "FORWARD", "security", 125, None),
                 A.Entry("ipv4", "LOCAL_IN", "security", "table", source="measured", beyond=True,
                         evidence="-j DROP: seen at every tracer point up to 125 ...")]
    A.merge(a, A.nft_hook_rows(NFT_CHAINS), {})
    assert a.ok, [c.what for c in a.checks if not c.ok]
    assert a.find("ipv4", "LOCAL_IN", "security").priority == 150
    assert a.find("ipv4", "FORWARD", "security").priority == 150
    assert a.find("ipv4", "LOCAL_IN", "filter").function == "chain ip filter INPUT"
    assert any("documented priority +150 inside" in c.what for c in a.checks)
    # the same rows in an atlas measured through legacy: somebody else's nftables chains
    legacy = A.Atlas(kernel="k", exact=True,
                     entries=[A.Entry("ipv4", "LOCAL_IN", "security", "table", source="measured",
                                      beyond=True, evidence="unseen")])
    A.merge(legacy, A.nft_hook_rows(NFT_CHAINS), {})
    assert legacy.find("ipv4", "LOCAL_IN", "security").priority is None
    assert "ipv4 LOCAL_IN security: unseen" in [c.what for c in legacy.checks if not c.ok]
    assert legacy.find("ipv4", "LOCAL_IN", "nftables ip security INPUT").kind == "other"


def test_json_round_trip():
    a = sample(exact=True)
    b = A.Atlas.from_json(a.to_json())
    assert b == a


# ---------------------------------------------------------------- SVG

def _svg_rows(svg: str) -> list:
    root = ET.fromstring(svg)
    return [g.attrib for g in root.iter("{http://www.w3.org/2000/svg}g")
            if g.attrib.get("class") == "entry"]


@pytest.mark.parametrize("exact", [True, False])
def test_svg_is_wellformed_with_every_hook_box(exact):
    svg = A.render_svg(sample(exact))
    root = ET.fromstring(svg)
    hooks = [g.attrib["data-hook"] for g in root.iter("{http://www.w3.org/2000/svg}g")
             if g.attrib.get("class") == "hook"]
    assert hooks == list(A.HOOKS)
    assert root.attrib["data-exact"] == str(int(exact))


def test_svg_rows_in_priority_order():
    svg = A.render_svg(sample(exact=True))
    rows = [r for r in _svg_rows(svg) if r["data-hook"] == "PRE_ROUTING"]
    names = [r["data-name"] for r in rows]
    assert names == ["nflab_tracer", "defrag", "raw", "conntrack", "mangle", "nat"]
    ys = [float(r["data-y"]) for r in rows]
    assert ys == sorted(ys)
    prios = [int(r["data-priority"]) for r in rows]
    assert prios == sorted(prios) == [-450, -400, -300, -200, -150, -100]
    mangle = next(r for r in rows if r["data-name"] == "mangle")
    assert mangle["data-interval"] == "-175,-125" and mangle["data-families"] == "ipv4"
    local_in = [r["data-name"] for r in _svg_rows(svg) if r["data-hook"] == "LOCAL_IN"]
    assert local_in == ["mangle", "nflab_pktcount", "filter", "security", "nat", "conntrack confirm"]
    assert "-150 ∈ (-175, -125)" in svg


def test_svg_intervals_only_without_nft():
    a = sample(exact=False)
    svg = A.render_svg(a)
    rows = [r for r in _svg_rows(svg) if r["data-hook"] == "LOCAL_IN"]
    assert [r["data-name"] for r in rows] == ["mangle", "nflab_pktcount", "filter", "security", "nat"]
    assert all(r["data-priority"] == "" for r in rows if r["data-name"] != "nflab_pktcount")
    assert "(-75, 25)" in svg and "measured intervals" in svg and "no nfnetlink_hook" in svg


def test_svg_escapes_text():
    a = A.Atlas(kernel="<k&>", entries=[A.Entry("ipv4", "FORWARD", "a<b>&c", "other", priority=1)])
    svg = A.render_svg(a)
    ET.fromstring(svg)
    assert "a&lt;b&gt;&amp;c" in svg


# ---------------------------------------------------------------- Markdown

def test_markdown_tables():
    md = A.render_markdown(sample(exact=True))
    assert "| PRE_ROUTING | ipv4 | mangle | -150 | (-175, -125) | nft+measured | iptable_mangle_hook [iptable_mangle] |" in md
    assert "| filter | - | 0 / 1 / 0 | 1 / 0 / 0 | 0 / 0 / 1 | - | LOCAL_IN, FORWARD, LOCAL_OUT |" in md
    assert "| forwarded | ipv4 | INGRESS → PRE_ROUTING → FORWARD → POST_ROUTING |" in md
    assert "FAILED" not in md
    md61 = A.render_markdown(sample(exact=False))
    assert "| LOCAL_IN | ipv4 | filter |  | (-75, 25) | measured |" in md61
    assert "no nfnetlink_hook" in md61


def test_write_files(tmp_path):
    res = A.write(sample(exact=True), tmp_path / "atlas-6.12.svg")
    assert res["svg"].name == "atlas-6.12.svg" and res["md"].name == "atlas-6.12.md"
    assert res["svg"].read_text().startswith("<?xml")
    assert "![netfilter atlas](atlas-6.12.svg)" in res["md"].read_text()
    assert A.Atlas.from_json(res["json"].read_text()).exact
    if res["converter"]:
        assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_files_are_named_by_the_stem_whatever_the_extension(tmp_path):
    res = A.write(sample(exact=True), tmp_path / "map.png")
    assert (res["svg"].name, res["md"].name, res["json"].name) == ("map.svg", "map.md", "map.json")
    assert A.write(sample(exact=True), tmp_path / "atlas-7.3")["svg"].name == "atlas-7.3.svg"


def test_a_sigterm_while_measuring_stops_the_vm_the_atlas_booted(tmp_path, monkeypatch):
    """CI's timeout or `kill` during `invoke atlas`: the VM it booted (QEMU runs in
    a session of its own) is stopped, as on Ctrl-C. The test's own SIGTERM handler
    stands in for the default one, so a regression fails here instead of killing pytest."""
    calls, unhandled = [], []
    monkeypatch.setattr(A.lab, "load", lambda vm: None)
    monkeypatch.setattr(A.lab, "up", lambda kernel, vm, progress: calls.append("up"))
    monkeypatch.setattr(A.lab, "down", lambda vm: calls.append(f"down {vm}"))

    def measure(vm, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)                     # the signal is handled before this returns
        return sample(exact=True)

    monkeypatch.setattr(A, "measure", measure)
    old = signal.signal(signal.SIGTERM, lambda *a: unhandled.append(a))
    try:
        with pytest.raises(KeyboardInterrupt):
            A.run("6.12", "rvx", out=str(tmp_path / "atlas.svg"), progress=lambda m: None)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert calls == ["up", "down rvx"] and not unhandled
