"""`invoke atlas` end to end on real kernels: boot, measure, draw; then check the
picture's data against the measurement and against what the kernel says.

The task boots its own VM (``it-atlas-<line>``) and stops it again; the
measurement is read back from the JSON written beside the SVG, and the SVG's
rows (``<g class="entry" data-...>``) must show exactly those entries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from nflab import atlas as A
from ground.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SVG_NS = "{http://www.w3.org/2000/svg}"
STOCK = {  # NF_IP_PRI_* (== NF_IP6_PRI_*)
    ("PRE_ROUTING", "raw"): -300, ("LOCAL_OUT", "raw"): -300,
    ("PRE_ROUTING", "conntrack"): -200, ("LOCAL_OUT", "conntrack"): -200,
    ("PRE_ROUTING", "nat"): -100, ("LOCAL_OUT", "nat"): -100,
    ("LOCAL_IN", "nat"): 100, ("POST_ROUTING", "nat"): 100,
    **{(h, "mangle"): -150 for h in A.HOOKS[1:]},
    **{(h, "filter"): 0 for h in ("LOCAL_IN", "FORWARD", "LOCAL_OUT")},
    **{(h, "security"): 50 for h in ("LOCAL_IN", "FORWARD", "LOCAL_OUT")},
}
ATTACHED = {
    "raw": ["PRE_ROUTING", "LOCAL_OUT"],
    "mangle": ["PRE_ROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POST_ROUTING"],
    "nat": ["PRE_ROUTING", "LOCAL_IN", "LOCAL_OUT", "POST_ROUTING"],
    "filter": ["LOCAL_IN", "FORWARD", "LOCAL_OUT"],
    "security": ["LOCAL_IN", "FORWARD", "LOCAL_OUT"],
}


def _inside(interval, value) -> bool:
    lo, hi = interval
    return (lo is None or lo < value) and (hi is None or value < hi)


def _run_atlas(tmp_path_factory, kernel):
    out = tmp_path_factory.mktemp(f"atlas-{kernel}") / f"atlas-{kernel}.svg"
    vm = f"it-atlas-{kernel.replace('.', '')}"
    res = subprocess.run([sys.executable, "-m", "invoke", "atlas", f"--kernel={kernel}", f"--vm={vm}",
                          f"--out={out}", "--modules=pktcount", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, CI="1"))
    from vm import lab
    st = lab.load(vm)
    assert st is None or not lab.is_running(st), f"invoke atlas left VM {vm} running"
    return res, out


@pytest.fixture(scope="module", params=["6.12", "6.1"])
def measured(request, tmp_path_factory):
    res, out = _run_atlas(tmp_path_factory, request.param)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    data = A.Atlas.from_json(out.with_name(out.name[:-4] + ".json").read_text())
    return request.param, data, out, res.stdout


def _svg_rows(path) -> list:
    root = ET.fromstring(path.read_text())
    return [g.attrib for g in root.iter(f"{SVG_NS}g") if g.attrib.get("class") == "entry"]


def test_attachment_by_counters(measured):
    _kernel, data, _out, _stdout = measured
    for fam in A.FAMILIES:
        for table, hooks in ATTACHED.items():
            assert data.attached(fam, table) == hooks, (fam, table, data.counts[fam][table])
        assert data.paths[fam] == {"forward": ["INGRESS", "PRE_ROUTING", "FORWARD", "POST_ROUTING"],
                                   "local-in": ["INGRESS", "PRE_ROUTING", "LOCAL_IN"],
                                   "local-out": ["LOCAL_OUT", "POST_ROUTING"]}


def test_measured_intervals_hold_the_stock_priorities(measured):
    kernel, data, _out, _stdout = measured
    for fam in A.FAMILIES:
        for (hook, name), prio in STOCK.items():
            e = data.find(fam, hook, name)
            assert e is not None and e.interval, f"{fam} {hook} {name} not measured"
            assert _inside(e.interval, prio), f"{fam} {hook} {name}: {prio} not in {e.interval}"
            if kernel == "6.12":
                assert e.priority == prio, f"{fam} {hook} {name}: nft list hooks says {e.priority}"
                assert e.source == "nft+measured"
            else:
                assert e.priority is None and e.source == "measured"
        # filter sits at LOCAL_IN/FORWARD/LOCAL_OUT only
        assert sorted({e.hook for e in data.entries if e.family == fam and e.name == "filter"}) == \
            ["FORWARD", "LOCAL_IN", "LOCAL_OUT"]
    mangle = data.find("ipv4", "PRE_ROUTING", "mangle")
    assert mangle.interval == [-175, -125]
    assert data.exact is (kernel == "6.12")
    assert data.ok, [c.what for c in data.checks if not c.ok]


def test_tracer_and_user_modules_at_their_own_priorities(measured):
    kernel, data, _out, _stdout = measured
    for fam in A.FAMILIES:
        for hook in A.HOOKS[1:]:
            assert [e.priority for e in data.at(hook, fam) if e.name == "nflab_tracer"] == \
                list(A.TRACER_POINTS)
            pk = data.find(fam, hook, "nflab_pktcount")
            assert pk is not None and pk.priority == A.INT_MAX
            if kernel == "6.12":
                assert pk.source == "proc+nft"
    assert data.find("netdev", "INGRESS", "nflab_tracer").priority == 0


def test_picture_shows_the_measurement(measured):
    kernel, data, out, stdout = measured
    rows = _svg_rows(out)
    assert ET.fromstring(out.read_text()).attrib["data-exact"] == str(int(kernel == "6.12"))
    for e in data.entries:
        iv = "" if not e.interval else ",".join("" if v is None else str(v) for v in e.interval)
        prio = "" if e.priority is None else str(e.priority)
        match = [r for r in rows if r["data-hook"] == e.hook and r["data-name"] == e.name
                 and r["data-priority"] == prio and r["data-interval"] == iv]
        assert match and e.family in match[0]["data-families"].split(), f"no SVG row for {e}"
    for hook in A.HOOKS:
        ys = [float(r["data-y"]) for r in rows if r["data-hook"] == hook]
        orders = [next(e.order for e in data.entries if e.hook == hook and e.name == r["data-name"]
                       and str(e.priority if e.priority is not None else "") == r["data-priority"])
                  for r in rows if r["data-hook"] == hook]
        assert ys == sorted(ys) and orders == sorted(orders), hook
    md = out.with_name(out.name[:-4] + ".md").read_text()
    assert "| PRE_ROUTING | ipv4 | mangle |" in md
    png = out.with_name(out.name[:-4] + ".png")
    if A.png_converters():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cross-checks:" in stdout and "0 failed" in stdout
