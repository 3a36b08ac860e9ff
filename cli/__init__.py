"""The invoke task modules (the tasks layer): thin wrappers over nflab/, vm/, kmods/.

invoke imports every task module for any command (``invoke --list``, ``invoke
vm-exec``), so each task imports the layers below inside its body: importing
the whole kit up front costs about 0.3 s per command (``python3 -c "import
tasks"`` against the same plus every module the tasks use, on the 2-core lab
host). Those function-local imports carry a ``# start-up cost`` comment;
import-linter sees them like any other (pyproject ``[tool.importlinter]``)."""

from invoke import Task

from ground.errors import SpecError

SNAPSHOT_HELP = ("restore the saved state of a freshly booted guest (the default: ~0.6 s instead "
                 "of a ~2 s boot; the first VM of a kernel boots once and saves it); "
                 "--no-snapshot boots cold, as NFLAB_SNAPSHOT=0 does")


def snapshot_flag(snapshot: bool) -> bool | None:
    """What a task's ``--snapshot/--no-snapshot`` asks of ``vm.lab.up``: None (the
    default, which ``$NFLAB_SNAPSHOT`` may turn off) or False (boot cold)."""
    return None if snapshot else False


class FlagTask(Task):
    """A task whose short flags are chosen where invoke's guess is wrong:
    ``@task(klass=FlagTask, shortflags={"jobs": "j", "junit": None})`` gives --jobs
    the short flag -j and --junit none. -h is never taken (it stays help); every
    other option keeps invoke's automatic short flag."""

    def __init__(self, body, shortflags=None, **kwargs):
        self.shortflags = dict(shortflags or {})
        super().__init__(body, **kwargs)

    def arg_opts(self, name, default, taken_names):
        reserved = {"h"} | {f for f in self.shortflags.values() if f}
        opts = super().arg_opts(name, default, set(taken_names) | reserved)
        if name in self.shortflags:
            flag = self.shortflags[name]
            opts["names"] = opts["names"][:1] + ([flag] if flag else [])
        return opts


def one_of(**given) -> None:
    """Refuse two options that say the same thing (``--kernel`` and ``--kernels``)."""
    both = [k for k, v in given.items() if v]
    if len(both) > 1:
        flags = " or ".join(f"--{k.replace('_', '-')}" for k in given)
        raise SpecError(f"give {flags}, not both",
                        hint=f"--{both[0].replace('_', '-')} alone, or all of them in "
                             f"--{both[-1].replace('_', '-')}")


def whole_number(option: str, value, default: int, minimum: int = 1) -> int:
    """A whole-number option (``--runs``, ``-j``); *default* when not given."""
    if value is None:
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = minimum - 1
    flag = f"-{option} " if len(option) == 1 else f"--{option}="
    if n < minimum:
        raise SpecError(f"{flag}{value!r} is not a whole number of at least {minimum}",
                        hint=f"e.g. {flag}{default}")
    return n


def catalog_selection(option: str, text: str | None) -> list[str]:
    """The extensions a comma list names ([] when none), each one in the catalog
    and valid; checked before anything slow (a fetch, a boot) starts."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import spec

    names = [n for n in (text or "").split(",") if n.strip()]
    known = spec.catalog_names(include_hidden=True)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(f"--{option}: no extension {', '.join(map(repr, unknown))} in the catalog",
                        hint=f"valid: {', '.join(known)}; `invoke catalog` lists them")
    for n in names:
        spec.load(n)
    return names
