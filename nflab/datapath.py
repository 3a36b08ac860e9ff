"""The datapath cost of a match, in packets per second through the guest router.

pktgen, in the client namespace of ``vm/app_netns.py``, floods the guest
router with UDP datagrams for the server namespace; what the guest
forwarded (the ``tx_packets`` of its veth towards the server) divided by
pktgen's run time is the rate. Each configuration is run with one flow (one
conntrack entry: after its first packets layer7 only looks its record up)
and with a new flow per packet (random source ports: a conntrack entry and
a layer7 record per packet, each scanned once), first with conntrack alone
(a rule that never matches), then with a ``-m layer7 --l7proto http`` rule
added. Runs alternate between the configurations; ``invoke bench
--only=datapath`` reports the medians. Under TCG these are the emulated
guest's rates: compare the rows, not the absolute numbers.
"""

from __future__ import annotations

import re

from nflab import deploy
from vm import app_netns, lab
from vm.app_netns import ADDR, CLIENT_NS, DEVS, SERVER_NS

PACKETS = 20000
BASE = ["iptables-legacy -w -A FORWARD -m conntrack --ctstate INVALID -j DROP"]
RULES = {"conntrack only": BASE,
         "with -m layer7 --l7proto http": BASE + ["iptables-legacy -w -A FORWARD -m layer7 --l7proto http"]}
FLOWS = {"one flow": (10000, 10000), "a new flow per packet": (1024, 65535)}
_RESULT = re.compile(r"forwarded (\d+) usec (\d+)")


def pktgen_script(rules: list[str], sports: tuple[int, int], count: int = PACKETS) -> str:
    """Shell for the guest: flush, set *rules*, send *count* datagrams (source
    ports *sports*) with pktgen; prints ``forwarded N usec T``."""
    src, dst = ADDR["ipv4"]
    conf = [f"count {count}", "pkt_size 96", "delay 0", f"dst {dst}", f"src_min {src}", f"src_max {src}",
            "dst_mac $mac", "udp_dst_min 9", "udp_dst_max 9", f"udp_src_min {sports[0]}",
            f"udp_src_max {sports[1]}"] + (["flag UDPSRC_RND"] if sports[0] != sports[1] else [])
    pg = f"ip netns exec {CLIENT_NS} sh -c"
    return "\n".join([
        "set -e", "iptables-legacy -w -F FORWARD", *rules, "conntrack -F >/dev/null 2>&1 || true",
        f"mac=$(cat /sys/class/net/{DEVS[CLIENT_NS]}/address)",
        f"{pg} 'echo reset > /proc/net/pktgen/pgctrl'",
        f"{pg} 'echo add_device eth0 > /proc/net/pktgen/kpktgend_0'",
        *(f"{pg} \"echo '{c}' > /proc/net/pktgen/eth0\"" for c in conf),
        f"tx=/sys/class/net/{DEVS[SERVER_NS]}/statistics/tx_packets",
        "before=$(cat $tx)",
        f"{pg} 'echo start > /proc/net/pktgen/pgctrl'",
        "after=$(cat $tx)",
        f"usec=$({pg} 'cat /proc/net/pktgen/eth0' | sed -n 's/.*Result: OK: \\([0-9]*\\)(.*/\\1/p')",
        'echo "forwarded $((after - before)) usec $usec"',
        "iptables-legacy -w -F FORWARD",
    ])


def rate(output: str) -> float:
    """Packets per second forwarded, from :func:`pktgen_script`'s output."""
    m = _RESULT.search(output)
    if not m or not int(m.group(2)):
        raise ValueError(f"no pktgen result in {output!r}")
    return int(m.group(1)) * 1e6 / int(m.group(2))


def measure(vm: str, runs: int, progress=print) -> dict[str, list[float]]:
    """{configuration: [packets/s per run]} in the running VM *vm* (layer7 is
    installed, the namespaces made, pktgen loaded)."""
    deploy.install("layer7", vm=vm, progress=lambda *_: None)
    lab.exec(vm, "set -e\n" + app_netns.setup_script() + "\nmodprobe pktgen", check=True)
    results: dict[str, list[float]] = {}
    for i in range(runs):
        progress(f"datapath run {i + 1}/{runs}")
        for rname, rules in RULES.items():
            for fname, sports in FLOWS.items():
                out = lab.exec(vm, pktgen_script(rules, sports), timeout=300, check=True).stdout
                results.setdefault(f"{fname}, {rname}", []).append(rate(out))
    return results
