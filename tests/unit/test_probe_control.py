"""Compile probes whose Kbuild run failed for reasons of its own (kmods/probes.py).

A compile probe is 0 only when gcc's failure is located in the probe's own
code; a run whose control object (an empty one) does not build, or a probe
that failed with no error in its own code (cc1 killed for memory, a full disk),
raises and caches nothing. Only the Kbuild run and the compiler id are stand-ins.
"""

from __future__ import annotations

import subprocess
import types

import pytest

from ground.errors import BuildError
from kmods import probes

KILLED = "gcc-14: fatal error: Killed signal terminated program cc1\ncompilation terminated.\n"


def _nospace(src):
    return (f"{src}:8:1: fatal error: error closing /tmp/ccQ1x2.s: No space left on device\n"
            "compilation terminated.\n")


def _mismatch(src):
    return (f"{src}:7:2: error: initialization of \u2018int (*)(void)\u2019 from incompatible "
            f"pointer type [-Werror=incompatible-pointer-types]\n    7 |  f;\n      |  ^\n"
            "cc1: all warnings being treated as errors\n")


def _static_assert(src):
    """5.10's xt_fragoff_u16: the error is in build_bug.h, the probe's line in a note."""
    bb = "/k/include/linux/build_bug.h"
    return (f"In file included from /k/include/linux/bits.h:22,\n                 from {src}:3:\n"
            f"{bb}:78:41: error: static assertion failed: \"__same_type(x, u16)\"\n"
            f"   78 | #define __static_assert(expr, msg, ...) _Static_assert(expr, msg)\n"
            f"{bb}:77:34: note: in expansion of macro '__static_assert'\n"
            f"{src}:6:1: note: in expansion of macro 'static_assert'\n"
            "    6 | static_assert(__same_type(x, u16));\n")


def _no_header(src):
    return (f"{src}:4:10: fatal error: net/nflab_nothere.h: No such file or directory\n"
            "compilation terminated.\n")


def _kbuild(calls, decide):
    """A stand-in for the Kbuild run: *decide(stem, source)* is what gcc prints
    compiling that object, or None when it builds."""
    def run(kernel, work, objects):
        calls.append(list(objects))
        err = ""
        for obj in objects:
            said = decide(obj[:-2], work / f"{obj[:-2]}.c")
            if said is None:
                (work / obj).write_text("")
                (work / f".{obj}.cmd").write_text("")
            else:
                err += said
        return subprocess.CompletedProcess([], 2 if err else 0, "", err)
    return run


def _probe(name):
    return probes.Probe(name, f"{name}()", "compile", header=("linux/netfilter/x_tables.h",),
                        code=f"static void *nflab_probe __maybe_unused = {name};")


TABLE = tuple(_probe(n) for n in ("alpha", "beta", "gamma"))


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probes, "compiler_id", lambda kernel: "trixie-x:gcc-14")
    (tmp_path / "headers").mkdir()
    return types.SimpleNamespace(release="6.12.118+deb13-cloud-amd64",
                                 headers=str(tmp_path / "headers"), packages={})


def _cached(kernel):
    where = probes.cache_dir(kernel)
    return sorted(p.name for p in where.iterdir() if not p.name.startswith(".")) \
        if where.is_dir() else []


def _refused(kernel, monkeypatch, decide, table=TABLE) -> BuildError:
    monkeypatch.setattr(probes, "kbuild_objects", _kbuild([], decide))
    with pytest.raises(BuildError) as info:
        probes.features(kernel, probes=table)
    assert _cached(kernel) == [], "a failed run must cache nothing"
    assert kernel.release in info.value.message and info.value.hint
    return info.value


def test_transient_failure_is_not_cached_as_missing_features(kernel, monkeypatch):
    """The reviewer's case: the OOM killer ends every cc1 of the run; the next
    run, on an idle host, probes again and finds every feature."""
    calls = []
    monkeypatch.setattr(probes, "kbuild_objects", _kbuild(calls, lambda stem, src: KILLED))
    with pytest.raises(BuildError):
        probes.features(kernel)
    assert _cached(kernel) == []
    monkeypatch.setattr(probes, "kbuild_objects", _kbuild(calls, lambda stem, src: None))
    results, header = probes.features(kernel)
    assert len(calls) == 2
    compiled = [r for r in results if r.how == "compile"]
    assert compiled and all(r.value for r in compiled)
    assert "#define NFLAB_HAVE_NF_CONNCOUNT_INIT_KEYLEN 1" in header.read_text()


def test_control_that_does_not_build_breaks_the_run(kernel, monkeypatch):
    err = _refused(kernel, monkeypatch, lambda stem, src: KILLED)
    assert "Killed signal" in err.message
    assert "Killed signal" in err.detail


def test_probes_killed_while_the_control_builds(kernel, monkeypatch):
    """Probes whose cc1 was killed carry no error of their own: not absent, unknown."""
    err = _refused(kernel, monkeypatch,
                   lambda stem, src: None if stem.endswith(("control", "alpha")) else KILLED)
    assert "beta" in err.message and "gamma" in err.message and "alpha" not in err.message


def test_full_disk_located_in_the_probe_is_not_its_failure(kernel, monkeypatch):
    """gcc puts an I/O failure at the probe's last line: still not the probe's code."""
    err = _refused(kernel, monkeypatch,
                   lambda stem, src: None if stem.endswith("control") else _nospace(src))
    assert "alpha" in err.message and "No space left on device" in err.message


def test_one_unlocated_failure_among_real_absences_caches_nothing(kernel, monkeypatch):
    said = {"alpha": _mismatch, "beta": lambda src: KILLED, "gamma": _static_assert}
    err = _refused(kernel, monkeypatch,
                   lambda stem, src: None if stem.endswith("control") else
                   said[stem.rsplit("_", 1)[1]](src))
    assert "beta" in err.message and "alpha" not in err.message


def test_failures_in_the_probes_own_code_are_absent_and_cached(kernel, monkeypatch):
    """An error on the probe's line, one in a header reached from it through a
    macro, a header the probe includes that does not exist: each is 0, cached."""
    said = {"alpha": _mismatch, "beta": _static_assert, "gamma": _no_header}
    calls = []
    monkeypatch.setattr(probes, "kbuild_objects", _kbuild(
        calls, lambda stem, src: None if stem.endswith("control") else
        said[stem.rsplit("_", 1)[1]](src)))
    results, _ = probes.features(kernel, probes=TABLE)
    got = {r.name: r for r in results}
    assert not any(r.value for r in results)
    assert "incompatible pointer type" in got["alpha"].evidence
    assert "\u2018" not in got["alpha"].evidence
    assert "static assertion failed" in got["beta"].evidence
    assert "net/nflab_nothere.h: No such file or directory" in got["gamma"].evidence
    assert len(_cached(kernel)) == 2                    # <key>.json and <key>.h
    assert probes.features(kernel, probes=TABLE)[0] == results and len(calls) == 1


def test_control_is_built_beside_the_probes_and_is_no_probe(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(probes, "kbuild_objects", _kbuild(calls, lambda stem, src: None))
    results, _ = probes.features(kernel, probes=TABLE)
    assert [r.name for r in results] == ["alpha", "beta", "gamma"]
    assert all(r.value and r.evidence == "builds with -Werror" for r in results)
    (objects,) = calls
    assert len(objects) == len(TABLE) + 1
    assert [o for o in objects if not o.startswith("nflab_probe_")]
