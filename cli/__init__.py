"""The invoke task modules (the tasks layer): thin wrappers over nflab/, vm/, kmods/.

invoke imports every task module for any command (``invoke --list``, ``invoke
vm-exec``), so each task imports the layers below inside its body: importing
the whole kit up front costs about 0.3 s per command (``python3 -c "import
tasks"`` against the same plus every module the tasks use, on the 2-core lab
host). Those function-local imports carry a ``# start-up cost`` comment;
import-linter sees them like any other (pyproject ``[tool.importlinter]``)."""
