"""nflab.upstream_t without a VM: the iptables source cache (a fake Debian
mirror on 127.0.0.1), which extensions are stock twins, the guest script, and
reading upstream's runner output and the kit-build evidence."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ground.debarchive import Archive
from ground.errors import NflabError
from nflab import upstream_t
from nflab.upstream_t import KitBuild, Report, Source
from tests.unit.debmirror import FakeMirror, Gpg, have_gpg, tarball

RUNNER_PY = b"#!/usr/bin/env python3\nprint('runner')\n"
STRING_T = b":INPUT\n-m string --string x --algo bm;=;OK\n"


def _tree(root: Path, names=("libxt_string.t", "libxt_comment.t", "libipt_TTL.t", "libxt_NOTKIT.t")) -> Source:
    (root / "extensions").mkdir(parents=True)
    (root / upstream_t.RUNNER).write_bytes(RUNNER_PY)
    for n in names:
        (root / "extensions" / n).write_bytes(STRING_T)
    return Source(root, "1.8.9-2", "bookworm")


# ---- the source cache, fetched through the kit's archive client ------------

@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    if not have_gpg():
        pytest.skip("gpg, gpgv or gpgconf is not installed")
    gpg = Gpg(tmp_path / "gnupg")
    mirror = FakeMirror(tmp_path / "mirror", gpg)
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NFLAB_ARCHIVE_TTL", raising=False)

    def publish(version: str, dsc_served: bool = True):
        upstream = version.split("-")[0]
        dsc = b"Source: iptables\n"
        files = [mirror.add_file("bookworm", f"pool/main/i/iptables/iptables_{upstream}.orig.tar.xz", tarball(
                    [("dir", f"iptables-{upstream}/"), ("dir", f"iptables-{upstream}/extensions/"),
                     ("file", f"iptables-{upstream}/{upstream_t.RUNNER}", RUNNER_PY),
                     ("file", f"iptables-{upstream}/extensions/libxt_string.t", STRING_T)], "xz")),
                 mirror.add_file("bookworm", f"pool/main/i/iptables/iptables_{version}.dsc", dsc)
                 if dsc_served else (hashlib.sha256(dsc).hexdigest(), len(dsc), f"iptables_{version}.dsc")]
        checks = "\n" + "\n".join(f" {sha} {size} {name}" for sha, size, name in files)
        mirror.publish("bookworm", [], sources=[{"Package": "iptables", "Version": version,
                                                 "Directory": "pool/main/i/iptables",
                                                 "Format": "3.0 (quilt)", "Checksums-Sha256": checks}])

    yield publish, mirror, Archive(mirror.url, mirror.security_url, keyring=gpg.keyring,
                                   cache=tmp_path / "debian")
    mirror.close()
    gpg.close()


def test_source_is_fetched_once_recorded_and_refetched_when_damaged(fake_archive, tmp_path):
    publish, mirror, archive = fake_archive
    publish("1.8.9-2")
    src = upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None)
    assert src.root == tmp_path / "cache" / "sources" / "iptables-1.8.9-2"
    assert (src.root / "extensions" / "libxt_string.t").read_bytes() == STRING_T
    record = json.loads((src.root / upstream_t.RECORD).read_text())
    assert record["version"] == "1.8.9-2" and set(record["files"]) == {upstream_t.RUNNER,
                                                                       "extensions/libxt_string.t"}
    asked = sum(mirror.requests.values())
    assert upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None) == src
    assert sum(mirror.requests.values()) == asked, "a cached, intact tree must not be fetched again"
    (src.root / "extensions" / "libxt_string.t").write_bytes(b":INPUT\n-m string;;OK\n")
    upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None)
    assert (src.root / "extensions" / "libxt_string.t").read_bytes() == STRING_T


def test_source_without_its_dsc_on_the_mirror_is_the_upstream_tarball_and_says_so(fake_archive):
    publish, _, archive = fake_archive
    publish("1.8.9-2", dsc_served=False)
    src = upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None)
    assert (src.root / "extensions" / "libxt_string.t").read_bytes() == STRING_T
    assert "404" in src.upstream_only and "upstream tarball only" in src.label
    assert upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None) == src
    label = upstream_t.source_label({"version": src.version, "suite": "bookworm", "upstream_only": src.upstream_only})
    assert label.startswith("iptables 1.8.9-2 (bookworm source package; upstream tarball only")


def test_source_of_another_version_than_the_guests_is_refused(fake_archive, tmp_path):
    publish, _, archive = fake_archive
    publish("1.8.10-1")
    with pytest.raises(NflabError, match=r"bookworm's iptables source is 1\.8\.10-1, but the guest runs "
                                         r"iptables 1\.8\.9-2"):
        upstream_t.source("1.8.9-2", "bookworm", archive=archive, progress=lambda m: None)
    assert not (tmp_path / "cache" / "sources" / "iptables-1.8.9-2").exists()
    assert [p.name for p in (tmp_path / "cache" / "sources").iterdir()] == [".iptables.lock"]


# ---- which extensions, and the guest script --------------------------------

def test_twins_are_catalog_matches_and_targets_stock_ships(tmp_path):
    src = _tree(tmp_path / "iptables")
    assert upstream_t.twins(src) == {"comment": [src.root / "extensions/libxt_comment.t"],
                                     "string": [src.root / "extensions/libxt_string.t"]}
    assert list(upstream_t.twins(src, ["string", "nth"])) == ["string"]


def test_guest_script_ships_runner_and_files_and_runs_each_backend(tmp_path):
    src = _tree(tmp_path / "iptables")
    f = src.root / "extensions/libxt_string.t"
    text = upstream_t.guest_script(src, [("string", f, "legacy"), ("string", f, "nft")])
    assert "python3 iptables-test.py -H -l extensions/libxt_string.t" in text
    assert "python3 iptables-test.py -H -n extensions/libxt_string.t" in text
    blob = next(w for line in text.splitlines() if "base64 -d" in line for w in line.split() if len(w) > 100)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(blob))) as tar:
        assert sorted(tar.getnames()) == ["extensions/libxt_string.t", upstream_t.RUNNER]
        assert tar.extractfile("extensions/libxt_string.t").read() == STRING_T


# ---- upstream's runner output ------------------------------------------------

def _out(i, rc, stdout, stderr="", log=""):
    return (f"@@NFLAB-UPT-BEGIN {i}\n@@NFLAB-UPT-RC {rc}\n@@NFLAB-UPT-OUT\n{stdout}@@NFLAB-UPT-ERR\n{stderr}"
            f"@@NFLAB-UPT-LOG\n{log}@@NFLAB-UPT-END\n")


RUNS = [("string", Path("extensions/libxt_string.t"), "legacy"),
        ("string", Path("extensions/libxt_string.t"), "nft"),
        ("connlimit", Path("extensions/libxt_connlimit.t"), "legacy")]
OUTPUT = (
    _out(0, 0, "extensions/libxt_string.t: OK\nlegacy: 1 test files, 10 unit tests, 10 passed\n")
    + _out(1, 0, "extensions/libxt_string.t: OK but fast mode failed!\nnft: 1 test files, 10 unit tests, 10 passed\n",
           log="command: x\ndumps differ!\nexpect: -A INPUT -m string --string \"test\" --algo bm\n"
               "got: -A INPUT -m string --string \"test\" --algo bm --from 0 --to 65535\n")
    + _out(2, 252, "legacy: 1 test files, 15 unit tests, 11 passed\n",
           "extensions/libxt_connlimit.t: ERROR: line 2 (cannot find: iptables -I INPUT -m connlimit "
           "--connlimit-upto 0)\n"))


def test_runner_output_passes_only_without_any_difference():
    ok, fast, errs = upstream_t.parse_runs(RUNS, OUTPUT)
    assert (ok.tests, ok.passed, ok.rc, ok.ok) == (10, 10, 0, True)
    # the re-run passed, but the block iptables-save printed differs from the file
    assert fast.passed == fast.tests == 10 and fast.fast_failed and not fast.ok
    assert "--from 0 --to 65535" in fast.problems()[0] and "libxt_string.t: fast mode failed" in fast.problems()[0]
    assert errs.errors == [(2, "cannot find: iptables -I INPUT -m connlimit --connlimit-upto 0")]
    assert errs.problems()[0].startswith("libxt_connlimit.t:2: cannot find")
    assert (errs.tests, errs.passed, errs.ok) == (15, 11, False)


def test_a_run_without_output_or_with_exact_line_problems_fails():
    silent = upstream_t.parse_runs(RUNS[:1], _out(0, 1, "", "Traceback ...\n"))[0]
    assert silent.problems() == ["libxt_string.t: iptables-test.py ran no test (exit 1)"]
    missing = upstream_t.parse_runs(RUNS[:1], "")[0]
    assert not missing.ok
    strict = upstream_t.parse_runs(RUNS, OUTPUT)[0]
    strict.strict.append("libxt_string.t:8: INPUT '...': iptables-save printed [...]")
    assert not strict.ok and strict.problems() == strict.strict


# ---- evidence that the kit's build ran ---------------------------------------

KIT = KitBuild("xt_string", "libxt_string", "9C7BFDEB385782D10948DE4", "a" * 64)


def _proof(taint="OE", srcversion=KIT.srcversion, sha="a" * 64, stock="b" * 64):
    return upstream_t.parse_proof(f"@@NFLAB-UPT-PROOF string xt_string {taint} {srcversion} {sha} {stock}\n")


def test_proof_script_reads_module_and_plugin():
    text = upstream_t.proof_script({"string": KIT})
    assert "/sys/module/xt_string/taint" in text and "/sys/module/xt_string/srcversion" in text
    assert f"{upstream_t.XTLIBDIR}/libxt_string.so.nflab-orig" in text


@pytest.mark.parametrize("proof, problem", [
    (_proof(), None),
    (_proof(taint="-"), "not the kit's module"),
    (_proof(srcversion="0123456789ABCDEF0123456"), "the kit built 9C7BFDEB385782D10948DE4"),
    (_proof(sha="c" * 64), "is not the kit's build"),
    (_proof(stock=""), "no stock plugin kept"),
    ({}, "no evidence from the guest"),
])
def test_proof_problems(proof, problem):
    got = upstream_t.proof_problems(proof, {"string": KIT})
    assert (got == []) if problem is None else (len(got) == 1 and problem in got[0]), got


# ---- reports ------------------------------------------------------------------

def test_reports_count_per_extension_and_name_the_source(tmp_path):
    runs = upstream_t.parse_runs(RUNS, OUTPUT)
    source = {"package": "iptables", "version": "1.8.9-2", "suite": "bookworm", "files": {}}
    report = Report("6.12.117+deb12-cloud-amd64", source, runs, _proof(), [])
    assert report.per_extension()["string"]["legacy"] == {"tests": 10, "passed": 10, "ok": True,
                                                          "files": ["libxt_string.t"]}
    assert report.per_extension()["string"]["nft"]["ok"] is False and not report.ok
    paths = upstream_t.write_reports(report, tmp_path)
    suite = ET.parse(paths["junit"]).getroot().find("testsuite")
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["iptables_source"] == \
        "iptables 1.8.9-2 bookworm"
    assert suite.get("failures") == "2" and len(suite.findall("testcase")) == 4
    assert "libxt_connlimit.t:2: cannot find" in ET.tostring(suite, encoding="unicode")
    md = paths["md"].read_text()
    assert "iptables 1.8.9-2" in md and "| string | 10/10 | 10/10 ❌ |" in md
    assert json.loads(paths["json"].read_text())["iptables_source"]["version"] == "1.8.9-2"
