"""Per-kernel boot pieces: a busybox initramfs and a modules disk image.

Debian's cloud kernels have ext4 built in but the virtio transports, virtio-blk
and virtio-net as modules, so the guest needs an initramfs that loads them
before it can mount the root image. It is tiny (static busybox, the handful of
virtio ``.ko`` files decompressed, ``vm/guest/initramfs-init.sh`` as ``/init``)
and uncompressed, so the kernel unpacks it in a few milliseconds under TCG.

The kernel's ``/lib/modules/<release>``, its compressed modules stored
decompressed (the same signed bytes; ``modules.dep`` made again by depmod), goes
into a read-only ext4 image, label ``nflab-mods``, which the guest init mounts
at ``/lib/modules/$(uname -r)``: ``modprobe`` of stock netfilter modules works.

Both live in ``cache_dir()/boot/<release>/`` with a ``boot.json`` manifest
whose recipe hash covers the init script, the busybox binary, the module list
and the kernel's package versions, plus the size, mtime and sha256 of each
file; a stale or damaged entry is rebuilt under a file lock, with a message.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ground import integrity
from ground.errors import VMError
from ground.paths import cache_dir
from ground.proc import file_lock, run

from .qemu import probe_pvh_entry

GUEST_DIR = Path(__file__).resolve().parent / "guest"
INIT_SCRIPT = GUEST_DIR / "initramfs-init.sh"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# what the initramfs needs, in wish order; only those the kernel has as modules
# are included (built-in ones need nothing), dependencies come from modules.dep.
# ext4 (and the crc32c its metadata checksums need) is built into the cloud
# flavour, a module in the generic -amd64 one: listing it lets the kit boot both.
WANTED_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "overlay",
                  "crc32c_generic", "ext4")
MODULES_LABEL = "nflab-mods"
MANIFEST = "boot.json"
RECIPE_VERSION = 6


@dataclass(frozen=True)
class BootFiles:
    """What the launcher needs for one kernel besides the rootfs."""

    release: str
    kernel: Path        # vmlinux (ELF, PVH entry) when extracted, else the vmlinuz
    initrd: Path
    modules_img: Path
    modules: tuple[str, ...]


def boot_dir(release: str) -> Path:
    return cache_dir() / "boot" / release


@functools.lru_cache(maxsize=None)
def _busybox() -> Path:
    """The static busybox the initramfs is made with (looked up once per process)."""
    for cand in BUSYBOX_CANDIDATES:
        path = Path(cand)
        if path.is_file():
            # a dynamically linked busybox would need its libraries in the initramfs
            out = run(["file", "-b", path], check=False).stdout if shutil.which("file") else ""
            if "dynamically linked" in out:
                continue
            return path
    raise VMError("no static busybox found for the initramfs",
                  hint="apt-get install busybox-static")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> {module name: (relative path, [dependency paths])}."""
    table = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path)] = (path, deps.split())
    return table


def module_name(path: str) -> str:
    """``kernel/drivers/virtio/virtio_pci.ko.xz`` -> ``virtio_pci``."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def load_order(dep: dict[str, tuple[str, list[str]]], wanted=WANTED_MODULES) -> list[str]:
    """Modules to insmod, dependencies first, each once; absent ones (built-in) skipped."""
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]):
        if name in order or name not in dep:
            return
        if name in stack:
            raise VMError(f"dependency loop in modules.dep: {' -> '.join(stack + (name,))}")
        for dpath in reversed(dep[name][1]):
            visit(module_name(dpath), stack + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _zstd(path: Path) -> bytes:
    # a module's frame may not record its size: read the stream to its end
    with path.open("rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


# how each compressed form of a module is read back to its ELF
DECOMPRESSORS = {
    ".ko.xz": lambda path: lzma.decompress(path.read_bytes()),
    ".ko.gz": lambda path: gzip.decompress(path.read_bytes()),
    ".ko.zst": _zstd,
}
COMPRESSED_MODULES = tuple(DECOMPRESSORS)


def read_module(path: Path) -> bytes:
    """The raw ELF of a module, decompressing .ko.xz / .ko.gz / .ko.zst (busybox insmod
    cannot)."""
    for suffix, decompress in DECOMPRESSORS.items():
        if path.name.endswith(suffix):
            return decompress(path)
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise VMError(f"unknown module compression: {path}",
                  hint="the kit reads .ko, .ko.xz, .ko.gz and .ko.zst: refetch the kernel "
                       "(invoke fetch-kernel --kernel=SPEC) if the file is damaged")


class CpioWriter:
    """A minimal ``newc`` cpio writer: lets us add /dev/console without mknod."""

    def __init__(self, fileobj):
        self.f = fileobj
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(header + name.encode() + b"\0")
        self.f.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm=0o755):
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self):
        self._entry("TRAILER!!!", 0)
        # pad to 512 bytes like GNU cpio does
        pos = self.f.tell()
        self.f.write(b"\0" * (-pos % 512))


# bzImage payload compressions: magic -> decompressor argv reading stdin
_PAYLOAD_TOOLS = (
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),        # LZ4 legacy frame
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    (b"\xfd7zXZ\x00", ["xz", "-dcq"]),
    (b"\x1f\x8b", ["gzip", "-dcq"]),
)
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _has_pvh_note(elf: bytes) -> bool:
    """True if *elf* (a 64-bit vmlinux) has the Xen PVH entry note QEMU boots from."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, e_phoff + i * e_phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(vmlinuz: Path, out: Path) -> bool:
    """Decompress the bzImage payload of *vmlinuz* into *out* if it is a vmlinux with a
    PVH entry. QEMU then jumps straight into the kernel (no real-mode setup, no
    in-guest decompression, which costs 0.2 s for LZ4 and 0.6 s for zstd under TCG).
    Returns False (and writes nothing) when that is not possible."""
    data = vmlinuz.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return False
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    for magic, tool in _PAYLOAD_TOOLS:
        if payload.startswith(magic) and shutil.which(tool[0]):
            # the build appends the decompressed size after the stream: decompressors
            # complain about trailing bytes, so judge by the result, not the exit code
            res = subprocess.run(tool, input=payload, capture_output=True, check=False)
            if _has_pvh_note(res.stdout):
                out.write_bytes(res.stdout)
                return True
    return False


def _pvh_vmlinux(vmlinuz: Path, out: Path, progress=print) -> str:
    """Extract the PVH vmlinux into *out* when it boots; why not otherwise (for boot.json)."""
    if not extract_vmlinux(vmlinuz, out):
        return "no PVH entry in the bzImage payload (or no decompressor): booting the vmlinuz"
    ok, reason = probe_pvh_entry(out)
    if not ok:
        out.unlink()
        progress(f"{vmlinuz.name}: {reason}; booting the bzImage instead (slower by its "
                 "in-guest decompression)")
    return reason


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of *path*, computed once per (size, mtime) in a process."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(kernel, busybox: Path, modules: list[str]) -> dict:
    return {
        "version": RECIPE_VERSION,
        "release": kernel.release,
        "kernel_packages": kernel.packages,
        "init": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "busybox": _digest(busybox, *_identity(busybox)),
        "modules": modules,
        "modules_label": MODULES_LABEL,
    }


def write_initramfs(out: Path, kernel, busybox: Path, modules: list[str],
                    dep: dict[str, tuple[str, list[str]]]):
    mods_root = Path(kernel.modules)
    with open(out, "wb") as f:
        cpio = CpioWriter(f)
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets(busybox):
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        cpio.file("modules.order", ("\n".join(modules) + "\n").encode())
        for name in modules:
            cpio.file(f"modules/{name}.ko", read_module(mods_root / dep[name][0]))
        cpio.close()


def applets(busybox: Path) -> list[str]:
    """The applets *busybox* has (``sh`` among them), linked in the initramfs at
    build time: ``busybox --install`` at every boot made ~270 symlinks under TCG."""
    names = run([str(busybox), "--list"], timeout=30).stdout.split()
    if "sh" not in names:
        raise VMError(f"{busybox} has no sh applet", hint="apt-get install busybox-static")
    return sorted(n for n in set(names) if "/" not in n and n != "busybox")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def write_modules_image(out: Path, kernel):
    """The ext4 image of *kernel*'s modules tree, every module in it decompressed
    (``_stage_modules``) and ``modules.dep`` made again for those names."""
    src = Path(kernel.modules)
    if not (src / "modules.dep").is_file():
        raise VMError(f"{src} has no modules.dep",
                      hint="the kernel cache entry is incomplete: delete it and run "
                           "`invoke fetch-kernel` again")
    with tempfile.TemporaryDirectory(prefix=".modules-", dir=out.parent) as tmp:
        # the kernel entry's own layout (lib -> usr/lib), so depmod -b finds the tree
        # whichever of the two a host's kmod looks in
        stage = Path(tmp) / "usr/lib/modules" / kernel.release
        (Path(tmp) / "lib").symlink_to("usr/lib")
        _stage_modules(src, stage)
        run(["depmod", "-b", tmp, kernel.release], timeout=300)
        # ext4 overhead (inodes, journal-less metadata) for many small files: 1.3x + 16 MiB
        size_kib = int(_dir_size(stage) * 1.3 / 1024) + 16 * 1024
        run(["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-L", MODULES_LABEL,
             "-E", "root_owner=0:0", "-d", stage, "-F", out, f"{size_kib}k"], timeout=300)


def _stage_modules(src: Path, stage: Path):
    """*src*'s tree at *stage*, each compressed module (``x.ko.xz``, ``.ko.gz``,
    ``.ko.zst``) written decompressed as ``x.ko``: the same signed bytes, which
    the guest's kmod then passes to the kernel as they are. Left compressed, the
    guest kernel decompresses each stock module as it loads it: under TCG ~0.07 s
    of a 0.24 s ``modprobe nf_tables`` on 6.12. Plain ``.ko`` files are
    hard-linked (copied across filesystems); every other file is copied, so the
    ``depmod`` run over *stage* can never write into the kernel's entry through a
    link; symlinks are kept as they are. The modules are decompressed on every
    core (a generic kernel's 4 230: 6.2 s on one, 3.4 s on two)."""
    compressed = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        into = stage / here.relative_to(src)
        into.mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            path = here / name
            if path.is_symlink():
                (into / name).symlink_to(os.readlink(path))
            elif name.endswith(COMPRESSED_MODULES) and path.is_file():
                compressed.append((path, into / name.rsplit(".", 1)[0]))
            elif name.endswith(".ko") and path.is_file():
                _link_or_copy(path, into / name)
            elif path.is_file():
                shutil.copy2(path, into / name)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_decompress, compressed))     # list(): the first failure is raised here


def _decompress(job: tuple[Path, Path]):
    src, dest = job
    dest.write_bytes(read_module(src))


def _link_or_copy(path: Path, dest: Path):
    try:
        os.link(path, dest)
    except OSError:
        shutil.copy2(path, dest)


@dataclass(frozen=True)
class _Plan:
    """What the boot files of one kernel are made from, and where they live."""

    kernel: object
    busybox: Path
    dep: dict
    modules: tuple[str, ...]
    recipe: dict
    key: str
    entry: Path

    def files(self) -> BootFiles:
        vmlinux = self.entry / "vmlinux"
        return BootFiles(self.kernel.release,
                         vmlinux if vmlinux.is_file() else Path(self.kernel.vmlinuz),
                         self.entry / "initramfs.cpio", self.entry / "modules.img", self.modules)


def _plan(kernel) -> _Plan:
    busybox = _busybox()
    dep_file = Path(kernel.modules) / "modules.dep"
    if not dep_file.is_file():
        raise VMError(f"kernel {kernel.release} has no modules.dep in {kernel.modules}",
                      hint="delete its cache entry and run `invoke fetch-kernel` again")
    dep = parse_modules_dep(dep_file.read_text())
    modules = load_order(dep)
    rec = _recipe(kernel, busybox, modules)
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    return _Plan(kernel, busybox, dep, tuple(modules), rec, key, boot_dir(kernel.release))


def _current(plan: _Plan) -> bool:
    try:
        data = json.loads((plan.entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if data.get("key") != plan.key or check_files(plan.entry, data) is not None:
        return False
    if "files" not in data:     # an entry from before the records: record it as it is
        data["files"] = record_files(plan.entry)
        tmp = plan.entry / f".{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, plan.entry / MANIFEST)
    return True


def current(kernel) -> bool:
    """Are *kernel*'s boot files built for this recipe and whole? (Then booting it
    reads nothing else of the kernel's cache entry but its manifest.)"""
    return _current(_plan(kernel))


def ensure(kernel, *, progress=print) -> BootFiles:
    """Initramfs and modules image for *kernel* (a ``supply.kernels.Kernel``), built if stale."""
    plan = _plan(kernel)
    if _current(plan):
        return plan.files()
    plan.entry.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(plan.entry.parent / f".{kernel.release}.lock"):
        if not _current(plan):
            _build(plan, progress)
    return plan.files()


def _build(plan: _Plan, progress):
    entry, kernel = plan.entry, plan.kernel
    try:
        data = json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        data = None
    if data is not None and data.get("key") == plan.key:
        progress(f"boot files in {entry} are damaged: {check_files(entry, data)}; rebuilding them")
    progress(f"building initramfs, modules image and vmlinux for {kernel.release}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kernel.release}-", dir=entry.parent))
    try:
        tmp.chmod(0o755)
        write_initramfs(tmp / "initramfs.cpio", kernel, plan.busybox, list(plan.modules), plan.dep)
        write_modules_image(tmp / "modules.img", kernel)
        pvh = _pvh_vmlinux(Path(kernel.vmlinuz), tmp / "vmlinux", progress)
        (tmp / MANIFEST).write_text(json.dumps({"key": plan.key, "recipe": plan.recipe, "pvh": pvh,
                                                "files": record_files(tmp)}, indent=2) + "\n")
        if entry.exists():
            # running VMs keep their open files; unlinking is safe
            shutil.rmtree(entry)
        tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


BOOT_FILES = ("initramfs.cpio", "modules.img", "vmlinux")




def record_files(entry: Path) -> dict:
    """Size, mtime and sha256 of each boot file, for ``check_files``."""
    out = {}
    for name in BOOT_FILES:
        path = entry / name
        if path.is_file():
            out[name] = integrity.record(path)
    return out


def check_files(entry: Path, data: dict) -> str | None:
    """None if the boot files match what ``boot.json`` recorded, else what is wrong.

    Size and mtime on every use, the sha256 when the mtime moved. A manifest
    from before the records only needs the initramfs and modules image present."""
    recorded = data.get("files")
    if recorded is None:
        for name in BOOT_FILES[:2]:
            if not (entry / name).is_file():
                return f"{name} is missing"
        return None
    for name in ("initramfs.cpio", "modules.img"):
        if name not in recorded:
            return f"{name} was never recorded"
    for name, rec in recorded.items():
        wrong = integrity.check(entry / name, rec, name=name)
        if wrong:
            return wrong
    return None
