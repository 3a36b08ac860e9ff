"""Bad command-line input: non-zero exit, one `error:` line naming the problem and
what is valid, and no file written outside the build and cache dirs.

The tasks run as a user runs them (`invoke ...` from the repo root) in a private
copy of the work tree, so the before/after snapshot (`git status --porcelain`
plus an mtime/size scan of every file) is exact even while other people commit
to the real repo. $HOME, $NFLAB_BUILD and $NFLAB_CACHE point at fresh tmp dirs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

_IGNORE = shutil.ignore_patterns(".git", "build", "__pycache__", ".pytest_cache", ".hypothesis",
                                 "*.pyc")


@pytest.fixture(scope="module")
def work_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "nflab"
    shutil.copytree(REPO, root, ignore=_IGNORE, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=root, check=True)
    return root


def _scan(root: Path) -> dict:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            found[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return found


def _git_status(root: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"],
                          cwd=root, capture_output=True, text=True, check=True).stdout


def _invoke(root: Path, args, tmp_path):
    home, build, cache = tmp_path / "home", tmp_path / "build", tmp_path / "cache"
    for d in (home, build, cache):
        d.mkdir()
    env = dict(os.environ, LC_ALL="C", CI="1", HOME=str(home), NFLAB_BUILD=str(build),
               NFLAB_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root))
    env.pop("XDG_CACHE_HOME", None)
    res = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    return res, home


# (id, argv, expected exit code, words the error line must contain)
CASES = [
    ("build-name-path", ["build-module", "--name=../x"], 2, ["--name", "../x", "valid:", "C identifier"]),
    ("build-name-abs", ["build-module", "--name=/etc/passwd"], 2, ["--name", "valid:"]),
    ("build-name-shell", ["build-module", "--name=x;touch pwned"], 2, ["--name", "valid:"]),
    ("build-name-unknown", ["build-module", "--name=nosuchext"], 2, ["--name", "nosuchext", "iprange"]),
    ("build-no-name", ["build-module"], 2, ["--name", "--all", "iprange"]),
    ("build-kernel-bogus", ["build-module", "--name=iprange", "--kernel=9.99"], 1,
     ["9.99", "5.10", "6.1", "6.12", "7.3", "rc"]),
    ("build-kernel-injection", ["build-module", "--name=iprange", "--kernel=6.1;id"], 1,
     ["kernel spec", "6.1", "6.12"]),
    ("build-kernel-no-such-abi", ["build-module", "--name=iprange", "--kernel=6.12.999+deb12"], 1,
     ["6.12.999+deb12", "nearest valid", "6.12."]),
    ("new-priority-word", ["new-module", "--kind=hook", "--name=nfltmp", "--priority=abc"], 2,
     ["--priority", "abc", "integer", "2147483647"]),
    ("new-priority-range", ["new-module", "--kind=hook", "--name=nfltmp", "--priority=4294967296"], 2,
     ["--priority", "out of range", "2147483647"]),
    ("new-hook-unknown", ["new-module", "--kind=hook", "--name=nfltmp", "--hook=PREROUTING"], 2,
     ["--hook", "PREROUTING", "PRE_ROUTING", "LOCAL_IN", "POST_ROUTING"]),
    ("new-kind-unknown", ["new-module", "--kind=widget", "--name=nfltmp"], 2,
     ["--kind", "widget", "hook, match, target"]),
    ("new-family-unknown", ["new-module", "--kind=hook", "--name=nfltmp", "--family=ipx"], 2,
     ["--family", "ipx", "ipv4, ipv6, netdev"]),
    ("new-name-path", ["new-module", "--kind=match", "--name=../../x"], 2, ["--name", "valid:"]),
    ("new-name-shell", ["new-module", "--kind=match", "--name=$(touch pwned)"], 2, ["--name", "valid:"]),
    ("new-name-long", ["new-module", "--kind=match", "--name=" + "a" * 60], 2, ["--name", "at most 28"]),
    ("new-name-in-tree", ["new-module", "--kind=match", "--name=mark"], 2, ["xt_mark", "overrides_in_tree"]),
    ("render-name-path", ["render", "--name=../x"], 2, ["--name", "valid:"]),
    # names are checked before any VM boots or anything is fetched
    ("install-name-unknown", ["install", "--name=nosuch", "--vm=fix-ws-none"], 2,
     ["--name", "nosuch", "valid:", "iprange"]),
    ("atlas-modules-unknown", ["atlas", "--modules=nosuch", "--vm=fix-ws-none"], 2,
     ["--modules", "nosuch", "valid:", "iprange"]),
    ("upstream-names-unknown", ["upstream-t", "--names=nosuch", "--vm=fix-ws-none"], 2,
     ["--names", "nosuch", "valid:"]),
    ("ci-config-names-unknown", ["ci-config", "--names=nosuch"], 2, ["--names", "nosuch", "valid:"]),
    ("matrix-names-unknown", ["matrix", "--names=iprange,nosuch"], 2, ["--names", "nosuch"]),
    # numbers that are not numbers
    ("matrix-j-word", ["matrix", "-j", "abc"], 2, ["-j", "abc", "whole number"]),
    ("bench-runs-word", ["bench", "--runs=abc"], 2, ["--runs", "abc", "number"]),
    ("test-jobs-word", ["test", "--name=iprange", "--jobs=abc"], 2, ["--jobs", "abc", "auto"]),
    ("test-j-is-jobs", ["test", "--name=iprange", "-j", "abc"], 2, ["--jobs", "abc"]),
    # options that contradict each other
    ("fetch-kernel-and-kernels", ["fetch-kernel", "--kernel=6.1", "--kernels=6.12"], 2,
     ["--kernel", "--kernels", "not both"]),
    ("test-name-and-names", ["test", "--name=iprange", "--names=comment"], 2,
     ["--name", "--names", "not both"]),
    ("new-match-with-hook", ["new-module", "--kind=match", "--name=nfltmp", "--hook=FORWARD"], 2,
     ["--hook", "--kind=hook", "match"]),
    ("new-target-with-priority", ["new-module", "--kind=target", "--name=nfltmp", "--priority=-100"],
     2, ["--priority", "--kind=hook", "target"]),
]


def _check(res, code, words):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "error:" not in res.stdout
    for w in words:
        assert w in errors[0], f"{w!r} missing from {errors[0]!r}"
    # nothing else but progress lines besides the one error line
    others = [line for line in res.stderr.splitlines()
              if line.strip() and not line.startswith(("error:", "nflab: "))]
    assert others == [], others


@pytest.mark.parametrize("argv,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_error_line_no_files(work_copy, tmp_path, argv, code, words):
    before, status = _scan(work_copy), _git_status(work_copy)
    res, home = _invoke(work_copy, argv, tmp_path)
    _check(res, code, words)
    assert _git_status(work_copy) == status
    after = _scan(work_copy)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"files written in the repo: {changed}"
    assert list(home.rglob("*")) == [], "files written in $HOME"
    assert not (work_copy / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_new_module_name_with_newline(work_copy, tmp_path):
    before = _scan(work_copy)
    res, _ = _invoke(work_copy, ["new-module", "--kind=match", "--name=nflx\n"], tmp_path)
    assert _scan(work_copy) == before
    _check(res, 2, ["--name", "not a C identifier"])


def test_catalog_lists_iprange(work_copy, tmp_path):
    res, _ = _invoke(work_copy, ["catalog"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert any(line.split()[:2] == ["iprange", "match"] for line in res.stdout.splitlines())


@pytest.mark.parametrize("task", ["test", "workshop", "matrix", "fetch-kernel", "bench"])
def test_dash_h_is_help(work_copy, tmp_path, task):
    """-h is help on tasks without positional arguments (invoke hands a positional
    argument the next word, so `invoke vm-exec -h` runs `-h`: `--help vm-exec` it is)."""
    res, _ = _invoke(work_copy, [task, "-h"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage:") and "needed value" not in res.stdout + res.stderr


def test_test_short_flags(work_copy, tmp_path):
    res, _ = _invoke(work_copy, ["--help", "test"], tmp_path)
    flags = {w[0]: w[2] for w in (line.split() for line in res.stdout.splitlines())
             if len(w) > 2 and len(w[0]) == 2 and w[0].startswith("-")}
    assert flags["-j"].startswith("--jobs=") and flags["-k"].startswith("--kernel=")
    assert "-h" not in flags
