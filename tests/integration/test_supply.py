"""Every Debian kernel line, from the kit's own archive client and build roots.

Real packages, real headers, real compilers: for each line the kit fetches the
kernel (both package layouts), makes the build root of the Debian release that
built it, and builds a match and a hook module with the compiler the headers
name; the modules' vermagic must be the kernel's release. The plugin is built
in the guest userland's root, against its libxtables.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kmods import build
from supply import buildroot, kernels
from supply.debian_kernels import KERNEL_SUITES
from userspace_ext import plugin

pytestmark = [pytest.mark.slow]

# the oldest LTS, both 6.x LTS lines, the newest release and the release candidate
LINES = ("5.10", "6.1", "6.12", "7.3", "rc")
COMPILERS = {"5.10": ("gcc-10", "bullseye"), "6.1": ("gcc-12", "bookworm"),
             "6.12": ("gcc-14", "trixie"), "7.3": ("gcc-14", "trixie"), "rc": ("gcc-16", "sid")}


@pytest.fixture(scope="module", params=LINES, ids=lambda s: f"k{s}")
def line_kernel(request, build_root):
    return request.param, kernels.get(request.param)


def _modinfo(ko: Path, field: str) -> str:
    return subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_headers_name_the_compiler_and_its_release_builds(line_kernel):
    line, kernel = line_kernel
    compiler, release = COMPILERS[line]
    assert kernel.compiler == compiler
    assert kernel.build_release == release
    root = buildroot.for_kernel(kernel)
    assert root.release == release and root.has(compiler)
    version = root.run([compiler, "-dumpversion"])
    assert version.returncode == 0 and version.stdout.strip().split(".")[0] == compiler[4:]


@pytest.mark.parametrize("name", ["iprange", "pktcount"])
def test_a_match_and_a_hook_build_with_the_kernels_vermagic(line_kernel, name):
    line, kernel = line_kernel
    art = build.build_extension(name, kernel)
    assert art.ko.is_file()
    assert art.vermagic.split()[0] == kernel.release == _modinfo(art.ko, "vermagic").split()[0]
    # Kbuild ran the headers' compiler inside the root: the .ko says which gcc built it
    comment = buildroot.for_kernel(kernel).run(["readelf", "-p", ".comment", str(art.ko)],
                                               ro=[art.dir]).stdout
    major = COMPILERS[line][0][4:]
    assert re.search(rf"GCC: \(Debian {major}\.", comment), comment
    if name == "iprange":
        assert art.so.is_file()
        assert plugin.recorded_xtables_version(art.so) == plugin.xtables_version()


def test_the_package_layout_is_normalised(line_kernel):
    _, kernel = line_kernel
    root = Path(kernel.root)
    for what in ("vmlinuz", "config", "System.map"):
        assert (root / "boot" / f"{what}-{kernel.release}").is_file()
    assert (root / "lib/modules" / kernel.release / "modules.dep").is_file()
    assert kernel.packages
    if kernel.suite:                 # entries fetched before the archive client have none
        assert kernel.suite in KERNEL_SUITES


def test_a_line_that_does_not_exist_is_one_line(tmp_path):
    from tests.conftest import run_invoke
    for line in ("4.19", "7.9"):
        res = run_invoke(["build-module", "--name=iprange", f"--kernel={line}"])
        errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
        assert res.returncode != 0 and len(errors) == 1, res.stderr
        assert f"no kernel line {line}" in errors[0] and "5.10" in errors[0] and "rc" in errors[0]


def test_an_unreachable_mirror_is_one_line_naming_mirror_and_suite(tmp_path):
    from tests.conftest import run_invoke
    res = run_invoke(["kernels", "--refresh"],
                     env_extra={"NFLAB_DEBIAN_MIRROR": "http://127.0.0.1:9/debian",
                                "NFLAB_DEBIAN_SECURITY_MIRROR": "http://127.0.0.1:9/debian-security",
                                "NFLAB_CACHE": str(tmp_path)})
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr
    assert "127.0.0.1:9" in errors[0] and re.search(r"\b(bullseye|bookworm|trixie|sid)", errors[0])
