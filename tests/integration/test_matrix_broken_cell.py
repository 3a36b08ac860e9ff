"""`invoke matrix` with a broken extension beside a good one: the broken cell fails at
the build stage with the compiler's reason, iprange still builds, loads and passes
its suite on the same kernel, and the matrix exits non-zero.

The broken extension is a real definition in a folder outside the catalog
(``--extensions-dir``): a scaffolded match whose template reads a field its info
struct does not have, so gcc rejects it on every kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kmods import scaffold
from ground.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vm]

KERNEL = "6.12"
BROKEN = "nflabbroken"
GOOD_LINE = "return (skb->len >= info->min_len)"
BAD_LINE = "return (skb->len >= info->nflab_no_such_field)"


@pytest.fixture(scope="module")
def extra_catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extra-catalog")
    written = scaffold.new_module("match", BROKEN, catalog=folder)
    tpl = next(p for p in written if p.name.endswith(".c.j2"))
    text = tpl.read_text()
    assert GOOD_LINE in text, f"the match scaffold changed: {GOOD_LINE!r} not found"
    tpl.write_text(text.replace(GOOD_LINE, BAD_LINE))
    return folder


def test_broken_extension_is_a_failed_build_cell_and_iprange_passes(extra_catalog, tmp_path):
    build = tmp_path / "build"      # private reports: concurrent matrix runs do not mix
    env = dict(os.environ, CI="1", NFLAB_BUILD=str(build))
    env.pop("NFLAB_EXTRA_CATALOG", None)
    res = subprocess.run([sys.executable, "-m", "invoke", "matrix", f"--kernels={KERNEL}",
                          f"--names=iprange,{BROKEN}", f"--extensions-dir={extra_catalog}", "-j", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert "1 of 1 kernel cell(s) failed" in out, out[-4000:]

    summary = json.loads((build / "reports" / "matrix" / "summary.json").read_text())
    [cell] = summary["cells"]
    assert not cell["ok"]
    assert cell["build"]["iprange"] == "ok", cell
    reason = cell["build"][BROKEN]
    # the compiler's own words, file and line first
    assert reason.startswith(f"xt_{BROKEN}.c:"), reason
    assert "error:" in reason and "nflab_no_such_field" in reason, reason
    assert f"failed to build for {cell['release']}" in reason, reason

    # iprange was installed (load proven by install) and its whole suite passed
    passed, failed = map(int, (cell["test"].split(" passed, ")[0],
                               cell["test"].split(" passed, ")[1].split(" failed")[0]))
    assert passed > 0 and failed == 0, cell["test"]
    assert cell["failures"] == [], cell["failures"]
    junit = open(cell["junit"]).read()
    assert "test_iprange" in junit and BROKEN not in junit

    md = (build / "reports" / "matrix" / "summary.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith(f"| {cell['release']} |"))
    assert "✅ build" in row and f"❌ build: xt_{BROKEN}.c:" in row, row
    assert f"✅ {cell['test']}" in row, row
