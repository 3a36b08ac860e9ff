"""`invoke doctor`: the guest libxtables and accelerator checks really run
(they once sat behind hasattr() on functions that did not exist)."""

from __future__ import annotations

import json

from nflab import doctor
from supply import buildroot
from vm import qemu, rootfs


def test_guest_libxtables_is_compared_with_the_build_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    [check] = [c for c in doctor.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.WARN and "invoke rootfs" in check.fix
    root = buildroot.BuildRoot("bookworm", tmp_path / "root", {rootfs.XTABLES_PKG: "1.8.9-2"})
    monkeypatch.setattr(doctor, "_made_root", lambda release, extra=(): root)
    monkeypatch.setattr(rootfs, "plugin_xtables_version", lambda: "1.8.9-2")
    [check] = [c for c in doctor.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.WARN and "invoke rootfs" in check.fix
    entry = tmp_path / "rootfs" / rootfs.recipe_hash()
    entry.mkdir(parents=True)
    manifest = {"packages": {rootfs.XTABLES_PKG: "0.0-older"}}
    (entry / rootfs.MANIFEST).write_text(json.dumps(manifest))
    [check] = [c for c in doctor.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.FAIL and "0.0-older" in check.detail and "--rebuild" in check.fix
    manifest["packages"][rootfs.XTABLES_PKG] = "1.8.9-2"
    (entry / rootfs.MANIFEST).write_text(json.dumps(manifest))
    [check] = [c for c in doctor.check_xtables() if c.name == "guest libxtables"]
    assert check.status == doctor.OK


def test_accelerator_reports_the_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(doctor.os.path, "exists", lambda p: p == "/dev/kvm" or p == str(tmp_path))
    (tmp_path / qemu.ACCEL_CACHE).write_text(json.dumps(
        {"key": qemu._accel_key(), "accel": "tcg", "reason": "a KVM guest hung"}))
    [check] = doctor.check_kvm()
    assert check.status == doctor.WARN and check.detail == "tcg (a KVM guest hung (cached probe))"
    (tmp_path / qemu.ACCEL_CACHE).write_text(json.dumps({"key": "another host", "accel": "kvm", "reason": "x"}))
    [check] = doctor.check_kvm()
    assert "probed" in check.detail and "cached" not in check.detail
