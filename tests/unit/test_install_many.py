"""install_many (nflab/deploy.py; the loading in vm/install.py): one copy and one
load script for several extensions, with the build and the guest side faked; the
real thing runs in the integration tests (test_vm, test_install_xtables,
test_faults, every suite run)."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from ground.errors import VMError
from nflab import deploy
from vm import install


def _art(name, module, srcversion="ABC"):
    return SimpleNamespace(name=name, module=module, srcversion=srcversion, plugin=name, so=None,
                           ko=SimpleNamespace(name=f"{module}.ko"))


@pytest.fixture
def fake(monkeypatch):
    from supply import kernels
    from vm import lab
    calls = {"copies": [], "scripts": []}
    monkeypatch.setattr(lab, "require", lambda vm: SimpleNamespace(release="r1", spec="6.1", pid=1,
                                                                 started_at=0.0))
    monkeypatch.setattr(kernels, "get", lambda release: SimpleNamespace(release=release))
    monkeypatch.setattr(install, "guest_facts", lambda vm, state: ("r1", "1.8.9-2"))
    monkeypatch.setattr(install, "_copy_files", lambda vm, files: calls["copies"].append(dict(files)))

    def plan(name, vm, kernel, rel, xt, params, kernel_spec):
        art = _art(name, f"xt_{name}")
        calls.setdefault("params", {})[name] = params
        return install.Plan(art, {f"/root/nflab/xt_{name}.ko": b"ko"}, 0,
                            [f"insmod /root/nflab/xt_{name}.ko",
                             f'echo "{install._DONE} xt_{name} $(taint_of {name}) ABC"'])
    monkeypatch.setattr(deploy, "_plan", plan)

    def run(stdout, rc=0):
        def exec_(vm, script, timeout=None):
            calls["scripts"].append(script)
            return subprocess.CompletedProcess([], rc, stdout, "insmod: ERROR: could not insert\n")
        monkeypatch.setattr(lab, "exec", exec_)
    calls["run"] = run
    return calls


def test_one_copy_one_script_and_each_module_proven(fake):
    fake["run"](f"{install._DONE} xt_a OE ABC\n{install._DONE} xt_b O ABC\n")
    got = deploy.install_many(["a", "b"], "vm1", params={"b": {"n": 2}})
    assert [i.module for i in got] == ["xt_a", "xt_b"] and [i.taint for i in got] == ["OE", "O"]
    assert len(fake["copies"]) == 1 and set(fake["copies"][0]) == {"/root/nflab/xt_a.ko",
                                                                   "/root/nflab/xt_b.ko"}
    assert len(fake["scripts"]) == 1
    script = fake["scripts"][0]
    # each extension's part runs in a subshell its first failing line leaves, naming it
    assert script == install.load_script(install.Plan(_art(n, f"xt_{n}"), {}, 0, [
        f"insmod /root/nflab/xt_{n}.ko", f'echo "{install._DONE} xt_{n} $(taint_of {n}) ABC"'])
        for n in "ab")
    assert f"echo '{install._FAILED} xt_b'" in script
    assert fake["params"] == {"a": None, "b": {"n": 2}}


def test_the_failing_module_is_named(fake):
    fake["run"](f"{install._DONE} xt_a OE ABC\n{install._FAILED} xt_b\n", rc=1)
    with pytest.raises(VMError) as exc:
        deploy.install_many(["a", "b", "c"], "vm1")
    assert "loading xt_b failed" in exc.value.message and "could not insert" in exc.value.detail


def test_a_module_without_taint_o_is_not_the_kits(fake):
    fake["run"](f"{install._DONE} xt_a OE ABC\n{install._DONE} xt_b E ABC\n")
    with pytest.raises(VMError, match="xt_b .* taint 'E' without O"):
        deploy.install_many(["a", "b"], "vm1")


def test_install_is_install_many_of_one(fake):
    fake["run"](f"{install._DONE} xt_a OE ABC\n")
    got = deploy.install("a", "vm1", params={"x": 1})
    assert got.module == "xt_a" and fake["params"] == {"a": {"x": 1}}


FAKE_GUEST_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
case " $* " in *" $FAIL "*) echo "insmod: ERROR: could not insert module $FAIL" >&2; exit 1 ;; esac
"""


# not busybox sh: it runs its own insmod and modprobe applets before any in PATH,
# and nothing may load a module on the host
@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_load_script_stops_at_the_first_failing_line(tmp_path, shell):
    """The script itself, run by the guest's shells (bash for SSH commands), with its guest
    commands faked: a failing insmod or modprobe ends its extension's part (no
    "installed" line for it) and the script, naming that extension. Under
    ``( set -e ... ) || ...`` every shell ignored the set -e and went on."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for tool in ("insmod", "modprobe", "rmmod", "install", "cp"):
        (fakes / tool).write_text(FAKE_GUEST_TOOL)
        (fakes / tool).chmod(0o755)
    for n in "abc":
        (tmp_path / f"xt_{n}.ko").write_bytes(b"not loaded")
    arts = [SimpleNamespace(name=n, module=f"xt_{n}", ko=tmp_path / f"xt_{n}.ko", so=None,
                            deps=["x_tables"]) for n in "abc"]
    script = install.load_script([install.plan(a, {}, None) for a in arts])
    env = {"PATH": f"{fakes}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls"), "FAIL": "/root/nflab/xt_b.ko"}
    res = subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert res.returncode == 1, res
    assert [ln.split()[:2] for ln in res.stdout.splitlines()] == [[install._DONE, "xt_a"],
                                                                  [install._FAILED, "xt_b"]], res.stdout
    assert calls == ["modprobe x_tables", "insmod /root/nflab/xt_a.ko",
                     "modprobe x_tables", "insmod /root/nflab/xt_b.ko"], calls
    env["FAIL"] = "x_tables"
    res = subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True)
    assert res.stdout.split() == [install._FAILED, "xt_a"], res.stdout
