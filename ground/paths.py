"""Where nflab keeps things: the repo, the cache and the build tree."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of every cache (kernels, rootfs, VMs): ``$NFLAB_CACHE``."""
    env = os.environ.get("NFLAB_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "nflab").resolve()


def build_dir() -> Path:
    """Root of rendered and built extensions: ``$NFLAB_BUILD`` or ``./build``."""
    env = os.environ.get("NFLAB_BUILD")
    return Path(env).expanduser().resolve() if env else REPO / "build"


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def rootfs_dir() -> Path:
    return cache_dir() / "rootfs"


def vms_dir() -> Path:
    return cache_dir() / "vms"
