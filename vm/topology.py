"""The guest as a router between two wires: addressing, neighbours, forwarding.

::

    host (vm/wire.py)                  guest                        host (vm/wire.py)
    client 192.0.2.2        eth1 192.0.2.1      eth2 198.51.100.1   server 198.51.100.2
           2001:db8:1::2         2001:db8:1::1       2001:db8:2::1         2001:db8:2::2
           52:54:00:00:01:02     52:54:00:00:01:01   52:54:00:00:02:01     52:54:00:00:02:02

The host-side peers exist only as addresses that ``vm/wire.py`` speaks for;
the guest has static (permanent) neighbour entries for them, so no ARP/NDP
round trip delays the first packet (the wire answers ARP/NDP anyway). DAD is
off (``nodad``) so IPv6 addresses are usable at once, router advertisements
and reverse-path filtering are off, forwarding is on for both families.

:func:`setup` is idempotent (``ip ... replace``, ``sysctl -w``) and runs as
one shell script, one round trip. It takes a testinfra host, a VM name (run
through ``vm.lab.exec``) or any ``run(cmd) -> (rc, stdout, stderr)`` callable.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass

from ground.errors import VMError
from vm import lab


@dataclass(frozen=True)
class Side:
    """One wire: the guest NIC and the host-side peer the wire speaks for."""

    name: str        # "client" or "server"
    dev: str         # guest NIC
    guest_mac: str
    guest4: str
    guest6: str
    peer_mac: str
    peer4: str
    peer6: str
    prefix4: int = 24
    prefix6: int = 64

    @property
    def net4(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.guest4}/{self.prefix4}", strict=False)

    @property
    def net6(self) -> ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.guest6}/{self.prefix6}", strict=False)


CLIENT = Side("client", "eth1", "52:54:00:00:01:01", "192.0.2.1", "2001:db8:1::1",
              "52:54:00:00:01:02", "192.0.2.2", "2001:db8:1::2")
SERVER = Side("server", "eth2", "52:54:00:00:02:01", "198.51.100.1", "2001:db8:2::1",
              "52:54:00:00:02:02", "198.51.100.2", "2001:db8:2::2")
SIDES = {"client": CLIENT, "server": SERVER}


def side(name: str) -> Side:
    try:
        return SIDES[name]
    except KeyError:
        raise ValueError(f"unknown wire side {name!r}; use one of {sorted(SIDES)}") from None


def sysctls() -> dict[str, str]:
    """Every sysctl the topology sets, key -> value."""
    values = {
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.all.send_redirects": "0",
        "net.ipv4.conf.all.accept_redirects": "0",
        "net.ipv6.conf.all.accept_redirects": "0",
    }
    for s in SIDES.values():
        values.update({
            f"net.ipv4.conf.{s.dev}.rp_filter": "0",
            f"net.ipv4.conf.{s.dev}.send_redirects": "0",
            f"net.ipv6.conf.{s.dev}.disable_ipv6": "0",
            f"net.ipv6.conf.{s.dev}.accept_dad": "0",
            f"net.ipv6.conf.{s.dev}.accept_ra": "0",
            f"net.ipv6.conf.{s.dev}.router_solicitations": "0",
        })
    return values


def _proc(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def script() -> str:
    """The idempotent setup script (POSIX sh). Two execs in all: the sysctls are
    written by the shell itself and every ``ip`` command goes through one
    ``ip -batch`` (each exec costs tens of milliseconds under TCG)."""
    links = [f"link set dev {s.dev} up" for s in SIDES.values()]
    addrs = []
    for s in SIDES.values():
        addrs += [
            f"addr replace {s.guest4}/{s.prefix4} dev {s.dev}",
            f"addr replace {s.guest6}/{s.prefix6} dev {s.dev} nodad",
            f"neigh replace {s.peer4} lladdr {s.peer_mac} dev {s.dev} nud permanent",
            f"neigh replace {s.peer6} lladdr {s.peer_mac} dev {s.dev} nud permanent",
        ]
    lines = ["set -e", "ip -batch - <<'EOF'", *links, "EOF"]
    # accept_dad/accept_ra before the addresses, so nothing is attempted on them
    lines += [f"echo {v} > {_proc(k)}" for k, v in sysctls().items()]
    lines += ["ip -batch - <<'EOF'", *addrs, "EOF"]
    return "\n".join(lines) + "\n"


def _runner(target):
    """A ``run(cmd) -> (rc, stdout, stderr)`` for a testinfra host, VM name or callable."""
    if isinstance(target, str):
        def run(cmd):
            res = lab.exec(target, cmd, timeout=60)
            return res.returncode, res.stdout, res.stderr
        return run
    if hasattr(target, "run"):
        def run(cmd):
            res = target.run(cmd)
            return res.rc, res.stdout, res.stderr
        return run
    if callable(target):
        return target
    raise TypeError(f"cannot run commands on {target!r}")


def setup(target) -> None:
    """Configure the guest as the router of both wires (idempotent)."""
    run = _runner(target)
    rc, out, err = run("sh -c " + shlex.quote(script()))
    if rc != 0:
        raise VMError("guest topology setup failed", detail=(err or out).strip()[-2000:],
                      hint="the detail names the failing ip/sysctl command; a fresh VM "
                           "(invoke vm-down, then vm-up) starts from a clean guest")
    problems = check(target)
    if problems:
        raise VMError("guest topology is not as configured", detail="\n".join(problems),
                      hint="something in the guest changed the lab's namespaces or routes: "
                           "invoke vm-down, then vm-up for a clean guest")


def check(target) -> list[str]:
    """What differs from the topology (empty when all is in place); one round trip."""
    run = _runner(target)
    keys = list(sysctls())
    # the shell reads the sysctls itself (no exec per key); ip neigh lists both families
    cmd = "".join(f"printf '%s=' {k}; read -r v < {_proc(k)} 2>/dev/null && echo \"$v\" || echo '?'; "
                  for k in keys)
    cmd += "echo ---; ip -o addr show; echo ---; ip neigh show nud permanent"
    rc, out, err = run(cmd)
    if rc != 0:
        return [f"cannot read the guest's network state: {(err or out).strip()[-300:]}"]
    parts = out.split("---\n")
    if len(parts) != 3:
        return [f"unexpected output: {out[-300:]}"]
    got_sysctl = dict(line.split("=", 1) for line in parts[0].splitlines() if "=" in line)
    problems = [f"sysctl {k} is {got_sysctl.get(k)!r}, want {v}"
                for k, v in sysctls().items() if got_sysctl.get(k, "").strip() != v]
    addrs = parts[1]
    neigh = parts[2]
    for s in SIDES.values():
        for addr, plen in ((s.guest4, s.prefix4), (s.guest6, s.prefix6)):
            if not any(f" {s.dev} " in line and f" {addr}/{plen} " in line for line in addrs.splitlines()):
                problems.append(f"{s.dev} lacks {addr}/{plen}")
        for addr in (s.peer4, s.peer6):
            if not any(line.startswith(f"{addr} dev {s.dev} lladdr {s.peer_mac}")
                       for line in neigh.splitlines()):
                problems.append(f"no permanent neighbour {addr} -> {s.peer_mac} on {s.dev}")
    return problems
