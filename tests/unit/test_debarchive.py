"""The Debian archive client against a fake mirror on 127.0.0.1, signed with a
throwaway key: verification, caching with validity, and every refusal."""

from __future__ import annotations

import json
import os
import time

import pytest

from ground import aptsources, deb, debarchive, integrity
from ground.debarchive import SUITES, Archive, ArchiveError, closure
from tests.unit.debmirror import Gpg, closed_port, have_gpg, tarball

pytestmark = pytest.mark.skipif(not have_gpg(), reason="gpg, gpgv or gpgconf is not installed")

HELLO = {"Package": "hello", "Version": "1.0-1", "Architecture": "amd64",
         "Maintainer": "Test <t@test.invalid>", "Description": "says hello"}
HELLO_FILES = [("dir", "./usr/"), ("dir", "./usr/bin/"),
               ("file", "./usr/bin/hello", b"#!/bin/sh\necho hello\n", 0o755)]
DISTS = "/debian/dists/bookworm"




@pytest.fixture
def archive(mirror, gpg, tmp_path, monkeypatch):
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
    return lambda: Archive(mirror.url, mirror.security_url, keyring=gpg.keyring,
                           cache=tmp_path / "cache")


def publish_hello(mirror, version="1.0-1", **kw):
    stanza = mirror.add_deb("bookworm", dict(HELLO, Version=version), HELLO_FILES)
    mirror.publish("bookworm", [stanza], **kw)
    return stanza


def cached_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock") if root.exists() else []


def test_good_path_verifies_parses_downloads_and_extracts(mirror, archive, tmp_path):
    stanza = publish_hello(mirror)
    a = archive()
    rel = a.release("bookworm")
    assert rel.codename == "bookworm" and "main/binary-amd64/Packages.xz" in rel.files
    ix = a.packages("bookworm")
    pkg = ix.newest("hello")
    assert (pkg.version, pkg.sha256, pkg.size) == ("1.0-1", stanza["SHA256"], int(stanza["Size"]))
    assert pkg.fields["Description"] == "says hello" and pkg.suite == "bookworm"
    path = a.download(pkg)
    assert path == tmp_path / "cache" / "pool" / "hello_1.0-1_amd64.deb"
    assert deb.control(path)["Package"] == "hello"
    deb.extract(path, tmp_path / "root")
    assert (tmp_path / "root/usr/bin/hello").read_bytes().startswith(b"#!/bin/sh")
    # a second process reuses everything: no request reaches the mirror
    before = sum(mirror.requests.values())
    again = archive()
    assert again.download(again.packages("bookworm")["hello"][0]) == path
    assert sum(mirror.requests.values()) == before


def test_by_hash_index_is_used_when_the_release_offers_it(mirror, archive):
    publish_hello(mirror, by_hash=True)
    assert "hello" in archive().packages("bookworm")
    assert any("/by-hash/SHA256/" in p for p in mirror.requests)
    assert mirror.requests[f"{DISTS}/main/binary-amd64/Packages.xz"] == 0


def test_tampered_inrelease_is_refused_and_not_cached(mirror, archive, tmp_path):
    publish_hello(mirror)
    inrelease = mirror.inrelease("bookworm")
    text = inrelease.read_text()
    inrelease.write_text(text.replace("main/binary-amd64/Packages.xz",
                                      "main/binary-amd64/Packages.gz"))
    with pytest.raises(ArchiveError) as err:
        archive().packages("bookworm")
    msg = str(err.value)
    assert "\n" not in msg and "InRelease" in msg and "bad signature" in msg
    assert cached_files(tmp_path / "cache") == []


def test_inrelease_signed_by_an_unknown_key_is_refused(mirror, archive, tmp_path):
    publish_hello(mirror)
    other = Gpg(tmp_path / "other-gnupg")
    try:
        a = Archive(mirror.url, keyring=other.keyring, cache=tmp_path / "cache")
        with pytest.raises(ArchiveError, match="not in the keyring"):
            a.release("bookworm")
    finally:
        other.close()


def test_missing_keyring_names_the_package_to_install(mirror, tmp_path):
    a = Archive(mirror.url, keyring=tmp_path / "nope.gpg", cache=tmp_path / "cache")
    with pytest.raises(ArchiveError, match="debian-archive-keyring package"):
        a.release("bookworm")


def test_wrong_sha256_deb_is_refused_and_not_cached(mirror, archive, tmp_path):
    stanza = publish_hello(mirror)
    deb_path = mirror.archive_dir("bookworm") / stanza["Filename"]
    data = bytearray(deb_path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    deb_path.write_bytes(bytes(data))
    a = archive()
    with pytest.raises(ArchiveError) as err:
        a.download(a.packages("bookworm").newest("hello"))
    msg = str(err.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and stanza["Filename"] in msg
    assert list((tmp_path / "cache" / "pool").glob("*")) == []


def test_truncated_download_is_refused_and_not_cached(mirror, archive, tmp_path):
    stanza = publish_hello(mirror)
    mirror.truncate.add("/debian/" + stanza["Filename"])
    a = archive()
    with pytest.raises(ArchiveError) as err:
        a.download(a.packages("bookworm").newest("hello"))
    assert "truncated download" in str(err.value) and "hello_1.0-1_amd64.deb" in str(err.value)
    assert list((tmp_path / "cache" / "pool").glob("*")) == []


def test_oversized_download_stops_at_the_indexed_size(mirror, archive, tmp_path):
    stanza = publish_hello(mirror)
    deb_path = mirror.archive_dir("bookworm") / stanza["Filename"]
    deb_path.write_bytes(deb_path.read_bytes() + bytes(4 << 20))   # 4 MiB the index does not know
    a = archive()
    with pytest.raises(ArchiveError, match=r"size mismatch \(more than the \d+ bytes expected\)"):
        a.download(a.packages("bookworm").newest("hello"))
    assert list((tmp_path / "cache" / "pool").glob("*")) == []


def test_truncated_index_is_refused(mirror, archive, tmp_path):
    publish_hello(mirror)
    mirror.truncate.add(f"{DISTS}/main/binary-amd64/Packages.xz")
    with pytest.raises(ArchiveError, match=r"Packages\.xz: truncated download"):
        archive().packages("bookworm")
    assert not list((tmp_path / "cache").rglob("Packages*"))


def test_http_error_names_the_url(mirror, archive):
    publish_hello(mirror)
    with pytest.raises(ArchiveError, match=r"dists/trixie/InRelease: HTTP 404"):
        archive().release("trixie")


def test_unknown_suite_lists_the_known_ones(archive):
    with pytest.raises(ArchiveError) as err:
        archive().packages("buster")
    assert "'buster'" in str(err.value) and all(s in str(err.value) for s in SUITES)


def test_unreachable_mirror_is_one_line_naming_mirror_and_suite(gpg, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/debian"
    with pytest.raises(ArchiveError) as err:
        Archive(url, keyring=gpg.keyring, cache=tmp_path / "cache").packages("trixie-backports")
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "trixie-backports" in msg
    assert cached_files(tmp_path / "cache") == []


def test_stale_index_is_refreshed_with_a_304_without_packages_download(mirror, archive,
                                                                      monkeypatch):
    publish_hello(mirror)
    archive().packages("bookworm")
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    assert archive().packages("bookworm").newest("hello").version == "1.0-1"
    assert mirror.requests[f"{DISTS}/InRelease"] == 2
    assert mirror.requests[f"{DISTS}/main/binary-amd64/Packages.xz"] == 1
    last = [h for p, h in mirror.seen_headers if p == f"{DISTS}/InRelease"][-1]
    assert last.get("If-None-Match")


def test_identical_inrelease_keeps_the_cached_packages(mirror, archive, monkeypatch):
    publish_hello(mirror)
    archive().packages("bookworm")
    mirror.conditional = False  # the server answers 200 with the same InRelease
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    archive().packages("bookworm")
    assert mirror.requests[f"{DISTS}/InRelease"] == 2
    assert mirror.requests[f"{DISTS}/main/binary-amd64/Packages.xz"] == 1


def test_fresh_index_asks_nothing_and_refresh_forces_the_check(mirror, archive):
    publish_hello(mirror)
    archive().packages("bookworm")
    archive().packages("bookworm")
    assert mirror.requests[f"{DISTS}/InRelease"] == 1
    archive().packages("bookworm", refresh=True)
    assert mirror.requests[f"{DISTS}/InRelease"] == 2


def test_packages_downloaded_again_when_its_hash_changed(mirror, archive, monkeypatch, tmp_path):
    publish_hello(mirror)
    archive().packages("bookworm")
    publish_hello(mirror, version="2.0-1")
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    assert archive().packages("bookworm").newest("hello").version == "2.0-1"
    assert mirror.requests[f"{DISTS}/main/binary-amd64/Packages.xz"] == 2
    # the older index is gone from the cache
    assert len(list((tmp_path / "cache").rglob("Packages-*.idx"))) == 1


def test_expired_valid_until_is_fetched_again_then_refused(mirror, archive, tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_DEBIAN_CHECK_VALID_UNTIL", "1")
    publish_hello(mirror, valid_days=-1)
    with pytest.raises(ArchiveError) as err:
        archive().release("bookworm")
    assert "expired" in str(err.value) and "Valid-Until" in str(err.value)
    assert mirror.requests[f"{DISTS}/InRelease"] == 2
    assert cached_files(tmp_path / "cache") == []


@pytest.mark.parametrize("setting", ["0", None])
def test_expired_valid_until_accepted_when_the_check_is_off(mirror, archive, monkeypatch, capsys,
                                                            setting):
    """Off by default, like debootstrap: a lagging mirror still serves signed indexes;
    the expiry is said once on stderr."""
    publish_hello(mirror, valid_days=-1)
    if setting is None:
        monkeypatch.delenv("NFLAB_DEBIAN_CHECK_VALID_UNTIL", raising=False)
    else:
        monkeypatch.setenv("NFLAB_DEBIAN_CHECK_VALID_UNTIL", setting)
    monkeypatch.setattr(debarchive, "_WARNED", set())
    assert "hello" in archive().packages("bookworm")
    assert mirror.requests[f"{DISTS}/InRelease"] == 1
    assert "expired on" in capsys.readouterr().err


def test_cached_expired_inrelease_is_replaced_by_a_fresh_one(mirror, archive, tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_DEBIAN_CHECK_VALID_UNTIL", "1")
    a = archive()
    publish_hello(mirror, valid_days=-1)
    expired = mirror.inrelease("bookworm")
    cached = a.suite_dir("bookworm") / "InRelease"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(expired.read_bytes())  # what a fetch a week ago left
    (cached.parent / "InRelease.json").write_text('{"fetched": %d}' % time.time())
    publish_hello(mirror, valid_days=7)
    assert not a.release("bookworm").expired()
    assert mirror.requests[f"{DISTS}/InRelease"] == 1


def test_stale_but_valid_index_is_used_when_the_mirror_is_gone(mirror, archive, monkeypatch):
    publish_hello(mirror)
    archive().packages("bookworm")
    mirror.close()
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    assert "hello" in archive().packages("bookworm")
    with pytest.raises(ArchiveError, match="cannot reach the Debian mirror"):
        archive().release("bookworm", refresh=True)


def test_cached_deb_is_checked_and_fetched_again_when_damaged(mirror, archive):
    publish_hello(mirror)
    a = archive()
    pkg = a.packages("bookworm").newest("hello")
    path = a.download(pkg)
    deb_url = "/debian/" + pkg.filename
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # the mtime moved: the sha256 is recomputed
    assert archive().download(pkg).read_bytes() != bytes(data)
    assert mirror.requests[deb_url] == 2


def test_download_into_a_directory(mirror, archive, tmp_path):
    publish_hello(mirror)
    a = archive()
    out = a.download(a.packages("bookworm").newest("hello"), tmp_path / "debs")
    assert out == tmp_path / "debs" / "hello_1.0-1_amd64.deb" and deb.control(out)


def test_security_suites_come_from_the_security_mirror(mirror, archive):
    stanza = mirror.add_deb("bookworm-security", dict(HELLO, Version="1.0-1+deb12u1"),
                            HELLO_FILES)
    mirror.publish("bookworm-security", [stanza])
    a = archive()
    pkg = a.packages("bookworm-security").newest("hello")
    assert a.download(pkg).name == "hello_1.0-1+deb12u1_amd64.deb"
    assert mirror.requests["/debian-security/dists/bookworm-security/InRelease"] == 1


def test_unstable_is_sid(mirror, archive):
    stanza = mirror.add_deb("sid", HELLO, HELLO_FILES)
    mirror.publish("sid", [stanza])
    assert archive().packages("unstable").newest("hello").suite == "sid"


def _pkg(name, depends="", provides="", priority="optional", version="1"):
    fields = {"Package": name, "Version": version, "Architecture": "amd64",
              "Priority": priority, "Filename": f"pool/{name}.deb", "Size": "1", "SHA256": "0"}
    fields.update({k: v for k, v in (("Depends", depends), ("Provides", provides)) if v})
    return fields


def test_closure_with_alternatives_provides_and_versions(mirror, archive):
    mirror.publish("bookworm", [
        _pkg("app", "libfoo (>= 2), awk | mawk, mail-transport-agent, base-files"),
        _pkg("libfoo", "libc6", version="2.1"), _pkg("libc6"),
        _pkg("mawk", provides="awk"), _pkg("gawk", provides="awk"),
        _pkg("postfix", "libc6", provides="mail-transport-agent"),
        _pkg("base-files", priority="required"), _pkg("unused")])
    mirror.publish("bookworm-updates", [_pkg("libfoo", "libc6", version="2.2"),
                                       _pkg("libfoo", "libc6", version="1.0")][:1])
    a = archive()
    indexes = [a.packages("bookworm"), a.packages("bookworm-updates")]
    got = {p.name: p for p in closure(indexes, ["app"])}
    assert set(got) == {"app", "libfoo", "libc6", "mawk", "postfix", "base-files"}
    assert got["libfoo"].version == "2.2" and got["libfoo"].suite == "bookworm-updates"
    skipped = {p.name for p in closure(indexes, ["app"], exclude={"postfix", "mail-transport-agent"},
                                       skip_required=True)}
    assert skipped == {"app", "libfoo", "libc6", "mawk"}
    with pytest.raises(ArchiveError, match="no package nothing"):
        closure(indexes, ["nothing"])


def test_closure_reports_unmet_dependencies(mirror, archive):
    mirror.publish("bookworm", [_pkg("app", "ghost | phantom")])
    with pytest.raises(ArchiveError, match=r"app needs ghost \| phantom"):
        closure([archive().packages("bookworm")], ["app"])


def test_index_search_and_versions(mirror, archive):
    mirror.publish("bookworm", [_pkg("linux-headers-6.1.0-9-amd64"), _pkg("linux-image-6.1.0-9-amd64"),
                                _pkg("linux-headers-6.1.0-10-amd64"), _pkg("x", version="1:0.1"),
                                _pkg("x", version="2.0")])
    ix = archive().packages("bookworm")
    assert ix.search(r"linux-headers-") == ["linux-headers-6.1.0-10-amd64",
                                            "linux-headers-6.1.0-9-amd64"]
    assert [p.version for p in ix["x"]] == ["1:0.1", "2.0"]
    assert len(ix) == 4 and "x" in ix and ix.newest("nope") is None


def test_fetch_source_unpacks_and_patches(mirror, archive, tmp_path):
    files = [mirror.add_file("bookworm", "pool/main/t/tool/tool_1.2.orig.tar.xz", tarball(
                [("dir", "tool-1.2/"), ("file", "tool-1.2/main.c", b"int x = 1;\n")], "xz")),
             mirror.add_file("bookworm", "pool/main/t/tool/tool_1.2-3.debian.tar.xz", tarball(
                [("file", "debian/patches/series", b"# fixes\nfix.patch\n"),
                 ("file", "debian/patches/fix.patch",
                  b"--- a/main.c\n+++ b/main.c\n@@ -1 +1 @@\n-int x = 1;\n+int x = 2;\n")],
                "xz")),
             mirror.add_file("bookworm", "pool/main/t/tool/tool_1.2-3.dsc", b"Source: tool\n")]
    checks = "\n" + "\n".join(f" {sha} {size} {name}" for sha, size, name in files)
    mirror.publish("bookworm", [], sources=[{"Package": "tool", "Version": "1:1.2-3",
                                             "Directory": "pool/main/t/tool",
                                             "Format": "3.0 (quilt)",
                                             "Checksums-Sha256": checks}])
    tree = archive().fetch_source("bookworm", "tool", tmp_path / "src")
    assert tree == tmp_path / "src" / "tool-1.2-3"
    assert (tree / "main.c").read_text() == "int x = 2;\n"
    info = json.loads((tree / ".nflab-source.json").read_text())
    assert info["version"] == "1:1.2-3" and info["patches"] == ["fix.patch"]
    assert info["files"]["tool_1.2-3.dsc"] == files[2][0] and info["patched"]
    assert archive().fetch_source("bookworm", "tool", tmp_path / "src") == tree
    plain = archive().fetch_source("bookworm", "tool", tmp_path / "plain", upstream_only=True)
    assert (plain / "main.c").read_text() == "int x = 1;\n" and not (plain / "debian").exists()
    assert list(json.loads((plain / ".nflab-source.json").read_text())["files"]) == \
        ["tool_1.2.orig.tar.xz"]


def test_host_apt_sources_pick_debian_and_security(tmp_path, monkeypatch):
    (tmp_path / "a.sources").write_text(
        "Types: deb\nURIs: http://other.test/nodistro\nSuites: nodistro\n\n"
        "Types: deb\nURIs: http://off.test/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://mirror.test/debian/\nSuites: bookworm bookworm-updates\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n")
    files = [tmp_path / "a.sources"]
    assert aptsources.find(lambda s: s in SUITES and not s.endswith("-security"), files) \
        == "http://mirror.test/debian"
    assert aptsources.find(lambda s: s.endswith("-security"), files) \
        == "http://mirror.test/debian-security"


def test_default_mirror_from_debootstrap(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "debootstrap"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\nDEF_MIRROR="http://boot.test/debian"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))
    monkeypatch.delenv("NFLAB_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("NFLAB_DEBIAN_SECURITY_MIRROR", raising=False)
    monkeypatch.setattr(aptsources, "APT_DIR", tmp_path / "apt")
    a = Archive()
    assert (a.mirror, a.security_mirror) == ("http://boot.test/debian",
                                             "http://boot.test/debian-security")
    monkeypatch.setenv("NFLAB_DEBIAN_MIRROR", "http://env.test/debian/")
    assert Archive().mirror == "http://env.test/debian"


@pytest.mark.slow
def test_real_archive_trixie_backports(tmp_path):
    """The real mirror (host default) and keyring: the signature verifies, the
    index has cloud headers, and a small .deb checks out."""
    a = Archive(cache=tmp_path / "cache")
    assert a.release("trixie-backports").codename == "trixie-backports"
    ix = a.packages("trixie-backports")
    assert ix.search(r"linux-headers-.*-cloud-amd64$")
    small = min((ix.newest(n) for n in ix if ix.newest(n).size > 0), key=lambda p: p.size)
    path = a.download(small)
    assert integrity.sha256_file(path) == small.sha256 and path.stat().st_size == small.size
    assert deb.control(path)["Package"] == small.name


# an InRelease of another suite, or an older one than the cached (stop 33's review)
def test_inrelease_of_another_suite_is_refused(mirror, gpg, tmp_path, monkeypatch):
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
    # the mirror (or anyone between) serves sid's signed InRelease at trixie's path
    sid = mirror.add_deb("sid", dict(HELLO, Version="9.9-1"), HELLO_FILES)
    mirror.publish("sid", [sid])
    dists = mirror.archive_dir("trixie") / "dists"
    (dists / "trixie").mkdir(parents=True)
    for p in (dists / "sid").rglob("*"):
        if p.is_file():
            q = dists / "trixie" / p.relative_to(dists / "sid")
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes())
    a = Archive(mirror.url, mirror.security_url, keyring=gpg.keyring, cache=tmp_path / "cache")
    with pytest.raises(ArchiveError, match="not trixie"):
        a.release("trixie")


def test_older_inrelease_keeps_the_newer_cached_one(mirror, gpg, tmp_path, monkeypatch):
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)
    old = mirror.add_deb("bookworm", HELLO, HELLO_FILES)
    mirror.publish("bookworm", [old])
    old_inrelease = mirror.inrelease("bookworm").read_bytes()
    time.sleep(1.1)                                   # Date has a one-second resolution
    new = mirror.add_deb("bookworm", dict(HELLO, Version="2.0-1"), HELLO_FILES)
    mirror.publish("bookworm", [new])
    a = Archive(mirror.url, mirror.security_url, keyring=gpg.keyring, cache=tmp_path / "cache")
    assert a.packages("bookworm").newest("hello").version == "2.0-1"
    newer_date = a.release("bookworm").date
    # the mirror goes back (a lagging CDN node, or a replay): an older signed InRelease
    mirror.inrelease("bookworm").write_bytes(old_inrelease)
    (mirror.archive_dir("bookworm") / "dists/bookworm/main/binary-amd64/Packages.xz").write_bytes(
        __import__("lzma").compress(
            "".join(f"{k}: {v}\n" for k, v in old.items()).encode()))
    monkeypatch.setenv("NFLAB_ARCHIVE_TTL", "0")
    b = Archive(mirror.url, mirror.security_url, keyring=gpg.keyring, cache=tmp_path / "cache")
    rel = b.release("bookworm")
    assert rel.date == newer_date, "a signed but older InRelease replaced the cached one"
    assert b.packages("bookworm").newest("hello").version == "2.0-1"


def test_a_kernel_suite_the_mirror_no_longer_serves_is_left_out(mirror, archive, capsys):
    """A 404 for one kernel suite (bullseye moving to archive.debian.org) leaves that
    suite's kernels out with a warning instead of stopping every kernel resolution;
    a mirror that does not answer still stops it."""
    from supply import debian_kernels as dk
    publish_hello(mirror)
    served = dk._served(archive())
    assert list(served) == ["bookworm"], served
    err = capsys.readouterr().err
    assert "the kernels of trixie are left out" in err and "HTTP 404" in err
    down = Archive(f"http://127.0.0.1:{closed_port()}/debian", keyring=mirror.gpg.keyring,
                   cache=mirror.root / "other-cache")
    with pytest.raises(ArchiveError):
        dk._served(down)
