"""A suite's signed ``InRelease``: checked with ``gpgv`` against a keyring,
then only the signed text is parsed (date, validity, the SHA256 file list)."""

from __future__ import annotations

import email.utils
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ground import deb822
from ground.errors import ArchiveError

BEGIN = "-----BEGIN PGP SIGNED MESSAGE-----"
SIG_BEGIN = "-----BEGIN PGP SIGNATURE-----"
SIG_END = "-----END PGP SIGNATURE-----"
_REASONS = (("BADSIG", "bad signature (the file was altered)"),
            ("EXPKEYSIG", "signed with an expired key"),
            ("REVKEYSIG", "signed with a revoked key"),
            ("NO_PUBKEY", "signed by a key that is not in the keyring"))


@dataclass
class Release:
    """The parsed signed text of an InRelease."""

    suite: str
    codename: str
    date: datetime | None
    valid_until: datetime | None
    files: dict[str, tuple[str, int]]
    acquire_by_hash: bool = False
    fields: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, text: str) -> "Release":
        try:
            f = deb822.parse(text)
        except ValueError as exc:
            raise ArchiveError(f"InRelease is not a Release file ({exc})") from None
        files = {name: (sha, size) for sha, size, name in deb822.checksums(f.get("SHA256", ""))}
        return cls(f.get("Suite", ""), f.get("Codename", ""), _date(f.get("Date")),
                   _date(f.get("Valid-Until")), files,
                   f.get("Acquire-By-Hash", "").lower() == "yes", f)

    def expired(self, now: float | None = None) -> bool:
        return bool(self.valid_until) and self.valid_until.timestamp() < (now or time.time())

    def entry(self, path: str, label: str) -> tuple[str, int]:
        """``(sha256, size)`` of *path* (relative to the suite's dists dir)."""
        try:
            return self.files[path]
        except KeyError:
            raise ArchiveError(f"{label}: {path} is not listed in the signed InRelease") from None


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise ArchiveError(f"InRelease has an unreadable date: {value!r}") from None


def keyring_missing(keyring: Path) -> ArchiveError:
    return ArchiveError(f"the Debian archive keyring {keyring} does not exist",
                        hint="install the debian-archive-keyring package, "
                             "or set NFLAB_DEBIAN_KEYRING")


def verify(path: Path, keyring: Path, label: str) -> str:
    """The signed text of the InRelease at *path*, if ``gpgv`` finds a good
    signature by a key of *keyring*; else ArchiveError naming *label*."""
    if not Path(keyring).is_file():
        raise keyring_missing(keyring)
    _check_armor(Path(path).read_text(errors="replace"), label)
    gpgv = shutil.which("gpgv")
    if not gpgv:
        raise ArchiveError("gpgv is not installed: cannot check InRelease signatures",
                           hint="install the gpgv package")
    with tempfile.TemporaryDirectory(prefix="nflab-gpgv-") as tmp:
        out = Path(tmp) / "signed"
        res = subprocess.run([gpgv, "--homedir", tmp, "--status-fd", "1",
                              "--keyring", str(Path(keyring).resolve()), "--output", str(out),
                              str(path)], capture_output=True, text=True, check=False)
        _check_status(res, label)
        return out.read_text()


def _check_armor(text: str, label: str):
    """One clearsigned message and nothing around it (apt's rule too)."""
    lines = text.strip().splitlines()
    ok = (lines and lines[0] == BEGIN and lines[-1] == SIG_END
          and text.count(BEGIN) == 1 and text.count(SIG_BEGIN) == 1)
    if not ok:
        raise ArchiveError(f"{label}: signature check failed (not a single clearsigned message)")


def _check_status(res: subprocess.CompletedProcess, label: str):
    status = [line.split()[1] for line in res.stdout.splitlines()
              if line.startswith("[GNUPG:] ") and len(line.split()) > 1]
    # one good signature suffices (Debian signs with two keys; an older keyring
    # may know one): gpgv then exits non-zero, so only its status lines count
    if "GOODSIG" in status and "VALIDSIG" in status and "BADSIG" not in status:
        return
    reason = next((why for key, why in _REASONS if key in status), None)
    if reason is None:
        tail = (res.stderr or "").strip().splitlines()
        reason = tail[-1] if tail else f"gpgv exited {res.returncode}"
    raise ArchiveError(f"{label}: signature check failed ({reason})")
