"""Test helpers for the Debian archive client: .debs and tarballs built in
Python, a throwaway GPG key, and a fake mirror served over HTTP on 127.0.0.1
(counting requests, able to truncate bodies and answer 304)."""

from __future__ import annotations

import bz2
import re
import collections
import email.utils
import gzip
import hashlib
import io
import lzma
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard


# ---- tarballs and .debs ----------------------------------------------------

def tarball(entries, comp: str = "") -> bytes:
    """A tarball of *entries*: ("file", name, data[, mode]), ("dir", name),
    ("sym", name, target), ("link", name, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            data = None
            if kind == "file":
                data = rest[0]
                info.size, info.mode = len(data), rest[1] if len(rest) > 1 else 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = rest[0]
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return compress(buf.getvalue(), comp)


def compress(raw: bytes, comp: str) -> bytes:
    return {"": lambda d: d, "xz": lzma.compress, "gz": lambda d: gzip.compress(d, mtime=0),
            "bz2": bz2.compress, "zst": zstandard.ZstdCompressor().compress}[comp](raw)


def ar(members) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n")
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def control_text(fields: dict) -> str:
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def make_deb(fields: dict, entries, comp: str = "xz") -> bytes:
    ext = f".{comp}" if comp else ""
    control = tarball([("dir", "./"), ("file", "./control", control_text(fields).encode())], comp)
    data = tarball([("dir", "./"), *entries], comp)
    return ar([("debian-binary", b"2.0\n"), (f"control.tar{ext}", control),
               (f"data.tar{ext}", data)])


# ---- a throwaway signing key -------------------------------------------------

class Gpg:
    """A GnuPG home with one ed25519 key; ``keyring`` is its exported public key."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run("--passphrase", "", "--quick-gen-key", "nflab test archive <archive@test.invalid>",
                 "ed25519", "sign", "never")
        self.keyring = home / "keyring.gpg"
        self.keyring.write_bytes(self.run("--export").stdout)

    def run(self, *args, input=None):
        return subprocess.run(["gpg", "--batch", "--yes", "--homedir", str(self.home),
                               "--pinentry-mode", "loopback", *args],
                              input=input, capture_output=True, check=True)

    def clearsign(self, text: str) -> bytes:
        return self.run("--passphrase", "", "--digest-algo", "SHA256", "--clearsign",
                        input=text.encode()).stdout

    def close(self):
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       capture_output=True, check=False)


# ---- the fake mirror ------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeMirror:
    """``<root>/debian`` and ``<root>/debian-security`` served on 127.0.0.1."""

    def __init__(self, root: Path, gpg: Gpg):
        self.root, self.gpg = root, gpg
        self.requests: collections.Counter = collections.Counter()
        self.seen_headers: list[tuple[str, dict]] = []
        self.truncate: set[str] = set()
        self.conditional = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/debian"
        self.security_url = self.url + "-security"

    def close(self):
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    def archive_dir(self, suite: str) -> Path:
        return self.root / ("debian-security" if suite.endswith("-security") else "debian")

    def inrelease(self, suite: str) -> Path:
        return self.archive_dir(suite) / "dists" / suite / "InRelease"

    def add_deb(self, suite: str, fields: dict, entries, comp="xz") -> dict:
        """Put a .deb in the pool; the Packages stanza for it."""
        data = make_deb(fields, entries, comp)
        name = fields["Package"]
        rel = f"pool/main/{name[0]}/{name}/{name}_{fields['Version']}_{fields['Architecture']}.deb"
        path = self.archive_dir(suite) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {**fields, "Filename": rel, "Size": str(len(data)), "SHA256": _sha(data)}

    def add_file(self, suite: str, rel: str, data: bytes) -> tuple[str, int, str]:
        path = self.archive_dir(suite) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return _sha(data), len(data), rel.rsplit("/", 1)[-1]

    def publish(self, suite: str, stanzas, sources=(), valid_days: float | None = 7,
                by_hash: bool = False) -> Path:
        """Write Packages(.xz), Sources(.xz) and a signed InRelease for *suite*."""
        dists = self.archive_dir(suite) / "dists" / suite
        lists = {"main/binary-amd64/Packages": "\n".join(control_text(s) for s in stanzas),
                 "main/source/Sources": "\n".join(control_text(s) for s in sources)}
        files = []
        for rel, text in lists.items():
            for name, data in ((rel, text.encode()), (rel + ".xz", lzma.compress(text.encode()))):
                (dists / name).parent.mkdir(parents=True, exist_ok=True)
                (dists / name).write_bytes(data)
                if by_hash and name.endswith(".xz"):
                    hashed = dists / rel.rsplit("/", 1)[0] / "by-hash" / "SHA256" / _sha(data)
                    hashed.parent.mkdir(parents=True, exist_ok=True)
                    hashed.write_bytes(data)
                files.append(f" {_sha(data)} {len(data):>8} {name}")
        release = self.release_text(suite, files, valid_days, by_hash)
        self.inrelease(suite).write_bytes(self.gpg.clearsign(release))
        return self.inrelease(suite)

    @staticmethod
    def release_text(suite, files, valid_days, by_hash) -> str:
        now = time.time()
        head = {"Origin": "Debian", "Label": "Debian", "Suite": suite, "Codename": suite,
                "Date": email.utils.formatdate(now, usegmt=True)}
        if valid_days is not None:
            head["Valid-Until"] = email.utils.formatdate(now + valid_days * 86400, usegmt=True)
        if by_hash:
            head["Acquire-By-Hash"] = "yes"
        head.update({"Architectures": "amd64", "Components": "main"})
        return control_text(head) + "SHA256:\n" + "\n".join(files) + "\n"

    def _handler(self):
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urllib.parse.unquote(self.path.split("?", 1)[0])
                mirror.requests[path] += 1
                mirror.seen_headers.append((path, dict(self.headers)))
                file = mirror.root / path.lstrip("/")
                if ".." in path or not file.is_file():
                    self.send_error(404)
                    return
                self._send(path, file.read_bytes())

            def _send(self, path, data):
                etag = f'"{_sha(data)[:16]}"'
                if mirror.conditional and self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if path in mirror.truncate else data)
                self.close_connection = path in mirror.truncate

        return Handler


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_gpg() -> bool:
    """gpg, gpgv and gpgconf are on PATH. Without them the signed-archive tests skip on
    a developer's machine, but fail under CI (``CI`` set): .ci/setup installs them, so
    their absence there is a broken setup, not a reason to test less."""
    found = bool(shutil.which("gpg") and shutil.which("gpgv") and shutil.which("gpgconf"))
    if not found and os.environ.get("CI"):
        pytest.fail("gpg, gpgv or gpgconf is not installed, yet CI is set: run bash .ci/setup "
                    "(it installs gnupg and gpgv)", pytrace=False)
    return found


@dataclass
class FakePkg:
    """A package row of a FakeIndex."""
    name: str
    version: str
    depends: str = ""


class FakeIndex(dict):
    """{name: FakePkg}: the index search the kernel offers make."""
    def search(self, pattern):
        return sorted(n for n in self if re.match(pattern, n))
