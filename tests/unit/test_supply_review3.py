"""The kernel supply where a third review found it wrong: the rc never moving past
the first upload fetched, a VM's release taken as a spec, offline line choices that
differ from online ones, debris of killed unpacks and downloads never removed,
nearest ABIs sorted as text. Each test failed on the code before the fix, except
the guards that what was right stays so (the offered upload not fetched again, the
cached rc used offline, offline stable not an older line than the archive's).
Only the archive, downloads and the VM state are faked, never the choices."""
import fcntl
import functools
import io
import os
import shutil
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from ground import http
from ground.errors import ArchiveError, KernelError
from supply import debian_kernels as dk
from supply import kernels, source_kernels
from supply.entry import MANIFEST, Kernel, check_entry, record_integrity
from tests.unit.debmirror import make_deb
from vm import xtables

RC7, RC8 = "7.3~rc7-1~exp1", "7.3~rc8-1~exp1"


def _offer(abi, suite, version, flavour="cloud-amd64", compiler="gcc-16"):
    return dk.Offer(abi, flavour, suite, version,
                    ((f"linux-image-{abi}-{flavour}", version),), compiler)


def _entry(cache, abi, suite, version, flavour="cloud-amd64"):
    """A whole cache entry, as a fetch of that upload leaves it."""
    rel = f"{abi}-{flavour}"
    entry = cache / "kernels" / rel
    shutil.rmtree(entry, ignore_errors=True)
    root, hdr = entry / "root", entry / "root/usr/src" / f"linux-headers-{rel}"
    for path in (root / "boot" / f"vmlinuz-{rel}", root / "boot" / f"config-{rel}",
                 root / "boot" / f"System.map-{rel}", root / "lib/modules" / rel / "modules.dep",
                 hdr / "Makefile", hdr / ".config", hdr / "Module.symvers",
                 hdr / "include/generated/utsrelease.h", hdr / "include/generated/autoconf.h"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    k = Kernel(abi=abi, flavour=flavour, release=rel, root=str(root),
               vmlinuz=str(root / "boot" / f"vmlinuz-{rel}"), headers=str(hdr),
               config=str(root / "boot" / f"config-{rel}"), modules=str(root / "lib/modules" / rel),
               system_map=str(root / "boot" / f"System.map-{rel}"),
               packages={f"linux-image-{rel}": version}, suite=suite,
               toolchain=dk.KERNEL_SUITES[suite], extra={"rc": "~rc" in version, "version": version})
    record_integrity(entry, k)
    (entry / MANIFEST).write_text(k.manifest())
    assert check_entry(entry) is None
    return entry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("NFLAB_DEBIAN_MIRROR", "http://deb.example/debian")
    return tmp_path


@pytest.fixture
def downloads(cache, monkeypatch):
    """The download and unpack of an offer: makes the entry it would, and says which."""
    made = []

    def make(offer, base, entry, progress):
        made.append(offer)
        _entry(cache, offer.abi, offer.suite, offer.version, offer.flavour)
    monkeypatch.setattr(kernels, "_make_entry", make)
    return made


def _offline(**kw):
    raise ArchiveError("cannot reach the Debian mirror")


# ---- A: the rc's ABI (7.3) stays while its upload moves on

def test_a_newer_rc_upload_under_the_same_abi_is_fetched(cache, downloads, monkeypatch):
    _entry(cache, "7.3", "experimental", RC7)
    rc8 = _offer("7.3", "experimental", RC8)
    monkeypatch.setattr(dk, "offers", lambda **kw: [rc8])
    k = kernels.fetch("rc", progress=lambda m: None)
    assert downloads == [rc8] and k.extra["version"] == RC8


def test_the_offered_rc_upload_is_not_fetched_again(cache, downloads, monkeypatch):
    _entry(cache, "7.3", "experimental", RC7)
    monkeypatch.setattr(dk, "offers", lambda **kw: [_offer("7.3", "experimental", RC7)])
    assert kernels.fetch("rc", progress=lambda m: None).extra["version"] == RC7
    assert downloads == []


def test_offline_the_cached_rc_upload_is_used(cache, downloads, monkeypatch):
    _entry(cache, "7.3", "experimental", RC7)
    monkeypatch.setattr(dk, "offers", _offline)
    assert kernels.fetch("rc", progress=lambda m: None).extra["version"] == RC7
    assert downloads == []


def test_an_unreachable_download_of_the_newer_upload_keeps_the_cached_one(cache, monkeypatch):
    _entry(cache, "7.3", "experimental", RC7)
    monkeypatch.setattr(dk, "offers", lambda **kw: [_offer("7.3", "experimental", RC8)])

    def unreachable(*a):
        raise http.Unreachable("cannot reach the Debian mirror for suite experimental")
    monkeypatch.setattr(kernels, "_make_entry", unreachable)
    said = []
    assert kernels.fetch("rc", progress=said.append).extra["version"] == RC7
    assert any("using the cached 7.3-cloud-amd64" in m for m in said)


def test_the_table_marks_cached_only_the_offered_upload(cache, monkeypatch):
    _entry(cache, "7.3", "experimental", RC7)
    monkeypatch.setattr(dk, "offers", lambda **kw: [_offer("7.3", "experimental", RC8)])
    rows = kernels.table_rows(every=True)
    offered = [r for r in rows if r["archive"]]
    assert [(r["version"], r["cached"]) for r in offered] == [(RC8, [])]
    old = [r for r in rows if not r["archive"]]
    assert [(r["version"], r["cached"]) for r in old] == [(RC7, ["cloud-amd64"])]
    assert "superseded" in old[0]["suite"]


# ---- B: a release is not a spec (the rc's 7.3-cloud-amd64 is not the 7.3 line)

RC_AND_LINE = [_offer("7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1", compiler="gcc-14"),
               _offer("7.3", "experimental", RC7)]


def test_by_release_of_the_rc_fetches_the_rc(cache, downloads, monkeypatch):
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_AND_LINE)
    assert kernels.by_release("7.3-cloud-amd64").release == "7.3-cloud-amd64"
    assert [o.release for o in downloads] == ["7.3-cloud-amd64"]


def test_a_damaged_rc_entry_hints_at_the_rc(cache, monkeypatch):
    entry = _entry(cache, "7.3", "experimental", RC7)
    (entry / "root/boot/vmlinuz-7.3-cloud-amd64").write_text("truncated")
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_AND_LINE)
    with pytest.raises(KernelError) as info:
        kernels.by_release("7.3-cloud-amd64")
    assert "--kernel=exact:7.3-cloud-amd64`" in info.value.hint
    assert kernels.resolve("exact:7.3-cloud-amd64").release == "7.3-cloud-amd64"


def test_an_uncached_rc_hints_at_the_rc(cache, monkeypatch):
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_AND_LINE)
    with pytest.raises(KernelError) as info:
        kernels.get("rc", fetch_missing=False)
    assert "--kernel=exact:7.3-cloud-amd64`" in info.value.hint


def test_missing_boot_files_hint_at_the_rc(tmp_path):
    with pytest.raises(KernelError) as info:
        kernels._normalise_boot(tmp_path, "7.3-cloud-amd64")
    assert "--kernel=exact:7.3-cloud-amd64 --force" in info.value.hint


def test_release_specs():
    assert kernels.release_spec("7.3-cloud-amd64") == "exact:7.3-cloud-amd64"
    assert kernels.release_spec("6.12.118+deb13-rt-amd64") == "6.12.118+deb13-rt-amd64"
    assert kernels.release_spec("6.12.117-nflab-5e6f7a8b") == "6.12.117-nflab-5e6f7a8b"


def test_xtables_of_an_rc_vm_looks_for_the_rc(cache, monkeypatch):
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_AND_LINE)
    monkeypatch.setattr(xtables.lab, "require", lambda vm: SimpleNamespace(release="7.3-cloud-amd64"))
    with pytest.raises(KernelError) as info:
        xtables.for_vm("default")
    assert "kernel 7.3-cloud-amd64 is not in the cache" in info.value.message


# ---- C: offline, a line means what it means online

def test_offline_a_line_prefers_what_online_prefers(cache, monkeypatch):
    _entry(cache, "6.12.118+deb12", "bookworm-security", "6.12.118-1~deb12u1")
    _entry(cache, "6.12.118+deb13", "trixie-security", "6.12.118-1")
    online = dk.choose("6.12", "cloud-amd64", [
        _offer("6.12.118+deb12", "bookworm-security", "6.12.118-1~deb12u1"),
        _offer("6.12.118+deb13", "trixie-security", "6.12.118-1")])
    monkeypatch.setattr(dk, "offers", _offline)
    assert kernels.resolve("6.12").release == online.release == "6.12.118+deb13-cloud-amd64"


def test_offline_stable_is_the_newest_cached_line(cache, monkeypatch):
    _entry(cache, "6.12.118+deb13", "trixie-security", "6.12.118-1")
    _entry(cache, "7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1")
    _entry(cache, "7.3", "experimental", RC7)
    monkeypatch.setattr(dk, "offers", _offline)
    assert kernels.resolve("stable").release == "7.3.4+deb13-cloud-amd64"


def test_offline_stable_is_not_an_older_line_than_the_archive_had(cache, monkeypatch):
    _entry(cache, "6.12.118+deb13", "trixie-security", "6.12.118-1")
    archive = dk.debarchive.Archive()
    dk._write_offers(dk.kernels_dir() / dk.OFFERS_CACHE, [archive.mirror, archive.security_mirror],
                     "stamp", [_offer("7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1"),
                               _offer("6.12.118+deb13", "trixie-security", "6.12.118-1")])
    monkeypatch.setattr(dk, "offers", _offline)
    with pytest.raises(ArchiveError, match="cannot reach"):
        kernels.resolve("stable")


# ---- D: debris of killed unpacks and downloads

def _source_deb(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:xz") as t:
        data = b"VERSION = 6\n"
        info = tarfile.TarInfo("linux-source-6.12/Makefile")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    deb = tmp_path / "src.deb"
    deb.write_bytes(make_deb({"Package": "linux-source-6.12", "Version": "6.12.118-1"},
                             [("dir", "./usr/"), ("dir", "./usr/src/"),
                              ("file", "./usr/src/linux-source-6.12.tar.xz", raw.getvalue())]))
    return deb


def test_a_killed_source_unpack_is_removed_by_the_next(cache, monkeypatch):
    deb = _source_deb(cache)
    monkeypatch.setattr(source_kernels, "_download_source", lambda p, progress=None: deb)
    src = cache / "kernels/.src"
    killed = src / ".tmp-6.12.118-1-k1ll3d_x"          # what a kill -9 mid-untar leaves
    (killed / "linux-source-6.12").mkdir(parents=True)
    others = [src / ".tmp-6.1.158-1-0th3rv3r", src / ".tmp-6.12.118-1-2-0th3rv3r"]
    for other in others:                               # other versions': their own locks
        other.mkdir()
    p = source_kernels.Plan(line="6.12", package="linux-source-6.12", version="6.12.118-1",
                            upstream="6.12.118", key="00000000", fragment="", fragment_hash="",
                            base="", spec="source:6.12", suite="trixie-security")
    assert (source_kernels.source_tree(p) / "Makefile").is_file()
    assert not killed.exists() and all(other.exists() for other in others)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "f.deb").write_bytes(b"payload")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/f.deb"
    server.shutdown()
    server.server_close()


def _part(pool, name, age):
    part = pool / f".{name}.part"
    part.write_bytes(b"half")
    os.utime(part, (time.time() - age, time.time() - age))
    return part


def test_a_killed_download_part_file_is_removed_by_the_next(served, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    killed = _part(pool, "f.deb.k1ll3d_x", 2 * http.STALE_PART)
    http.fetch(served, pool / "f.deb", size=7)
    assert (pool / "f.deb").read_bytes() == b"payload" and not killed.exists()


def test_a_part_file_in_use_is_kept(served, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    live = _part(pool, "f.deb.l1vel1ve", 2 * http.STALE_PART)    # another process downloads it
    young = _part(pool, "f.deb.y0ungy0u", 0)                     # just made, not locked yet
    other = _part(pool, "f.deb.x.0th3rf1l", 2 * http.STALE_PART)  # f.deb.x's, not f.deb's
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        http.fetch(served, pool / "f.deb", size=7)
    finally:
        os.close(fd)
    assert live.exists() and young.exists() and other.exists()


# ---- E: the nearest valid ABIs in numeric order

def test_nearest_valid_abis_are_in_numeric_order():
    offers = [_offer(f"6.12.{n}+deb13", "trixie-security", f"6.12.{n}-1") for n in (99, 100, 118)]
    with pytest.raises(KernelError) as info:
        dk.choose("6.12.119+deb13", "cloud-amd64", offers)
    assert info.value.hint == "nearest valid: 6.12.118+deb13, 6.12.100+deb13, 6.12.99+deb13"
