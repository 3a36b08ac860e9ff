"""The kernel supply where a review of stop 33 found it wrong (each test failed
on the code before the fix): --force removing the only copy of a kernel before
a refetch could happen, an InRelease of another suite or an older one accepted,
stale kernel offers never read again, and offline line specs taking the rc."""
import json
import time

import pytest

from ground import debarchive
from ground.debarchive import Archive
from ground.errors import ArchiveError, KernelError
from supply import debian_kernels as dk
from supply import kernels
from supply.entry import Kernel
from tests.unit.debmirror import FakeMirror, Gpg, have_gpg

needs_gpg = pytest.mark.skipif(not have_gpg(), reason="gpg needed")





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





HELLO = {"Package": "hello", "Version": "1.0-1", "Architecture": "amd64",
         "Maintainer": "T <t@test.invalid>", "Description": "x"}
FILES = [("dir", "./usr/"), ("file", "./usr/hello", b"hi\n", 0o644)]


@pytest.fixture(scope="module")
def gpg(tmp_path_factory):
    g = Gpg(tmp_path_factory.mktemp("gnupg"))
    yield g
    g.close()


@pytest.fixture
def mirror(tmp_path, gpg):
    m = FakeMirror(tmp_path / "mirror", gpg)
    yield m
    m.close()


def arch(mirror, gpg, tmp_path):
    return Archive(mirror.url, mirror.security_url, keyring=gpg.keyring, cache=tmp_path / "cache")


@needs_gpg
def test_inrelease_of_another_suite_is_refused(mirror, gpg, tmp_path, monkeypatch):
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
    # the mirror (or anyone between) serves sid's signed InRelease at trixie's path
    sid = mirror.add_deb("sid", dict(HELLO, Version="9.9-1"), FILES)
    mirror.publish("sid", [sid])
    dists = mirror.archive_dir("trixie") / "dists"
    (dists / "trixie").mkdir(parents=True)
    for p in (dists / "sid").rglob("*"):
        if p.is_file():
            q = dists / "trixie" / p.relative_to(dists / "sid")
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes())
    a = arch(mirror, gpg, tmp_path)
    with pytest.raises(ArchiveError, match="not trixie"):
        a.release("trixie")


@needs_gpg
def test_older_inrelease_keeps_the_newer_cached_one(mirror, gpg, tmp_path, monkeypatch):
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
    old = mirror.add_deb("bookworm", HELLO, FILES)
    mirror.publish("bookworm", [old])
    old_inrelease = mirror.inrelease("bookworm").read_bytes()
    time.sleep(1.1)                                   # Date has a one-second resolution
    new = mirror.add_deb("bookworm", dict(HELLO, Version="2.0-1"), FILES)
    mirror.publish("bookworm", [new])
    a = arch(mirror, gpg, tmp_path)
    assert a.packages("bookworm").newest("hello").version == "2.0-1"
    newer_date = a.release("bookworm").date
    # the mirror goes back (a lagging CDN node, or a replay): an older signed InRelease
    mirror.inrelease("bookworm").write_bytes(old_inrelease)
    (mirror.archive_dir("bookworm") / "dists/bookworm/main/binary-amd64/Packages.xz").write_bytes(
        __import__("lzma").compress(
            "".join(f"{k}: {v}\n" for k, v in old.items()).encode()))
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    b = arch(mirror, gpg, tmp_path)
    rel = b.release("bookworm")
    assert rel.date == newer_date, "a signed but older InRelease replaced the cached one"
    assert b.packages("bookworm").newest("hello").version == "2.0-1"

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
