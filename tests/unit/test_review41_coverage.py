"""Behaviour no other unit test pinned (review 41: each test here fails under a
mutation that had survived the whole unit suite): workshop grading and the
matrix's JUnit summary count errors as failures; an InRelease is one
clearsigned message and nothing around it; a signature counts only with
GOODSIG and VALIDSIG and no BADSIG among gpgv's status lines."""

from __future__ import annotations

import subprocess

import pytest

from ground import debrelease
from ground.errors import ArchiveError
from nflab import suites
from nflab import workshop as ws

# ---- an <error> is a failure: workshop grading and the matrix summary ------------


def test_workshop_exercise_whose_test_errors_is_failed(tmp_path):
    """A fixture that raises gives ``<error>`` (no ``<failure>``): not green."""
    junit = tmp_path / "j.xml"
    junit.write_text("""<testsuites><testsuite tests="4" errors="1">
      <testcase classname="tests.workshop.test_ex01_count" name="a"/>
      <testcase classname="tests.workshop.test_ex02_prio" name="a"/>
      <testcase classname="tests.workshop.test_ex02_prio" name="b"><error message="fixture boom"/></testcase>
      <testcase classname="tests.workshop.test_ex03_ttl.TestX" name="a"><error message="setup"/></testcase>
    </testsuite></testsuites>""")
    got = ws.verdicts(ws.select("1,2,3"), junit)
    assert got == {1: "passed", 2: "failed", 3: "failed"}


def test_parse_junit_lists_errors_with_failures(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text("""<testsuites><testsuite tests="4" failures="1" errors="2" skipped="0">
      <testcase classname="tests.suites.test_x" name="ok"/>
      <testcase classname="tests.suites.test_x" name="f"><failure message="assert 1 == 2&#10;more"/></testcase>
      <testcase classname="tests.suites.test_y" name="e"><error message="fixture boom&#10;trace"/></testcase>
      <testcase classname="tests.suites.test_y" name="bare"><error/></testcase>
    </testsuite></testsuites>""")
    counts, failures = suites.parse_junit(junit)
    assert counts == {"tests": 4, "failures": 1, "errors": 2, "skipped": 0}
    assert failures == ["tests.suites.test_x::f: assert 1 == 2",
                        "tests.suites.test_y::e: fixture boom",
                        "tests.suites.test_y::bare: error"]


# ---- an InRelease is a single clearsigned message ---------------------------------

RELEASE = "Suite: bookworm\nCodename: bookworm\n"


@pytest.fixture
def signed(gpg):
    return lambda text=RELEASE: gpg.clearsign(text).decode()


def _verify(tmp_path, gpg, text: str) -> str:
    path = tmp_path / "InRelease"
    path.write_text(text)
    return debrelease.verify(path, gpg.keyring, "bookworm InRelease")


def test_single_clearsigned_inrelease_verifies(tmp_path, gpg, signed):
    assert _verify(tmp_path, gpg, signed()) == RELEASE


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda s, other: "Suite: evil\nCodename: evil\n\n" + s, id="text-before"),
    pytest.param(lambda s, other: s + "Suite: evil\nCodename: evil\n", id="text-after"),
    pytest.param(lambda s, other: s + other, id="second-clearsigned-block"),
])
def test_inrelease_with_anything_around_its_signed_message_is_refused(tmp_path, gpg, signed, wrap):
    """gpgv itself finds GOODSIG and VALIDSIG in each of these (and writes the first
    block's text): only the armor check refuses them, as apt does."""
    text = wrap(signed(), signed("Suite: sid\nCodename: sid\n"))
    with pytest.raises(ArchiveError) as err:
        _verify(tmp_path, gpg, text)
    msg = str(err.value)
    assert "bookworm InRelease" in msg and "not a single clearsigned message" in msg, msg


# ---- gpgv's status lines ----------------------------------------------------------

KEY = "0123456789ABCDEF"
FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
GOOD = f"[GNUPG:] GOODSIG {KEY} Debian Archive Automatic Signing Key"
VALID = f"[GNUPG:] VALIDSIG {FPR} 2024-01-01 1704067200 0 4 0 22 8 01 {FPR}"
BAD = f"[GNUPG:] BADSIG {KEY} Debian Archive Automatic Signing Key"
NOKEY = f"[GNUPG:] NO_PUBKEY {KEY}"


def _status(*lines, code=0, stderr=""):
    return subprocess.CompletedProcess(["gpgv"], code, stdout="\n".join(lines) + "\n", stderr=stderr)


@pytest.mark.parametrize("res", [
    pytest.param(_status("[GNUPG:] NEWSIG", GOOD, VALID), id="goodsig-validsig"),
    # Debian signs with two keys; a keyring that knows one: gpgv exits 2, one good signature suffices
    pytest.param(_status("[GNUPG:] NEWSIG", NOKEY, "[GNUPG:] NEWSIG", GOOD, VALID, code=2),
                 id="one-of-two-keys-known"),
])
def test_good_and_valid_signature_is_accepted(res):
    debrelease._check_status(res, "bookworm InRelease")


@pytest.mark.parametrize("res, reason", [
    pytest.param(_status(GOOD, code=0, stderr="gpgv: something odd"), "something odd",
                 id="goodsig-without-validsig"),
    pytest.param(_status(GOOD, VALID, BAD, code=1), "bad signature", id="goodsig-validsig-badsig"),
    pytest.param(_status(BAD, code=1), "bad signature", id="badsig"),
    pytest.param(_status(NOKEY, code=2), "not in the keyring", id="no-pubkey"),
    pytest.param(_status(f"[GNUPG:] EXPKEYSIG {KEY} x", code=1), "expired key", id="expired-key"),
    pytest.param(_status(f"[GNUPG:] REVKEYSIG {KEY} x", code=1), "revoked key", id="revoked-key"),
    # not status lines: a GOODSIG in gpgv's other output counts for nothing
    pytest.param(_status(f"[GNUPG] GOODSIG {KEY}", f"[GNUPG] VALIDSIG {FPR}", code=2), "gpgv exited 2",
                 id="no-status-prefix"),
])
def test_signature_without_a_clean_good_and_valid_status_is_refused(res, reason):
    with pytest.raises(ArchiveError) as err:
        debrelease._check_status(res, "bookworm InRelease")
    msg = str(err.value)
    assert msg.startswith("bookworm InRelease: signature check failed") and reason in msg, msg
