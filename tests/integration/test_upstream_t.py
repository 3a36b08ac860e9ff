"""Stock iptables' own tests pass against the kit (issue 21).

On each supported kernel line a fresh VM gets the kit's build of every
catalog extension that stock iptables also ships, and upstream's
``iptables-test.py`` runs upstream's ``extensions/*.t`` files of them (from
the Debian source of the guest's iptables, fetched through the kit's archive
client) with iptables-legacy and iptables-nft (each the kernel serves,
``vm.xtables``). Every case must pass on every backend, with nothing but the
kit's modules and plugins in use.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from kmods import spec
from nflab import upstream_t

pytestmark = [pytest.mark.slow, pytest.mark.vm]

# the stock twins issue 21 names; any other catalog extension upstream ships joins them
NAMED = {"comment", "string", "iprange", "time", "connlimit", "quota"}


# the oldest and the newest supported lines (the release candidate runs them in the matrix)
@pytest.mark.parametrize("line", ["5.10", "7.3"])
def test_upstream_files_pass_on_both_backends(line, tmp_path):
    report, paths = upstream_t.run_on_kernel(line, vm=f"it-upt-{line.replace('.', '')}",
                                             out_dir=tmp_path, progress=lambda m: None)
    src = upstream_t.source(report.source["version"], report.source["suite"], progress=lambda m: None)
    twins = upstream_t.twins(src)
    assert NAMED <= set(twins) <= set(spec.catalog_names())
    per = report.per_extension()
    assert set(per) == set(twins), f"ran {sorted(per)}, stock twins {sorted(twins)}"
    problems = [p for r in report.runs for p in r.problems()] + report.proof_problems
    assert report.ok, "\n".join(problems)
    backends = report.backends["usable"]
    assert backends and set(backends) <= {"legacy", "nft"}, report.backends
    for ext, cells in per.items():
        assert set(cells) == set(backends), (ext, cells)
        for backend, cell in cells.items():
            assert cell["ok"] and cell["tests"] > 0 and cell["passed"] == cell["tests"], (ext, backend, cell)
    # the kit's build was what ran: out-of-tree modules, the kit's plugins, stock ones set aside
    for ext in twins:
        assert "O" in report.proof[ext]["taint"], report.proof[ext]
        assert report.proof[ext]["plugin_sha256"] != report.proof[ext]["stock_plugin_sha256"]
    # the reports name the iptables source the files came from
    summary = json.loads(paths["json"].read_text())
    assert summary["iptables_source"]["version"] == src.version and summary["ok"]
    assert set(summary["iptables_source"]["files"]) >= {f"extensions/{p.name}" for ps in twins.values() for p in ps}
    suite = ET.parse(paths["junit"]).getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["iptables_source"].startswith(f"iptables {src.version}")
    assert suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == len(backends) * sum(map(len, twins.values())) + 1
