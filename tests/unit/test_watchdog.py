"""The suites' per-test bound (nflab/watchdog.py): a hung test phase fails alone,
with the phase and the bound in its report, and the run goes on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ground.paths import REPO
from nflab import watchdog

SUITE = textwrap.dedent('''
    import time
    import pytest

    @pytest.fixture
    def stuck_setup():
        time.sleep(60)

    def test_hangs_in_call():
        time.sleep(60)

    def test_hangs_in_setup(stuck_setup):
        pass

    def test_after_them_passes():
        assert True
''')


def _pytest(tmp_path, *args):
    (tmp_path / "test_hang.py").write_text(SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
                           "nflab.pytest_plugin", "-q", "-rfE", f"--rootdir={tmp_path}",
                           "-c", "/dev/null", str(tmp_path / "test_hang.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=50)


def test_a_hung_phase_fails_alone_and_says_so(tmp_path):
    res = _pytest(tmp_path, "--nflab-test-timeout=1")
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert "1 failed, 1 passed, 1 error" in out, out      # a setup that fails is an error
    assert "test call ran over 1 s (nflab watchdog" in out, out
    assert "test setup ran over 1 s (nflab watchdog" in out, out


def test_bound_from_option_environment_and_default(monkeypatch):
    monkeypatch.delenv(watchdog.ENV, raising=False)
    assert watchdog.bound_from(None) == watchdog.DEFAULT
    monkeypatch.setenv(watchdog.ENV, "42")
    assert watchdog.bound_from(None) == 42.0
    assert watchdog.bound_from("0") == 0.0
    with pytest.raises(pytest.UsageError, match="is not a number of seconds"):
        watchdog.bound_from("soon")
