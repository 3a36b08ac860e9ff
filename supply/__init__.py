"""Kernel and toolchain supply: Debian kernels, kernels built from source, build roots.

Below build (kmods/, userspace_ext/) and lab (vm/), above ground/."""
