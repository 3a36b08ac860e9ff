"""The invoke task modules (the tasks layer): thin wrappers over nflab/, vm/, kmods/.

invoke imports every task module for any command (``invoke --list``, ``invoke
vm-exec``), so each task imports the layers below inside its body: importing
the whole kit up front costs about 0.3 s per command (``python3 -c "import
tasks"`` against the same plus every module the tasks use, on the 2-core lab
host). Those function-local imports carry a ``# start-up cost`` comment;
import-linter sees them like any other (pyproject ``[tool.importlinter]``)."""

SNAPSHOT_HELP = ("restore the saved state of a freshly booted guest (the default: ~0.6 s instead "
                 "of a ~2 s boot; the first VM of a kernel boots once and saves it); "
                 "--no-snapshot boots cold, as NFLAB_SNAPSHOT=0 does")


def snapshot_flag(snapshot: bool) -> bool | None:
    """What a task's ``--snapshot/--no-snapshot`` asks of ``vm.lab.up``: None (the
    default, which ``$NFLAB_SNAPSHOT`` may turn off) or False (boot cold)."""
    return None if snapshot else False
