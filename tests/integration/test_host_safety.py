"""Nothing the kit builds is ever loaded on the host.

Two independent checks: a scan of every kit Python module for host-side
calls of module loaders, and a real build with booby-trapped ``insmod``,
``modprobe`` and ``rmmod`` first on PATH that record any call.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ground.paths import REPO

LOADERS = {"insmod", "modprobe", "rmmod", "kmod"}
PACKAGES = ("kmods", "userspace_ext", "vm", "nflab")


def _host_exec_calls(tree: ast.AST):
    """(lineno, argv0) of subprocess/os calls whose first argv element is a literal loader."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        # host-side execution: subprocess.*/os.* calls, or helpers imported by name
        # (ground.proc.run); guest.run()/host.run() methods run inside the VM
        if isinstance(func, ast.Attribute):
            if not (isinstance(func.value, ast.Name) and func.value.id in {"subprocess", "os"}):
                continue
            name = func.attr
        elif isinstance(func, ast.Name):
            name = func.id
        else:
            continue
        if name not in {"run", "Popen", "call", "check_call", "check_output", "system", "execvp"}:
            continue
        if not node.args:
            continue
        first = node.args[0]
        if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
            first = first.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            argv0 = first.value.split()[0] if first.value.split() else ""
            if os.path.basename(argv0) in LOADERS:
                yield node.lineno, argv0


def test_no_host_side_module_loader_calls():
    offenders = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            offenders += [f"{path.relative_to(REPO)}:{ln}: {cmd}" for ln, cmd in _host_exec_calls(tree)]
    assert not offenders, "host-side module loader calls:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_build_never_calls_a_loader(tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    log = tmp_path / "called.log"
    for tool in LOADERS:
        script = trap / tool
        script.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {log}\nexit 99\n")
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{trap}:{os.environ['PATH']}", NFLAB_BUILD=str(tmp_path / "build"),
               CI="1")
    res = subprocess.run([sys.executable, "-m", "invoke", "build-module", "--name=iprange",
                          "--kernel=6.1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"a module loader was called on the host: {log.read_text()}"


def test_scanner_catches_host_calls_and_ignores_guest_calls():
    src = ("import subprocess, os\nfrom ground.proc import run\n"
           "subprocess.run(['modprobe', 'x'])\nrun(['insmod', 'a.ko'])\n"
           "guest.run('modprobe y')\nhost.run('rmmod z')\nos.system('rmmod z')\n")
    assert [c for _, c in _host_exec_calls(ast.parse(src))] == ["modprobe", "insmod", "rmmod"]
