"""The datapath cost of a match, in packets per second through the guest router.

pktgen, in the client namespace of ``vm/app_netns.py``, floods the guest
router with UDP datagrams for the server namespace; what the guest
forwarded (the ``tx_packets`` of its veth towards the server) is counted.

The kit's matches against their in-tree twins (:func:`measure_twins`):
iprange, string (bm, kmp), quota, connlimit, time and comment, each the same
rule (:data:`TWINS`) in FORWARD, with the kernel's own ``xt_<name>`` and the
stock plugin (``XTABLES_LIBDIR`` = the stock plugins only), then with the
kit's module and plugin, alternately in one guest; and the hook modules
(pktcount, the tracer with nothing tagged) against the empty chain. Every
measurement proves what ran (module taint and srcversion, the plugin file
ld.so opened and its sha256) or is refused. These floods are timed by the
CPU time QEMU spent on them (TCG runs the guest in one host thread), not by
the clock: on a shared host the clock also counts other processes' turns.
The cost of a rule is 1/rate minus the empty chain's 1/rate; the table
gives the kit/in-tree cost ratio, its spread over runs and the plain rate
ratio (:func:`ratio_rows`).

conntrack against layer7 (:func:`measure`): each configuration is run with
one flow (one conntrack entry: after its first packets layer7 only looks its
record up) and with a new flow per packet (random source ports: a conntrack
entry and a layer7 record per packet, each scanned once), first with
conntrack alone (a rule that never matches), then with a ``-m layer7
--l7proto http`` rule added; the rate is the forwarded packets over pktgen's
run time. Runs alternate between the configurations; ``invoke bench
--only=datapath`` reports the medians. Under TCG these are the emulated
guest's rates: compare the rows, not the absolute numbers.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ground.errors import NflabError
from kmods.build import build_extension
from nflab import deploy
from supply import kernels
from vm import app_netns, lab, xtables
from vm.install import GUEST_DIR, XTLIBDIR
from vm.app_netns import ADDR, CLIENT_NS, DEVS, SERVER_NS

PACKETS = 20000
# rule arguments; pktgen_script runs them with the kernel's iptables backend
BASE = ["-w -A FORWARD -m conntrack --ctstate INVALID -j DROP"]
RULES = {"conntrack only": BASE,
         "with -m layer7 --l7proto http": BASE + ["-w -A FORWARD -m layer7 --l7proto http"]}
FLOWS = {"one flow": (10000, 10000), "a new flow per packet": (1024, 65535)}
_RESULT = re.compile(r"forwarded (\d+) usec (\d+)")


def pktgen_lines(sports: tuple[int, int], count: int) -> list[str]:
    """Shell lines: set pktgen up in the client namespace to send *count* datagrams
    (source ports *sports*) to the server namespace."""
    src, dst = ADDR["ipv4"]
    conf = [f"count {count}", "pkt_size 96", "delay 0", f"dst {dst}", f"src_min {src}", f"src_max {src}",
            "dst_mac $mac", "udp_dst_min 9", "udp_dst_max 9", f"udp_src_min {sports[0]}",
            f"udp_src_max {sports[1]}"] + (["flag UDPSRC_RND"] if sports[0] != sports[1] else [])
    pg = f"ip netns exec {CLIENT_NS} sh -c"
    return [
        f"mac=$(cat /sys/class/net/{DEVS[CLIENT_NS]}/address)",
        f"{pg} 'echo reset > /proc/net/pktgen/pgctrl'",
        f"{pg} 'echo add_device eth0 > /proc/net/pktgen/kpktgend_0'",
        *(f"{pg} \"echo '{c}' > /proc/net/pktgen/eth0\"" for c in conf),
    ]


def start_lines() -> list[str]:
    """Shell lines: run the pktgen set up by :func:`pktgen_lines` and print
    ``forwarded N usec T`` (what the guest forwarded towards the server, pktgen's
    run time)."""
    pg = f"ip netns exec {CLIENT_NS} sh -c"
    return [
        f"tx=/sys/class/net/{DEVS[SERVER_NS]}/statistics/tx_packets",
        "before=$(cat $tx)",
        f"{pg} 'echo start > /proc/net/pktgen/pgctrl'",
        "after=$(cat $tx)",
        f"usec=$({pg} 'cat /proc/net/pktgen/eth0' | sed -n 's/.*Result: OK: \\([0-9]*\\)(.*/\\1/p')",
        'echo "forwarded $((after - before)) usec $usec"',
    ]


def flood_lines(sports: tuple[int, int], count: int) -> list[str]:
    """Shell lines: :func:`pktgen_lines`, then :func:`start_lines`."""
    return pktgen_lines(sports, count) + start_lines()


def pktgen_script(rules: list[str], sports: tuple[int, int], count: int = PACKETS,
                  tool: str = "iptables-legacy") -> str:
    """Shell for the guest: flush, set *rules* (iptables arguments) with *tool* (the
    kernel's backend), send *count* datagrams (source ports *sports*) with pktgen;
    prints ``forwarded N usec T``."""
    return "\n".join([
        "set -e", f"{tool} -w -F FORWARD", *(f"{tool} {r}" for r in rules),
        "conntrack -F >/dev/null 2>&1 || true",
        *flood_lines(sports, count),
        f"{tool} -w -F FORWARD",
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
    tool = f"iptables-{xtables.for_vm(vm).primary}"     # as measure_twins: legacy where it exists
    results: dict[str, list[float]] = {}
    for i in range(runs):
        progress(f"datapath run {i + 1}/{runs}")
        for rname, rules in RULES.items():
            for fname, sports in FLOWS.items():
                out = lab.exec(vm, pktgen_script(rules, sports, tool=tool), timeout=300, check=True).stdout
                results.setdefault(f"{fname}, {rname}", []).append(rate(out))
    return results


# ------------------------------------------------ the kit's matches against their in-tree twins
#
# Each twin's rule sits in FORWARD several times (``Twin.copies``), without a
# target: the flood traverses every copy, the match runs on every packet, and
# nothing is dropped. The copies lift a match's cost well above the run-to-run
# noise of an emulated guest on a shared host (cheap matches get more); the
# ratios do not depend on the number of copies, and the table also gives the
# cost per rule evaluation (the cost over the baseline / copies).

TWIN_PACKETS = 60000
ONE_FLOW = FLOWS["one flow"]


class Twin(NamedTuple):
    ext: str            # the catalog extension (xt_<ext>, libxt_<ext>.so)
    rule: str           # the rule's options, the same for both sides
    copies: int         # how many times the rule sits in FORWARD
    why: str            # why the match runs on every packet and keeps the flood


TWINS = {
    "iprange": Twin("iprange", "-m iprange --src-range 10.77.1.1-10.77.1.9 --dst-range 10.77.2.1-10.77.2.9",
                    100, "matches (both ranges compared), no target"),
    "string --algo bm": Twin("string", "-m string --algo bm --string nflab-needle", 30,
                             "never matches: the whole datagram is searched, no target"),
    "string --algo kmp": Twin("string", "-m string --algo kmp --string nflab-needle", 30,
                              "never matches: the whole datagram is searched, no target"),
    "quota": Twin("quota", "-m quota --quota 1000000000000", 100,
                  "matches (1 TB is never used up): every packet is counted under the rule's lock, no target"),
    "connlimit": Twin("connlimit", "-m connlimit --connlimit-above 1000000 --connlimit-mask 32 --connlimit-saddr",
                      20, "never matches: every packet counts its source's connections; "
                          "both sides turn conntrack on"),
    "time": Twin("time", "-m time --timestart 00:00:00 --timestop 23:59:59 --weekdays Mon,Tue,Wed,Thu,Fri,Sat,Sun",
                 50, "matches at any time (day time and weekday both checked), no target"),
    "comment": Twin("comment", '-m comment --comment "nflab bench"', 100, "matches every packet, no target"),
}
HOOK_MODULES = {"pktcount": "per-CPU packet and byte counters on every inet hook",
                "tracer": "nothing tagged: each packet's payload is checked for the magic"}
STOCK_XTDIR = f"{GUEST_DIR}/xt-stock"      # the guest's stock plugins only (XTABLES_LIBDIR)
LD_LOG = "/tmp/nflab-ld"
SIDES = ("in-tree", "kit")
_MODULE_RE = re.compile(r"^@@module (\S+) taint=(\S+) srcversion=(\S+)", re.M)
_PLUGIN_RE = re.compile(r"^@@plugin (\S*) sha256=(\S*)", re.M)
_RULES_RE = re.compile(r"^@@rules (\d+)", re.M)


def stock_xtdir_script() -> str:
    """Shell: a directory of the guest's stock plugins only. ``nflab.deploy``
    installs a kit plugin over the stock one in the guest's xtables dir and keeps
    the stock one beside it as ``*.nflab-orig``; this puts every original back
    under its own name (the rest are links), for ``XTABLES_LIBDIR``."""
    return "\n".join([
        f"rm -rf {STOCK_XTDIR}", f"mkdir -p {STOCK_XTDIR}",
        f"for f in {XTLIBDIR}/*.so; do b=${{f##*/}}",
        f"  if [ -f $f.nflab-orig ]; then cp -p $f.nflab-orig {STOCK_XTDIR}/$b; "
        f"else ln -s $f {STOCK_XTDIR}/$b; fi",
        "done",
    ])


def restore_lines(tool: str, rules: list[str], env: str = "") -> list[str]:
    """Shell: the filter table's FORWARD chain holds exactly *rules* (``-A`` lines
    without the chain), set in one ``*-restore`` (whose plugin loads *env* steers)."""
    body = "\n".join(["*filter", ":FORWARD ACCEPT [0:0]", *(f"-A FORWARD {r}" for r in rules), "COMMIT"])
    return [f"{env + ' ' if env else ''}{tool}-restore -w <<'NFLAB_RULES'\n{body}\nNFLAB_RULES"]


def module_proof_line(module: str) -> str:
    """Shell: ``@@module NAME taint=T srcversion=S`` of the loaded *module* (``-``
    for none: the stock modules have no srcversion and no taint)."""
    return (f't=$(cat /sys/module/{module}/taint); s=$(cat /sys/module/{module}/srcversion 2>/dev/null || :); '
            f'echo "@@module {module} taint=${{t:--}} srcversion=${{s:--}}"')


@dataclass(frozen=True)
class Flood:
    """One measurement: *prep* (unload what the last one left, load, set the rules,
    set pktgen up) and *go* (the flood alone: what is timed)."""

    prep: str
    go: str


def twin_script(tool: str, ext: str, rule: str, side: str, ko: str, *, copies: int = 10,
                count: int = TWIN_PACKETS, sports: tuple[int, int] = ONE_FLOW) -> Flood:
    """Load *side*'s ``xt_<ext>`` (in-tree: ``modprobe``, which resolves the
    kernel's own module, Debian's signed bytes; kit: ``insmod`` of *ko*), set *copies* of
    *rule* with that side's plugin (in-tree: ``XTABLES_LIBDIR`` = the stock plugins
    only; kit: the guest's xtables dir, where ``nflab.deploy`` put the kit's),
    prove both (``@@module``, ``@@plugin``: the file ld.so opened and its sha256,
    ``@@rules``); then flood."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: one of {', '.join(SIDES)}")
    mod, so = f"xt_{ext}", f"libxt_{ext}.so"
    load = f"modprobe {mod}" if side == "in-tree" else f"insmod {ko}"
    libdir = STOCK_XTDIR if side == "in-tree" else XTLIBDIR
    env = f"XTABLES_LIBDIR={libdir} LD_DEBUG=files LD_DEBUG_OUTPUT={LD_LOG}"
    prep = "\n".join([
        "set -e", *restore_lines(tool, []), "conntrack -F >/dev/null 2>&1 || true",
        f"if [ -d /sys/module/{mod} ]; then rmmod {mod}; fi", load, module_proof_line(mod),
        f"rm -f {LD_LOG}.*", *restore_lines(tool, [rule] * copies, env),
        f"p=$(cat {LD_LOG}.* 2>/dev/null | sed -n 's/.*opening file=\\(.*\\/{re.escape(so)}\\) .*/\\1/p' | head -n 1)",
        'echo "@@plugin ${p:--} sha256=$(if [ -n "$p" ]; then sha256sum < "$p" | cut -d" " -f1; else echo -; fi)"',
        f'echo "@@rules $(XTABLES_LIBDIR={libdir} {tool} -w -S FORWARD | grep -c -- "-m {ext}\\( \\|$\\)" || :)"',
        *pktgen_lines(sports, count),
    ])
    return Flood(prep, "\n".join(["set -e", *start_lines()]))


def hook_script(tool: str, module: str | None = None, ko: str | None = None, *, unload: tuple = (),
                count: int = TWIN_PACKETS, sports: tuple[int, int] = ONE_FLOW) -> Flood:
    """FORWARD empty and the hook modules *unload* unloaded; with *module* and
    *ko* that hook module is loaded for the flood (proved by ``@@module``);
    without, the baseline (the empty chain on its own)."""
    lines = [f"if [ -d /sys/module/{m} ]; then rmmod {m}; fi" for m in unload]
    if module and ko:
        lines += [f"if [ -d /sys/module/{module} ]; then rmmod {module}; fi", f"insmod {ko}",
                  module_proof_line(module)]
    prep = "\n".join(["set -e", *restore_lines(tool, []), "conntrack -F >/dev/null 2>&1 || true", *lines,
                      *pktgen_lines(sports, count)])
    return Flood(prep, "\n".join(["set -e", *start_lines()]))


@dataclass(frozen=True)
class Proof:
    """What a twin or hook script said was loaded: the module's taint and
    srcversion, the plugin file ld.so opened and its sha256, the rules in FORWARD."""

    module: str
    taint: str
    srcversion: str
    plugin: str = "-"
    plugin_sha256: str = "-"
    rules: int = 0


def parse_proof(output: str) -> Proof:
    """The ``@@module``/``@@plugin``/``@@rules`` lines of a script's *output*
    (``@@plugin`` and ``@@rules`` only in twin scripts)."""
    m = _MODULE_RE.search(output)
    if not m:
        raise ValueError(f"no @@module line in {output[-500:]!r}")
    plugin, sha = ("-", "-")
    pm = _PLUGIN_RE.search(output)
    if pm:
        plugin, sha = pm.group(1) or "-", pm.group(2) or "-"
    rm = _RULES_RE.search(output)
    return Proof(m.group(1), m.group(2), m.group(3), plugin, sha, int(rm.group(1)) if rm else 0)


@dataclass(frozen=True)
class KitBuild:
    """What the kit built for the guest's kernel: the module file in the guest,
    the srcversion it must show, the sha256 of its plugin."""

    ext: str
    module: str
    ko: str
    srcversion: str
    plugin_sha256: str = "-"


def check_twin_proof(proof: Proof, side: str, kit: KitBuild, copies: int) -> str:
    """Refuse a measurement that cannot say which module and plugin ran; else a
    one-line account of them. In-tree: no ``O`` taint (out of tree), not the kit's
    srcversion, the stock plugin from :data:`STOCK_XTDIR`; kit: taint ``O``, the
    build's srcversion, the kit's plugin (its sha256) from the guest's xtables dir."""
    where = f"{kit.module}, {side} side"
    stock = side == "in-tree"
    plugin_dir = STOCK_XTDIR if stock else XTLIBDIR
    wrong = []
    if proof.module != kit.module:
        wrong.append(f"the script proved {proof.module}, not {kit.module}")
    if stock and ("O" in proof.taint or proof.srcversion == kit.srcversion):
        wrong.append(f"taint {proof.taint}, srcversion {proof.srcversion}: the kit's module, not the kernel's")
    if not stock and ("O" not in proof.taint or proof.srcversion != kit.srcversion):
        wrong.append(f"taint {proof.taint}, srcversion {proof.srcversion}: not the kit's build "
                     f"(srcversion {kit.srcversion})")
    if proof.plugin != f"{plugin_dir}/libxt_{kit.ext}.so":
        wrong.append(f"iptables loaded the plugin {proof.plugin}, not {plugin_dir}/libxt_{kit.ext}.so")
    if (proof.plugin_sha256 == kit.plugin_sha256) == stock:
        wrong.append(f"the plugin's sha256 {proof.plugin_sha256[:12]} is {'' if stock else 'not '}the kit's")
    if proof.rules != copies:
        wrong.append(f"{proof.rules} rules with -m {kit.ext} in FORWARD, not {copies}")
    if wrong:
        raise NflabError(f"datapath {where}: " + "; ".join(wrong),
                         hint="run `invoke install --name=NAME --vm=VM` to see the kit's install; "
                              "a measurement that cannot tell which module ran is not kept")
    return (f"{side}: {proof.module} taint {proof.taint} srcversion {proof.srcversion}, "
            f"plugin {proof.plugin} sha256 {proof.plugin_sha256[:12]}")


def check_hook_proof(proof: Proof, kit: KitBuild) -> str:
    """The hook module that ran is the kit's build (taint ``O``, its srcversion)."""
    if proof.module != kit.module or "O" not in proof.taint or proof.srcversion != kit.srcversion:
        raise NflabError(f"datapath {kit.ext}: {proof.module} taint {proof.taint} srcversion "
                         f"{proof.srcversion} is not the kit's build (srcversion {kit.srcversion})",
                         hint=f"run `invoke install --name={kit.ext} --vm=VM` to see the kit's install")
    return f"kit: {proof.module} taint {proof.taint} srcversion {proof.srcversion}"


# ------------------------------------------------ ratios

def cost_us(rate_: float, base: float) -> float:
    """Microseconds a packet costs over the baseline: 1/rate minus 1/baseline rate."""
    return 1e6 / rate_ - 1e6 / base


@dataclass
class TwinRatio:
    """One twin's summary: median rates, the kit/in-tree cost ratio (from the
    medians) with the min–max of the per-run ratios (each run against its own
    baseline), and the plain rate ratio."""

    base: float
    stock: float
    kit: float
    cost_stock_us: float
    cost_kit_us: float
    cost_ratio: float | None
    run_ratios: list
    rate_ratio: float
    best_ratio: float | None = None     # the same from each side's best run (interference only slows)

    @property
    def spread(self) -> tuple | None:
        return (min(self.run_ratios), max(self.run_ratios)) if self.run_ratios else None


def _cost_ratio(kit: float, stock: float, base: float) -> float | None:
    """The kit's cost over the in-tree one against the baseline *base*; None when
    either cost is at or under zero (lost in the noise)."""
    ck, cs = cost_us(kit, base), cost_us(stock, base)
    return ck / cs if ck > 0 and cs > 0 else None


def twin_ratio(base: list[float], stock: list[float], kit: list[float]) -> TwinRatio:
    """*base*, *stock* and *kit* are packets/s per run (same length, run i of each
    measured together). A cost at or under zero (the match lost in the noise)
    gives no ratio for that run."""
    if not (len(base) == len(stock) == len(kit)) or not base:
        raise ValueError(f"need one baseline, in-tree and kit rate per run: {len(base)}, {len(stock)}, {len(kit)}")
    b, s, k = (statistics.median(x) for x in (base, stock, kit))
    cs, ck = cost_us(s, b), cost_us(k, b)
    runs = [r for r in (_cost_ratio(k_, s_, b_) for b_, s_, k_ in zip(base, stock, kit)) if r is not None]
    best = _cost_ratio(max(kit), max(stock), max(base))
    return TwinRatio(b, s, k, cs, ck, ck / cs if cs > 0 else None, runs, k / s, best)


def format_ratio(r: TwinRatio) -> str:
    """``1.03 (0.98–1.07)``: the cost ratio and its spread over runs, or why none."""
    if r.cost_ratio is None:
        return "- (the in-tree cost is within the noise)"
    spread = f" ({r.spread[0]:.2f}–{r.spread[1]:.2f})" if r.spread else ""
    return f"{r.cost_ratio:.2f}{spread}"


# ------------------------------------------------ the run

def kit_builds(vm: str, names) -> dict[str, KitBuild]:
    """{extension: KitBuild} for VM *vm*'s kernel (the builds ``nflab.deploy``
    installs: cached, so this only reads them)."""
    kernel = kernels.by_release(lab.require(vm).release)
    out = {}
    for name in names:
        art = build_extension(name, kernel)
        sha = hashlib.sha256(art.so.read_bytes()).hexdigest() if art.so else "-"
        out[name] = KitBuild(name, art.module, f"{GUEST_DIR}/{art.ko.name}", art.srcversion, sha)
    return out


def schedstat_ns(texts) -> int:
    """Nanoseconds on a CPU: the sum of the first field of each thread's
    ``/proc/PID/task/TID/schedstat`` text in *texts*."""
    return sum(int(t.split()[0]) for t in texts if t.strip())


def _cpu_ns(pid: int) -> int:
    texts = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            texts.append((task / "schedstat").read_text())
        except OSError:         # a thread that ended meanwhile
            pass
    return schedstat_ns(texts)


def cpu_rate(output: str, cpu_ns: int) -> float:
    """Packets forwarded per second of the guest's CPU time (QEMU's, on the host)."""
    m = _RESULT.search(output)
    if not m or cpu_ns <= 0:
        raise ValueError(f"no pktgen result in {output!r} or no CPU time ({cpu_ns} ns)")
    return int(m.group(1)) * 1e9 / cpu_ns


def _flood(vm: str, flood: Flood) -> tuple[str, float]:
    """Run *flood*: its prep, then its flood timed by the CPU time the QEMU
    process spent (all its threads: TCG runs the guest in one) rather than by the
    clock, which every other process on the host moves; (output, packets/s of
    guest CPU)."""
    out = lab.exec(vm, flood.prep, timeout=300, check=True).stdout
    pid = lab.require(vm).pid
    before = _cpu_ns(pid)
    res = lab.exec(vm, flood.go, timeout=600, check=True)
    spent = _cpu_ns(pid) - before
    rate(res.stdout)                # pktgen said OK
    return out + res.stdout, cpu_rate(res.stdout, spent)


@dataclass
class TwinRun:
    """Everything :func:`measure_twins` saw: packets/s per run, and the proofs."""

    backend: str
    twins: dict          # label -> {"baseline"|"in-tree"|"kit": [packets/s per run]}
    hooks: dict          # name -> {"baseline"|"loaded": [packets/s per run]}
    proofs: dict         # label or hook name -> {side: one-line account of what ran}


def measure_twins(vm: str, runs: int, progress=print) -> TwinRun:
    """The kit's twins against the in-tree modules, and the hook modules against
    the empty chain, in the running VM *vm*: per run and twin a baseline, then
    both sides (in-tree first in odd runs, kit first in even ones); per run and
    hook module a baseline, then the module loaded."""
    names = sorted({t.ext for t in TWINS.values()}) + list(HOOK_MODULES)
    kits = kit_builds(vm, names)
    deploy.install_many(names, vm=vm, progress=lambda *_: None)
    hook_mods = tuple(kits[h].module for h in HOOK_MODULES)
    lab.exec(vm, "set -e\n" + app_netns.setup_script() + "\nmodprobe pktgen\n" + stock_xtdir_script()
             + f"\nrmmod {' '.join(hook_mods)}", check=True, timeout=120)
    tool = f"iptables-{xtables.for_vm(vm).primary}"
    res = TwinRun(tool, {}, {}, {})
    for i in range(runs):
        progress(f"datapath twins run {i + 1}/{runs} ({tool})")
        for label, twin in TWINS.items():
            got = res.twins.setdefault(label, {"baseline": [], "in-tree": [], "kit": []})
            got["baseline"].append(_flood(vm, hook_script(tool, unload=hook_mods))[1])
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                kit = kits[twin.ext]
                out, pps = _flood(vm, twin_script(tool, twin.ext, twin.rule, side, kit.ko, copies=twin.copies))
                account = check_twin_proof(parse_proof(out), side, kit, twin.copies)
                res.proofs.setdefault(label, {})[side] = account
                got[side].append(pps)
        for hook in HOOK_MODULES:
            got = res.hooks.setdefault(hook, {"baseline": [], "loaded": []})
            got["baseline"].append(_flood(vm, hook_script(tool, unload=hook_mods))[1])
            out, pps = _flood(vm, hook_script(tool, kits[hook].module, kits[hook].ko, unload=hook_mods))
            res.proofs[hook] = {"kit": check_hook_proof(parse_proof(out), kits[hook])}
            got["loaded"].append(pps)
    return res


RATIO_HEADER = ["datapath (median of runs)", "rules", "baseline pkt/CPU-s", "in-tree pkt/CPU-s",
                "kit pkt/CPU-s", "kit/in-tree cost (min–max)", "best runs", "rate kit/in-tree",
                "in-tree ns/match", "kit ns/match"]


def ratio_rows(run: TwinRun) -> list[list[str]]:
    """The ratio table: per twin the median rates, the cost ratio with its spread,
    the rate ratio and the cost of one rule evaluation (the cost over the baseline
    / copies); per hook module its rate against the empty chain and its cost per
    packet (in the kit's ns column)."""
    rows = []
    for label, got in run.twins.items():
        r, n = twin_ratio(got["baseline"], got["in-tree"], got["kit"]), TWINS[label].copies
        rows.append([label, str(n), f"{r.base:.0f}", f"{r.stock:.0f}", f"{r.kit:.0f}", format_ratio(r),
                     "-" if r.best_ratio is None else f"{r.best_ratio:.2f}", f"{r.rate_ratio:.2f}", f"{1000 * r.cost_stock_us / n:.0f}", f"{1000 * r.cost_kit_us / n:.0f}"])
    for hook, got in run.hooks.items():
        b, k = statistics.median(got["baseline"]), statistics.median(got["loaded"])
        rows.append([f"{hook} (hook, no twin)", "-", f"{b:.0f}", "-", f"{k:.0f}", "-", "-",
                     f"{k / b:.2f} of the baseline", "-", f"{1000 * cost_us(k, b):.0f} per packet"])
    return rows
