"""Build an extension: render, Kbuild against a cached kernel, plugin against libxtables.

The build tree is ``build/<kernel release>/<name>/``. Files are rewritten only
when their content changes, so Kbuild's own dependency tracking keeps warm
rebuilds fast. A failed build removes the artifacts it would have produced,
so nothing half-built is ever reported as built. One build of a tree runs at
a time (``build/<release>/.<name>.lock``, held from rendering to the stamp):
a second one waits, then finds the tree built and up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ground.compiler import failure
from ground.errors import BuildError, NflabError
from ground.files import atomic_write, write_if_changed
from ground.paths import build_dir, kernels_dir
from ground.proc import file_lock
from kmods import probes, render, spec
from supply import buildroot
from userspace_ext import plugin



@dataclass
class Artifacts:
    """What a build produced for one kernel release."""

    name: str
    kind: str
    release: str
    dir: Path
    ko: Path
    module: str
    so: Path | None = None
    plugin: str | None = None
    deps: list = field(default_factory=list)
    vermagic: str = ""
    srcversion: str = ""
    rebuilt: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def stock_deps(ext: spec.Extension) -> list[str]:
    """Stock modules that must be loaded before the extension (symbols it uses)."""
    if ext.kind == "hook":
        return []
    return ["x_tables"]


def module_info(ko: Path) -> dict:
    """vermagic and srcversion of a built .ko (read from the file; nothing is loaded)."""
    info = {}
    for fld in ("vermagic", "srcversion", "name", "depends"):
        res = subprocess.run(["modinfo", "-F", fld, str(ko)], capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"modinfo cannot read {ko}: {res.stderr.strip()}",
                             hint="install kmod (apt-get install kmod)")
        info[fld] = res.stdout.strip()
    return info


def render_into(ext: spec.Extension, out: Path) -> bool:
    """Render all sources of *ext* into *out*; return True when anything changed."""
    out.mkdir(parents=True, exist_ok=True)
    changed = False
    for name, text in render.render(ext).items():
        changed |= write_if_changed(out / name, text)
    changed |= write_if_changed(out / "nflab_xt.h", plugin.SHARED_HEADER.read_text())
    return changed


def _kbuild(kernel, out: Path, jobs: int) -> subprocess.CompletedProcess:
    """Kbuild for *out* against *kernel*, inside the build root of the kernel's release."""
    root = buildroot.for_kernel(kernel)
    cmd = ["make", "-C", kernel.headers, f"M={out}", f"-j{jobs}", "modules"]
    return root.run(cmd, rw=[out], ro=[kernels_dir()])


def build_extension(name: str | spec.Extension, kernel, *, jobs: int | None = None,
                    with_plugin: bool = True) -> Artifacts:
    """Render and build *name* for *kernel* (a supply.kernels.Kernel)."""
    ext = spec.load(name) if isinstance(name, str) else name
    # the kernel's own modules and aliases: a name it serves needs overrides_in_tree
    spec.check_collision(ext, stock_names(kernel))
    started = time.monotonic()
    out = build_dir() / kernel.release / ext.name
    with file_lock(out.parent / f".{ext.name}.lock"):
        art = _build_locked(ext, kernel, out, jobs, with_plugin)
    art.seconds = time.monotonic() - started
    return art


def _build_locked(ext: spec.Extension, kernel, out: Path, jobs: int | None,
                  with_plugin: bool) -> Artifacts:
    """build_extension's work, under the lock of *out*."""
    ko = out / f"{ext.module}.ko"
    changed = render_into(ext, out)
    changed |= probes.prepare(ext, kernel, out)    # nflab_features.h; refuses before Kbuild
    stamp = out / ".nflab-build.json"
    inputs = _inputs_hash(out, kernel)
    fresh = (not changed and ko.is_file() and stamp.is_file()
             and json.loads(stamp.read_text()).get("inputs") == inputs)
    art = Artifacts(name=ext.name, kind=ext.kind, release=kernel.release, dir=out, ko=ko,
                    module=ext.module, plugin=ext.name if ext.plugin else None,
                    deps=stock_deps(ext))
    if not fresh:
        stamp.unlink(missing_ok=True)
        _make(ext, kernel, out, ko, jobs)
        art.rebuilt = True
    if with_plugin and ext.plugin:
        art.so = plugin.build(ext, out, force=art.rebuilt)
    info = module_info(ko)
    art.vermagic, art.srcversion = info["vermagic"], info["srcversion"]
    # stock modules whose symbols the .ko uses (nf_conncount, nf_reject_ipv4...):
    # install insmods the kit module, which resolves nothing, so they are modprobed first
    art.deps = list(dict.fromkeys(art.deps + [d for d in info["depends"].split(",") if d]))
    if art.vermagic.split()[0] != kernel.release:
        ko.unlink(missing_ok=True)
        raise BuildError(f"{ko.name} has vermagic {art.vermagic!r}, expected {kernel.release}",
                         hint="the headers in the cache do not match the kernel; "
                              "run `invoke fetch-kernel --force`")
    atomic_write(stamp, json.dumps({"inputs": inputs, "artifacts": art.as_dict()}, indent=2))
    return art


def _make(ext: spec.Extension, kernel, out: Path, ko: Path, jobs: int | None):
    """Kbuild the module in *out*; on failure remove the .ko and raise the diagnostics."""
    res = _kbuild(kernel, out, jobs or os.cpu_count() or 2)
    (out / "build.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or not ko.is_file():
        ko.unlink(missing_ok=True)
        raise failure(f"kernel module {ext.module}", res.stdout + res.stderr, out, out / "build.log",
                      dict(ext.c_names()), ext.name_prefixes(), target=f" for {kernel.release}")


# what of the headers a built .ko depends on besides the sources: the configuration
# the headers were generated with and the exported symbols' CRCs (modversions)
HEADER_INPUTS = ("include/generated/autoconf.h", "Module.symvers")


def _inputs_hash(out: Path, kernel) -> str:
    """What the .ko in *out* was built from: its sources, and the kernel's release,
    packages (a refetched rc keeps its release), compiler and generated headers."""
    h = hashlib.sha256(kernel.release.encode())
    h.update(json.dumps(sorted(kernel.packages.items())).encode())
    h.update(probes.compiler_id(kernel).encode())
    for rel in HEADER_INPUTS:
        path = Path(kernel.headers) / rel
        h.update(rel.encode() + (path.read_bytes() if path.is_file() else b"(missing)"))
    for path in sorted(out.iterdir()):
        if path.suffix in (".c", ".h") or path.name == "Kbuild":
            if path.name.endswith(".mod.c"):
                continue
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def stock_names(kernel) -> set[str]:
    """The module names and aliases *kernel* ships (modules.order, modules.builtin,
    modules.alias, modules.builtin.modinfo's aliases): empty when it has none cached."""
    moddir = Path(kernel.modules)
    names: set[str] = set()
    for listing in ("modules.order", "modules.builtin"):
        names |= {Path(ln.strip()).name.split(".ko")[0] for ln in _lines(moddir / listing) if ln.strip()}
    names |= {w[1] for w in (ln.split() for ln in _lines(moddir / "modules.alias"))
              if len(w) == 3 and w[0] == "alias"}
    builtin = moddir / "modules.builtin.modinfo"
    if builtin.is_file():
        names |= {item.split(".alias=", 1)[1] for item in builtin.read_bytes().decode(errors="replace")
                  .split("\0") if ".alias=" in item}
    return names


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def build_many(names, kernel, *, keep_going=True, progress=None) -> tuple[list, list]:
    """Build several extensions; return (artifacts, [(name, error)])."""
    built, failed = [], []
    for name in names:
        if progress:
            progress(name)
        try:
            built.append(build_extension(name, kernel))
        except NflabError as exc:
            failed.append((name, exc))
            if not keep_going:
                break
    return built, failed
