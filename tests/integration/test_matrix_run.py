"""`invoke matrix` for real: two kernels in parallel, one VM each, reports written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ground.paths import REPO, build_dir
from nflab.suites import parse_junit

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def test_matrix_two_kernels_in_parallel():
    res = subprocess.run([sys.executable, "-m", "invoke", "matrix", "--kernels=6.1,6.12",
                          "--names=iprange,nth", "-j", "2"], cwd=REPO, capture_output=True,
                         text=True, timeout=1800, env=dict(os.environ, CI="1"))
    out = build_dir() / "reports" / "matrix"
    summary = json.loads((out / "summary.json").read_text())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    cells = summary["cells"]
    assert {c["kernel"] for c in cells} == {"6.1", "6.12"}
    for c in cells:
        assert c["ok"], c
        assert c["build"] == {"iprange": "ok", "nth": "ok"}
        assert os.path.isfile(c["junit"])
        # ok with every test skipped (no target, no backend) would be no test at all
        counts, failures = parse_junit(Path(c["junit"]))
        assert counts["tests"] > 0 and counts["skipped"] == 0, (counts, c["test"])
        assert counts["failures"] == counts["errors"] == 0 and not failures, failures
        assert c["suites_passed"] is True, c
        assert c["test"] == f"{counts['tests']} passed, 0 failed, 0 skipped", c["test"]
    md = (out / "summary.md").read_text()
    assert "6.1.0-" in md and "6.12." in md and "✅" in md
    assert "kernel" in res.stdout and "iprange" in res.stdout
