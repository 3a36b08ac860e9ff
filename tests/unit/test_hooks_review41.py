"""Review 41 of the hook-placement checks: ``nft list hooks`` keeps each netdev
hook's device (nftables 1.0.6 and 1.1.x list them differently), the stock
priorities follow the iptables backend, the atlas takes only iptables-nft's own
chains for tables, and the matchers notice a wrong family, hook or priority."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nflab import atlas as A
from nflab import tracing

# ---------------------------------------------------------------- listings
# As nftables prints them (src/mnl.c print_hooks): 1.0.6 (bookworm) and 1.1.3
# (trixie). `nft list hooks ip` and `... ip6` print the same in both; `nft list
# hooks netdev device eth1` names the device only in >= 1.1; a plain `nft list
# hooks` lists no netdev hooks in 1.0.6 (its netdev query has no device) and
# those of every interface in >= 1.1.1.

IP = """\
family ip {
\thook prerouting {
\t\t-0000000450 tracer_hook [nflab_tracer]
\t\t-0000000300 iptable_raw_hook [iptable_raw]
\t\t-0000000175 tracer_hook [nflab_tracer]
\t\t+0000000025 tracer_hook [nflab_tracer]
\t}
\thook input {
\t\t-0000000150 iptable_mangle_hook [iptable_mangle]
\t}
}
"""
IP6 = """\
family ip6 {
\thook prerouting {
\t\t-0000000450 tracer_hook [nflab_tracer]
\t}
}
"""
NETDEV_ETH1_106 = """\
family netdev {
\thook ingress {
\t\t 0000000000 tracer_hook [nflab_tracer]
\t}
}
"""
NETDEV_ETH1_11 = """\
family netdev {
\thook ingress device eth1 {
\t\t 0000000000 tracer_hook [nflab_tracer]
\t}
}
"""
# 1.1.x's plain listing: netdev hooks of every interface (eth0's: somebody's
# flowtable, as nftables >= 1.1.4 names it)
NETDEV_ALL_11 = """\
family netdev {
\thook ingress device eth0 {
\t\t-0000000010 flowtable inet t ft [nf_tables]
\t}
\thook ingress device eth1 {
\t\t 0000000000 tracer_hook [nflab_tracer]
\t}
}
"""
# the tracer's netdev point on the wrong device (eth0)
NETDEV_ALL_11_WRONG = """\
family netdev {
\thook ingress device eth0 {
\t\t 0000000000 tracer_hook [nflab_tracer]
\t}
}
"""

# what the suite's command printed before (`nft list hooks; nft list hooks netdev device eth1`)
OLD_CMD_106 = IP + IP6 + NETDEV_ETH1_106
OLD_CMD_11 = IP + IP6 + NETDEV_ALL_11 + NETDEV_ETH1_11
# what tracing.nft_hooks_command prints: the same on both versions but for the device name
NEW_CMD_106 = IP + IP6 + NETDEV_ETH1_106
NEW_CMD_11 = IP + IP6 + NETDEV_ETH1_11


def claims(*keys):
    return [tracing.Point(i, f, h, p, True, 0) for i, (f, h, p) in enumerate(keys)]


TRACER = claims(("ipv4", "PRE_ROUTING", -450), ("ipv4", "PRE_ROUTING", -175),
                ("ipv4", "PRE_ROUTING", 25), ("ipv6", "PRE_ROUTING", -450),
                ("netdev", "INGRESS", 0))


def test_the_suites_command_lists_ip_ip6_and_one_device():
    assert tracing.nft_hooks_command("eth1") == \
        "nft list hooks ip; nft list hooks ip6; nft list hooks netdev device eth1"
    src = (Path(__file__).parents[2] / "tests/suites/test_placement.py").read_text()
    assert "nft list hooks;" not in src and 'check_output("nft list hooks")' not in src
    assert src.count("tracing.nft_hooks_command(") == 2


@pytest.mark.parametrize("text", [NEW_CMD_106, NEW_CMD_11, OLD_CMD_106, OLD_CMD_11],
                         ids=["1.0.6", "1.1.x", "1.0.6-plain", "1.1.x-plain"])
def test_each_row_keeps_its_device(text):
    rows = tracing.nft_hook_lines(text, device="eth1")
    netdev = [r for r in rows if r[0] == "netdev" and r[4] == "nflab_tracer"]
    assert [(r.device, tuple(r)) for r in netdev] == \
        [("eth1", ("netdev", "ingress", 0, "tracer_hook", "nflab_tracer"))]
    assert all(r.device == "" for r in rows if r[0] != "netdev")
    # still the plain (family, hook, priority, function, module) tuple it was
    assert ("ip", "prerouting", -300, "iptable_raw_hook", "iptable_raw") in rows


# the same hook on two devices
NETDEV_TWO_11 = NETDEV_ALL_11.replace("\t\t-0000000010 flowtable inet t ft [nf_tables]\n",
                                      "\t\t 0000000000 tracer_hook [nflab_tracer]\n")


def test_rows_of_different_devices_stay_distinct():
    rows = tracing.nft_hook_lines(NETDEV_TWO_11)
    assert sorted((r.device, r[3]) for r in rows) == [("eth0", "tracer_hook"), ("eth1", "tracer_hook")]
    assert rows[0] != rows[1] and tuple(rows[0]) == tuple(rows[1])
    assert len(set(rows)) == len(dict.fromkeys(rows)) == 2
    # a device listed a second time adds nothing
    assert tracing.nft_hook_lines(NETDEV_TWO_11 + NETDEV_ETH1_11) == rows


@pytest.mark.parametrize("text", [NEW_CMD_106, NEW_CMD_11, OLD_CMD_11],
                         ids=["1.0.6", "1.1.x", "1.1.x-plain+device"])
def test_the_tracer_on_its_device_passes(text):
    assert tracing.nft_problems(text, TRACER, device="eth1") == []


def test_duplicates_across_listings_are_no_unclaimed_hooks():
    """1.1.x's plain listing holds eth1 already; the explicit eth1 listing repeats it.
    This once said "nflab_tracer hooks no definition claims: [('netdev','ingress',0)]"."""
    problems = tracing.nft_problems(OLD_CMD_11, TRACER, device="eth1")
    assert not any("no definition claims" in p for p in problems), problems


@pytest.mark.parametrize("text", [
    IP + IP6 + NETDEV_ALL_11_WRONG,                               # 1.1.x plain listing
    IP + IP6 + NETDEV_ALL_11_WRONG + "family netdev {\n}\n",     # ... and an empty eth1 listing
    IP + IP6,                                                     # 1.0.6: eth1's listing is empty
], ids=["1.1.x-plain", "1.1.x-both", "1.0.6"])
def test_the_tracer_on_the_wrong_device_fails(text):
    problems = tracing.nft_problems(text, TRACER, device="eth1")
    assert any(p.startswith("netdev INGRESS: claims priority 0 on eth1") for p in problems), problems


def test_the_wrong_device_is_named():
    problems = tracing.nft_problems(IP + IP6 + NETDEV_ALL_11_WRONG, TRACER, device="eth1")
    assert "the kernel has nflab_tracer at 0 on eth0 there" in problems[0], problems
    assert problems[-1] == "nflab_tracer hooks no definition claims: netdev ingress device eth0 0"


# ---------------------------------------------------------------- wrong family / hook (item 3)

def test_nft_problems_catches_a_wrong_family():
    """The kernel has the -175 point in ip6, the definition claims it for ipv4."""
    text = IP.replace("\t\t-0000000175 tracer_hook [nflab_tracer]\n", "") + \
        IP6.replace("\t}\n}", "\t\t-0000000175 tracer_hook [nflab_tracer]\n\t}\n}")
    problems = tracing.nft_problems(text + NETDEV_ETH1_11, TRACER, device="eth1")
    assert any(p.startswith("ipv4 PRE_ROUTING: claims priority -175") for p in problems), problems
    assert "ip6 prerouting -175" in problems[-1], problems


def test_nft_problems_catches_a_wrong_hook():
    """The kernel has the -175 point at input, the definition claims prerouting."""
    text = IP.replace("\t\t-0000000175 tracer_hook [nflab_tracer]\n", "").replace(
        "\t\t-0000000150 iptable_mangle_hook", "\t\t-0000000175 tracer_hook [nflab_tracer]\n"
        "\t\t-0000000150 iptable_mangle_hook")
    problems = tracing.nft_problems(text + IP6 + NETDEV_ETH1_11, TRACER, device="eth1")
    assert any(p.startswith("ipv4 PRE_ROUTING: claims priority -175") for p in problems), problems
    assert "ip input -175" in problems[-1], problems


# ---------------------------------------------------------------- stock priorities per backend (item 5)

def test_one_table_of_documented_priorities():
    assert A.DOCUMENTED is tracing.DOCUMENTED and A.DOCUMENTED_NFT is tracing.DOCUMENTED_NFT
    assert tracing.documented("legacy")["security"] == 50
    assert tracing.documented("nft")["security"] == tracing.documented("iptables-nft")["security"] == 150
    for hook in ("LOCAL_IN", "FORWARD", "LOCAL_OUT"):
        assert tracing.stock_at(hook, "nft")[150] == "security" and 50 not in tracing.stock_at(hook, "nft")
        assert tracing.stock_at(hook)[50] == "security" == tracing.STOCK_AT[hook][50]


def test_labels_and_fate_follow_the_backend():
    assert tracing.point_label("LOCAL_OUT", 125) == "after security 50"
    assert tracing.point_label("LOCAL_OUT", 125, "nft") == "after filter 0, before security 150"
    assert tracing.point_label("FORWARD", 75, "iptables-nft") == "after filter 0, before security 150"
    points = claims(*(("ipv4", "FORWARD", p) for p in (-450, -250, -175, -125, -75, 25, 75, 125)))
    last = tracing.Entry(1, 5, "ipv4", "FORWARD", 25, "eth1", "eth2", 0, "new", "ipv4",
                         "192.0.2.2", "198.51.100.2", 17, False, 92, 7)
    assert tracing.fate([last], points).endswith("; between them: security 50")
    said = tracing.fate([last], points, backend="nft")
    assert said.startswith("stopped after FORWARD/25") and "between them" not in said, said
    last125 = tracing.Entry(**{**last.__dict__, "priority": 75})
    assert "between them" not in tracing.fate([last125], points)


# ---------------------------------------------------------------- atlas: chain family, 1.1.x rows (item 6)

def test_only_iptables_nfts_own_family_is_a_table():
    assert A.classify_nft("chain inet filter input", "nf_tables", True, "ipv4") == \
        ("nftables inet filter input", "other")
    assert A.classify_nft("chain inet filter input", "nf_tables", True) == \
        ("nftables inet filter input", "other")
    assert A.classify_nft("chain ip6 filter INPUT", "nf_tables", True, "ipv4") == \
        ("nftables ip6 filter INPUT", "other")
    assert A.classify_nft("chain ip filter INPUT", "nf_tables", True, "ipv4") == ("filter", "table")
    assert A.classify_nft("chain ip6 filter INPUT", "nf_tables", True, "ipv6") == ("filter", "table")


DEBIAN_INET = """\
family ip {
\thook input {
\t\t 0000000000 chain inet filter input [nf_tables]
\t}
}
"""


def test_debians_inet_filter_chain_is_not_iptables_filter_table():
    a = A.Atlas(kernel="k", backend="iptables-nft", exact=True,
                entries=[A.Entry("ipv4", "LOCAL_IN", "filter", "table", interval=[-75, 25],
                                 source="measured")])
    A.merge(a, A.nft_hook_rows(DEBIAN_INET), {})
    assert a.find("ipv4", "LOCAL_IN", "filter").priority is None
    assert any(not c.ok and "ipv4 LOCAL_IN filter: measured interval (-75, 25) holds 0" in c.what
               for c in a.checks), [c.what for c in a.checks]
    assert a.find("ipv4", "LOCAL_IN", "nftables inet filter input").kind == "other"
    # unmeasured, it is somebody else's chain, not a table the counters missed
    b = A.Atlas(kernel="k", backend="iptables-nft", exact=True)
    A.merge(b, A.nft_hook_rows(DEBIAN_INET), {})
    assert b.ok, [c.what for c in b.checks]


NFT_11_EXTRA = """\
family ip {
\thook prerouting {
\t\t-0000000128 nf_hook_run_bpf id 7
\t\t-0000000100
\t}
}
"""


def test_bpf_flowtable_and_nameless_rows_are_shown_as_other():
    rows = A.nft_hook_rows(NFT_11_EXTRA + NETDEV_ALL_11)
    assert ("ipv4", "PRE_ROUTING", -128, "nf_hook_run_bpf id 7", "") in rows
    assert ("ipv4", "PRE_ROUTING", -100, "", "") in rows
    assert ("netdev", "INGRESS", -10, "flowtable inet t ft", "nf_tables") in rows
    a = A.Atlas(kernel="k", exact=True)
    A.merge(a, rows, {"nflab_tracer": [("netdev", "INGRESS", 0)]})
    assert a.find("ipv4", "PRE_ROUTING", "nf_hook_run_bpf id 7").kind == "other"
    assert a.find("ipv4", "PRE_ROUTING", "(no function name)").kind == "other"
    ft = a.find("netdev", "INGRESS", "nftables flowtable inet t ft")
    assert ft.kind == "other" and ft.device == "eth0"
    assert a.find("netdev", "INGRESS", "nflab_tracer").device == "eth1"
    assert a.ok, [c.what for c in a.checks]


# ---------------------------------------------------------------- atlas: devices distinct (item 1)

class FakeNft:
    """A guest whose nft is *version* (1.0.6 or 1.1): answers each `nft list hooks`
    of a command as that version prints it; the tracer on *tracer_dev*."""

    def __init__(self, version: str, tracer_dev: str = "eth1"):
        self.version, self.tracer_dev, self.commands = version, tracer_dev, []

    def _netdev(self, dev):
        if self.version == "1.0.6" and dev is None:
            return ""                              # no device: the kernel refuses netdev
        hooks = {"eth0": "\t\t-0000000010 flowtable inet t ft [nf_tables]\n"}
        hooks[self.tracer_dev] = hooks.get(self.tracer_dev, "") + \
            "\t\t 0000000000 tracer_hook [nflab_tracer]\n"
        devs = [dev] if dev else sorted(hooks)
        blocks = ["\thook ingress%s {\n%s\t}\n" % ("" if self.version == "1.0.6" else f" device {d}",
                                                 hooks[d]) for d in devs if d in hooks]
        return "family netdev {\n" + "".join(blocks) + "}\n" if blocks else ""

    def run(self, cmd, timeout=90):
        self.commands.append(cmd)
        out = ""
        for part in cmd.split(";"):
            m = re.fullmatch(r"\s*nft list hooks(?: (\w+))?(?: device (\w+))?\s*", part)
            if not m:
                continue
            fam, dev = m.groups()
            if fam in (None, "ip"):
                out += IP
            if fam in (None, "ip6"):
                out += IP6
            if fam in (None, "netdev"):
                out += self._netdev(dev)
        return 0, out, ""


@pytest.mark.parametrize("version", ["1.0.6", "1.1"])
def test_atlas_lists_the_same_hooks_with_both_nftables(version):
    guest = FakeNft(version)
    rows = A._nft_hooks(guest, A.Atlas(kernel="k"), lambda m: None)
    netdev = [(r[2], r[3], r.device) for r in rows if r[0] == "netdev"]
    assert netdev == [(0, "tracer_hook", "eth1")], (guest.commands, netdev)
    assert len(rows) == len(tracing.nft_hook_lines(IP + IP6)) + 1


def test_atlas_does_not_take_a_tracer_on_another_device_for_eth1s():
    rows = A.nft_hook_rows(IP + NETDEV_ALL_11_WRONG)
    a = A.Atlas(kernel="k", exact=True)
    A.merge(a, rows, {"nflab_tracer": [("netdev", "INGRESS", 0)]})
    assert any(not c.ok and "nflab_tracer claims 0, nft list hooks does not show it on eth1" in c.what
               for c in a.checks), [c.what for c in a.checks]


def test_atlas_rows_of_two_devices_are_two_rows():
    a = A.Atlas(kernel="k", exact=True)
    A.merge(a, A.nft_hook_rows(NETDEV_TWO_11), {})
    tracer = [e for e in a.entries if e.hook == "INGRESS" and e.module == "nflab_tracer"]
    assert sorted(e.device for e in tracer) == ["eth0", "eth1"]
    assert len([r for r in A._rows(a, "INGRESS") if r[0] == "nflab_tracer"]) == 2


# ---------------------------------------------------------------- atlas matchers: family, priority (item 3)

def _proc_check(nft_text):
    a = A.Atlas(kernel="k", exact=True)
    A.merge(a, A.nft_hook_rows(nft_text), {"nflab_mine": [("ipv4", "PRE_ROUTING", -120)]})
    return a


def test_proc_point_in_the_wrong_family_is_flagged():
    a = _proc_check("family ip6 {\n\thook prerouting {\n\t\t-0000000120 mine_hook [nflab_mine]\n\t}\n}\n")
    assert any(not c.ok and "ipv4 PRE_ROUTING: nflab_mine claims -120" in c.what for c in a.checks), \
        [c.what for c in a.checks]
    assert a.find("ipv4", "PRE_ROUTING", "nflab_mine").source == "proc"


def test_proc_point_at_the_wrong_priority_is_flagged():
    a = _proc_check("family ip {\n\thook prerouting {\n\t\t-0000000121 mine_hook [nflab_mine]\n\t}\n}\n")
    assert any(not c.ok and "ipv4 PRE_ROUTING: nflab_mine claims -120" in c.what for c in a.checks), \
        [c.what for c in a.checks]


def test_proc_point_found_passes():
    a = _proc_check("family ip {\n\thook prerouting {\n\t\t-0000000120 mine_hook [nflab_mine]\n\t}\n}\n")
    assert a.ok and a.find("ipv4", "PRE_ROUTING", "nflab_mine").source == "proc+nft"


def test_candidates_only_of_the_entrys_family():
    ip6_mangle = ("family ip6 {\n\thook prerouting {\n"
                  "\t\t-0000000150 ip6table_mangle_hook [ip6table_mangle]\n\t}\n}\n")
    rows = A.nft_hook_rows(ip6_mangle)
    e = A.Entry("ipv4", "PRE_ROUTING", "mangle", "table", interval=[-175, -125], source="measured")
    assert A._candidates(e, rows, set(), False) == []
    e6 = A.Entry("ipv6", "PRE_ROUTING", "mangle", "table", interval=[-175, -125], source="measured")
    assert A._candidates(e6, rows, set(), False) == [0]
    # and the merge says the ipv4 interval holds no hook
    a = A.Atlas(kernel="k", exact=True, entries=[e])
    A.merge(a, rows, {})
    assert any(not c.ok and "ipv4 PRE_ROUTING mangle: measured interval (-175, -125) holds 0" in c.what
               for c in a.checks), [c.what for c in a.checks]
