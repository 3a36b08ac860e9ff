"""Tasks of the build pipeline: build-module, new-module, render, catalog."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import task

from cli import FlagTask
from ground.output import Progress, friendly, table
from ground.errors import NflabError, SpecError
from supply import buildroot


@task(help={
    "name": "extension to build (see `invoke catalog`)",
    "kernel": "kernel spec: a line (5.10, 6.1, 6.12, 7.3), rc, or an exact ABI like "
              "6.12.118+deb13, optionally -amd64/-rt-amd64 (default 6.12)",
    "all": "build every catalog extension",
    "quiet": "no progress display",
    "userland": buildroot.USERLAND_HELP,
    "check": "also run the maintainers' static checks: checkpatch.pl --strict, a W=1 build "
             "with sparse (C=2), coccicheck; allowed findings: kmods/static_checks.toml",
})
@friendly
def build_module(c, name=None, kernel=None, all=False, quiet=False, userland=None, check=False):
    """Render and build an extension's .ko and libxt_*.so for a kernel."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import build, checks, spec
    from supply import kernels

    buildroot.use_userland(userland)

    if bool(name) == bool(all):
        raise SpecError("give exactly one of --name=NAME or --all",
                        hint="valid names: " + ", ".join(spec.catalog_names()))
    names = spec.catalog_names() if all else [name]
    if name:
        spec.load(name)                       # validate before fetching anything
    with Progress(quiet) as progress:
        kern = kernels.get(kernel, progress=progress)
        built, failed = build.build_many(names, kern, progress=lambda n: progress(f"building {n} for {kern.release}"))
    for art in built:
        print(f"{art.name}: {art.ko}  (vermagic {art.vermagic.split()[0]}, "
              f"{'built' if art.rebuilt else 'up to date'} in {art.seconds:.1f}s)")
        if art.so:
            print(f"{art.name}: {art.so}")
    for n, exc in failed:
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        print(f"error: {n}: {exc}", file=sys.stderr)
    if failed:
        raise NflabError(f"{len(failed)} of {len(names)} extensions failed to build",
                         hint="each error above names its full build.log")
    if check:
        with Progress(quiet) as progress:
            findings = checks.run([art.name for art in built], kern, progress=progress)
        for f in findings:
            print(f, file=sys.stderr)
        if findings:
            raise NflabError(f"{len(findings)} static check finding(s) on {kern.release}",
                             hint="fix the template, or list the finding with its reason in "
                                  "kmods/static_checks.toml")
        print(f"static checks: {len(built)} extension(s) clean on {kern.release} "
              "(checkpatch --strict, W=1, sparse, coccicheck)")


@task(klass=FlagTask, shortflags={"hook": None}, help={
    "kind": "hook, match or target",
    "name": "C identifier; becomes the folder kmods/catalog/NAME",
    "hook": "hook point for --kind=hook (default PRE_ROUTING): PRE_ROUTING, LOCAL_IN, FORWARD, "
            "LOCAL_OUT, POST_ROUTING, INGRESS",
    "priority": "hook priority (int) for --kind=hook (default -175, between conntrack (-200) "
                "and mangle (-150))",
    "family": "ipv4, ipv6 (netdev for INGRESS hooks)",
})
@friendly
def new_module(c, kind, name, hook=None, priority=None, family="ipv4"):
    """Scaffold a new extension definition that builds at once."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import scaffold

    hook_only = [f"--{k}" for k, v in (("hook", hook), ("priority", priority)) if v is not None]
    if kind in ("match", "target") and hook_only:
        raise SpecError(f"{' and '.join(hook_only)} only apply to --kind=hook, not to a {kind}",
                        hint=f"drop {' '.join(hook_only)}, or use --kind=hook")
    for path in scaffold.new_module(kind, name, hook or "PRE_ROUTING",
                                    "-175" if priority is None else priority, family):
        print(f"wrote {path}")
    print("next:")
    print(f"  invoke build-module --name={name}")
    print(f"  invoke install --name={name}")
    print(f"  invoke test --name={name}")


@task(help={"name": "extension to render", "out": "directory to write the sources into",
            "kernel": "also probe this kernel's headers and write nflab_features.h "
                      "(the NFLAB_HAVE_* results compat_nflab.h keys on)"})
@friendly
def render(c, name, out=None, kernel=None):
    """Render an extension's C sources without building (to read them)."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import build, probes, spec
    from supply import kernels

    ext = spec.load(name)
    dest = Path(out) if out else Path("build") / "rendered" / name
    build.render_into(ext, dest)
    refused = None
    if kernel:
        with Progress(False) as progress:
            kern = kernels.get(kernel, progress=progress)
            progress(f"probing the headers of {kern.release}")
            try:
                probes.prepare(ext, kern, dest)
            except probes.MissingFeature as exc:
                refused = exc
    for f in sorted(dest.iterdir()):
        print(f)
    if not kernel:
        print(f"(no {probes.FEATURES_H}: give --kernel=K to probe a kernel's headers)")
    if refused:
        print(f"note: {refused.message}", file=sys.stderr)


@task
@friendly
def catalog(c):
    """List the catalog's extensions: kind, families, hooks, summary."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import spec

    rows = []
    for n in spec.catalog_names(include_hidden=True):
        ext = spec.load(n)
        if len(ext.hooks) <= 4:
            where = ", ".join(f"{h.family}/{h.hook}@{h.priority}" for h in ext.hooks) or "-"
        else:
            prios = sorted({h.priority for h in ext.hooks})
            where = (f"{len(ext.hooks)} points: {len({h.hook for h in ext.hooks})} hooks, "
                     f"priorities {', '.join(map(str, prios))}")
        rows.append([ext.name, ext.kind, ",".join(ext.families), ext.module, where,
                     ext.summary + (" (catalog only)" if ext.catalog_only else "")])
    table(["name", "kind", "families", "module", "hook points", "summary"], rows)


TASKS = [build_module, new_module, render, catalog]
