"""Two network namespaces inside the guest, routed by the guest itself.

A client and a server namespace, each joined to the guest's own namespace
by a veth pair, so traffic between them crosses the guest's FORWARD chain
and conntrack like the wires' traffic does, with real TCP/UDP stacks (or
pktgen) on both ends::

    netns l7c  eth0 10.77.1.2  --  l7c0 10.77.1.1   guest   l7s0 10.77.2.1  --  eth0 10.77.2.2  netns l7s
               2001:db8:77:1::2     2001:db8:77:1::1         2001:db8:77:2::1      2001:db8:77:2::2

:func:`setup_script` is idempotent and runs as one shell script (one round
trip). Used by the suites' real applications (``tests/suites/guest_apps.py``)
and the datapath measurement of ``invoke bench`` (``nflab/bench.py``).
"""

from __future__ import annotations

CLIENT_NS, SERVER_NS = "l7c", "l7s"
# per family: (client, server) addresses in the namespaces, and the guest's side of each veth
ADDR = {"ipv4": ("10.77.1.2", "10.77.2.2"), "ipv6": ("2001:db8:77:1::2", "2001:db8:77:2::2")}
GW = {"ipv4": ("10.77.1.1", "10.77.2.1"), "ipv6": ("2001:db8:77:1::1", "2001:db8:77:2::1")}
PLEN = {"ipv4": 24, "ipv6": 64}
DEVS = {CLIENT_NS: "l7c0", SERVER_NS: "l7s0"}      # the guest's end of each veth


def setup_script() -> str:
    """Shell: both namespaces, their veths, addresses and default routes, and
    forwarding on in the guest."""
    lines = ["modprobe veth"]
    for i, ns in enumerate((CLIENT_NS, SERVER_NS)):
        dev = DEVS[ns]
        lines += [
            f"ip netns list | grep -qw {ns} || ip netns add {ns}",
            f"ip link show {dev} >/dev/null 2>&1 || ip link add {dev} type veth peer name eth0 netns {ns}",
            f"sysctl -qw net.ipv6.conf.{dev}.disable_ipv6=0 net.ipv6.conf.{dev}.accept_dad=0",
            f"ip netns exec {ns} sysctl -qw net.ipv6.conf.eth0.accept_dad=0",
            f"ip link set {dev} up",
            f"ip netns exec {ns} ip link set lo up",
            f"ip netns exec {ns} ip link set eth0 up",
        ]
        for fam in ("ipv4", "ipv6"):
            v6, nodad = (" -6", " nodad") if fam == "ipv6" else ("", "")
            lines += [
                f"ip{v6} addr replace {GW[fam][i]}/{PLEN[fam]} dev {dev}{nodad}",
                f"ip netns exec {ns} ip{v6} addr replace {ADDR[fam][i]}/{PLEN[fam]} dev eth0{nodad}",
                f"ip netns exec {ns} ip{v6} route replace default via {GW[fam][i]}",
            ]
    lines.append("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    return "\n".join(lines)
