"""A kernel cache entry, whatever made it (Debian's packages or a source build).

``$NFLAB_CACHE/kernels/<release>/`` holds ``root/`` (``boot/vmlinuz-<release>``,
``boot/config-<release>``, ``boot/System.map-<release>``, ``lib/modules/<release>``
with ``modules.dep``, and the headers), the manifest ``nflab-kernel.json``
written last, and integrity records written at fetch time:
``nflab-integrity.json`` (size, mtime and sha256 of the vmlinuz; the count, byte
total and digest of the listing of every file under root/) and
``nflab-files.gz`` (the listing itself), so a damaged entry says *what* is wrong.
Every use checks the vmlinuz's size and mtime (sha256 when the mtime moved) and
walks the tree (~14k files, ~0.04 s).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ground import integrity, kconfig
from ground.errors import KernelError
from ground.paths import kernels_dir

MANIFEST = "nflab-kernel.json"
MANIFEST_VERSION = 1
INTEGRITY = "nflab-integrity.json"
LISTING = "nflab-files.gz"
_CC_RE = re.compile(r"^\s*(?:override\s+)?CC\s*:?=.*\$\(CROSS_COMPILE\)(?P<cc>\S+)\s*$", re.M)
# which Debian release built a kernel, from the tag Debian puts in its ABI
_RELEASE_TAGS = (("deb11", "bullseye"), ("deb12", "bookworm"), ("deb13", "trixie"),
                 ("deb14", "sid"))


def release_of_abi(abi: str) -> str:
    """``6.12.118+deb13`` -> trixie; ``5.10.0-32`` -> bullseye; ``6.1.0-57`` -> bookworm."""
    for tag, release in _RELEASE_TAGS:
        if tag in abi:
            return release
    if abi.startswith("5.10."):
        return "bullseye"
    if abi.startswith("6.1.0-"):
        return "bookworm"
    return ""


@dataclass
class Kernel:
    """A cached kernel, as recorded in its manifest."""

    abi: str
    flavour: str
    release: str
    root: str
    vmlinuz: str
    headers: str
    config: str
    modules: str
    system_map: str
    packages: dict
    suite: str = ""            # the Debian suite it came from ("" for older entries)
    toolchain: str = ""        # the Debian release whose build root compiles for it
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.abi}-{self.flavour}"

    @property
    def compiler(self) -> str:
        """The compiler the headers ask for (``.kernelvariables``: ``gcc-14``), else gcc."""
        try:
            text = (Path(self.headers) / ".kernelvariables").read_text()
        except OSError:
            return self.extra.get("compiler", "gcc")
        m = _CC_RE.search(text)
        return m.group("cc") if m else "gcc"

    @property
    def build_release(self) -> str:
        """The Debian release whose build root runs Kbuild for this kernel."""
        return self.toolchain or release_of_abi(self.abi) or "bookworm"

    def config_value(self, option: str):
        """Value of CONFIG_<option> in the kernel's .config, or None if unset."""
        return kconfig.value(kconfig.read(self.config), option)

    @classmethod
    def load(cls, entry: Path) -> "Kernel":
        data = json.loads((entry / MANIFEST).read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise KernelError(f"cache entry {entry} has an old manifest",
                              hint="delete it and run `invoke fetch-kernel` again")
        data.pop("version")
        return cls(**data)

    def manifest(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, **self.__dict__}, indent=2) + "\n"


def cached_kernels() -> list[Kernel]:
    """Every entry with a manifest, newest first (``check_entry`` says which are whole)."""
    base = kernels_dir()
    found = []
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            # .tmp-* and .build-* hold a manifest for a moment before their rename
            if not entry.name.startswith(".") and (entry / MANIFEST).is_file():
                try:
                    found.append(Kernel.load(entry))
                except (KernelError, TypeError, json.JSONDecodeError):
                    continue
    found.sort(key=lambda k: abi_sort_key(k.abi), reverse=True)
    return found


def abi_sort_key(abi: str):
    """Numeric order of ABIs: 6.1.0-9 < 6.1.0-56 < 6.12.9+deb12 < 7.3.4+deb13."""
    if re.match(r"^\d+\.\d+\.0-\d+$", abi):              # 5.10.0-32, 6.1.0-57
        major, minor, _, abinum = re.split(r"[.-]", abi)
        return (int(major), int(minor), int(abinum))
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", abi)
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


# ---------------------------------------------------------------- integrity records

# the headers Makefile's absolute references: Debian's include of the common
# headers, Kbuild's O= include of the source tree and (7.x) its KBUILD_OUTPUT
_MAKEFILE_REF_RE = re.compile(r"^(?:include|export KBUILD_OUTPUT\s*:?=)\s*(/\S+)\s*$", re.M)


def _walk(root: Path) -> dict[str, str]:
    """relative path -> size (regular files) or '->target' (symlinks), dirs left out.
    One lstat per file at most (``os.scandir`` knows types from the directory
    listing): ~0.04 s for a kernel entry's ~14k files, paid by every `vm-up`."""
    out = {}
    stack = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                key = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    out[key] = "->" + os.readlink(e.path)
                elif e.is_dir(follow_symlinks=False):
                    stack.append((key, e.path))
                else:
                    out[key] = str(e.stat(follow_symlinks=False).st_size)
    return out


def _digest(listing: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in sorted(listing):
        h.update(f"{path}\0{listing[path]}\n".encode())
    return h.hexdigest()


def _key_files(kernel: Kernel) -> list[Path]:
    """What a build and a boot cannot do without (checked even without records)."""
    headers = Path(kernel.headers)
    return [Path(kernel.vmlinuz), Path(kernel.config), Path(kernel.modules) / "modules.dep",
            headers / "Makefile", headers / ".config", headers / "Module.symvers",
            headers / "include/generated/utsrelease.h", headers / "include/generated/autoconf.h"]


def record_integrity(entry: Path, kernel: Kernel):
    """Write the entry's integrity records (at fetch time, before the manifest);
    *kernel* carries the final paths, *entry* is where the tree is now."""
    root = entry / "root"
    listing = _walk(root)
    rel_vmlinuz = Path(kernel.vmlinuz).relative_to(kernel.root)
    data = {
        "vmlinuz": {"path": str(rel_vmlinuz), **integrity.record(root / rel_vmlinuz)},
        "files": len(listing),
        "bytes": sum(int(v) for v in listing.values() if not v.startswith("->")),
        "digest": _digest(listing),
    }
    text = "".join(f"{p}\t{listing[p]}\n" for p in sorted(listing))
    for name, payload in ((LISTING, gzip.compress(text.encode())),
                          (INTEGRITY, (json.dumps(data, indent=2) + "\n").encode())):
        tmp = entry / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(payload)
        os.replace(tmp, entry / name)


def _listing_diff(entry: Path, now: dict[str, str]) -> str:
    try:
        text = gzip.decompress((entry / LISTING).read_bytes()).decode()
    except (OSError, EOFError, ValueError):
        return "its file listing differs from the one recorded (and the record is unreadable)"
    then = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    missing = sorted(set(then) - set(now))
    extra = sorted(set(now) - set(then))
    changed = sorted(p for p in set(then) & set(now) if then[p] != now[p])
    parts = []
    for label, paths in (("missing", missing), ("changed", changed), ("unexpected", extra)):
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            parts.append(f"{len(paths)} {label} ({shown})")
    return "; ".join(parts) or "its file listing digest differs from the one recorded"


def predates_records(entry: Path) -> bool:
    """Whether the entry was made before fetches wrote integrity records: its
    manifest lacks ``suite``, a field every manifest has had since (records came
    first). A newer entry without records is damaged, never adopted as whole."""
    try:
        return "suite" not in json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


def _check_records(entry: Path, kernel: Kernel, listing: bool = True) -> str | None:
    try:
        data = json.loads((entry / INTEGRITY).read_text())
    except FileNotFoundError:
        if not predates_records(entry):
            return (f"it has no {INTEGRITY} although its manifest is newer than the "
                    "records (a removal or a fetch was cut short)")
        try:   # an entry from before the records: adopt it as it is now
            record_integrity(entry, kernel)
        except OSError:
            pass
        return None
    except (OSError, ValueError) as exc:
        return f"its {INTEGRITY} is unreadable ({exc})"
    vm = data["vmlinuz"]
    vmlinuz = entry / "root" / vm["path"]
    wrong = integrity.check(vmlinuz, vm, name=str(vmlinuz.relative_to(entry)))
    if wrong or not listing:
        return wrong
    now = _walk(entry / "root")
    if _digest(now) != data["digest"]:
        return f"files under root/ changed since the fetch: {_listing_diff(entry, now)}"
    return None


def check_entry(entry: Path, *, listing: bool = True) -> str | None:
    """None if the cache entry is whole, else what is wrong with it (one line).

    Without *listing* the walk of every file under ``root/`` (~14 000 ``lstat``s,
    0.05 s) is left out: the key files and the recorded ``vmlinuz`` are still
    checked. A boot whose boot files are current needs no more (they carry their
    own records, see ``vm/initramfs.py``); a build always walks."""
    if not entry.is_dir():
        return "it does not exist"
    if not (entry / MANIFEST).is_file():
        return f"it has no {MANIFEST} (an interrupted fetch, or the manifest was deleted)"
    try:
        kernel = Kernel.load(entry)
    except (KernelError, TypeError, ValueError, OSError) as exc:
        return f"its manifest is unreadable ({exc})"
    return _key_problem(entry, kernel) or _check_records(entry, kernel, listing)


def _key_problem(entry: Path, kernel: Kernel) -> str | None:
    """What is missing of what every build and boot needs (stat calls only)."""
    for path in _key_files(kernel):
        if not path.is_file():
            return f"{path.relative_to(entry)} is missing"
        if path.stat().st_size == 0:
            return f"{path.relative_to(entry)} is empty"
    makefile = Path(kernel.headers) / "Makefile"
    for target in _MAKEFILE_REF_RE.findall(makefile.read_text(errors="replace")):
        if not Path(target).exists():
            return f"{makefile.relative_to(entry)} refers to {target}, which does not exist"
    return None
