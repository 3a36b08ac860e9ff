"""nflab tasks. Thin: every task lives in an importable module beside the code it drives.

    invoke --list        table of contents
    invoke doctor        what this machine lacks
"""

from invoke import Collection

from cli import build as kmods_cli
from cli import atlas as atlas_cli, suite as suite_cli, workshop as workshop_cli
from cli import lab as vm_cli

ns = Collection()
for _module in (kmods_cli, vm_cli, suite_cli, atlas_cli, workshop_cli):
    for _task in _module.TASKS:
        ns.add_task(_task)
