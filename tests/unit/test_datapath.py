"""`invoke bench --only=datapath`: the twin scripts, what they prove, and the ratio math.

The guest side (pktgen, the modules, iptables) runs only in a VM; here the pure
parts: the shell the guest gets (checked by a real shell's parser), the parsing
of what it prints (real output of a 6.12 guest), the proof checks and the ratios.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ground.errors import NflabError
from nflab import bench, datapath
from nflab.datapath import STOCK_XTDIR, XTLIBDIR

KIT = datapath.KitBuild("string", "xt_string", "/root/nflab/xt_string.ko", "F44915E1253970B8A7D71AC",
                        "78ee37572187" + "0" * 52)

# what twin_script printed in a 6.12.118+deb13 guest (sha256s shortened to the kit's above)
STOCK_OUT = """@@module xt_string taint=- srcversion=-
@@plugin /root/nflab/xt-stock/libxt_string.so sha256=7ddc8c693b70e0c8a1f3
@@rules 10
forwarded 100000 usec 2654331
"""
KIT_OUT = f"""@@module xt_string taint=OE srcversion=F44915E1253970B8A7D71AC
@@plugin /usr/lib/x86_64-linux-gnu/xtables/libxt_string.so sha256={KIT.plugin_sha256}
@@rules 10
forwarded 100000 usec 2474480
"""


def _parses(script: str):
    for sh in ("sh", "bash"):
        if shutil.which(sh):
            res = subprocess.run([sh, "-n"], input=script, text=True, capture_output=True)
            assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("side", datapath.SIDES)
def test_twin_script_loads_the_side_sets_the_copies_and_floods(side):
    ext, rule = datapath.TWINS["string --algo kmp"][:2]
    flood = datapath.twin_script("iptables-legacy", ext, rule, side, KIT.ko, copies=3, count=500)
    script = flood.prep
    _parses(script)
    _parses(flood.go)
    assert script.count(f"-A FORWARD {rule}") == 3
    if side == "in-tree":
        assert "modprobe xt_string" in script and "insmod" not in script
        assert f"XTABLES_LIBDIR={STOCK_XTDIR} LD_DEBUG=files" in script
    else:
        assert f"insmod {KIT.ko}" in script and "modprobe xt_string" not in script
        assert f"XTABLES_LIBDIR={XTLIBDIR} LD_DEBUG=files" in script
    # the chain is emptied and the module swapped first, then the rules, proved, then pktgen set up
    order = [script.index(s) for s in (":FORWARD ACCEPT", "rmmod xt_string", "@@module", f"-A FORWARD {rule}",
                                       "@@plugin", "@@rules", "echo 'count 500'")]
    assert order == sorted(order)
    assert "udp_src_min 10000" in script and "UDPSRC_RND" not in script      # one flow
    # the timed part is the flood alone
    assert "echo start" in flood.go and "echo start" not in script
    assert not any(w in flood.go for w in ("iptables", "insmod", "modprobe", "rmmod", "count 500"))


def test_twin_script_refuses_an_unknown_side():
    with pytest.raises(ValueError, match="side 'stock'"):
        datapath.twin_script("iptables-legacy", "comment", "-m comment --comment x", "stock", "/x.ko")


def test_every_twin_rule_has_no_target_and_a_reason():
    for label, (ext, rule, copies, why) in datapath.TWINS.items():
        assert rule.startswith(f"-m {ext} ") and " -j " not in rule and why and copies >= 1, label
    assert {t.ext for t in datapath.TWINS.values()} == {"iprange", "string", "quota", "connlimit", "time",
                                                          "comment"}


def test_hook_script_and_baseline():
    base = datapath.hook_script("iptables-nft", unload=("nflab_pktcount", "nflab_tracer"), count=500)
    hook = datapath.hook_script("iptables-nft", "nflab_pktcount", "/root/nflab/nflab_pktcount.ko", count=500)
    for f in (base, hook):
        _parses(f.prep)
        assert "iptables-nft-restore -w" in f.prep and "-A FORWARD" not in f.prep
        assert "echo start" in f.go and "echo start" not in f.prep
    assert "insmod" not in base.prep and "@@module" not in base.prep
    assert "rmmod nflab_pktcount" in base.prep and "rmmod nflab_tracer" in base.prep
    assert hook.prep.index("insmod /root/nflab/nflab_pktcount.ko") < hook.prep.index("@@module") \
        < hook.prep.index("echo 'count 500'")


def test_schedstat_and_cpu_rate():
    # /proc/PID/task/TID/schedstat: ns on a CPU, ns waiting, timeslices
    assert datapath.schedstat_ns(["2503118220 90541115 4101\n", "120551 3001 7\n", ""]) == 2503238771
    assert datapath.cpu_rate("forwarded 100000 usec 2654331\n", 2_000_000_000) == 50000.0
    with pytest.raises(ValueError, match="no CPU time"):
        datapath.cpu_rate("forwarded 100000 usec 2654331\n", 0)


def test_stock_xtdir_script_puts_the_originals_back():
    s = datapath.stock_xtdir_script()
    _parses(s)
    assert f"cp -p $f.nflab-orig {STOCK_XTDIR}/$b" in s and f"ln -s $f {STOCK_XTDIR}/$b" in s


def test_parse_proof_of_real_output():
    p = datapath.parse_proof(STOCK_OUT)
    assert p == datapath.Proof("xt_string", "-", "-", "/root/nflab/xt-stock/libxt_string.so",
                               "7ddc8c693b70e0c8a1f3", 10)
    assert datapath.rate(STOCK_OUT) == pytest.approx(100000 / 2.654331)
    hook = datapath.parse_proof("@@module nflab_tracer taint=OE srcversion=AC2EF1C4FE97845833DF572\n")
    assert (hook.taint, hook.plugin, hook.rules) == ("OE", "-", 0)
    with pytest.raises(ValueError, match="no @@module"):
        datapath.parse_proof("forwarded 1 usec 1\n")


def test_a_proof_that_shows_the_right_side_is_kept():
    assert datapath.check_twin_proof(datapath.parse_proof(STOCK_OUT), "in-tree", KIT, 10).startswith(
        "in-tree: xt_string taint - srcversion -, plugin /root/nflab/xt-stock/libxt_string.so")
    assert "taint OE srcversion F44915E1253970B8A7D71AC" in datapath.check_twin_proof(
        datapath.parse_proof(KIT_OUT), "kit", KIT, 10)


@pytest.mark.parametrize("out,side,why", [
    (KIT_OUT, "in-tree", "the kit's module, not the kernel's"),           # the kit module stayed loaded
    (STOCK_OUT, "kit", "not the kit's build"),
    (KIT_OUT.replace("/usr/lib/x86_64-linux-gnu/xtables/", "/root/nflab/xt-stock/"), "kit",
     "iptables loaded the plugin /root/nflab/xt-stock/libxt_string.so"),
    (STOCK_OUT.replace("sha256=7ddc8c693b70e0c8a1f3", f"sha256={KIT.plugin_sha256}"), "in-tree",
     "is the kit's"),
    (KIT_OUT.replace("@@rules 10", "@@rules 0"), "kit", "0 rules with -m string in FORWARD, not 10"),
    (KIT_OUT.replace("@@plugin", "@@nothing"), "kit", "iptables loaded the plugin -"),
])
def test_a_proof_that_cannot_tell_which_module_ran_is_refused(out, side, why):
    with pytest.raises(NflabError, match="a measurement that cannot tell") as exc:
        datapath.check_twin_proof(datapath.parse_proof(out), side, KIT, 10)
    assert why in str(exc.value) and f"xt_string, {side} side" in str(exc.value)


def test_hook_proof():
    kit = datapath.KitBuild("tracer", "nflab_tracer", "/root/nflab/nflab_tracer.ko", "AC2EF1C4FE97845833DF572")
    good = datapath.parse_proof("@@module nflab_tracer taint=OE srcversion=AC2EF1C4FE97845833DF572\n")
    assert datapath.check_hook_proof(good, kit) == "kit: nflab_tracer taint OE srcversion AC2EF1C4FE97845833DF572"
    with pytest.raises(NflabError, match="is not the kit's build"):
        datapath.check_hook_proof(datapath.parse_proof("@@module nflab_tracer taint=- srcversion=-"), kit)


def test_cost_and_ratio_math():
    assert datapath.cost_us(50000, 100000) == pytest.approx(10.0)        # 20 µs - 10 µs
    # run 1: baseline 100k, in-tree 50k (10 µs), kit 40k (15 µs); run 2: 80k, 40k (12.5), 40k (12.5)
    r = datapath.twin_ratio([100000, 80000, 100000], [50000, 40000, 50000], [40000, 40000, 50000])
    assert (r.base, r.stock, r.kit) == (100000, 50000, 40000)
    assert r.cost_stock_us == pytest.approx(10) and r.cost_kit_us == pytest.approx(15)
    assert r.cost_ratio == pytest.approx(1.5) and r.rate_ratio == pytest.approx(0.8)
    assert r.run_ratios == pytest.approx([1.5, 1.0, 1.0]) and r.spread == pytest.approx((1.0, 1.5))
    assert datapath.format_ratio(r) == "1.50 (1.00–1.50)"
    assert r.best_ratio == pytest.approx(1.0)       # best: 100k, 50k, 50k


def test_an_in_tree_cost_in_the_noise_gives_no_ratio():
    r = datapath.twin_ratio([100000], [101000], [90000])
    assert r.cost_ratio is None and r.run_ratios == [] and r.spread is None and r.best_ratio is None
    assert datapath.format_ratio(r) == "- (the in-tree cost is within the noise)"
    with pytest.raises(ValueError, match="one baseline, in-tree and kit rate per run"):
        datapath.twin_ratio([1.0, 2.0], [1.0], [1.0])


def _run() -> datapath.TwinRun:
    return datapath.TwinRun(
        "iptables-legacy",
        {"comment": {"baseline": [100000, 100000], "in-tree": [50000, 50000], "kit": [40000, 50000]}},
        {"pktcount": {"baseline": [100000, 90000], "loaded": [80000, 90000]}},
        {"comment": {"in-tree": "in-tree: xt_comment taint -", "kit": "kit: xt_comment taint OE"},
         "pktcount": {"kit": "kit: nflab_pktcount taint OE"}})


def test_ratio_table_rows():
    rows = datapath.ratio_rows(_run())
    assert all(len(r) == len(datapath.RATIO_HEADER) for r in rows)
    n = datapath.TWINS["comment"].copies
    # best runs: baseline 100k, in-tree 50k (10 µs), kit 50k (10 µs)
    assert rows[0] == ["comment", str(n), "100000", "50000", "45000", "1.22 (1.00–1.50)", "1.00", "0.90",
                       f"{10000 / n:.0f}", f"{12222.2 / n:.0f}"]
    assert rows[1][0] == "pktcount (hook, no twin)" and rows[1][7] == "0.89 of the baseline"
    assert rows[1][9] == f"{1e9 / 85000 - 1e9 / 95000:.0f} per packet"


def test_bench_rows_of_a_twin_run():
    rows = bench.twin_rows(_run())
    names = [m.name for m in rows]
    assert names == ["datapath baseline: empty FORWARD (packets/CPU-s)",
                     "datapath comment: in-tree (packets/CPU-s)", "datapath comment: kit (packets/CPU-s)",
                     "datapath comment: kit/in-tree cost per packet", "datapath pktcount loaded (packets/CPU-s)",
                     "datapath pktcount: µs per packet over the empty chain"]
    assert rows[0].runs == [100000, 100000, 100000, 90000]
    ratio = rows[3]
    assert ratio.runs == pytest.approx([1.5, 1.0]) and "from the medians 1.22 (1.00–1.50)" in ratio.note
    assert ratio.row()[1:5] == ["1.25", "1.00", "1.50", "2"]
    assert "taint OE" in rows[2].note and f"{datapath.TWINS['comment'].copies} x -m comment" in rows[1].note
    assert rows[5].runs == pytest.approx([2.5, 0.0])
