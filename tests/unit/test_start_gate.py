"""The start gate between `invoke test` and its pytest subprocess (no VM needed):
pytest collects at once, waits for "go" before the first test, and ends
without running any test on "abort"."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from ground.paths import REPO
from nflab.start_gate import ENV as GATE_ENV


def _pytest(tmp_path, gate, *, write=None, after=0.0):
    test = tmp_path / "test_gated.py"
    test.write_text("import time\n\ndef test_runs():\n"
                    f"    open({str(tmp_path / 'ran')!r}, 'w').write(repr(time.monotonic()))\n")
    opened = []
    if write is not None:
        def open_gate():
            opened.append(time.monotonic())      # CLOCK_MONOTONIC: one clock for both processes
            gate.write_text(write)
        threading.Timer(after, open_gate).start()
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "nflab.pytest_plugin", "-p", "no:cacheprovider",
                          "-q", "-c", os.devnull, f"--rootdir={tmp_path}", str(test)],
                         cwd=tmp_path, env=dict(os.environ, **{GATE_ENV: str(gate)}, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    return res, opened


def test_tests_start_only_after_go(tmp_path):
    gate = tmp_path / "gate"
    res, opened = _pytest(tmp_path, gate, write="go", after=1.5)
    assert res.returncode == 0, res.stdout + res.stderr
    ran_at = float((tmp_path / "ran").read_text())
    assert ran_at >= opened[0], "the test ran before the gate opened"


def test_abort_ends_the_run_before_any_test(tmp_path):
    gate = tmp_path / "gate"
    res, _ = _pytest(tmp_path, gate, write="abort", after=0.5)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no VM to test in" in res.stdout + res.stderr
    assert not (tmp_path / "ran").exists()
