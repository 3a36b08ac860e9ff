"""The kernel supply where a review of stop 33 found it wrong (each test failed
on the code before the fix): --force removing the only copy of a kernel before
a refetch could happen, stale kernel offers never read again, and offline line
specs taking the rc. The InRelease checks are in test_debarchive.py."""
import contextlib
import json
import os
import re
import resource
import signal
import socket
import threading
from dataclasses import dataclass

import pytest

from ground import aptsources, deb, debarchive, http
from ground.debarchive import Archive, closure
from ground.errors import ArchiveError, KernelError
from supply import debian_kernels as dk
from supply import kernels, source_kernels
from supply.entry import INTEGRITY, MANIFEST, Kernel, check_entry, record_integrity
from tests.unit.debmirror import FakeIndex, FakeMirror, FakePkg, closed_port, have_gpg, make_deb
from tests.unit.test_debarchive import HELLO, HELLO_FILES

needs_gpg = pytest.mark.skipif(not have_gpg(), reason="gpg, gpgv or gpgconf is not installed")





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


# ---- review of stop 38: rt headers, the rc's exact spec, offers per mirror, apt
# sources, 404 suites, write errors, stored fragments, forced source rebuilds,
# versioned dependencies (each test fails on the code before its fix)





class _OneIndex:
    def __init__(self, idx):
        self.idx = idx

    def packages(self, suite):
        return self.idx


def test_rt_headers_bring_their_common_rt_package():
    """rt headers depend on linux-headers-<abi>-common-rt, not -common."""
    v, abi = "6.12.118-1", "6.12.118+deb13"
    idx = FakeIndex()
    for p in (FakePkg(f"linux-image-{abi}-rt-amd64", v, "kmod, linux-base"),
              FakePkg(f"linux-headers-{abi}-rt-amd64", v,
                   f"linux-headers-{abi}-common-rt (= {v}), linux-kbuild-{abi} (= {v}), gcc-14"),
              FakePkg(f"linux-headers-{abi}-common-rt", v), FakePkg(f"linux-kbuild-{abi}", v)):
        idx[p.name] = [p]
    [offer] = dk._suite_offers(_OneIndex(idx), "trixie-security")
    assert f"linux-headers-{abi}-common-rt" in dict(offer.packages)


def test_rt_headers_makefile_including_common_rt_is_accepted(tmp_path):
    rel = "6.12.118+deb13-rt-amd64"
    hdr = tmp_path / "usr/src" / f"linux-headers-{rel}"
    hdr.mkdir(parents=True)
    (hdr / "Makefile").write_text(
        "include /usr/src/linux-headers-6.12.118+deb13-common-rt/Makefile\n")
    kernels._fix_headers_makefile(tmp_path, tmp_path / "final", rel)
    assert f"include {tmp_path}/final/usr/src/linux-headers-6.12.118+deb13-common-rt/" in \
        (hdr / "Makefile").read_text()
    (hdr / "Makefile").write_text("include /elsewhere/Makefile\n")
    with pytest.raises(KernelError, match="unexpected headers Makefile layout") as err:
        kernels._fix_headers_makefile(tmp_path, tmp_path / "final", rel)
    assert err.value.hint


def _offer(abi, suite, version, flavour="cloud-amd64"):
    return dk.Offer(abi, flavour, suite, version, ((f"linux-image-{abi}-{flavour}", version),),
                    "gcc-14")


RC_OFFERS = [_offer("6.12.118+deb13", "trixie-security", "6.12.118-1"),
             _offer("7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1"),
             _offer("7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1", "rt-amd64"),
             _offer("7.3", "experimental", "7.3~rc7-1~exp1"),
             _offer("7.3", "experimental", "7.3~rc7-1~exp1", "rt-amd64")]


def test_the_exact_spec_of_the_rc_names_the_rc(tmp_path, monkeypatch):
    """The rc's ABI is 7.3: its exact spec must not be read as the 7.3 line."""
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_OFFERS)
    for spec in ("rc", "rc-rt-amd64"):
        rc = kernels.resolve(spec)
        again = kernels.resolve(kernels.exact_spec(rc))
        assert (again.release, again.suite) == (rc.release, "experimental")
    assert kernels._offer_for(kernels.KernelRef("7.3")).suite == "experimental"


@pytest.mark.parametrize("spec,release", [
    ("7.3", "7.3.4+deb13-cloud-amd64"),
    ("7.3-cloud-amd64", "7.3.4+deb13-cloud-amd64"),
    ("7.3-rt-amd64", "7.3.4+deb13-rt-amd64"),          # .ci/setup's kernel without xtables
    ("6.12.118+deb13-cloud-amd64", "6.12.118+deb13-cloud-amd64"),
    ("exact:6.12.118+deb13", "6.12.118+deb13-cloud-amd64"),
    ("exact:7.3", "7.3-cloud-amd64"),
])
def test_every_other_spec_means_what_it_meant(tmp_path, monkeypatch, spec, release):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(dk, "offers", lambda **kw: RC_OFFERS)
    assert kernels.resolve(spec).release == release


def test_exact_needs_an_abi():
    with pytest.raises(KernelError, match="invalid kernel spec"):
        kernels.parse_spec("exact:rc")


def _kernel_stanzas(mirror, suite, abi="6.12.1+deb13", version="6.12.1-1"):
    img = dict(HELLO, Package=f"linux-image-{abi}-cloud-amd64", Version=version,
               Depends="kmod, linux-base")
    hdr = dict(HELLO, Package=f"linux-headers-{abi}-cloud-amd64", Version=version,
               Depends=f"linux-headers-{abi}-common (= {version}), linux-kbuild-{abi}, gcc-14")
    com = dict(HELLO, Package=f"linux-headers-{abi}-common", Version=version, Architecture="all")
    kb = dict(HELLO, Package=f"linux-kbuild-{abi}", Version=version)
    return [mirror.add_deb(suite, f, HELLO_FILES) for f in (img, hdr, com, kb)]


def _use_mirror(monkeypatch, m):
    monkeypatch.setenv("NFLAB_DEBIAN_MIRROR", m.url)
    monkeypatch.setenv("NFLAB_DEBIAN_SECURITY_MIRROR", m.security_url)


def test_offers_belong_to_their_mirror_and_none_is_kept_of_nothing(tmp_path, gpg, monkeypatch):
    """After a wrong NFLAB_DEBIAN_MIRROR, the good one is read at once (not after 6 h)."""
    wrong, good = FakeMirror(tmp_path / "wrong", gpg), FakeMirror(tmp_path / "good", gpg)
    try:
        good.publish("trixie", _kernel_stanzas(good, "trixie"))
        monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("NFLAB_DEBIAN_KEYRING", str(gpg.keyring))
        monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
        _use_mirror(monkeypatch, wrong)
        assert dk.offers() == []
        assert not (tmp_path / "cache/kernels" / dk.OFFERS_CACHE).exists()
        _use_mirror(monkeypatch, good)
        assert kernels.resolve("6.12").abi == "6.12.1+deb13"
        _use_mirror(monkeypatch, wrong)      # a non-empty cache is not the wrong mirror's
        assert dk.offers() == []
    finally:
        wrong.close()
        good.close()


ADOPTIUM = "deb https://packages.adoptium.net/artifactory/deb trixie main\n"
DEBIAN_SOURCES = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie trixie-updates\n"
                  "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def _apt_dir(tmp_path, monkeypatch, files: dict):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    monkeypatch.setattr(aptsources, "APT_DIR", apt)
    monkeypatch.delenv("NFLAB_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("NFLAB_DEBIAN_SECURITY_MIRROR", raising=False)
    return apt


def test_default_mirror_is_debians_not_a_third_party_repo(tmp_path, monkeypatch):
    """adoptium.list sorts before debian.sources and names trixie too."""
    _apt_dir(tmp_path, monkeypatch, {"sources.list.d/adoptium.list": ADOPTIUM,
                                     "sources.list.d/debian.sources": DEBIAN_SOURCES})
    assert debarchive.default_mirror() == "http://deb.debian.org/debian"
    _apt_dir(tmp_path / "2", monkeypatch, {
        "sources.list.d/adoptium.list": ADOPTIUM,
        "sources.list.d/zz.list": "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
                                  " http://mirror.test/pub trixie main\n"})
    assert debarchive.default_mirror() == "http://mirror.test/pub"
    _apt_dir(tmp_path / "3", monkeypatch, {"sources.list.d/adoptium.list": ADOPTIUM})
    assert debarchive.default_mirror() == "https://packages.adoptium.net/artifactory/deb"


def test_an_unreachable_mirror_names_the_apt_source_it_came_from(tmp_path, monkeypatch):
    apt = _apt_dir(tmp_path, monkeypatch, {
        "sources.list.d/odd.list": f"deb http://127.0.0.1:{closed_port()}/debian trixie main\n"})
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    a = Archive(keyring=keyring, cache=tmp_path / "cache")
    with pytest.raises(http.Unreachable) as err:
        a.release("trixie")
    assert str(apt / "sources.list.d/odd.list") in err.value.message


def test_source_offer_leaves_out_a_suite_the_mirror_does_not_serve(mirror, gpg, tmp_path,
                                                                 monkeypatch):
    src = dict(HELLO, Package="linux-source-6.12", Version="6.12.118-1", Architecture="all")
    stanza = mirror.add_deb("trixie", src, HELLO_FILES)
    for suite in dk.KERNEL_SUITES:
        if suite != "bullseye":             # 404, as when it moves to archive.debian.org
            mirror.publish(suite, [stanza] if suite == "trixie" else [])
    monkeypatch.setattr(source_kernels.debarchive, "Archive",
                        lambda: Archive(mirror.url, mirror.security_url, keyring=gpg.keyring,
                                        cache=tmp_path / "cache"))
    suite, pkg = source_kernels.source_offer("6.12")
    assert (suite, pkg.version) == ("trixie", "6.12.118-1")


def _garbage_server():
    """127.0.0.1 answering every connection with a line that is not HTTP."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_a_server_that_is_not_http_is_an_archive_error(tmp_path):
    srv = _garbage_server()
    try:
        with pytest.raises(ArchiveError) as err:
            http.fetch(f"http://127.0.0.1:{srv.getsockname()[1]}/debian/x", tmp_path / "x")
    finally:
        srv.close()
    assert "not an HTTP answer" in err.value.message and "NFLAB_DEBIAN_MIRROR" in err.value.hint


@contextlib.contextmanager
def _small_files():
    """Files may grow to 1 MiB only (writes past it fail with EFBIG, like ENOSPC)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    oldsig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, oldsig)


def test_a_full_disk_during_a_download_is_an_archive_error(mirror, tmp_path):
    (mirror.root / "debian").mkdir(parents=True, exist_ok=True)
    (mirror.root / "debian" / "big").write_bytes(b"x" * (3 << 20))
    with _small_files(), pytest.raises(ArchiveError) as err:
        http.fetch(mirror.url + "/big", tmp_path / "dl" / "big")
    assert "cannot write" in err.value.message and "free space" in err.value.hint
    assert not list((tmp_path / "dl").glob(".big.*")), "temp file left behind"


def test_a_full_disk_while_unpacking_a_deb_is_an_archive_error(tmp_path):
    path = tmp_path / "big.deb"
    path.write_bytes(make_deb(HELLO, [("dir", "./usr/"), ("file", "./usr/big", os.urandom(2 << 20))]))
    with _small_files(), pytest.raises(ArchiveError) as err:
        deb.extract(path, tmp_path / "root")
    assert "cannot write" in err.value.message and "free space" in err.value.hint


# -- source kernels: a build stubbed out, the rest real

FRAGMENT = "CONFIG_NF_TABLES=y\n"


def _stub_build(monkeypatch, tmp_path, builds):
    """source_kernels.fetch with plan, source tree and compile replaced by stubs."""
    key = "1a2b3c4d"
    p = source_kernels.Plan(line="6.12", package="linux-source-6.12", version="6.12.118-1",
                            upstream="6.12.118", key=key, fragment=FRAGMENT,
                            fragment_hash=source_kernels.fragment_hash(FRAGMENT), base="",
                            spec=f"source:6.12+{source_kernels.fragment_hash(FRAGMENT)}",
                            suite="trixie")
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(source_kernels, "plan", lambda spec, **kw: p)
    monkeypatch.setattr(source_kernels, "source_tree", lambda p, progress=None: tmp_path)

    def build(p, work, src, progress=None, jobs=None):
        builds.append(work)
        rel = p.release
        files = [f"root/boot/vmlinuz-{rel}", f"root/boot/config-{rel}", f"root/boot/System.map-{rel}",
                 f"root/lib/modules/{rel}/modules.dep", "build/Makefile", "build/.config",
                 "build/Module.symvers", "build/include/generated/utsrelease.h",
                 "build/include/generated/autoconf.h"]
        for f in files:
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            (work / f).write_text(f"build {len(builds)}\n")
        return {}
    monkeypatch.setattr(source_kernels, "build", build)
    return p


def test_a_stored_fragment_that_does_not_hash_to_its_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    name = source_kernels.fragment_hash(FRAGMENT)
    stored = source_kernels.fragments_store() / f"{name}.config"
    stored.parent.mkdir(parents=True)
    stored.write_text("CONFIG_NF_TABLES=n\n")            # changed behind the name's back
    with pytest.raises(KernelError, match="does not hash to") as err:
        source_kernels.parse_spec(f"source:6.12+{name}")
    assert str(stored) in err.value.hint
    stored.write_text(FRAGMENT)
    assert source_kernels.parse_spec(f"source:6.12+{name}").fragment == FRAGMENT


def test_a_fetch_stores_its_fragment_atomically_and_only_when_missing(tmp_path, monkeypatch):
    p = _stub_build(monkeypatch, tmp_path, [])
    stored = source_kernels.fragments_store() / f"{p.fragment_hash}.config"
    stored.parent.mkdir(parents=True)
    stored.write_text(FRAGMENT)
    os.utime(stored, (1000, 1000))
    source_kernels.fetch("source:6.12+x", force=True)
    assert stored.stat().st_mtime == 1000, "a good stored fragment was rewritten"
    stored.write_text("CONFIG_NF_TABLES=n\n")           # damaged: replaced by a new file
    inode = stored.stat().st_ino
    source_kernels.fetch("source:6.12+x", force=True)
    assert stored.read_text() == FRAGMENT and stored.stat().st_ino != inode
    assert not list(stored.parent.glob(".*")), "temporary files left behind"


def test_a_forced_rebuild_killed_while_removing_the_old_entry_leaves_a_whole_one(
        tmp_path, monkeypatch):
    """--force used to rmtree the entry in place: a kill in the middle left an entry
    without its records, which check_entry then adopted as whole."""
    builds = []
    p = _stub_build(monkeypatch, tmp_path, builds)
    entry = tmp_path / "kernels" / p.release
    source_kernels.fetch("source:6.12+x")
    real_rmtree = source_kernels.shutil.rmtree

    def killed_rmtree(path, *a, **kw):
        if (path / INTEGRITY).exists():      # the first file goes, then the kill
            (path / INTEGRITY).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *a, **kw)
    monkeypatch.setattr(source_kernels.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        source_kernels.fetch("source:6.12+x", force=True)
    monkeypatch.setattr(source_kernels.shutil, "rmtree", real_rmtree)
    assert (entry / INTEGRITY).is_file(), "the entry lost its records"
    assert check_entry(entry) is None
    assert (entry / "root/boot" / f"vmlinuz-{p.release}").read_text() == "build 2\n"


def _entry_without_records(tmp_path, legacy: bool):
    entry = tmp_path / "kernels" / "6.12.118+deb13-cloud-amd64"
    root = entry / "root"
    k = Kernel(abi="6.12.118+deb13", flavour="cloud-amd64", release="6.12.118+deb13-cloud-amd64",
               root=str(root), vmlinuz=str(root / "boot/vmlinuz"), headers=str(root / "hdr"),
               config=str(root / "boot/config"), modules=str(root / "mod"),
               system_map=str(root / "boot/System.map"), packages={}, suite="trixie-security")
    for f in ("boot/vmlinuz", "boot/config", "mod/modules.dep", "hdr/Makefile", "hdr/.config",
              "hdr/Module.symvers", "hdr/include/generated/utsrelease.h",
              "hdr/include/generated/autoconf.h"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x\n")
    data = json.loads(k.manifest())
    if legacy:       # the manifest of before the integrity records: no suite, no toolchain
        for field in ("suite", "toolchain", "extra"):
            data.pop(field)
    (entry / MANIFEST).write_text(json.dumps(data))
    return entry


def test_only_an_entry_from_before_the_records_is_adopted_without_them(tmp_path):
    legacy = _entry_without_records(tmp_path / "old", legacy=True)
    assert check_entry(legacy) is None and (legacy / INTEGRITY).is_file()
    newer = _entry_without_records(tmp_path / "new", legacy=False)
    assert "no nflab-integrity.json" in check_entry(newer)
    assert not (newer / INTEGRITY).exists()
    record_integrity(newer, Kernel.load(newer))
    assert check_entry(newer) is None


def test_a_versioned_dependency_no_version_satisfies_is_unmet(mirror, gpg, tmp_path):
    a = mirror.add_deb("bookworm", dict(HELLO, Package="a", Depends="libfoo (>= 2.0)"), HELLO_FILES)
    foo = mirror.add_deb("bookworm", dict(HELLO, Package="libfoo", Version="1.0-1"), HELLO_FILES)
    mirror.publish("bookworm", [a, foo])
    ix = Archive(mirror.url, mirror.security_url, keyring=gpg.keyring,
                 cache=tmp_path / "c").packages("bookworm")
    with pytest.raises(ArchiveError, match=r"a needs libfoo \(>= 2\.0\)"):
        closure([ix], ["a"])
    assert {p.name for p in closure([ix], ["libfoo"])} == {"libfoo"}
