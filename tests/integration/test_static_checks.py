"""The kernel maintainers' static checks (issue 17): checkpatch.pl --strict, a W=1
build, sparse (make C=2) and coccicheck are clean on every module the kit
renders — the catalog, the tracer (and the fault module) and every workshop
solution — on the oldest and the newest kernel line the kit tests; what may stay is
listed with its reason in kmods/static_checks.toml. A template change that
breaks any of them is reported in the tool's own words.
"""

from __future__ import annotations

import shutil

import pytest

from kmods import checks, spec
from nflab import workshop
from tests.conftest import SUPPORTED_ENDS, get_kernel

pytestmark = pytest.mark.slow


def _debian_kernels():
    """The oldest and the newest supported kernel line (tests/conftest.py)."""
    return [get_kernel(line) for line in SUPPORTED_ENDS]


ENDS = {"oldest": 0, "newest": -1}
MODULES = ([spec.load(n) for n in spec.catalog_names(include_hidden=True)]
           + [ex.load(solution=True) for ex in workshop.exercises()])


@pytest.mark.parametrize("end", list(ENDS))
def test_every_rendered_module_is_clean(end, build_root):
    kernel = _debian_kernels()[ENDS[end]]
    findings = checks.run(MODULES, kernel)
    if end == "newest":
        # no sparse Debian ships (0.6.4) passes 7.x's checker test (__typeof_unqual__):
        # Kbuild turns C=2 off and says so; that is the one finding allowed here
        off = [f for f in findings if f.tool == "sparse" and f.kind == "not run"]
        assert len(off) <= 1 and all("not up to date" in f.message for f in off), off
        findings = [f for f in findings if f not in off]
    assert not findings, f"on {kernel.release}:\n" + "\n".join(map(str, findings))


BROKEN = """{% extends "hook.c.j2" %}
{% block includes %}
#include <linux/slab.h>
{% endblock %}
{% block helpers %}
static void nflbroke_defects(void)
{
	__be16 port = 5;
	void *p = kmalloc(8, GFP_ATOMIC);
	int unused;

	unused = ntohs(port);
	if(p)
		kfree(p);
}

{% endblock %}
{% block hook_body %}
	nflbroke_defects();
	return NF_ACCEPT;
{% endblock %}
"""


def test_a_broken_template_fails_each_check_in_its_own_words(tmp_path, build_root):
    folder = tmp_path / "nflbroke"
    folder.mkdir()
    text = (spec.CATALOG / "pktcount" / "ext.toml").read_text().replace('name = "pktcount"',
                                                                           'name = "nflbroke"')
    (folder / "ext.toml").write_text(text)
    (folder / "nflab_nflbroke.c.j2").write_text(BROKEN)
    ext = spec.load_file(folder / "ext.toml")
    found = checks.run([ext], _debian_kernels()[0])     # sparse runs there (see above)
    said = {}
    for f in found:
        said[f.tool] = said.get(f.tool, "") + f"{f}\n"
    assert set(said) == {"checkpatch", "W=1", "sparse", "coccinelle"}, found
    assert "SPACING" in said["checkpatch"] and "space required before the open parenthesis" in said["checkpatch"]
    assert "set but not used" in said["W=1"] and "unused-but-set-variable" in said["W=1"]
    assert "incorrect type in initializer" in said["sparse"]
    assert "NULL check before some freeing functions is not needed" in said["coccinelle"]
    assert all(f.file == "nflbroke/nflab_nflbroke.c" for f in found), found
    shutil.rmtree(folder)
