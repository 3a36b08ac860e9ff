"""`invoke atlas`: the measured netfilter map of a kernel (see nflab/atlas.py)."""

from __future__ import annotations

from invoke import task

from cli import catalog_selection
from ground.output import Progress, friendly, table
from ground.errors import NflabError


@task(help={
    "kernel": "kernel spec to measure: 6.1, 6.12 or an exact ABI (default 6.12)",
    "out": "SVG to write; .png, .md and .json are written beside it (default atlas.svg)",
    "vm": "lab VM to measure in (booted if not running, and then stopped again; default atlas)",
    "keep": "leave a VM this task booted running afterwards",
    "modules": "catalog hook modules to install first, comma-separated (shown as your modules)",
    "quiet": "no progress display",
})
@friendly
def atlas(c, kernel=None, out="atlas.svg", vm="atlas", keep=False, modules=None, quiet=False):
    """Measure hooks, tables, priorities and paths on a real kernel; draw the netfilter panorama."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import atlas as at

    mods = catalog_selection("modules", modules)
    with Progress(quiet) as progress:
        result, files = at.run(kernel, vm, out=out, keep=keep, modules=mods, progress=progress)
    rows = []
    for hook in at.HOOKS:
        for e in result.at(hook):
            if e.kind == "tracer":
                continue
            rows.append([hook, e.family, e.name, e.priority_text(), e.source])
    table(["hook", "family", "what", "priority", "source"], rows,
          title=f"netfilter atlas of {result.kernel} ({'exact + measured' if result.exact else 'measured intervals'})")
    for kind in ("svg", "png", "md", "json"):
        print(f"{kind}: {files[kind] or 'not written (no SVG converter: apt-get install librsvg2-bin)'}")
    bad = [ch for ch in result.checks if not ch.ok]
    print(f"cross-checks: {len(result.checks) - len(bad)} ok, {len(bad)} failed")
    for ch in bad:
        print(f"FAILED {ch.what}")
    if bad:
        raise NflabError(f"{len(bad)} cross-check(s) between measurement and nft list hooks failed",
                         hint=f"see {files['md']}")


TASKS = [atlas]
