"""`install` refuses a plugin whose libxtables is not the guest's, before copying.

A real VM whose package database says its libxtables12 is 1.8.8-1 (the root
is a tmpfs overlay, so the edit dies with the VM): installing iprange fails
with one line naming both versions, and nothing reached the guest. In a fresh
boot of the same image the same install goes through.
"""

from __future__ import annotations

import pytest

from ground.errors import NflabError
from nflab import deploy
from userspace_ext import plugin
from vm import install, lab

pytestmark = [pytest.mark.slow, pytest.mark.vm]

VM = "it-xtver"
FAKE = "1.8.8-1"
SET_VERSION = (
    "cp -n /var/lib/dpkg/status /root/dpkg-status.orig && "
    "awk -v v='{v}' '/^Package: /{{p=($2==\"libxtables12\")}} p && /^Version: /{{print \"Version: \" v; next}} "
    "{{print}}' /root/dpkg-status.orig > /root/dpkg-status.new && "
    "cp /root/dpkg-status.new /var/lib/dpkg/status && dpkg-query -W -f='${{Version}}' libxtables12")


@pytest.fixture(scope="module")
def vm():
    lab.down(VM)
    lab.up("6.1", VM, progress=lambda m: None)
    yield VM
    lab.down(VM)


def test_plugin_for_another_libxtables_is_refused_before_copying(vm):
    out = lab.exec(vm, SET_VERSION.format(v=FAKE), check=True).stdout
    assert out == FAKE
    with pytest.raises(NflabError) as info:
        deploy.install("iprange", vm)
    text = str(info.value)
    assert "\n" not in text
    assert (f"libxt_iprange.so was built against libxtables {plugin.xtables_version()} but "
            f"VM '{VM}' has libxtables 1.8.8 (libxtables12 {FAKE}); refusing to install it") in text
    left = lab.exec(vm, f"ls {install.GUEST_DIR} 2>/dev/null; cat /sys/module/xt_iprange/taint "
                        "2>/dev/null").stdout
    assert "xt_iprange.ko" not in left and "libxt_iprange.so" not in left
    assert "O" not in left, "the kit's module was loaded despite the refusal"


def test_same_install_goes_through_with_the_guests_real_version(vm):
    # install asks a VM for its libxtables once per boot (it cannot change while
    # the guest runs, short of this test's edit): a fresh boot has the real one
    lab.down(vm)
    lab.up("6.1", vm, progress=lambda m: None)
    done = deploy.install("iprange", vm)
    assert "O" in done.taint
