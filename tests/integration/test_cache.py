"""Caches are verified on use: a damaged or half entry is reported and rebuilt,
and two kit processes fetching one kernel serialise on its lock.

Everything here works in a temporary ``$NFLAB_CACHE`` (never the shared one):
the kernel tests really download Debian's packages with the kit's archive client (~50 MB for
the 6.12 cloud kernel, four times), the boot-file tests build real initramfs
and modules images from the cached kernel, and the rootfs tests work on a
copy of the cached image (one of them rebuilds it with debootstrap).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ground.errors import KernelError, VMError
from ground.paths import REPO, cache_dir
from nflab import doctor, doctor_kit
from supply import kernels
from vm import initramfs, rootfs

pytestmark = [pytest.mark.slow]

SHARED = cache_dir()     # the kit's own cache: $NFLAB_CACHE, else ~/.cache/nflab


def _cli(args, cache: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, NFLAB_CACHE=str(cache), PYTHONPATH=str(REPO), CI="1", LC_ALL="C")
    return subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _blocked_on(lock: Path, pid: int) -> bool:
    """True if *pid* waits (``->`` in /proc/locks) for the flock on *lock*."""
    ino = lock.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "->" in f and "FLOCK" in f:
            i = f.index("FLOCK")
            if int(f[i + 3]) == pid and int(f[i + 4].rsplit(":", 1)[1]) == ino:
                return True
    return False


# ---------------------------------------------------------------- kernel entries

@pytest.fixture(scope="module")
def kcache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kcache")
    mp = pytest.MonkeyPatch()
    mp.setenv("NFLAB_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def kernel_ref(kcache):
    """The newest 6.12 cloud kernel apt offers (fetched into the temporary cache)."""
    return kernels.resolve("6.12")


@pytest.fixture(scope="module")
def fetched(kcache, kernel_ref):
    """Two `invoke fetch-kernel` of one kernel into an empty cache, the second
    started while the first downloads: returns the (cache, entry, results)."""
    spec = f"--kernel={kernel_ref.abi}-{kernel_ref.flavour}"
    base = kcache / "kernels"
    lock = base / f".{kernel_ref.key}.lock"
    first = _cli(["fetch-kernel", spec], kcache)
    second = None
    try:
        deadline = time.monotonic() + 600
        # the first holds the lock once its temporary entry exists
        while not (base.is_dir() and any(base.glob(f".tmp-{kernel_ref.key}-*"))):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first fetch never started downloading"
            time.sleep(0.05)
        second = _cli(["fetch-kernel", spec], kcache)
        waited = False
        while first.poll() is None and not waited:
            waited = _blocked_on(lock, second.pid)
            time.sleep(0.05)
        results = [p.communicate(timeout=900) + (p.returncode,) for p in (first, second)]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return {"entry": base / kernel_ref.key, "results": results, "waited": waited}


def test_two_processes_fetching_one_kernel_share_one_download(fetched, kernel_ref):
    (out1, err1, rc1), (out2, err2, rc2) = fetched["results"]
    assert (rc1, rc2) == (0, 0), err1 + err2
    assert fetched["waited"], "the second fetch never waited on the first one's lock"
    assert "unpacking linux-image-" in err1
    assert "unpacking linux-image-" not in err2, "the second process downloaded again after the lock"
    assert out1 == out2 and kernel_ref.release in out1
    entry = fetched["entry"]
    assert kernels.check_entry(entry) is None
    assert not list(entry.parent.glob(".tmp-*")), "a temporary entry was left behind"
    k = kernels.get(f"{kernel_ref.abi}-{kernel_ref.flavour}", fetch_missing=False)
    assert Path(k.vmlinuz).is_file() and k.root.startswith(str(entry))
    integrity = json.loads((entry / kernels.INTEGRITY).read_text())
    listing = gzip.decompress((entry / kernels.LISTING).read_bytes()).decode().splitlines()
    assert integrity["files"] == len(listing) > 1000
    assert integrity["vmlinuz"]["size"] == Path(k.vmlinuz).stat().st_size


def _vmlinuz(entry: Path) -> Path:
    return next((entry / "root/boot").glob("vmlinuz-*"))


def _truncate_vmlinuz(entry):
    path = _vmlinuz(entry)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return r"vmlinuz-\S+ has \d+ bytes, \d+ were recorded"


def _delete_manifest(entry):
    (entry / kernels.MANIFEST).unlink()
    return r"no nflab-kernel\.json"


def _delete_common_header(entry):
    # a header every netfilter module includes; not among the key files, so only
    # the recorded listing can notice it is gone
    victim = next((entry / "root/usr/src").glob("linux-headers-*-common/include/linux/netfilter.h"))
    victim.unlink()
    return r"1 missing \(usr/src/linux-headers-[^/]+-common/include/linux/netfilter\.h\)"


def _delete_symvers(entry):
    next((entry / "root/usr/src").glob("linux-headers-*-amd64/Module.symvers")).unlink()
    return r"Module\.symvers is missing"


@pytest.mark.parametrize("damage", [_truncate_vmlinuz, _delete_manifest, _delete_common_header,
                                    _delete_symvers], ids=lambda f: f.__name__.lstrip("_"))
def test_damaged_kernel_entry_is_reported_and_fetched_again(fetched, kernel_ref, damage):
    entry = fetched["entry"]
    assert kernels.check_entry(entry) is None
    said = damage(entry)
    spec = f"{kernel_ref.abi}-{kernel_ref.flavour}"
    problem = kernels.check_entry(entry)
    assert problem and re.search(said, problem), problem
    # a boot whose boot files are current leaves out only the walk of every file
    quick = kernels.check_entry(entry, listing=False)
    assert (quick is None) == (damage is _delete_common_header), quick
    if (entry / kernels.MANIFEST).is_file():
        # a use that may not fetch names the damage and what to do
        with pytest.raises(KernelError) as info:
            kernels.get(spec, fetch_missing=False)
        assert "damaged" in info.value.message and re.search(said, info.value.message)
        assert "invoke fetch-kernel" in info.value.hint
        fails = [c for c in doctor_kit.check_cache() if c.status == doctor.FAIL]
        assert any(kernel_ref.release in c.name and re.search(said, c.detail) for c in fails), fails
    # what a fetch killed with SIGKILL would have left beside the entry
    debris = entry.parent / f".tmp-{kernel_ref.key}-killed"
    (debris / "root").mkdir(parents=True)
    proc = _cli(["fetch-kernel", f"--kernel={spec}"], fetched["entry"].parent.parent)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert not debris.exists() and f"removing {debris.name}, left by an interrupted fetch" in err
    assert re.search(r"kernel cache entry \S+ is damaged: .*" + said + ".*; fetching it again",
                     err), err
    assert "unpacking linux-image-" in err
    assert kernels.check_entry(entry) is None
    assert kernels.get(spec, fetch_missing=False).release == kernel_ref.release


def test_same_vmlinuz_with_a_new_mtime_is_not_refetched_but_changed_bytes_are(fetched, kernel_ref):
    entry = fetched["entry"]
    path = _vmlinuz(entry)
    os.utime(path, (1, 1))
    assert kernels.check_entry(entry) is None      # sha256 still matches
    with open(path, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    problem = kernels.check_entry(entry)
    assert problem and "does not match its recorded sha256" in problem, problem
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(byte)
    assert kernels.check_entry(entry) is None


# ---------------------------------------------------------------- boot files

def test_damaged_boot_files_are_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(SHARED))     # not this module's kcache
    kernel = kernels.get("6.12")
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    said = []
    first = initramfs.ensure(kernel, progress=said.append)
    assert str(first.initrd).startswith(str(tmp_path))
    manifest = json.loads((first.initrd.parent / initramfs.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"initramfs.cpio", "modules.img"}
    size = first.initrd.stat().st_size
    with open(first.initrd, "r+b") as f:
        f.truncate(size - 512)
    said.clear()
    again = initramfs.ensure(kernel, progress=said.append)
    assert any(re.search(r"initramfs\.cpio has \d+ bytes, \d+ were recorded.*rebuilding", m)
               for m in said), said
    assert again.initrd.stat().st_size == size
    said.clear()
    initramfs.ensure(kernel, progress=said.append)
    assert said == [], "a whole entry must be used as it is"


SIG_MAGIC = b"~Module signature appended~\n"


def _image_file(img: Path, path: str) -> bytes:
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(img)], capture_output=True, check=True)
    return res.stdout


def test_the_modules_image_holds_debians_signed_modules_decompressed(tmp_path, monkeypatch):
    """6.12's modules are .ko.xz: the image has each as the .ko it decompresses to,
    signature and all, and a modules.dep that names those."""
    monkeypatch.setenv("NFLAB_CACHE", str(SHARED))     # not this module's kcache
    kernel = kernels.get("6.12")
    src = Path(kernel.modules)
    packed = sorted(str(p.relative_to(src)) for p in src.rglob("*.ko.xz"))
    assert len(packed) > 500, f"6.12's modules should be .ko.xz: {len(packed)} in {src}"
    img = tmp_path / "modules.img"
    initramfs.write_modules_image(img, kernel)
    dep = _image_file(img, "/modules.dep").decode().splitlines()
    assert sorted(line.split(":", 1)[0] for line in dep) == [p[:-3] for p in packed]
    assert not [line for line in dep if ".ko." in line]
    inside = _image_file(img, "/kernel/net/netfilter/nf_tables.ko")
    original = initramfs.read_module(src / "kernel/net/netfilter/nf_tables.ko.xz")
    assert inside == original and inside.endswith(SIG_MAGIC)


# ---------------------------------------------------------------- rootfs image

@pytest.fixture
def rootfs_copy(tmp_path, monkeypatch):
    """The shared cache's current rootfs entry, copied (sparse, mtimes kept) into a temp cache."""
    monkeypatch.setenv("NFLAB_CACHE", str(SHARED))     # not this module's kcache
    key = rootfs.recipe_hash()
    src = rootfs.ensure(progress=lambda *_: None).parent     # built there if missing
    assert src == SHARED / "rootfs" / key
    dest = tmp_path / "rootfs" / key
    dest.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dest)], check=True)
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    assert rootfs.check(dest) is None
    return dest


def test_rootfs_damage_is_detected(rootfs_copy):
    img = rootfs_copy / rootfs.IMAGE
    manifest = rootfs.load_manifest(rootfs_copy)
    # a new mtime over the same bytes: the hash is checked and the mtime re-recorded
    os.utime(img, (1, 1))
    assert rootfs.check(rootfs_copy) is None
    assert rootfs.load_manifest(rootfs_copy)["mtime_ns"] == img.stat().st_mtime_ns
    # one changed byte, same size
    with open(img, "r+b") as f:
        f.seek(1024 + 0x78)     # inside the ext4 superblock (volume name)
        old = f.read(1)
        f.seek(1024 + 0x78)
        f.write(bytes([old[0] ^ 0x20]))
    problem = rootfs.check(rootfs_copy)
    assert problem and "sha256" in problem, problem
    with pytest.raises(VMError, match="damaged.*sha256"):
        rootfs.verify(rootfs_copy)
    # truncated
    with open(img, "r+b") as f:
        f.truncate(manifest["size"] // 2)
    problem = rootfs.check(rootfs_copy)
    assert problem and re.search(r"rootfs\.img has \d+ bytes, \d+ were recorded", problem), problem
    # half entry: no manifest
    (rootfs_copy / rootfs.MANIFEST).unlink()
    assert "no readable manifest.json" in rootfs.check(rootfs_copy)


def test_truncated_rootfs_is_rebuilt_by_ensure(rootfs_copy):
    """The real repair: ensure() says what was wrong and builds the image again (debootstrap)."""
    img = rootfs_copy / rootfs.IMAGE
    with open(img, "r+b") as f:
        f.truncate(img.stat().st_size // 2)
    said = []
    path = rootfs.ensure(progress=said.append)
    assert path == img
    assert any(re.search(r"rootfs cache entry \S+ is damaged: rootfs\.img has \d+ bytes.*"
                         r"rebuilding it", m) for m in said), said
    assert any("debootstrap" in m for m in said), said
    assert rootfs.check(rootfs_copy, full=True) is None
    said.clear()
    assert rootfs.ensure(progress=said.append) == img and said == []
