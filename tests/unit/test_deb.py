"""Pure-Python .deb handling: ar, control, extraction (every compression,
links, merged /usr) and the refusals that keep extraction inside dest."""

from __future__ import annotations

import pytest

from ground import deb, debversion
from ground.errors import ArchiveError
from tests.unit.debmirror import make_deb, tarball

FIELDS = {"Package": "t", "Version": "1", "Architecture": "amd64", "Description": "a\n more"}


def write_deb(tmp_path, entries, comp="xz", name="t.deb"):
    path = tmp_path / name
    path.write_bytes(make_deb(FIELDS, entries, comp))
    return path


@pytest.mark.parametrize("comp", ["xz", "gz", "bz2", "zst", ""])
def test_control_and_extract_every_compression(tmp_path, comp):
    path = write_deb(tmp_path, [("dir", "./etc/"), ("file", "./etc/t.conf", b"x=1\n", 0o600),
                                ("sym", "./etc/link", "t.conf"), ("link", "./etc/hard", "./etc/t.conf")],
                     comp)
    assert deb.control(path) == {"Package": "t", "Version": "1", "Architecture": "amd64",
                                 "Description": "a\n more"}
    names = deb.extract(path, tmp_path / "root")
    root = tmp_path / "root"
    assert names == ["etc", "etc/t.conf", "etc/link", "etc/hard"]
    assert (root / "etc/t.conf").read_text() == "x=1\n"
    assert (root / "etc/t.conf").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/link").readlink().as_posix() == "t.conf"
    assert (root / "etc/hard").stat().st_ino == (root / "etc/t.conf").stat().st_ino


def test_merged_usr_members_go_through_the_directory_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("/usr/lib")  # absolute: taken inside root, never the host's
    path = write_deb(tmp_path, [("dir", "./bin/"), ("file", "./bin/tool", b"#!/bin/sh\n", 0o755),
                                ("dir", "./lib/"), ("dir", "./lib/modules/"),
                                ("file", "./lib/modules/m.ko", b"ko")])
    deb.extract(path, root)
    assert (root / "bin").is_symlink() and (root / "lib").is_symlink()
    assert (root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (root / "usr/lib/modules/m.ko").read_bytes() == b"ko"


@pytest.mark.parametrize("entries, why", [
    ([("file", "../evil", b"x")], "'..' component"),
    ([("file", "./usr/../../evil", b"x")], "'..' component"),
    ([("file", "/etc/evil", b"x")], "absolute path"),
    ([("link", "./hard", "../../etc/passwd")], "'..' component"),
    ([("link", "./hard", "./missing")], "missing member"),
])
def test_path_traversal_is_refused(tmp_path, entries, why):
    path = write_deb(tmp_path, entries)
    with pytest.raises(ArchiveError, match=why) as err:
        deb.extract(path, tmp_path / "root")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "evil").exists()


def test_symlink_out_of_dest_is_followed_inside_dest_only(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = write_deb(tmp_path, [("sym", "./esc", str(outside)), ("sym", "./up", "../../.."),
                                ("file", "./esc/planted", b"x"), ("file", "./up/also", b"y")])
    root = tmp_path / "root"
    deb.extract(path, root)
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "planted").read_bytes() == b"x"
    assert (root / "also").read_bytes() == b"y"


def test_file_member_replaces_a_file_and_a_symlink_but_not_a_directory(tmp_path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "f").write_text("old")
    (root / "s").symlink_to("/etc/passwd")
    deb.extract(write_deb(tmp_path, [("file", "./f", b"new"), ("file", "./s", b"own")]), root)
    assert (root / "f").read_text() == "new"
    assert not (root / "s").is_symlink() and (root / "s").read_text() == "own"
    with pytest.raises(ArchiveError, match="would replace the directory"):
        deb.extract(write_deb(tmp_path, [("file", "./d", b"x")], name="d.deb"), root)


def test_a_fifo_member_is_skipped_and_removes_nothing(tmp_path):
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        fifo = tarfile.TarInfo("f")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    (tmp_path / "t.tar").write_bytes(buf.getvalue())
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("kept")
    assert deb.extract_tarball(tmp_path / "t.tar", root) == []
    assert (root / "f").read_text() == "kept"


def test_a_member_under_a_file_is_an_archive_error(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_text("a file")
    with pytest.raises(ArchiveError, match="which is a file, not a directory") as err:
        deb.extract(write_deb(tmp_path, [("file", "./a/b", b"x")]), root)
    assert "fetch again" in err.value.hint


def test_not_a_deb_and_truncated_deb(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(ArchiveError, match="not a .deb"):
        deb.control(bad)
    good = write_deb(tmp_path, [("file", "./x", b"x" * 100000)], comp="gz")
    cut = tmp_path / "cut.deb"
    cut.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(ArchiveError) as err:
        deb.extract(cut, tmp_path / "root")
    assert "cut.deb" in str(err.value)


def test_extract_tarball_strips_the_top_directory(tmp_path):
    tb = tmp_path / "src.tar.zst"
    tb.write_bytes(tarball([("dir", "pkg-1.0/"), ("file", "pkg-1.0/a/b.c", b"c")], "zst"))
    assert deb.extract_tarball(tb, tmp_path / "out", strip=1) == ["a/b.c"]
    assert (tmp_path / "out/a/b.c").read_bytes() == b"c"


@pytest.mark.parametrize("a, b, expected", [
    ("1.0", "1.0", 0), ("1.0~rc1", "1.0", -1), ("1:0.1", "2.0", 1), ("1.0-1", "1.0-2", -1),
    ("6.12.118-1", "6.12.57-1", 1), ("1.0a", "1.0", 1), ("1.0+b1", "1.0", 1),
    ("7.3~rc4-1~exp1", "7.3~rc4-1", -1), ("7.3.4-1~bpo13+1", "7.3.4-1", -1), ("1.0.0", "1.0", 1),
])
def test_debian_version_order(a, b, expected):
    assert debversion.compare(a, b) == expected
    assert debversion.compare(b, a) == -expected


def test_version_relations():
    assert debversion.satisfies("2.1", ">=", "2") and not debversion.satisfies("2.1", "<<", "2")
    assert debversion.satisfies("1:0", ">>", "9") and debversion.satisfies("x", "", "")
