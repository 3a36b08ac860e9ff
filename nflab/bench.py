"""`invoke bench`: time the edit-build-boot-test loop; report, never assert.

Every measurement runs several times and reports median, min and max wall
seconds. Commands are timed as a user runs them (``python -m invoke ...`` in a
subprocess) unless noted. The JSON output is meant for comparing runs; it
records the host's load average before and after, since the numbers depend
on it.

Groups (``--only=a,b``; default: build, boot, snapshot, vng, test):

* ``build``: warm ``build-module`` runs, warm ``fetch-kernel``;
* ``boot``: cold boot to SSH ready, with where its time went on the host's clock
  (when the console first showed each of the guest's progress lines, and the
  first login after the ready line), cold boot + ``uname -r`` + poweroff, QEMU
  RSS, and boot to SSH ready with the other guest SSH server (OpenSSH is the
  default, dropbear starts faster), with the difference as
  ``boot_cost_vs_<other>_s``;
* ``snapshot``: the same from a post-boot snapshot, and the CLI cycle;
* ``vng``: virtme-ng on the generic flavour of the same kernel
  (``vng --run <vmlinuz> --exec 'uname -r'``) against the kit's cold boot +
  ``uname -r`` + poweroff, runs alternated, as the ratio vng/kit; the kit boots
  the identical generic image when it can, else the cloud flavour of the same
  ABI (the reason is recorded); a run that cannot happen is a row with
  ``skipped: <reason>``;
* ``boottrace`` (``--only=boottrace``): cold boots with the kernel's own
  messages on the console (no ``quiet``), each line timed on the host's clock
  as it showed: when the console came up, ``Run /init``, and the longest
  waits between two lines, each named by the line that ended it (a line
  printed after a silent stretch of work names that work's end);
* ``test``: ``invoke test --name=iprange`` with no VM running, plain and with
  ``--html`` (the per-test packet report: its cost);
* ``datapath`` (``--only=datapath``, in the VM ``--vm``): packets the guest
  router forwards under a pktgen flood per second of guest CPU, the kit's
  matches against their in-tree twins and the hook modules against the empty
  chain (a ratio table: ``info["datapath_ratios"]``); packets/s with
  conntrack alone and with a layer7 rule, one flow and a new flow per packet
  (``nflab/datapath.py``);
* ``workshop`` (``--workshop``): every exercise's reference solution on 6.1 and
  6.12 as an attendee runs it (build from a clean tree, install, its suite), one
  VM per kernel: seconds per exercise and the total (boot + exercises + poweroff).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ground.errors import NflabError, SpecError
from ground.paths import REPO
from ground.proc import run_group
from kmods import spec as kspec
from nflab import datapath
from nflab import workshop as ws
from supply import kernels
from vm import lab, qemu


@dataclass
class Measurement:
    name: str
    runs: list = field(default_factory=list)
    note: str = ""
    error: str = ""

    @property
    def median(self):
        return statistics.median(self.runs) if self.runs else None

    def row(self):
        if not self.runs:
            return [self.name, "-", "-", "-", "0", self.error or self.note]
        return [self.name, f"{self.median:.2f}", f"{min(self.runs):.2f}", f"{max(self.runs):.2f}",
                str(len(self.runs)), self.note]


def _invoke(*args, env=None, timeout=1800) -> float:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, CI="1", **(env or {})), timeout=timeout)
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        tail = (res.stdout.strip()[-300:] + " | " + res.stderr.strip()[-300:]).replace("\n", " ")
        raise NflabError(f"invoke {' '.join(args)} failed (exit {res.returncode}): {tail}",
                         hint=f"run `invoke {' '.join(args)}` by hand to see its whole output")
    return elapsed


def _measure(name, fn, runs, note="") -> Measurement:
    m = Measurement(name, note=note)
    for _ in range(runs):
        try:
            m.runs.append(fn())
        except Exception as exc:    # a benchmark reports failures, it does not stop
            m.error = str(exc)[:200]
            break
    return m


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


GROUPS = ("build", "boot", "boottrace", "snapshot", "vng", "test", "datapath", "workshop")
DEFAULT_GROUPS = ("build", "boot", "snapshot", "vng", "test")
WORKSHOP_KERNELS = ("6.1", "6.12")


def groups_for(only: str | None, workshop: bool = False) -> list[str]:
    """The measurement groups a run covers (``--only`` and ``--workshop``)."""
    if only:
        chosen = [g.strip() for g in only.split(",") if g.strip()]
        bad = [g for g in chosen if g not in GROUPS]
        if bad:
            raise NflabError(f"--only: unknown group(s) {', '.join(bad)}", hint="valid: " + ", ".join(GROUPS))
    else:
        chosen = list(DEFAULT_GROUPS)
    if workshop and "workshop" not in chosen:
        chosen.append("workshop")
    return [g for g in GROUPS if g in chosen]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


MATRIX_KERNELS = "6.1,6.12"


def runs_count(value) -> int:
    """``--runs`` as a whole number of at least 1 (every group takes medians of its runs)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise SpecError(f"--runs={value!r} is not a number of runs",
                        hint="give a whole number of at least 1, e.g. --runs=3")
    return n


def run(kernel: str | None = None, runs: int = 3, cold: bool = False, matrix: bool = False,
        progress=print, *, only: str | None = None, workshop: bool = False, vm: str = "bench") -> dict:
    groups = groups_for(only, workshop)
    kern = kernels.get(kernel, progress=progress)
    spec = kernels.exact_spec(kern)       # every group runs this very kernel, flavour included
    results: list[Measurement] = []
    extra: dict = {"kernel": kern.release, "runs": runs, "host_cpus": os.cpu_count(),
                   "groups": ",".join(groups), "loadavg_start": _load()}
    if "build" in groups:
        _build_group(spec, runs, cold, results, progress)
    if "boot" in groups:
        _boot_group(spec, runs, results, extra, progress)
    if "boottrace" in groups:
        results += boottrace_group(spec, runs, progress)
    if "snapshot" in groups:
        _snapshot_group(spec, runs, results, progress)
    if "vng" in groups:
        results += vng_group(kern, runs, extra, progress)
    if "test" in groups:
        progress("warm test cycle")
        plain = _measure("invoke test --name=iprange (VM not running)",
                         lambda: _invoke("test", "--name=iprange", f"--kernel={spec}"), runs)
        html_dir = tempfile.mkdtemp(prefix="nflab-bench-html-")
        html = _measure("invoke test --name=iprange --html (VM not running)",
                        lambda: _invoke("test", "--name=iprange", f"--kernel={spec}",
                                        f"--html={html_dir}/report.html"), runs,
                        note="per test: packets, tracer paths, verdicts, rules with counters")
        shutil.rmtree(html_dir, ignore_errors=True)
        if plain.median and html.median:
            html.note += f"; +{html.median - plain.median:.1f} s over the plain run"
        results += [plain, html]
        if matrix:
            results.append(_measure("invoke test (whole catalog)",
                                    lambda: _invoke("test", f"--kernel={spec}"), 1))
            results.append(_measure(f"invoke matrix --kernels={MATRIX_KERNELS} -j 2 (whole catalog)",
                                    lambda: _invoke("matrix", f"--kernels={MATRIX_KERNELS}", "-j", "2"), 1,
                                    note="one VM per kernel, both at once"))
    if "datapath" in groups:
        results += datapath_group(spec, runs, progress, vm, extra)
    if "workshop" in groups:
        results += workshop_group(WORKSHOP_KERNELS, extra, progress)
    extra["loadavg_end"] = _load()
    return {"measurements": [dict(asdict(m), median=m.median) for m in results],
            "rows": [m.row() for m in results], "info": extra}


def datapath_group(spec, runs, progress, vm: str = "bench", extra: dict | None = None) -> list[Measurement]:
    """Packets/s through the guest router (these rows are in packets per second,
    not seconds): the kit's twins against the in-tree modules and the hook
    modules against the empty chain (the ratio table goes to
    ``extra["datapath_ratios"]``), then conntrack alone against a layer7 rule."""
    progress(f"datapath: pktgen through the guest router of VM {vm}")
    lab.up(spec, vm, progress=lambda *_: None)
    try:
        twins = datapath.measure_twins(vm, runs, progress)
        rates = datapath.measure(vm, runs, progress)
    finally:
        lab.down(vm)
    out = twin_rows(twins)
    if extra is not None:
        extra["datapath_backend"] = twins.backend
        extra["datapath_ratios"] = {"header": datapath.RATIO_HEADER, "rows": datapath.ratio_rows(twins)}
        extra["datapath_proofs"] = twins.proofs
    rows = {name: Measurement(f"datapath: {name} (packets/s)", values,
                              note=f"{datapath.PACKETS} UDP datagrams from pktgen")
            for name, values in rates.items()}
    for flows in datapath.FLOWS:
        base, l7 = (rows[f"{flows}, {r}"] for r in datapath.RULES)
        if base.median and l7.median:
            l7.note += f"; {100 * l7.median / base.median:.0f}% of the rate with conntrack only"
    return out + list(rows.values())


def twin_rows(twins: datapath.TwinRun) -> list[Measurement]:
    """Rows of the twins (in-tree and kit packets/s, the per-run cost ratios) and
    the hook modules (packets/s loaded, per-run cost over the empty chain)."""
    n = f"{datapath.TWIN_PACKETS} datagrams, one flow"
    out = [Measurement("datapath baseline: empty FORWARD (packets/CPU-s)",
                       [x for got in [*twins.twins.values(), *twins.hooks.values()] for x in got["baseline"]],
                       note=f"{n}, before every pair ({twins.backend}); packets per second of guest CPU")]
    for label, got in twins.twins.items():
        rule, why, copies = datapath.TWINS[label].rule, datapath.TWINS[label].why, datapath.TWINS[label].copies
        r = datapath.twin_ratio(got["baseline"], got["in-tree"], got["kit"])
        proof = twins.proofs.get(label, {})
        out += [Measurement(f"datapath {label}: in-tree (packets/CPU-s)", got["in-tree"],
                            note=f"{copies} x {rule}: {why}; {proof.get('in-tree', '')}"),
                Measurement(f"datapath {label}: kit (packets/CPU-s)", got["kit"], note=proof.get("kit", "")),
                Measurement(f"datapath {label}: kit/in-tree cost per packet", r.run_ratios,
                            note=f"from the medians {datapath.format_ratio(r)}; rate kit/in-tree "
                                 f"{r.rate_ratio:.2f}; µs/packet over the baseline: in-tree "
                                 f"{r.cost_stock_us:.2f}, kit {r.cost_kit_us:.2f} ({n}, {copies} rules)")]
    for hook, got in twins.hooks.items():
        costs = [datapath.cost_us(k, b) for b, k in zip(got["baseline"], got["loaded"])]
        out += [Measurement(f"datapath {hook} loaded (packets/CPU-s)", got["loaded"],
                            note=f"{datapath.HOOK_MODULES[hook]}; {twins.proofs.get(hook, {}).get('kit', '')}"),
                Measurement(f"datapath {hook}: µs per packet over the empty chain", costs,
                            note=f"rate {statistics.median(got['loaded']) / statistics.median(got['baseline']):.2f}"
                                 " of the baseline (medians)")]
    return out


def _build_group(spec, runs, cold, results, progress):
    progress("warm build-module")
    _invoke("build-module", "--name=iprange", f"--kernel={spec}")
    results.append(_measure("build-module iprange (warm)",
                            lambda: _invoke("build-module", "--name=iprange", f"--kernel={spec}"), runs))
    hooks = [n for n in kspec.catalog_names() if kspec.load(n).kind == "hook"]
    if hooks:
        _invoke("build-module", f"--name={hooks[0]}", f"--kernel={spec}")
        results.append(_measure(f"build-module {hooks[0]} (hook, warm)",
                                lambda: _invoke("build-module", f"--name={hooks[0]}", f"--kernel={spec}"), runs))
    _invoke("build-module", "--all", f"--kernel={spec}")
    results.append(_measure("build-module --all (warm)",
                            lambda: _invoke("build-module", "--all", f"--kernel={spec}"), runs))
    results.append(_measure("fetch-kernel (warm)",
                            lambda: _invoke("fetch-kernel", f"--kernel={spec}"), runs))
    if cold:
        def cold_fetch():
            tmp = tempfile.mkdtemp(prefix="nflab-bench-")
            try:
                return _invoke("fetch-kernel", f"--kernel={spec}", env={"NFLAB_CACHE": tmp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        results.append(_measure("fetch-kernel (cold)", cold_fetch, 1))

        def cold_rootfs():
            tmp = tempfile.mkdtemp(prefix="nflab-bench-")
            try:
                return _invoke("rootfs", env={"NFLAB_CACHE": tmp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        results.append(_measure("rootfs build (cold)", cold_rootfs, 1))


def _up_cmd_down(spec, vm, snapshot: bool):
    def once():
        t0 = time.monotonic()
        try:
            lab.up(spec, vm, snapshot=snapshot, progress=lambda *_: None)
            lab.exec(vm, "uname -r")
        finally:
            lab.down(vm)
        return time.monotonic() - t0
    return once


def _boot_group(spec, runs, results, extra, progress):
    progress("boot-to-ready")
    vm = "bench"
    lab.down(vm)
    rss = []
    boots = []      # (guest SSH server, VMState) of every cold boot

    def boot_ready():
        t0 = time.monotonic()
        try:
            state = lab.up(spec, vm, snapshot=False, progress=lambda *_: None)
            elapsed = time.monotonic() - t0
            extra["accel"] = state.accel
            extra["machine"] = state.machine
            boots.append((qemu.sshd_choice(), state))
            lab.exec(vm, "true")
            r = _peak_rss_kib(state.pid)
            if r:
                rss.append(r)
        finally:
            lab.down(vm)
        return elapsed
    default = _measure("boot to SSH ready (in-process)", boot_ready, runs,
                       note=f"guest SSH server: {qemu.sshd_choice()}")
    results.append(default)
    results += phase_rows([st for server, st in boots if server == qemu.sshd_choice()])
    results.append(_measure("boot + uname -r + poweroff", _up_cmd_down(spec, vm, False), runs))
    if rss:
        extra["qemu_peak_rss_mib"] = round(max(rss) / 1024, 1)
    results.append(_other_server(boot_ready, runs, default, extra))


def _other_server(boot_ready, runs, default: Measurement, extra: dict) -> Measurement:
    """Cold boots with the other guest SSH server (NFLAB_SSHD), and what the default
    costs or saves against it."""
    other = next(s for s in qemu.SSHDS if s != qemu.sshd_choice())
    saved = os.environ.get("NFLAB_SSHD")
    os.environ["NFLAB_SSHD"] = other
    try:
        alt = _measure(f"boot to SSH ready, NFLAB_SSHD={other}", boot_ready, runs,
                       note=f"guest SSH server: {other}")
    finally:
        if saved is None:
            del os.environ["NFLAB_SSHD"]
        else:
            os.environ["NFLAB_SSHD"] = saved
    if alt.median is not None and default.median is not None:
        extra[f"boot_cost_vs_{other}_s"] = round(default.median - alt.median, 2)
    return alt


def phase_rows(states: list) -> list[Measurement]:
    """Where the cold boots' time went, on the host's clock: when the console first
    showed each guest progress line, and the first login after the ready line."""
    rows = {}
    for st in states:
        for line, seconds in st.boot_marks.items():
            rows.setdefault(line, Measurement(f"  console: {line}", note="s after QEMU started"))
            rows[line].runs.append(seconds)
    ready = lab.READY_LINE.removesuffix(" after")
    login = Measurement("  first SSH login after the ready line", note="the ready command")
    login.runs = [round(st.boot_seconds - st.boot_marks[ready], 3)
                  for st in states if ready in st.boot_marks]
    return [*rows.values(), login] if rows else []


# ---------------------------------------------------------------- boot trace

TRACE_GAPS = 8          # the longest waits between console lines, reported
INIT_LINE = "Run /init as init process"


def line_text(line: str) -> str:
    """A console line without the kernel's timestamp and the guest init's "after N s"
    (its progress lines, ``lab.MARK_RE``)."""
    text = qemu.strip_timestamp(line).strip()
    mark = lab.MARK_RE.match(text)
    return mark.group(1) if mark else text


def trace_waits(lines: list) -> dict[str, tuple[float, str, str]]:
    """{key: (seconds since the line before, this line, the line before)} of one
    traced boot's ``boot_lines`` ([host seconds, line]) from its second line on
    (the first one's wait is the console's start). The key is the line with its
    numbers blanked ("initialised in 12ms" and "in 24ms" are one line); a key
    seen twice keeps its first wait."""
    out: dict[str, tuple[float, str, str]] = {}
    texts = [(t, line_text(line)) for t, line in lines]
    texts = [(t, text) for t, text in texts if text]
    for (prev_t, prev), (t, text) in zip(texts, texts[1:]):
        out.setdefault(re.sub(r"\d+", "#", text), (round(t - prev_t, 3), text, prev))
    return out


def trace_rows(boots: list) -> list[Measurement]:
    """Rows of traced boots (``VMState``s with ``boot_lines``): when the console
    came up and ``Run /init``, then the *TRACE_GAPS* longest waits by median
    over the boots that printed the line."""
    firsts = [st.boot_lines[0][0] for st in boots if st.boot_lines]
    inits = [next((t for t, ln in st.boot_lines if INIT_LINE in ln), None) for st in boots]
    inits = [t for t in inits if t is not None]
    rows = [Measurement("  kernel console up (first line)", firsts,
                        note="s after QEMU started; the kernel buffers its messages until then"),
            Measurement(f"  kernel: {INIT_LINE}", inits, note="s after QEMU started")]
    waits: dict[str, Measurement] = {}
    for st in boots:
        for key, (gap, text, prev) in trace_waits(st.boot_lines).items():
            waits.setdefault(key, Measurement(f"  wait before: {text[:72]}", note=f"after: {prev[:60]}"))
            waits[key].runs.append(gap)
    longest = sorted(waits.values(), key=lambda m: m.median, reverse=True)[:TRACE_GAPS]
    return rows + longest


def boottrace_group(spec, runs, progress) -> list[Measurement]:
    """Cold boots with the kernel's messages on the console, each line timed."""
    progress("boot trace (kernel messages on the console)")
    vm, boots = "bench", []
    lab.down(vm)

    def traced():
        t0 = time.monotonic()
        state = lab.up(spec, vm, snapshot=False, trace=True, progress=lambda *_: None)
        elapsed = time.monotonic() - t0
        boots.append(state)
        lab.down(vm)
        return elapsed
    total = _measure("boot trace: cold boot to SSH ready, kernel messages on", traced, runs,
                     note="the console's own output included: compare the quiet boot of the same run")
    return [total, *trace_rows(boots)]


def _snapshot_group(spec, runs, results, progress):
    vm = "bench"
    lab.down(vm)
    # post-boot snapshot (vm/snapshot.py): the first up saves the state, untimed
    progress("snapshot restore")
    try:
        lab.up(spec, vm, snapshot=True, progress=lambda *_: None)
    finally:
        lab.down(vm)

    def restore_ready():
        t0 = time.monotonic()
        state = lab.up(spec, vm, snapshot=True, progress=lambda *_: None)
        elapsed = time.monotonic() - t0
        restored = bool(state.restored_from)
        lab.down(vm)
        if not restored:
            raise RuntimeError("the VM was booted cold, not restored (see `invoke vm-up`)")
        return elapsed
    results.append(_measure("snapshot restore to SSH ready", restore_ready, runs))

    results.append(_measure("snapshot restore + uname -r + poweroff", _up_cmd_down(spec, vm, True), runs))

    def cli_cycle():
        t0 = time.monotonic()
        try:
            _invoke("vm-up", f"--kernel={spec}", f"--vm={vm}", "--snapshot")
            _invoke("vm-exec", f"--vm={vm}", "--cmd=uname -r")
        finally:
            _invoke("vm-down", f"--vm={vm}")
        return time.monotonic() - t0
    results.append(_measure("CLI vm-up + vm-exec + vm-down (snapshot)", cli_cycle, runs))


# ---------------------------------------------------------------- virtme-ng

VNG_ROW = "vng --run <generic vmlinuz> --exec 'uname -r'"


def _vng_argv(vng: str, vmlinuz, accel: str) -> list[str]:
    # --force-9p: the root as 9p, as in shared/README (virtiofs needs a virtiofsd
    # that can run here); --verbose: the guest console on stdout, the only place the
    # command's output shows when virtme-ng-init finds no virtio-serial port for it
    # (no udevd on the host, whose root the guest uses: it then runs the command on
    # the console, prints "starting script (console fallback)", and exits 255)
    return [vng, *(["--disable-kvm"] if accel == "tcg" else []), "--force-9p", "--verbose",
            "--run", str(vmlinuz), "--exec", "uname -r"]


def vng_group(kern, runs: int, extra: dict, progress=print) -> list[Measurement]:
    """virtme-ng against the kit on the same kernel version: ``vng --run <vmlinuz>
    --exec 'uname -r'`` on the generic flavour (the cloud flavour has no 9p), and
    the kit's cold boot + ``uname -r`` + poweroff, on that identical image when the
    kit boots it, else on the cloud flavour of the same ABI. Runs alternate
    (kit, vng, kit, vng, ...) so load changes hit both. Whatever cannot run is a
    row saying ``skipped: <reason>``; the reasons also go to *extra*."""
    vng = shutil.which("vng")
    if not vng:
        return _vng_skipped("virtme-ng is not installed (pip install virtme-ng)", extra)
    generic_spec = f"{kern.abi}-amd64"
    try:
        generic = kernels.get(generic_spec, progress=progress)
    except Exception as exc:
        return _vng_skipped(f"the generic kernel {generic_spec} is not available: {str(exc)[:200]}", extra)
    vm = "bench-vng"
    kit_spec, kit_flavour, accel = _kit_flavour(kern, generic, vm, extra, progress)
    if accel is None:
        reason = f"the kit boots neither flavour of {kern.abi}: {extra.get('kit_cloud')}"
        return [Measurement(VNG_ROW, note=f"skipped: {reason}")]
    extra["vng_kit_flavour"] = kit_flavour
    kit = Measurement(f"kit boot + uname -r + poweroff ({kit_flavour} {kern.abi}, cold)",
                      note="same ABI as vng" + (", identical image" if kit_flavour == "generic"
                                                else ": the cloud image (see kit_generic)"))
    vm_ = Measurement(VNG_ROW, note=f"{generic.release}, {'TCG' if accel == 'tcg' else 'KVM'}, 9p root")
    argv = _vng_argv(vng, generic.vmlinuz, accel)
    extra["vng_command"] = " ".join(argv)
    rcs: list = []
    progress(f"vng vs kit on {kern.abi} ({runs} runs each, alternated)")
    failed = _alternate(runs, kit, _up_cmd_down(kit_spec, vm, False), vm_, _vng_once(argv, generic, rcs, extra))
    if failed:
        # a vng run that fails is vng's own (its guest oopsed under TCG once in 6 here):
        # counted, and the series went on
        extra["vng_failures"] = f"{len(failed)} of {runs} vng runs failed; the first: {failed[0]}"
        if not vm_.runs:
            vm_.error = failed[0]
        vm_.note += f"; {len(failed)} of {runs} vng runs failed (vng_failures in info)"
    _vng_notes(kit, vm_, rcs, extra)
    return [kit, vm_]


def _alternate(runs: int, kit: Measurement, kit_once, vng: Measurement, vng_once) -> list[str]:
    """*runs* rounds of a kit run then a vng run. A kit failure ends the kit's
    series (its error is the row's); a vng failure is returned and vng goes on."""
    failed = []
    for _ in range(runs):
        if not kit.error:
            try:
                kit.runs.append(kit_once())
            except Exception as exc:
                kit.error = str(exc)[:300]
        try:
            vng.runs.append(vng_once())
        except Exception as exc:
            failed.append(str(exc)[:300])
    return failed


def _vng_skipped(reason: str, extra: dict) -> list[Measurement]:
    extra["vng"] = f"skipped: {reason}"
    return [Measurement(VNG_ROW, note=f"skipped: {reason}")]


def _kit_flavour(kern, generic, vm: str, extra: dict, progress) -> tuple:
    """Can the kit boot the generic image itself? One try, untimed; else the cloud
    flavour of the same ABI: (kit spec, flavour, accelerator or None)."""
    lab.down(vm)
    kit_spec, kit_flavour = f"{kern.abi}-amd64", "generic"
    progress(f"kit boot of the generic flavour {generic.release}")
    accel = None
    try:
        accel = lab.up(kit_spec, vm, snapshot=False, progress=lambda *_: None).accel
    except Exception as exc:
        first = str(exc).splitlines()[0][:300]
        extra["kit_generic"] = f"skipped: the kit cannot boot {generic.release}: {first}"
        kit_spec, kit_flavour = f"{kern.abi}-cloud-amd64", "cloud"
        try:
            accel = lab.up(kit_spec, vm, snapshot=False, progress=lambda *_: None).accel
        except Exception as exc2:
            extra["kit_cloud"] = f"the kit cannot boot {kit_spec} either: {str(exc2)[:300]}"
    finally:
        lab.down(vm)
    return kit_spec, kit_flavour, accel


def _vng_once(argv: list, generic, rcs: list, extra: dict):
    """One timed vng run; its exit status goes to *rcs*."""
    def once():
        t0 = time.monotonic()
        # vng starts QEMU as its grandchild: a run past the timeout is killed whole
        res = run_group(argv, timeout=600, cwd=tempfile.gettempdir())
        elapsed = time.monotonic() - t0
        # success = the guest ran the command: its output is the release. vng's exit
        # status is not used alone: when virtme-ng-init finds no virtio-serial script
        # port it runs the command on the console and the status is lost (255)
        console = res.stdout + "\n" + res.stderr          # --verbose puts the console on stderr
        if generic.release not in [ln.strip() for ln in console.splitlines()]:
            tail = (res.stderr.strip() or res.stdout.strip())[-300:].replace("\n", " | ")
            raise RuntimeError(f"vng exit {res.returncode}, no `{generic.release}` line in its output: "
                               f"{tail or '(no output at all)'}")
        rcs.append(res.returncode)
        if "console fallback" in console:
            extra["vng_console_fallback"] = True
        return elapsed
    return once


def _vng_notes(kit: Measurement, vm_: Measurement, rcs: list, extra: dict):
    """What the rows and *extra* say about the runs: skipped, exit status, ratio."""
    if vm_.error and not vm_.runs:       # vng never ran, or every run of it failed
        vm_.note = f"{'failed' if extra.get('vng_failures') else 'skipped'}: {vm_.error}"
        extra["vng"] = vm_.note
    if rcs and any(rcs):
        vm_.note += f"; vng exit status {sorted(set(rcs))} (the command ran: see vng_exit in info)"
        extra["vng_exit"] = (f"vng exit status {sorted(set(rcs))} although the guest printed "
                             "`uname -r`" + (": virtme-ng-init found no virtio-serial port for the "
                                             "script (no udevd on this host), ran it on the console "
                                             "(console fallback) and its status was lost"
                                             if extra.get("vng_console_fallback") else ""))
    if vm_.median and kit.median:
        extra["vng_over_kit"] = round(vm_.median / kit.median, 2)
        vm_.note += f"; vng/kit = {extra['vng_over_kit']}"


# ---------------------------------------------------------------- the workshop

def workshop_group(kernel_specs=WORKSHOP_KERNELS, extra: dict | None = None,
                   progress=print) -> list[Measurement]:
    """Every exercise's reference solution on each kernel, as an attendee runs them
    one after the other in one kept VM (``invoke workshop --exercise=N --solution
    --keep``): build from a clean tree (a fresh ``$NFLAB_BUILD``: the compile an
    edit costs), install, its suite. One row per exercise and kernel, plus the
    total per kernel: cold boot + every exercise + poweroff."""
    extra = extra if extra is not None else {}
    out = []
    exs = ws.exercises()
    for spec in kernel_specs:
        kern = kernels.get(spec, progress=progress)
        rows, failed = [], []
        load0 = _load()
        try:
            boot, total = _workshop_on(spec, exs, rows, failed, progress)
        except Exception as exc:
            rows.append(Measurement(f"workshop {spec} total", error=f"stopped: {str(exc)[:250]}"))
            out += rows
            continue
        out += rows
        out.append(Measurement(f"workshop {spec} total ({kern.release})", [total],
                               note=(f"boot {boot:.1f} s + {len(exs)} exercises + poweroff; "
                                     + ("all passed" if not failed else "FAILED: " + ", ".join(failed))
                                     + f"; load {load0} -> {_load()}")))
        extra[f"workshop_{spec}"] = {"release": kern.release, "boot_s": round(boot, 2),
                                     "total_s": round(total, 2), "failed": failed,
                                     "per_exercise_s": {r.name.split()[2]: round(r.runs[0], 2) for r in rows}}
    return out


def _workshop_on(spec, exs, rows: list, failed: list, progress) -> tuple[float, float]:
    """Run every exercise's solution on kernel *spec* in a fresh VM ``bench-ws``,
    its rows into *rows* and the names of those that did not pass into *failed*;
    (boot, total) seconds. The VM is stopped whatever happens, Ctrl-C included."""
    vm = "bench-ws"
    lab.down(vm)
    with _fresh_build_dir() as tmp:
        t0 = time.monotonic()
        try:
            lab.up(spec, vm, snapshot=False, progress=lambda *_: None)
            boot = time.monotonic() - t0
            for ex in exs:
                progress(f"workshop {spec}: exercise {ex.number} ({ex.name}), solution")
                row, verdict = _workshop_exercise(spec, vm, ex, tmp)
                rows.append(row)
                if verdict != "passed":
                    failed.append(ex.name)
        finally:
            lab.down(vm)
    return boot, time.monotonic() - t0


@contextmanager
def _fresh_build_dir():
    """A temporary ``$NFLAB_BUILD`` for the block (every build from a clean tree),
    then the caller's back and the temporary one removed."""
    tmp = tempfile.mkdtemp(prefix="nflab-bench-ws-")
    old = os.environ.get("NFLAB_BUILD")
    os.environ["NFLAB_BUILD"] = tmp
    try:
        yield Path(tmp)
    finally:
        if old is None:
            os.environ.pop("NFLAB_BUILD", None)
        else:
            os.environ["NFLAB_BUILD"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _workshop_exercise(spec: str, vm: str, ex, tmp: Path) -> tuple[Measurement, str]:
    """One exercise's solution built, installed and tested in the running *vm*: its
    row and its verdict."""
    t1 = time.monotonic()
    res = ws.run_suites([ex], vm, solution=True, junit=tmp / f"junit-{ex.name}.xml",
                        progress=lambda *_: None, capture=True)
    secs = time.monotonic() - t1
    verdict = res.verdicts.get(ex.number, "failed")
    c = res.counts
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return (Measurement(f"workshop {spec} {ex.name} (solution)", [secs],
                        note=f"{verdict}: {passed}/{c['tests']} tests; build+install+suite"), verdict)


def write_json(data: dict, path: str):
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
