"""nflab: a lab kit for Linux netfilter kernel extensions.

The architecture is visible in the top-level folders:

* ``kmods/``          extension definitions, kernel-side templates, Kbuild driver
* ``userspace_ext/``  iptables plugin templates and the libxtables build
* ``vm/``             kernels, guest rootfs, initramfs, QEMU launcher, packet wire
* ``tests/``          unit, integration and testinfra suites
* ``nflab/``          glue shared by all of them (paths, errors, subprocess)
"""

__version__ = "0.1.0"
