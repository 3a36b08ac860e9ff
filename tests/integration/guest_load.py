"""Load the lab tests run inside the guest while they load and unload modules."""

from __future__ import annotations


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
