"""Load the lab tests run inside the guest while they load and unload modules, and
the slab measure they check for leaks with."""

from __future__ import annotations

from vm import lab


def udp_flood(payload: bytes) -> str:
    """A Python script for the guest: *payload* as UDP to 127.0.0.1:9 and [::1]:9
    without end (a short pause every 8 rounds), through every hook of its netns."""
    return f"""
import socket, time
p = {payload!r}
socks = [(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", 9)),
         (socket.socket(socket.AF_INET6, socket.SOCK_DGRAM), ("::1", 9))]
n = 0
while True:
    for s, a in socks:
        try:
            s.sendto(p, a)
        except OSError:
            pass
    n += 1
    if n % 8 == 0:
        time.sleep(0.002)
"""


def slab(vm: str) -> dict[str, tuple[int, int]]:
    """name -> (active objects, object size) from /proc/slabinfo, caches shrunk first."""
    out = lab.exec(vm, "sync; echo 3 > /proc/sys/vm/drop_caches; "
                       "for f in /sys/kernel/slab/*/shrink; do echo 1 > $f; done 2>/dev/null; "
                       "cat /proc/slabinfo", check=True, timeout=120).stdout
    caches = {}
    for line in out.splitlines()[2:]:
        f = line.split()
        caches[f[0]] = (int(f[1]), int(f[3]))
    return caches


def kmalloc_bytes(caches) -> int:
    return sum(a * size for name, (a, size) in caches.items() if name.startswith("kmalloc-"))
