"""Guest root filesystem: a Debian 12 minbase image shared by every kernel.

The image is built once with ``debootstrap`` (no mounting, no root-only loop
devices: ``mke2fs -d DIR`` turns the tree into ext4) and cached in
``rootfs_dir()/<recipe-hash>/``:

* ``rootfs.img``  ext4, label ``nflab-root``; QEMU opens it ``readonly=on`` and
  the guest mounts it read-only under a tmpfs overlay, so every boot starts from
  the same clean state and several VMs share it;
* ``manifest.json`` written last: recipe, package versions, size, mtime and
  sha256 of the image. Every use compares size and mtime (sha256 when the mtime
  moved); a damaged or half-written entry is rebuilt with a message.

The recipe hash covers the package list, the guest scripts in ``vm/guest/``,
the image size and the host's libxtables version, so a change to any of them
builds a new image and nothing else does. The guest's libxtables must equal
the host's (plugins built on the host are loaded by the guest's iptables);
the build checks it and ``ensure()`` re-checks it against the host on use.

The lab's SSH key is *not* in the image: the guest init reads it from the
kernel command line (``nflab.key=``), so the image does not depend on the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ground import aptsources, deb822, debarchive, integrity
from ground.errors import VMError
from ground.paths import rootfs_dir
from ground.proc import file_lock, run
from supply import buildroot

from .initramfs import GUEST_DIR

PACKAGES = (
    "python3", "python3-scapy", "python3-pytest", "iptables", "nftables", "iproute2",
    "openssh-server", "dropbear-bin", "kmod", "procps", "iputils-ping", "conntrack", "tcpdump",
    "netcat-openbsd", "ethtool",
)
IMAGE_SIZE = "1G"
LABEL = "nflab-root"
RECIPE_VERSION = 1
# file in vm/guest/  ->  where it goes in the image, mode
GUEST_FILES = {
    "init.sh": ("sbin/nflab-init", 0o755),
    "poweroff.sh": ("usr/local/sbin/poweroff", 0o755),
    "sshd.conf": ("etc/ssh/sshd_config.d/nflab.conf", 0o644),
}
GUEST_LINKS = {"usr/local/sbin/reboot": "poweroff", "usr/local/sbin/halt": "poweroff",
               # dropbear runs its sftp subsystem from here: scp/sftp work as with OpenSSH
               "usr/lib/sftp-server": "openssh/sftp-server"}
# the guest's SSH server (vm/guest/init.sh) is OpenSSH (its host keys made when the
# package is installed), or dropbear with NFLAB_SSHD=dropbear, whose host key is made
# here; both once, at build time, so every boot presents the same one and spends nothing on it
DROPBEAR_KEY = "etc/dropbear/dropbear_ed25519_host_key"
XTABLES_PKG = "libxtables12"
MANIFEST = "manifest.json"
IMAGE = "rootfs.img"


def suite() -> str:
    """The guest userland's Debian release (``--userland`` / $NFLAB_USERLAND)."""
    return buildroot.userland()


def plugin_xtables_version() -> str:
    """The Debian version of libxtables12 plugins are built against: the one in the
    build root of the guest userland's release (made on first use)."""
    root = buildroot.ensure(suite())
    version = root.packages.get(XTABLES_PKG)
    if not version:
        raise VMError(f"the {suite()} build root has no {XTABLES_PKG}",
                      hint="delete $NFLAB_CACHE/buildroots and build again")
    return version


def mirror(sources: list[Path] | None = None) -> str | None:
    """Debian mirror for debootstrap, the one the kit's archive client uses:
    $NFLAB_DEBIAN_MIRROR (or the older $NFLAB_MIRROR), else the host's apt source for
    the suite (one-line or deb822 format), else None (debootstrap's default)."""
    return (aptsources.env_mirror("NFLAB_DEBIAN_MIRROR") or aptsources.env_mirror("NFLAB_MIRROR")
            or aptsources.find(lambda s: s == suite(), sources))


def recipe() -> dict:
    """Everything that determines the image; its hash names the cache entry."""
    return {
        "version": RECIPE_VERSION,
        "suite": suite(),
        "packages": sorted(PACKAGES),
        "image_size": IMAGE_SIZE,
        "label": LABEL,
        "guest_files": {name: hashlib.sha256((GUEST_DIR / name).read_bytes()).hexdigest()
                        for name in sorted(GUEST_FILES)},
        "guest_links": GUEST_LINKS,
        "xtables": plugin_xtables_version(),
    }


def recipe_hash(rec: dict | None = None) -> str:
    data = json.dumps(rec or recipe(), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _guest_versions(root: Path, pkgs) -> dict:
    """Versions of installed packages, read from the image's dpkg status (no host dpkg)."""
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    out = {}
    for stanza in status.split("\n\n"):
        fields = deb822.parse(stanza)
        if fields.get("Package") in pkgs and "installed" in fields.get("Status", ""):
            out[fields["Package"]] = fields.get("Version", "")
    return out


def _install_guest_files(root: Path):
    for name, (dest, mode) in GUEST_FILES.items():
        target = root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST_DIR / name, target)
        target.chmod(mode)
    for link, to in GUEST_LINKS.items():
        (root / link).unlink(missing_ok=True)
        os.symlink(to, root / link)
    # trim what a lab guest never needs (keeps mke2fs and the image small)
    for sub in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/info",
                "usr/share/locale"):
        path = root / sub
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "partial"):
                    child.unlink()
    key = root / DROPBEAR_KEY
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["chroot", root, "dropbearkey", "-t", "ed25519", "-f", "/" + DROPBEAR_KEY], timeout=120)
    (root / "etc/hostname").write_text("nflab\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 nflab\n")
    (root / "etc/fstab").write_text("# nflab: mounts are done by /sbin/nflab-init\n")


def build(*, progress=print) -> Path:
    """Build the image for the current recipe (even if cached) and return its entry dir."""
    rec = recipe()
    key = recipe_hash(rec)
    base = rootfs_dir()
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))
    try:
        root = tmp / "root"
        t0 = time.monotonic()
        _debootstrap(root, progress)
        versions = _checked_versions(root, rec)
        _install_guest_files(root)
        (root / "etc/nflab-rootfs.json").write_text(
            json.dumps({"recipe": key, "xtables": rec["xtables"]}) + "\n")
        progress(f"mke2fs -t ext4 -d ... {IMAGE_SIZE}")
        img = tmp / IMAGE
        run(["mke2fs", "-q", "-t", "ext4", "-L", LABEL, "-E", "root_owner=0:0", "-d", root,
             "-F", img, IMAGE_SIZE], timeout=600)
        shutil.rmtree(root)
        _write_manifest(tmp, img, key, rec, versions, t0)
        entry = base / key
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
        return entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _debootstrap(root: Path, progress) -> None:
    """A minbase root of the guest's suite with PACKAGES in *root*."""
    cmd = ["debootstrap", "--variant=minbase", f"--keyring={debarchive.default_keyring()}",
           "--include=" + ",".join(PACKAGES), suite(), root]
    src = mirror()
    if src:
        cmd.append(src)
    progress(f"debootstrap {suite()} minbase + {len(PACKAGES)} packages (about 45 s)")
    res = run(cmd, check=False, timeout=1800)
    if res.returncode != 0:
        log = root / "debootstrap/debootstrap.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise VMError(f"debootstrap failed with exit {res.returncode}",
                      hint="check the network to the Debian mirror or set NFLAB_MIRROR",
                      detail="\n".join(tail) or (res.stderr or "")[-2000:])


def _checked_versions(root: Path, rec: dict) -> dict:
    """The guest's versions of the packages the kit cares about; its xtables must be
    the build root's, or plugins built there would not load in the guest."""
    versions = _guest_versions(root, [XTABLES_PKG, "iptables", "nftables", "openssh-server",
                                      "dropbear-bin", "python3", "python3-scapy"])
    if versions.get(XTABLES_PKG) != rec["xtables"]:
        raise VMError(
            f"guest {XTABLES_PKG} {versions.get(XTABLES_PKG)} differs from the build root's "
            f"{rec['xtables']}: plugins built there would not load in the guest",
            hint="the mirror moved on between the two: delete $NFLAB_CACHE/buildroots/"
                 f"{suite()}-* and run `invoke rootfs` again")
    return versions


def _write_manifest(entry: Path, img: Path, key: str, rec: dict, versions: dict,
                    t0: float) -> None:
    st = img.stat()
    manifest = {
        "recipe_hash": key, "recipe": rec, "packages": versions,
        "image": IMAGE, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "sha256": integrity.sha256_file(img), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check(entry: Path, *, full=False) -> str | None:
    """None if the entry matches its manifest, else what is wrong (one line).

    Size and mtime are compared on every use; the sha256 when *full* or when
    the mtime moved (a copy with the same content is re-recorded, not rebuilt)."""
    manifest = load_manifest(entry)
    img = entry / IMAGE
    if manifest is None:
        return f"it has no readable {MANIFEST} (an interrupted build, or it was deleted)"
    wrong = integrity.check(img, manifest, name=IMAGE, full=full)
    if wrong:
        return wrong
    st = img.stat()
    if st.st_mtime_ns != manifest.get("mtime_ns"):          # same bytes, touched: re-record
        manifest["mtime_ns"] = st.st_mtime_ns
        tmp = entry / f".{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, entry / MANIFEST)
    return None


def verify(entry: Path, *, full=False) -> dict:
    """The entry's manifest; VMError saying what is wrong if the entry is damaged."""
    problem = check(entry, full=full)
    if problem:
        raise VMError(f"rootfs cache entry {entry} is damaged: {problem}",
                      hint="run `invoke rootfs --rebuild`")
    return load_manifest(entry)


def ensure(*, rebuild=False, full_verify=False, progress=print) -> Path:
    """Path of the rootfs image for the current recipe, building it if needed.

    A missing, half-written or damaged entry (see ``check``) is rebuilt with a
    message saying what was wrong."""
    key = recipe_hash()
    base = rootfs_dir()
    entry = base / key
    with file_lock(base / f".{key}.lock"):
        problem = None if rebuild else check(entry, full=full_verify)
        if rebuild or problem:
            if problem and entry.exists():
                progress(f"rootfs cache entry {entry} is damaged: {problem}; rebuilding it")
            entry = build(progress=progress)
            prune(keep=key, progress=progress)
    return entry / IMAGE


def prune(keep: str, progress=print):
    """Delete images of older recipes of the same userland (a running VM keeps its
    open image until it stops); the other userland's image stays."""
    for old in rootfs_dir().iterdir():
        if old.is_dir() and not old.name.startswith(".") and old.name != keep:
            manifest = load_manifest(old) or {}
            if manifest.get("recipe", {}).get("suite", suite()) != suite():
                continue
            progress(f"removing rootfs of an older recipe: {old}")
            shutil.rmtree(old, ignore_errors=True)


def cached_entries() -> list[dict]:
    """Manifests of every cached image (for `invoke rootfs`)."""
    base = rootfs_dir()
    found = []
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            manifest = load_manifest(entry)
            if manifest:
                manifest["path"] = str(entry / IMAGE)
                found.append(manifest)
    return found


def guest_xtables_version() -> str | None:
    """The guest libxtables of the image for today's recipe, None if it is not built."""
    entry = rootfs_dir() / recipe_hash()
    manifest = load_manifest(entry) if entry.is_dir() else None
    return manifest.get("packages", {}).get(XTABLES_PKG) if manifest else None


def check_guest_xtables(manifest: dict):
    """Raise if the plugins' libxtables (the userland build root's) is not the image's."""
    host = plugin_xtables_version()
    guest = manifest.get("packages", {}).get(XTABLES_PKG)
    if guest != host:
        raise VMError(f"guest {XTABLES_PKG} {guest} differs from the build root's {host}",
                      hint="run `invoke rootfs --rebuild`")

