"""Shared fixtures: real kernels from the cache (fetched when missing), isolated build trees.

Nothing here mocks the kernel, the compiler or libxtables: integration tests
build real modules against real Debian headers and probe real plugins.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run (derandomize: from each test's
# own source), so CI never fails at random; a bug one finds is fixed and its example
# kept as an @example. HYPOTHESIS_PROFILE=explore draws fresh examples for a search.
settings.register_profile("nflab", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nflab"))
KERNEL_LINES = ("6.1", "6.12")
# the oldest and the newest supported line (lts + stable): the static checks, the
# lifecycle and upstream .t suites run on both
SUPPORTED_ENDS = ("5.10", "7.3")


# ---- valid definitions the tests mutate -----------------------------------

MATCH_RAW = {
    "kind": "match",
    "name": "nfltest",
    "summary": "test match",
    "families": ["ipv4", "ipv6"],
    "options": [
        {"name": "min-len", "type": "uint16", "invert": True, "help": "minimum length"},
    ],
}

TARGET_RAW = {
    "kind": "target",
    "name": "NFLTEST",
    "summary": "test target",
    "families": ["ipv4", "ipv6"],
    "verdict": "XT_CONTINUE",
    "options": [{"name": "set-mark", "type": "uint32", "help": "mark to set"}],
}

HOOK_RAW = {
    "kind": "hook",
    "name": "nflhook",
    "summary": "test hook",
    "families": ["ipv4"],
    "hooks": [{"hook": "PRE_ROUTING", "priority": -175, "family": "ipv4"}],
}


@pytest.fixture
def match_raw():
    return copy.deepcopy(MATCH_RAW)


@pytest.fixture
def target_raw():
    return copy.deepcopy(TARGET_RAW)


@pytest.fixture
def hook_raw():
    return copy.deepcopy(HOOK_RAW)


# ---- kernels and build trees ----------------------------------------------

_kernels = {}


def get_kernel(line: str):
    """The cached Debian kernel of *line* (fetched into $NFLAB_CACHE when missing)."""
    if line not in _kernels:
        from supply import kernels
        _kernels[line] = kernels.get(line)
    return _kernels[line]


@pytest.fixture(scope="session", params=KERNEL_LINES, ids=lambda s: f"k{s}")
def kernel(request):
    """A real kernel (headers, vmlinuz, .config), once per supported line."""
    return get_kernel(request.param)


@pytest.fixture(scope="session")
def kernel_612():
    return get_kernel("6.12")


@pytest.fixture(scope="session")
def build_root(tmp_path_factory):
    """A session-wide $NFLAB_BUILD so tests never write into the repo's ./build."""
    root = tmp_path_factory.mktemp("nflab-build")
    mp = pytest.MonkeyPatch()
    mp.setenv("NFLAB_BUILD", str(root))
    yield root
    mp.undo()


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A per-test empty $NFLAB_BUILD (for cache/rebuild and failure tests)."""
    root = tmp_path / "build"
    monkeypatch.setenv("NFLAB_BUILD", str(root))
    return root


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("probe")


@pytest.fixture
def tmp_catalog(tmp_path):
    """An empty catalog folder outside the repo (new-module writes here)."""
    cat = tmp_path / "catalog"
    cat.mkdir()
    return cat


@pytest.fixture
def iprange_copy(tmp_catalog):
    """A copy of the catalog's iprange folder that a test may break."""
    from kmods import spec
    dest = tmp_catalog / "iprange"
    shutil.copytree(spec.CATALOG / "iprange", dest)
    return dest


# ---- running the CLI like a user does ---------------------------------------

def run_invoke(args, env_extra=None, timeout=600):
    """Run the real `invoke ARGS` (tasks.py) from the repo root; returns CompletedProcess.

    No fallback: when tasks.py (or anything in cli/ it imports) fails to import,
    `invoke` fails for users, so the test fails too, with the import error.
    """
    env = dict(os.environ, LC_ALL="C", CI="1")
    env.update(env_extra or {})
    probe = subprocess.run([sys.executable, "-c", "import tasks"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
    if probe.returncode != 0:
        pytest.fail(f"`import tasks` failed, so `invoke` is broken for users:\n{probe.stderr}",
                    pytrace=False)
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_stopping(cmd, *, timeout: float, grace: float = 90, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) that, on *timeout*, sends
    SIGTERM first: `invoke test` then stops its VMs (their QEMUs run in their own
    sessions, so a SIGKILL of invoke would leave them behind and fail .ci/run).
    A run that timed out returns exit code 124 and says so in its stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(
            cmd, 124, out, (err or "") + f"\n[test] timed out after {timeout:g}s: sent SIGTERM")


def pytest_collection_modifyitems(config, items):
    """Slow tests last, so a quick `-x` run reports unit failures first."""
    items.sort(key=lambda it: 1 if it.get_closest_marker("slow") else 0)
