"""nflab tasks. Thin: every task lives in an importable module beside the code it drives.

    invoke --list        table of contents
    invoke doctor        what this machine lacks
"""

from invoke import Collection

from kmods import cli as kmods_cli
from nflab import atlas_cli, suite_cli, workshop_cli
from vm import cli as vm_cli

ns = Collection()
for _module in (kmods_cli, vm_cli, suite_cli, atlas_cli, workshop_cli):
    for _task in _module.TASKS:
        ns.add_task(_task)
