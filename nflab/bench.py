"""`invoke bench`: time the edit-build-boot-test loop; report, never assert.

Every measurement runs several times and reports median, min and max wall
seconds. Commands are timed as a user runs them (``python -m invoke ...`` in a
subprocess) unless noted. The JSON output is meant for comparing runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nflab.paths import REPO


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
        raise RuntimeError(f"invoke {' '.join(args)} failed (exit {res.returncode}): {tail}")
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


def run(kernel: str | None = None, runs: int = 3, cold: bool = False, matrix: bool = False,
        progress=print) -> dict:
    from vm import kernels, lab

    kern = kernels.get(kernel, progress=progress)
    spec = kern.abi
    results: list[Measurement] = []
    extra: dict = {"kernel": kern.release, "runs": runs, "host_cpus": os.cpu_count()}

    progress("warm build-module")
    _invoke("build-module", "--name=iprange", f"--kernel={spec}")
    results.append(_measure("build-module iprange (warm)",
                            lambda: _invoke("build-module", "--name=iprange", f"--kernel={spec}"), runs))
    from kmods import spec as kspec
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

    progress("boot-to-ready")
    vm = "bench"
    lab.down(vm)
    rss = []

    def boot_ready():
        t0 = time.monotonic()
        state = lab.up(spec, vm, snapshot=False, progress=lambda *_: None)
        elapsed = time.monotonic() - t0
        extra["accel"] = state.accel
        extra["machine"] = state.machine
        lab.exec(vm, "true")
        r = _peak_rss_kib(state.pid)
        if r:
            rss.append(r)
        lab.down(vm)
        return elapsed
    results.append(_measure("boot to SSH ready (in-process)", boot_ready, runs))

    def up_cmd_down(snapshot: bool):
        def once():
            t0 = time.monotonic()
            lab.up(spec, vm, snapshot=snapshot, progress=lambda *_: None)
            lab.exec(vm, "uname -r")
            lab.down(vm)
            return time.monotonic() - t0
        return once
    m = _measure("boot + uname -r + poweroff", up_cmd_down(False), runs)
    results.append(m)
    kit_cmd = m.median

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

    m = _measure("snapshot restore + uname -r + poweroff", up_cmd_down(True), runs)
    results.append(m)
    kit_snap_cmd = m.median

    def cli_cycle():
        t0 = time.monotonic()
        try:
            _invoke("vm-up", f"--kernel={spec}", f"--vm={vm}")
            _invoke("vm-exec", f"--vm={vm}", "--cmd=uname -r")
        finally:
            _invoke("vm-down", f"--vm={vm}")
        return time.monotonic() - t0
    results.append(_measure("CLI vm-up + vm-exec + vm-down (snapshot)", cli_cycle, runs))
    if rss:
        extra["qemu_peak_rss_mib"] = round(max(rss) / 1024, 1)

    vng = shutil.which("vng")
    if vng:
        def vng_run():
            t0 = time.monotonic()
            res = subprocess.run([vng, "--disable-kvm", "--run", kern.vmlinuz, "--exec", "uname -r"],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(res.stderr.strip()[-200:])
            return time.monotonic() - t0
        vm_ = _measure("vng --run --exec 'uname -r'", vng_run, runs)
        results.append(vm_)
        if vm_.median and kit_cmd:
            extra["vng_over_kit"] = round(vm_.median / kit_cmd, 2)
        if vm_.median and kit_snap_cmd:
            extra["vng_over_kit_snapshot"] = round(vm_.median / kit_snap_cmd, 2)
    else:
        results.append(Measurement("vng --run --exec 'uname -r'", note="virtme-ng not installed "
                                   "(pip install virtme-ng; needs the generic amd64 kernel)"))

    progress("warm test cycle")
    results.append(_measure("invoke test --name=iprange (VM not running)",
                            lambda: _invoke("test", "--name=iprange", f"--kernel={spec}"), runs))
    if matrix:
        results.append(_measure("invoke test (whole catalog)",
                                lambda: _invoke("test", f"--kernel={spec}"), 1))
    return {"measurements": [dict(asdict(m), median=m.median) for m in results],
            "rows": [m.row() for m in results], "info": extra}


def write_json(data: dict, path: str):
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
