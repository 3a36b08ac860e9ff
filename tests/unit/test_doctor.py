"""`invoke doctor`: the guest libxtables and accelerator checks really run
(they once sat behind hasattr() on functions that did not exist)."""

from __future__ import annotations

import json
import subprocess
import sys

from ground.paths import REPO
from nflab import doctor, doctor_kit
from supply import buildroot
from vm import qemu, rootfs


def test_guest_libxtables_is_compared_with_the_build_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    [check] = [c for c in doctor_kit.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.WARN and "invoke rootfs" in check.fix
    root = buildroot.BuildRoot("bookworm", tmp_path / "root", {rootfs.XTABLES_PKG: "1.8.9-2"})
    monkeypatch.setattr(doctor_kit, "_made_root", lambda release, extra=(): root)
    monkeypatch.setattr(rootfs, "plugin_xtables_version", lambda: "1.8.9-2")
    [check] = [c for c in doctor_kit.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.WARN and "invoke rootfs" in check.fix
    entry = tmp_path / "rootfs" / rootfs.recipe_hash()
    entry.mkdir(parents=True)
    manifest = {"packages": {rootfs.XTABLES_PKG: "0.0-older"}}
    (entry / rootfs.MANIFEST).write_text(json.dumps(manifest))
    [check] = [c for c in doctor_kit.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.FAIL and "0.0-older" in check.detail and "--rebuild" in check.fix
    manifest["packages"][rootfs.XTABLES_PKG] = "1.8.9-2"
    (entry / rootfs.MANIFEST).write_text(json.dumps(manifest))
    [check] = [c for c in doctor_kit.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.OK


def test_accelerator_reports_the_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(qemu, "SYS_MODULE", tmp_path / "module")    # kvm_intel's, not PVM's
    (tmp_path / "module" / "kvm_intel").mkdir(parents=True)
    monkeypatch.setattr(doctor_kit.os.path, "exists", lambda p: p == "/dev/kvm" or p == str(tmp_path))
    (tmp_path / qemu.ACCEL_CACHE).write_text(json.dumps(
        {"key": qemu._accel_key(), "accel": "tcg", "reason": "a KVM guest hung"}))
    [check] = doctor_kit.check_kvm()
    assert check.status == doctor.WARN and check.detail == "tcg (a KVM guest hung (cached probe))"
    (tmp_path / qemu.ACCEL_CACHE).write_text(json.dumps({"key": "another host", "accel": "kvm", "reason": "x"}))
    [check] = doctor_kit.check_kvm()
    assert "probed" in check.detail and "cached" not in check.detail
    (tmp_path / "module" / "kvm_pvm").mkdir()          # a PVM host: no probe will be made
    [check] = doctor_kit.check_kvm()
    assert check.status == doctor.WARN and "kvm_pvm" in check.detail and "TCG" in check.fix, check


def test_the_doctor_runs_before_setup_without_the_kits_packages():
    """README: `python3 -m nflab.doctor` works before setup. `-S` hides every
    installed package (the venv's zstandard, jinja2, invoke), as Debian's python3
    on a fresh machine would: the checks print, the kit's part is one failed check."""
    res = subprocess.run([sys.executable, "-S", "-E", "-m", "nflab.doctor"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = {line.split()[1]: line for line in res.stdout.splitlines() if len(line.split()) > 1}
    assert lines["kit"].startswith("FAIL") and "bash .ci/setup" in lines["kit"], res.stdout
    assert "bash .ci/setup" in lines["python"] and "pip install -e" not in res.stdout, res.stdout
    assert lines["disk"].startswith("ok"), res.stdout


def test_a_tool_only_in_sbin_is_not_ok(tmp_path, monkeypatch):
    """The kit runs depmod, mke2fs and debootstrap by name: a user whose PATH lacks
    /usr/sbin gets "command not found" from the kit, so the doctor must not say ok."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    tool = tmp_path / "sbin" / "nflab-fake-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setattr(doctor, "SBIN", str(tmp_path / "sbin"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    check = doctor._tool("nflab-fake-tool", "apt-get install fake")
    assert check.status == doctor.FAIL and "not on PATH" in check.detail and "PATH" in check.fix
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{tmp_path / 'sbin'}")
    assert doctor._tool("nflab-fake-tool", "apt-get install fake").status == doctor.OK
    tool.unlink()
    check = doctor._tool("nflab-fake-tool", "apt-get install fake")
    assert (check.status, check.detail, check.fix) == (doctor.FAIL, "not found", "apt-get install fake")
