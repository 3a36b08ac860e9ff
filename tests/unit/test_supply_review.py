"""The kernel supply where a review of stop 33 found it wrong (each test failed
on the code before the fix): --force removing the only copy of a kernel before
a refetch could happen, stale kernel offers never read again, and offline line
specs taking the rc. The InRelease checks are in test_debarchive.py."""
import json

import pytest

from ground import debarchive
from ground.errors import ArchiveError, KernelError
from supply import debian_kernels as dk
from supply import kernels
from supply.entry import Kernel





def _cached_entry(cache, release):
    entry = cache / "kernels" / release
    (entry / "root").mkdir(parents=True)
    (entry / "nflab-kernel.json").write_text(json.dumps({"version": 1}))   # any manifest
    return entry


def test_force_on_a_dropped_abi_keeps_the_cached_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    entry = _cached_entry(tmp_path, "6.12.100+deb13-cloud-amd64")
    monkeypatch.setattr(dk, "offers", lambda **kw: [])      # the archive moved on
    with pytest.raises(KernelError, match="not in Debian's archive"):
        kernels.fetch("6.12.100+deb13", force=True, progress=lambda m: None)
    assert entry.exists(), "a refetch that cannot happen removed the only copy"


def test_force_offline_keeps_the_cached_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    entry = _cached_entry(tmp_path, "6.12.118+deb13-cloud-amd64")

    def offline(**kw):
        raise ArchiveError("cannot reach the Debian mirror")
    monkeypatch.setattr(dk, "offers", offline)
    with pytest.raises(ArchiveError):
        kernels.fetch("6.12.118+deb13", force=True, progress=lambda m: None)
    assert entry.exists(), "a refetch that cannot happen removed the only copy"




OLD = dk.Offer("6.12.117+deb13", "cloud-amd64", "trixie-security", "6.12.117-1",
               (("linux-image-6.12.117+deb13-cloud-amd64", "6.12.117-1"),), "gcc-14")


class _NewArchive:
    """The archive after trixie-security moved to 6.12.118."""
    def __init__(self, *a, **kw):
        pass

    def packages(self, suite):
        return {}


def test_a_package_gone_from_its_suite_reads_the_offers_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    refreshes = []
    monkeypatch.setattr(dk, "offers", lambda refresh=False, **kw: refreshes.append(refresh) or [OLD])
    monkeypatch.setattr(debarchive, "Archive", _NewArchive)
    with pytest.raises(KernelError, match="no longer in trixie-security") as err:
        kernels.fetch("6.12", progress=lambda m: None)
    assert True in refreshes, "the stale offers were not read again"
    assert "invoke kernels --refresh" in err.value.hint




def test_offline_line_spec_never_takes_the_rc(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    entry = tmp_path / "kernels" / "7.3-cloud-amd64"
    entry.mkdir(parents=True)
    k = Kernel(abi="7.3", flavour="cloud-amd64", release="7.3-cloud-amd64", root="", vmlinuz="",
               headers="", config="", modules="", system_map="", packages={},
               suite="experimental", toolchain="sid",
               extra={"rc": True, "version": "7.3~rc7-1~exp1"})
    (entry / "nflab-kernel.json").write_text(k.manifest())

    def offline(**kw):
        raise ArchiveError("cannot reach the Debian mirror")
    monkeypatch.setattr(dk, "offers", offline)
    try:
        ref = kernels.resolve("7.3")
    except (ArchiveError, KernelError):
        ref = None
    assert ref is None or ref.release != "7.3-cloud-amd64", "offline, line 7.3 took the rc"
    assert kernels._line(Kernel.load(entry)) == "rc"
