"""Which iptables backends a guest kernel serves: legacy xtables, nft_compat, or both.

``iptables-legacy`` needs the kernel's own xt tables (``ip_tables`` +
``iptable_filter``, ``ip6_tables`` + ``ip6table_filter``); since 6.17 they sit
behind ``CONFIG_NETFILTER_XTABLES_LEGACY``, which Debian's rt flavour of the
newest lines leaves unset. ``iptables-nft`` puts the same matches and targets
into nf_tables through ``nft_compat``. Rules written through one backend are
invisible to the other, so the suites say which one they tested.

The answer comes from the kernel itself: its ``.config`` and module list in
the kernel cache entry (kit VMs), or the same read inside the guest
(``/proc/config.gz``, ``/boot/config-$(uname -r)``, ``modules.dep`` and
``modules.builtin``) for a machine the kit did not boot.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ground import kconfig
from ground.errors import SpecError
from supply import kernels

from . import lab

BACKENDS = ("legacy", "nft")
TOOLS = {"ipv4": "iptables", "ipv6": "ip6tables"}
# backend -> what it needs: (Kconfig symbol, module it builds) in the order a reason names them
NEEDS = {
    "legacy": (("CONFIG_NETFILTER_XTABLES_LEGACY", None),
               ("CONFIG_IP_NF_IPTABLES_LEGACY", "ip_tables"),
               ("CONFIG_IP_NF_FILTER", "iptable_filter"),
               ("CONFIG_IP6_NF_IPTABLES_LEGACY", "ip6_tables"),
               ("CONFIG_IP6_NF_FILTER", "ip6table_filter")),
    "nft": (("CONFIG_NF_TABLES", "nf_tables"), ("CONFIG_NFT_COMPAT", "nft_compat")),
}
# symbols that only exist on some kernels: absent from a .config means "not this kernel's
# option", not "off" (NETFILTER_XTABLES_LEGACY: 6.17; IP*_NF_IPTABLES_LEGACY: 6.9)
OPTIONAL = {"CONFIG_NETFILTER_XTABLES_LEGACY", "CONFIG_IP_NF_IPTABLES_LEGACY",
            "CONFIG_IP6_NF_IPTABLES_LEGACY"}
_MODULE_RE = re.compile(r"(?:^|/)([^/\s:]+)\.ko(?:\.\w+)?:?")

GUEST_COMMAND = (
    'r=$(uname -r); echo "@@release $r"; echo @@config; '
    '{ zcat /proc/config.gz 2>/dev/null || cat "/boot/config-$r" 2>/dev/null; }; '
    'echo @@modules; cat "/lib/modules/$r/modules.dep" "/lib/modules/$r/modules.builtin" '
    '2>/dev/null | cut -d: -f1')


@dataclass(frozen=True)
class Backends:
    """The backends a kernel serves; ``missing`` says why the others are not."""

    missing: dict = field(default_factory=dict)    # backend -> reason
    source: str = ""                               # where the answer was read

    @property
    def usable(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b not in self.missing)

    @property
    def legacy(self) -> bool:
        return "legacy" not in self.missing

    @property
    def primary(self) -> str:
        """The backend a test that needs just one uses: legacy (the kernel's own xt
        tables) where it exists, else nft."""
        return "legacy" if self.legacy else "nft"

    def tool(self, family: str, backend: str | None = None) -> str:
        return f"{TOOLS[family]}-{backend or self.primary}"

    def skip_reason(self, backend: str) -> str | None:
        """Why tests of *backend* are skipped on this kernel, or None when they run."""
        if backend not in self.missing:
            return None
        other = self.usable
        runs = f"; the suites run {' and '.join(other)} only" if other else ""
        return f"iptables-{backend} not tested: {self.missing[backend]} ({self.source}){runs}"

    def describe(self) -> str:
        """One line for reports: which backends were tested, and why not the others."""
        if not self.missing:
            return "legacy and nft"
        tested = " and ".join(self.usable) or "none"
        why = "; ".join(f"{b} skipped: {r}" for b, r in self.missing.items())
        return f"{tested} only ({why})"

    def as_dict(self) -> dict:
        return {**asdict(self), "usable": list(self.usable)}


def parse_modules(text: str) -> set[str]:
    """Module names from ``modules.dep``/``modules.builtin`` lines (paths, any compression)."""
    names = set()
    for line in text.splitlines():
        m = _MODULE_RE.search(line.split(":", 1)[0])
        if m:
            names.add(m.group(1).replace("-", "_"))
    return names


def _why_not(backend: str, config: dict, modules: set | None) -> str | None:
    for symbol, module in NEEDS[backend]:
        value = config.get(symbol)
        if value is None and symbol in OPTIONAL:
            continue
        if value not in ("y", "m"):
            what = f" (no {module})" if module else ""
            return f"{symbol} is not set{what}"
        if modules is not None and module and module not in modules:
            return f"{symbol}={value} but {module} is not among the kernel's modules"
    return None


def decide(config_text: str | None, modules_text: str | None = None, *, source: str) -> Backends:
    """What a kernel with this ``.config`` (and module list) serves. With neither,
    nothing is known and both backends are assumed (the suites' failures then say more)."""
    if not (config_text or "").strip():
        if not (modules_text or "").strip():
            return Backends({}, f"{source}: no kernel config or module list, both assumed")
        modules = parse_modules(modules_text)
        missing = {b: f"no {', '.join(m for _, m in NEEDS[b] if m and m not in modules)} module"
                   for b in BACKENDS if any(m and m not in modules for _, m in NEEDS[b])}
        return Backends(missing, source)
    config = kconfig.parse(config_text, strict=False)
    modules = parse_modules(modules_text) if (modules_text or "").strip() else None
    missing = {b: r for b in BACKENDS if (r := _why_not(b, config, modules))}
    return Backends(missing, source)


SELECT_ENV = "NFLAB_BACKENDS"


def selected(found: Backends, choice: str | None = None) -> Backends:
    """*found*, narrowed to the backends ``$NFLAB_BACKENDS`` (or *choice*: ``nft``,
    ``legacy``, ``legacy,nft``) names: the others are missing "not selected"."""
    choice = choice if choice is not None else os.environ.get(SELECT_ENV, "")
    names = [b.strip() for b in choice.split(",") if b.strip()]
    if not names:
        return found
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise SpecError(f"{SELECT_ENV}={choice!r} names unknown backend(s) {', '.join(bad)}",
                        hint=f"use {', '.join(BACKENDS)} or both, comma-separated, or leave it unset")
    extra = {b: f"not selected ({SELECT_ENV}={choice})" for b in BACKENDS
             if b not in names and b not in found.missing}
    return Backends({**found.missing, **extra}, found.source)


def for_kernel(kernel) -> Backends:
    """From a kernel cache entry (a supply Kernel): its .config and module lists."""
    mods = Path(kernel.modules)
    lists = "".join(p.read_text() for p in (mods / "modules.dep", mods / "modules.builtin")
                    if p.is_file())
    return decide(Path(kernel.config).read_text(), lists,
                  source=f"kernel config of {kernel.release}")


def from_guest_output(out: str) -> Backends:
    """Parse what :data:`GUEST_COMMAND` printed."""
    release, section, parts = "?", None, {"config": [], "modules": []}
    for line in out.splitlines():
        if line.startswith("@@release "):
            release = line.split(None, 1)[1].strip()
        elif line in ("@@config", "@@modules"):
            section = line[2:]
        elif section:
            parts[section].append(line)
    return decide("\n".join(parts["config"]), "\n".join(parts["modules"]),
                  source=f"the guest's config of {release}")


def for_vm(vm: str) -> Backends:
    """For a kit VM: from its kernel's cache entry (the entry of exactly its release)."""
    release = lab.require(vm).release
    kernel = next((k for k in kernels.cached_kernels() if k.release == release), None)
    return for_kernel(kernel or kernels.get(kernels.release_spec(release), fetch_missing=False))
