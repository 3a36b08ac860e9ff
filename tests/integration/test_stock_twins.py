"""The kit's plugins print what the stock plugins print (issue 21), without a kernel.

For every catalog extension stock iptables also ships, every OK rule of
upstream's ``.t`` file and of the kit's own is parsed by the guest userland's
stock plugin and by the kit's, in that userland's build root (``nflab-xtshow``:
libxtables' option parser, then the plugin's save and ``-L`` print; nothing
reaches a kernel). Both must take the
upstream rules; where both take a rule, the save text and the ``-L`` text must
be byte for byte the same, and rules the stock plugin encodes alike (what
``iptables -C``/``-D`` compare) must be alike in the kit's too.

Deliberate differences are listed in DELIBERATE with their reason; the kit
also accepts some rules stock refuses (its own .t files say which).
"""

from __future__ import annotations

import shlex

import pytest

from kmods import build
from nflab import rules_t, upstream_t
from tests.conftest import get_kernel
from userspace_ext import plugin, xtshow
from vm import rootfs

pytestmark = pytest.mark.slow

# ext -> [(text the stock save adds, when the rule does not give the option, why)]
DELIBERATE = {"time": [(" --datestop 2038-01-19T03:14:07", "--datestop",
                        "the kit's dates are 64-bit: a rule without --datestop has no end date, where "
                        "the stock plugin saves its 32-bit default")]}
# ext -> [(the kit's save or -L text, the stock plugin's in its place, why)]
KIT_ONLY = {"time": [(" --datestop 1970-01-01T00:00:00", "",
                      "a --datestop at the epoch never matches: the stock plugin's save drops it, "
                      "so its saved rule restores as one that always matches"),
                     (" until date 1970-01-01 00:00:00", " until date",
                      "and its -L prints the label without the date")]}
STOP = {"-m", "--match", "-j", "--jump", "-p", "--protocol", "-s", "-d", "-i", "-o", "-g"}


def match_args(rule: str, name: str) -> list[str] | None:
    """The words of *rule* that belong to ``-m name`` (a leading ``!`` included)."""
    words = shlex.split(rule)
    for i in range(len(words) - 1):
        if words[i] in ("-m", "--match") and words[i + 1] == name:
            out = []
            for w in words[i + 2:]:
                if w in STOP:
                    break
                out.append(w)
            return out[:-1] if out and out[-1] == "!" else out
    return None


@pytest.fixture(scope="module")
def upstream():
    # the build root's libxtables12 and its stock plugins come from this iptables source
    return upstream_t.source(rootfs.plugin_xtables_version(), rootfs.suite(), progress=lambda m: None)


@pytest.fixture(scope="module")
def exe(build_root):
    return xtshow.binary(build_root / "xtshow")


def _cases(name, files):
    for path in files:
        fam = rules_t.family_of(path)
        seen = set()
        for c in rules_t.parse(path.read_text(), str(path)):
            args = match_args(c.rule, name)
            if c.ok and c.lineno not in seen and args is not None:
                seen.add(c.lineno)
                yield f"{path.parent.name}/{path.name}:{c.lineno}", fam, args


def _stock_save(ext, args, text):
    for extra, option, _ in DELIBERATE.get(ext, []):
        if option not in args:
            text = text.replace(extra, "")
    return text


def _kit_output(ext, save, listing):
    for kit, stock, _ in KIT_ONLY.get(ext, []):
        save, listing = save.replace(kit, stock), listing.replace(kit, stock)
    return save, listing


# the stock plugin's revision where the kit's differs: the kit's quota is revision 1
# because its struct is not the in-tree revision 0's (kmods/catalog/quota/ext.toml)
STOCK_REVISION = {"quota": 0}


def test_kit_plugins_save_and_list_what_stock_plugins_do(upstream, exe, build_root):
    from kmods.spec import CATALOG, load

    kernel = get_kernel("6.12")
    twins = upstream_t.twins(upstream)
    assert {"comment", "string", "iprange", "time", "connlimit", "quota"} <= set(twins)
    diffs, compared = [], 0
    for name, up_files in twins.items():
        ext = load(name)
        kit_so = build.build_extension(name, kernel).so
        stock_so = plugin.stock_plugin(ext.name)
        kit_files = sorted((CATALOG / name).glob("lib*.t"))
        encodings = {}
        for where, fam, args in _cases(ext.name, up_files + kit_files):
            stock = xtshow.show(exe, stock_so, ext.name, STOCK_REVISION.get(name, ext.revision), fam, args)
            kit = xtshow.show(exe, kit_so, ext.name, ext.revision, fam, args)
            upstream_case = where.startswith("extensions/")
            if kit.rc != 0 and (upstream_case or stock.rc == 0):
                diffs.append(f"{where}: the kit refuses {' '.join(args)!r} ({kit.error}); stock takes it")
            if stock.rc != 0 or kit.rc != 0:
                continue
            compared += 1
            kit_save, kit_listing = _kit_output(name, kit.save, kit.listing)
            if _stock_save(name, args, stock.save) != kit_save:
                diffs.append(f"{where}: save\n  stock:{stock.save}\n  kit:  {kit.save}")
            if stock.listing != kit_listing:
                diffs.append(f"{where}: -L\n  stock:{stock.listing}\n  kit:  {kit.listing}")
            encodings.setdefault((fam, stock.data), set()).add((kit.data, where))
        for (fam, _), kits in encodings.items():
            if len({k for k, _ in kits}) > 1:
                diffs.append(f"{name} {fam}: one rule for the stock plugin, several for the kit's: "
                             + ", ".join(sorted(w for _, w in kits)))
    assert compared > 60
    assert not diffs, "\n".join(diffs)
