"""Kernels built from Debian's linux-source with a config fragment, for real.

* Kconfig runs on the real source tree (``kernels/.src/``, downloaded and unpacked
  once): a fragment whose options Kconfig drops is refused with each dropped option,
  its new value and its ``depends on``; the debug fragment survives whole.
* The debug kernel (``source:6.12+debug``: KASAN, lockdep, DEBUG_LIST, kmemleak) is
  built when missing (tens of minutes on 2 cores, then cached), boots, runs
  iprange's suite green through ``invoke test``, and catches a module's
  use-after-free that a Debian kernel lets pass silently.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kmods import scaffold, spec
from ground import kconfig
from ground.errors import KernelError, VMError
from ground.paths import REPO
from supply import kernels
from supply import source_kernels as sk

pytestmark = [pytest.mark.slow]

DEBUG = "source:6.12+debug"


@pytest.fixture(scope="module")
def src_612():
    """The real linux-source-6.12 tree (cached build's version, else apt's newest)."""
    plan = sk.plan("source:6.12")
    return plan, sk.source_tree(plan)


def _plan(base_plan, fragment: str) -> sk.Plan:
    return sk.Plan(line="6.12", package=base_plan.package, version=base_plan.version,
                   upstream=base_plan.upstream, key="feedf00d", fragment=fragment,
                   fragment_hash=sk.fragment_hash(fragment), base=base_plan.base, spec="test")


def test_kconfig_drops_are_listed_with_their_dependencies(src_612, tmp_path):
    plan, src = src_612
    frag = ("CONFIG_VETH=y\n"                  # survives (the base asks for m)
            "CONFIG_BRIDGE_NETFILTER=m\n"      # needs BRIDGE, which nothing enables
            "CONFIG_REFCOUNT_FULL=y\n"         # removed in 5.5
            "# CONFIG_IPV6 is not set\n")      # the kit's base needs it: its ip6tables options go
    with pytest.raises(KernelError) as info:
        sk.configure(src, tmp_path / "build", _plan(plan, frag))
    err = info.value
    assert "Kconfig dropped" in err.message and ".config" in err.hint
    detail = err.detail
    assert "CONFIG_BRIDGE_NETFILTER=m: now not set (depends on BRIDGE" in detail, detail
    assert "CONFIG_REFCOUNT_FULL=y: no such option in this kernel source" in detail, detail
    assert "CONFIG_VETH" not in detail
    # the user's own "not set" was honoured; what it took away from the kit's base is
    # named: as going with it where Kconfig's `depends on` says so, else as dropped
    going = detail.split("going with what your fragment turns off (not an error):")[1]
    assert "CONFIG_IP6_NF_IPTABLES=m: now not set" in going
    assert "the kit's base.config:" in detail
    assert "CONFIG_IPV6=" not in detail


def test_debug_fragment_survives_kconfig_whole(src_612, tmp_path):
    plan, src = src_612
    frag = (sk.CONFIGS / "debug.config").read_text()
    config = sk.configure(src, tmp_path / "build", _plan(plan, frag))
    final = kconfig.read(config)
    for name, value in kconfig.parse(frag).items():
        assert final.get(name) == value, name
    assert final["CONFIG_LOCALVERSION"] == '"-nflab-feedf00d"'
    assert final["CONFIG_VIRTIO_BLK"] == "y" and final["CONFIG_VIRTIO_MMIO"] == "y"
    assert final["CONFIG_PVH"] == "y" and final["CONFIG_MODULES"] == "y"


@pytest.fixture(scope="module")
def debug_kernel():
    return kernels.get(DEBUG, progress=lambda m: print(m, file=sys.stderr))


@pytest.mark.vm
@pytest.mark.kernel_build
def test_debug_kernel_runs_the_iprange_suite(debug_kernel, tmp_path):
    k = debug_kernel
    assert sk.RELEASE_RE.match(k.release) and k.config_value("KASAN") == "y"
    assert k.config_value("PROVE_LOCKING") == "y" and k.config_value("DEBUG_LIST") == "y"
    for needed in ("Module.symvers", "scripts/module.lds"):
        assert os.path.isfile(os.path.join(k.headers, needed)), needed
    junit = tmp_path / "junit.xml"
    res = subprocess.run([sys.executable, "-m", "invoke", "test", "--name=iprange", f"--kernel={DEBUG}",
                          f"--junit={junit}"], cwd=REPO, capture_output=True, text=True, timeout=3600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert k.release in out and "FAILED" not in out
    text = junit.read_text()
    assert 'failures="0"' in text and 'errors="0"' in text and "test_iprange" in text


UAF = """{% extends "hook.c.j2" %}
{% block includes %}
#include <linux/slab.h>
{% endblock %}
{% block hook_body %}
	return NF_ACCEPT;
{% endblock %}
{% block module_init %}
	{
		char *volatile buf = kmalloc(64, GFP_KERNEL);

		if (!buf)
			return -ENOMEM;
		kfree(buf);
		pr_info("nflabuaf: read after free: %d\\n", buf[8]);
	}
{% endblock %}
"""


@pytest.mark.vm
@pytest.mark.kernel_build
def test_debug_kernel_catches_a_use_after_free(debug_kernel, tmp_path):
    from nflab import deploy
    from vm import lab

    written = scaffold.new_module("hook", "nflabuaf", catalog=tmp_path)
    tpl = next(p for p in written if p.name.endswith(".c.j2"))
    tpl.write_text(UAF)
    ext = spec.load_file(tmp_path / "nflabuaf" / "ext.toml")
    vm = "it-src-kasan"
    lab.down(vm)
    lab.up(DEBUG, vm, progress=lambda *_: None)
    try:
        with pytest.raises(VMError) as info:
            deploy.install(ext, vm)
    finally:
        lab.down(vm)
    err = info.value
    assert "KASAN" in err.message and "use-after-free" in err.message, err.message
    assert "nflab_nflabuaf" in (err.detail or ""), err.detail
