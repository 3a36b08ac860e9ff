"""`invoke new-module` then `invoke test`: the starter suite and .t file run at once
(issue 17: `invoke test --name=myport` once answered "no suites found").

One hook (netdev INGRESS, the lab's client wire), one match and one target are
scaffolded into a catalog folder outside the kit (``--extensions-dir``, their
suites beside the definitions) and tested in one VM: every starter test passes
(a real packet through the router, the rule or point saw it), every .t line
holds, and each placeholder is an expected failure until its author replaces it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kmods import scaffold
from ground.paths import REPO
from nflab.suites import parse_junit

pytestmark = [pytest.mark.slow, pytest.mark.vm]

NEW = [("hook", "nflscafh", {"hook": "INGRESS", "family": "netdev", "priority": "0"}),
       ("hook", "nflscaff", {"hook": "FORWARD", "family": "ipv6", "priority": "10"}),
       ("match", "nflscafm", {}),
       ("target", "NFLSCAFT", {})]


def test_scaffolded_extensions_test_green_at_once(tmp_path):
    catalog = tmp_path / "catalog"
    for kind, name, kw in NEW:
        written = scaffold.new_module(kind, name, catalog=catalog, **kw)
        assert catalog / name / f"test_{name}.py" in written
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, CI="1", NFLAB_BUILD=str(tmp_path / "build"))
    env.pop("NFLAB_EXTRA_CATALOG", None)
    res = subprocess.run([sys.executable, "-m", "invoke", "test", "--kernel=6.12", "--jobs=1",
                          f"--names={','.join(n for _, n, _ in NEW)}", f"--extensions-dir={catalog}",
                          f"--junit={junit}", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    counts, failures = parse_junit(junit)
    assert not failures and counts["failures"] == counts["errors"] == 0, failures
    # per extension: its packet test passes, its placeholder is the one expected failure
    assert counts["skipped"] == len(NEW), out[-3000:]
    assert counts["tests"] - counts["skipped"] >= len(NEW) + 2 * 2   # + .t files, both backends
