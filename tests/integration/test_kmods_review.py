"""Concurrent builds of one extension for one kernel (a real Kbuild against the
6.12 headers): after a change, three at once all succeed, one rebuilds and the
others find its result up to date. Nothing is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmods import scaffold
from tests.conftest import get_kernel

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUILD = """
import json, sys
from kmods import build
from supply import kernels
art = build.build_extension("kfixpar", kernels.by_release(sys.argv[1]))
print(json.dumps({"rebuilt": art.rebuilt, "srcversion": art.srcversion}))
"""


def _start(env, release):
    return subprocess.Popen([sys.executable, "-c", BUILD, release], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_concurrent_builds_after_a_change_all_succeed(tmp_path):
    kernel = get_kernel("6.12")
    catalog = tmp_path / "catalog"
    scaffold.new_module("match", "kfixpar", catalog=catalog)
    env = {**os.environ, "NFLAB_EXTRA_CATALOG": str(catalog), "NFLAB_BUILD": str(tmp_path / "build")}
    env.pop("PYTHONPATH", None)
    first = _start(env, kernel.release)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    ext_toml = catalog / "kfixpar" / "ext.toml"
    ext_toml.write_text(ext_toml.read_text().replace("(nflab starter)", "(changed)"))
    procs = [_start(env, kernel.release) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"a concurrent build failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["rebuilt"] for r in results) == [False, False, True], results
    assert len({r["srcversion"] for r in results}) == 1, results
    leftovers = [p.name for p in (tmp_path / "build" / kernel.release / "kfixpar").iterdir()
                 if ".tmp" in p.name]
    assert not leftovers
