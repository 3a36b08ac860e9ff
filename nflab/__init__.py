"""nflab: a lab kit for Linux netfilter kernel extensions.

Layers, top to bottom (a package imports only from the layers below it):

* ``tasks.py``, ``cli/``        the invoke tasks (thin)
* ``nflab/``                     orchestration: suites, matrix, atlas, bench, workshop, reports
* ``vm/``  |  ``kmods/`` + ``userspace_ext/``   the lab  |  the build (independent of each other)
* ``supply/``                    kernels, kernels built from source, toolchain build roots
* ``ground/``                    errors, paths, processes and locks, integrity, output
"""

__version__ = "0.1.0"
