"""Kernel feature probes (kmods/probes.py, kmods/probes.toml).

Fast tests run every header check of the real table over synthetic header
trees laid out as Debian's (flavour headers whose Makefile includes the
common tree) and as a ``make O=`` build (a ``source`` link): each probe is 1
with its declaration and 0 without it, or with it only in a comment. Slow
tests probe the cached 6.1 and 6.12 headers, where several answers differ
from what a version check says, and compile the compat layer's fallbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from ground.errors import SpecError
from kmods import probes, spec
from kmods.render import KMODS_TEMPLATES

TABLE = probes.load_table()
HEADER_PROBES = [p for p in TABLE if p.how == "header"]

# Each header probe's declaration as the kernel writes it (one per probe, so a
# new row in probes.toml needs its sample here).
SAMPLES = {
    "nf_conncount_count_skb": "unsigned int nf_conncount_count_skb(struct net *net,\n"
                              "\t\t\t\t    const struct sk_buff *skb, u16 l3num);",
    "proc_create_net_single_write": "struct proc_dir_entry *proc_create_net_single_write("
                                    "const char *name, umode_t mode);",
    "kernel_read_file_from_path": "ssize_t kernel_read_file_from_path(const char *path, "
                                  "loff_t offset,\n\t\t\t\t   void **buf);",
    "timer_container_of": "#define timer_container_of(var, callback_timer, timer_fieldname) \\\n"
                          "\tcontainer_of(callback_timer, typeof(*var), timer_fieldname)",
    "timer_delete": "extern int timer_delete_sync(struct timer_list *timer);\n"
                    "extern int timer_delete(struct timer_list *timer);",
    "get_random_u32_below": "static inline u32 get_random_u32_below(u32 ceil)\n{\n}",
    "prandom_u32": "u32 prandom_u32(void);",
    "u64_stats_sub": "static inline void u64_stats_sub(u64_stats_t *p, s64 val)\n{\n}",
    "pde_data": "static inline void *pde_data(const struct inode *inode)\n{\n}",
    "linux_unaligned_h": "",
    "module_import_ns_string": "#define MODULE_IMPORT_NS(ns)\tMODULE_INFO(import_ns, ns)",
    "strlcpy": "size_t strlcpy(char *, const char *, size_t);",
    "strncpy": "extern char * strncpy(char *,const char *, __kernel_size_t);",
    "nf_inet_ingress": "enum nf_inet_hooks {\n\tNF_INET_INGRESS = NF_INET_NUMHOOKS,\n};",
    "nla_strscpy": "ssize_t nla_strscpy(char *dst, const struct nlattr *nla, size_t dstsize);",
    "genl_resv_start_op": "struct genl_family {\n\tu8\t\t\tresv_start_op;\n};",
    "genl_mcast_cap_net_admin": "#define GENL_MCAST_CAP_NET_ADMIN\tBIT(0)",
    "genl_mcgrp_cap_sys_admin": "struct genl_multicast_group {\n\tchar\t\t\tname[GENL_NAMSIZ];\n"
                                "\tu8\t\t\tflags;\n\tu8\t\t\tcap_sys_admin:1;\n};",
}
# What the older kernels had instead (present, but not what the probe asks for).
NEAR_MISSES = {
    "module_import_ns_string": "#define MODULE_IMPORT_NS(ns)\tMODULE_INFO(import_ns, __stringify(ns))",
    "timer_delete": "extern int del_timer(struct timer_list *timer);\n"
                    "static inline int del_timer_sync(struct timer_list *t) { return timer_delete(t); }",
    "timer_container_of": "#define from_timer(var, callback_timer, timer_fieldname) \\\n"
                          "\tcontainer_of(callback_timer, typeof(*var), timer_fieldname)",
    "pde_data": "void *PDE_DATA(const struct inode *);",
    "u64_stats_sub": "static inline void u64_stats_add(u64_stats_t *p, unsigned long val)\n{\n}",
    "nla_strscpy": "size_t nla_strlcpy(char *dst, const struct nlattr *nla, size_t dstsize);",
    "genl_mcgrp_cap_sys_admin": "struct genl_multicast_group {\n\tchar name[GENL_NAMSIZ];\n\tu8 flags;\n};",
    "nf_conncount_count_skb": "unsigned int nf_conncount_count(struct net *net, "
                              "struct nf_conncount_data *data);",
}


def _debian_tree(root: Path, files: dict[str, str]) -> Path:
    """Debian's layout: linux-headers-R (generated) + linux-headers-A-common (the rest)."""
    common = root / "linux-headers-6.9.0-1-common"
    flavour = root / "linux-headers-6.9.0-1-cloud-amd64"
    (common / "include").mkdir(parents=True)
    (common / "Makefile").write_text("# common\n")
    (flavour / "include/generated/uapi/linux").mkdir(parents=True)
    (flavour / "Makefile").write_text(f"include {common}/Makefile\n")
    (flavour / "include/generated/uapi/linux/version.h").write_text(
        "#define LINUX_VERSION_CODE 395520\n")        # 6.9.0, no MAJOR/PATCHLEVEL macros
    for name, text in files.items():
        path = common / "include" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return flavour


def _check(probe, tmp_path, text: str | None):
    files = {} if text is None else {h: text for h in probe.header[:1]}
    headers = _debian_tree(tmp_path, files)
    return probes.check_header(probe, probes.include_dirs(headers))


def test_every_header_probe_has_a_sample():
    assert {p.name for p in HEADER_PROBES} == set(SAMPLES)


@pytest.mark.parametrize("probe", HEADER_PROBES, ids=lambda p: p.name)
def test_header_probe_true_with_its_declaration(probe, tmp_path):
    res = _check(probe, tmp_path, f"/* SPDX */\n#include <linux/types.h>\n\n{SAMPLES[probe.name]}\n")
    assert res.value, res.evidence
    assert probe.header[0] in res.evidence
    if probe.find:                                  # the line of the declaration is named
        assert re.search(r"line \d+", res.evidence)


@pytest.mark.parametrize("probe", HEADER_PROBES, ids=lambda p: p.name)
def test_header_probe_false_without_it(probe, tmp_path):
    if not probe.find:                              # the answer is the file itself
        res = _check(probe, tmp_path, None)
        assert not res.value and res.evidence == f"no <{probe.header[0]}>"
        return
    sample = SAMPLES[probe.name]
    line_comments = "".join(f"// {line}\n" for line in sample.splitlines())
    res = _check(probe, tmp_path, f"/*\n * {sample}\n */\n{line_comments}{NEAR_MISSES.get(probe.name, '')}\n")
    assert not res.value, f"{probe.name}: {res.evidence}"
    assert res.evidence.startswith("not declared in <")


def test_header_probe_false_when_no_header_exists(tmp_path):
    probe = next(p for p in TABLE if p.name == "nf_conncount_count_skb")
    res = _check(probe, tmp_path, None)
    assert not res.value and "none exist" in res.evidence


def test_every_find_must_match(tmp_path):
    """timer_delete wants both timer_delete() and timer_delete_sync()."""
    probe = next(p for p in TABLE if p.name == "timer_delete")
    assert not _check(probe, tmp_path, "extern int timer_delete(struct timer_list *timer);\n").value


def test_build_tree_layout_and_arch_headers_first(tmp_path):
    """A make O= tree: generated headers in the build dir, the rest behind ``source``;
    <asm/...> resolves to the arch directory before include/."""
    src, obj = tmp_path / "src", tmp_path / "build"
    (src / "arch/x86/include/asm").mkdir(parents=True)
    (src / "include/asm").mkdir(parents=True)
    (src / "arch/x86/include/asm/unaligned.h").write_text("arch\n")
    (src / "include/asm/unaligned.h").write_text("generic\n")
    obj.mkdir()
    (obj / "source").symlink_to(src)
    dirs = probes.include_dirs(obj)
    assert probes.resolve(dirs, "asm/unaligned.h").read_text() == "arch\n"
    assert probes.resolve(dirs, "linux/unaligned.h") is None
    assert probes.source_roots(obj) == [src.resolve()]


def test_headers_version_from_code_and_from_macros(tmp_path):
    headers = _debian_tree(tmp_path, {})
    assert probes.headers_version(headers) == (6, 9, 0)
    (headers / "include/generated/uapi/linux/version.h").write_text(
        "#define LINUX_VERSION_CODE 393727\n#define LINUX_VERSION_MAJOR 6\n"
        "#define LINUX_VERSION_PATCHLEVEL 1\n#define LINUX_VERSION_SUBLEVEL 300\n")
    assert probes.headers_version(headers) == (6, 1, 300)     # the code caps the sublevel at 255


def test_version_says():
    by = {p.name: p for p in TABLE}
    assert probes.version_says(by["nf_conncount_count_skb"], (6, 1, 192)) is False
    assert probes.version_says(by["nf_conncount_count_skb"], (6, 19, 0)) is True
    assert probes.version_says(by["strlcpy"], (6, 7, 12)) is True       # until 6.8
    assert probes.version_says(by["strlcpy"], (6, 8, 0)) is False
    assert probes.version_says(by["xt_fragoff_u16"], (6, 1, 0)) is None  # no release given


def test_missing_for_names_only_used_features_without_fallback():
    results = [probes.Result(p.name, p.name != "nf_conncount_count_skb", p.how, "x") for p in TABLE]
    src = "static int f(void)\n{\n\treturn nf_conncount_count_skb(net, skb, 2, d, k);\n}\n"
    assert [p.name for p, _ in probes.missing_for(src, TABLE, results)] == ["nf_conncount_count_skb"]
    assert probes.missing_for("/* nf_conncount_count_skb() */\n", TABLE, results) == []
    everything_missing = [dataclasses.replace(r, value=False) for r in results]
    # fallbacks (timer_container_of, ...) never refuse; uses without a match never refuse
    src = "x = timer_container_of(p, t, timer);\nproc_create_net_single_write(a);\n"
    assert [p.name for p, _ in probes.missing_for(src, TABLE, everything_missing)] == \
        ["proc_create_net_single_write"]


def test_header_comments_say_how_and_what_a_version_check_would_say(tmp_path):
    headers = _debian_tree(tmp_path, {})
    kernel = type("K", (), {"release": "6.9.0-1-cloud-amd64", "headers": str(headers)})()
    results = [probes.Result(p.name, p.name in ("nf_conncount_count_skb", "strlcpy"), p.how,
                             f"evidence of {p.name}") for p in TABLE]
    text = probes.render_header(kernel, TABLE, results)
    assert "#define NFLAB_HAVE_NF_CONNCOUNT_COUNT_SKB 1" in text
    assert "#define NFLAB_HAVE_TIMER_CONTAINER_OF 0" in text
    block = text.split("NFLAB_HAVE_NF_CONNCOUNT_COUNT_SKB")[0].rsplit("/*", 1)[1]
    assert "evidence of nf_conncount_count_skb" in block
    assert "mainline since 6.19: a version check says 0, WRONG here" in block
    block = text.split("NFLAB_HAVE_STRLCPY")[0].rsplit("/*", 1)[1]
    assert "until 6.8: a version check says 0, WRONG here" in block
    block = text.split("NFLAB_HAVE_TIMER_CONTAINER_OF")[0].rsplit("/*", 1)[1]
    assert "as here" in block and "without it: from_timer()" in block
    assert "#error" not in text and all(len(line) <= 100 for line in text.splitlines())
    assert text.count("#define NFLAB_HAVE_") == len(TABLE)


def test_compat_keys_on_probes_not_versions():
    compat = probes._uncommented((KMODS_TEMPLATES / "compat_nflab.h").read_text())
    assert not re.search(r"LINUX_VERSION_CODE|KERNEL_VERSION|#\s*error", compat)
    assert '#include "nflab_features.h"' in compat
    used = set(re.findall(r"\bNFLAB_HAVE_(\w+)", compat)) - {"NETDEV_INGRESS", "NETDEV_EGRESS"}
    assert used <= {p.name.upper() for p in TABLE}


@pytest.mark.parametrize("row, complaint", [
    ({"name": "x", "what": "w", "how": "guess", "header": ["a.h"]}, "how"),
    ({"name": "x", "what": "w", "how": "header", "header": ["a.h"], "colour": 1}, "unknown field"),
    ({"name": "X-y", "what": "w", "how": "header", "header": ["a.h"]}, "identifier"),
    ({"name": "x", "what": "w", "how": "header", "header": []}, "no header"),
    ({"name": "x", "what": "w", "how": "compile", "header": ["a.h"]}, "needs `code`"),
    ({"name": "x", "what": "w", "how": "header", "header": ["a.h"], "find": "("}, "bad regex"),
    ({"name": "x", "what": "w", "how": "header", "header": ["a.h"], "since": "6"}, "MAJOR.MINOR"),
    ({"name": "x", "what": "w", "how": "header", "header": ["a.h"], "uses": "x",
      "fallback": "y"}, "without a fallback"),
    ({"name": "x", "what": "w", "how": "any", "of": ["a"]}, "two or more"),
    ({"name": "x", "what": "w", "how": "any", "of": ["a", "b"], "header": ["a.h"]}, "no `header`"),
    ({"name": "x", "what": "w", "how": "header", "header": ["a.h"], "of": ["a", "b"]}, "is for how"),
])
def test_bad_table_rows_are_refused(row, complaint, tmp_path):
    table = tmp_path / "probes.toml"
    lines = ["[[probe]]"] + [f"{k} = {_toml(v)}" for k, v in row.items()]
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=re.escape(complaint)):
        probes.load_table(table)


def test_duplicate_names_are_refused(tmp_path):
    table = tmp_path / "probes.toml"
    row = '[[probe]]\nname = "x"\nwhat = "w"\nhow = "header"\nheader = "a.h"\n'
    table.write_text(row + row)
    with pytest.raises(SpecError, match="given twice: x"):
        probes.load_table(table)


def test_any_probe_names_earlier_probes(tmp_path):
    table = tmp_path / "probes.toml"
    row = '[[probe]]\nname = "{}"\nwhat = "w"\nhow = "header"\nheader = "a.h"\n'
    either = '[[probe]]\nname = "either"\nwhat = "w"\nhow = "any"\nof = ["a", "b"]\n'
    table.write_text(row.format("a") + either + row.format("b"))
    with pytest.raises(SpecError, match="names b, not a probe given before it"):
        probes.load_table(table)
    table.write_text(row.format("a") + row.format("b") + either)
    assert [p.how for p in probes.load_table(table)] == ["header", "header", "any"]


@pytest.mark.parametrize("have", ["genl_mcast_cap_net_admin", "genl_mcgrp_cap_sys_admin", None])
def test_genl_mcgrp_privileged_is_either_form(have, tmp_path):
    """The real table's "any" probe on header trees with one form, the other, neither."""
    dirs = probes.include_dirs(_debian_tree(tmp_path, {
        "net/genetlink.h": SAMPLES[have] if have else NEAR_MISSES["genl_mcgrp_cap_sys_admin"]}))
    by_name = {p.name: probes.check_header(p, dirs) for p in HEADER_PROBES}
    res = probes.decide_any(next(p for p in TABLE if p.name == "genl_mcgrp_privileged"), by_name)
    assert res.value == bool(have), res.evidence
    assert res.evidence.startswith(f"{have}: declared in <net/genetlink.h>") if have else \
        res.evidence == "none of genl_mcast_cap_net_admin, genl_mcgrp_cap_sys_admin"


def _toml(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, int):
        return str(v)
    return "'" + v + "'"


# ---------------------------------------------------------------- real headers (slow)

@pytest.mark.slow
def test_real_headers_differ_from_version_checks():
    """Debian's 6.1.192 has three APIs mainline gained after 6.1; 6.1 keeps the
    family form of nf_conncount_init(); a header exists only from 6.12."""
    from tests.conftest import get_kernel
    k61, k612 = get_kernel("6.1"), get_kernel("6.12")
    got = {line: {r.name: r for r in probes.features(k)[0]} for line, k in (("6.1", k61), ("6.12", k612))}
    version = probes.headers_version(Path(k61.headers))
    assert version[:2] == (6, 1)
    by = {p.name: p for p in TABLE}
    for name in ("nf_conncount_count_skb", "timer_delete", "get_random_u32_below"):
        assert got["6.1"][name].value, got["6.1"][name]
        assert probes.version_says(by[name], version) is False      # the version check is wrong
    assert not got["6.1"]["nf_conncount_init_keylen"].value
    assert "incompatible pointer type" in got["6.1"]["nf_conncount_init_keylen"].evidence
    assert got["6.12"]["nf_conncount_init_keylen"].value
    assert got["6.1"]["strlcpy"].value and not got["6.12"]["strlcpy"].value
    assert not got["6.1"]["linux_unaligned_h"].value and got["6.12"]["linux_unaligned_h"].value
    for line in got:
        assert not got[line]["timer_container_of"].value
        assert got[line]["xt_fragoff_u16"].value


# Every compat name, used as a template would.
COMPAT_USER = textwrap.dedent("""\
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/netdevice.h>
    #include <linux/proc_fs.h>
    #include <linux/random.h>
    #include <linux/timer.h>
    #include <net/netfilter/nf_conntrack_count.h>
    #include <net/netlink.h>
    #include "compat_nflab.h"

    struct holder {
    	struct timer_list timer;
    	char name[IFNAMSIZ];
    };

    static void holder_fire(struct timer_list *t)
    {
    	struct holder *h = nflab_timer_container_of(h, t, timer);

    	nflab_strscpy(h->name, "x", sizeof(h->name));
    }

    int nflab_compat_use(struct net *net, struct net_device *dev, struct inode *inode,
    		     const struct nlattr *nla);
    int nflab_compat_use(struct net *net, struct net_device *dev, struct inode *inode,
    		     const struct nlattr *nla)
    {
    	struct nf_conncount_data *data = nflab_conncount_init(net, NFPROTO_IPV4, 8);
    	struct holder h = {};

    	nflab_nla_strscpy(h.name, nla, sizeof(h.name));

    	timer_setup(&h.timer, holder_fire, 0);
    	nflab_timer_delete(&h.timer);
    	nflab_timer_delete_sync(&h.timer);
    	if (!IS_ERR(data))
    		nflab_conncount_destroy(net, NFPROTO_IPV4, data);
    	return nflab_get_random_u32_below(10) + (nflab_pde_data(inode) ? 1 : 0) +
    	       (int)strlen(nflab_hook_name(NFPROTO_IPV4, NF_INET_FORWARD));
    }

    nflab_module_import_ns(NFLAB_TEST);
    MODULE_LICENSE("GPL");
    """)

# Fallbacks whose replacement API the kernel still has, so forcing the probe to 0
# must build too: every #else branch of compat_nflab.h is compiled somewhere.
FORCED = {"6.1": ("timer_delete", "get_random_u32_below"),
          "6.12": ("timer_delete",)}


@pytest.mark.slow
@pytest.mark.parametrize("line", ["6.1", "6.12"])
def test_compat_builds_with_probed_and_forced_fallback_features(line, tmp_path):
    from tests.conftest import get_kernel
    kernel = get_kernel(line)
    _, header = probes.features(kernel)
    text = header.read_text()
    variants = {"probed": text}
    for name in FORCED[line]:
        macro = f"NFLAB_HAVE_{name.upper()}"
        assert f"#define {macro} 1" in text, f"{name} is already 0 on {line}"
        variants[f"no_{name}"] = text.replace(f"#define {macro} 1", f"#define {macro} 0")
    objects = []
    for label, features_h in variants.items():
        d = tmp_path / label
        d.mkdir()
        shutil.copy(KMODS_TEMPLATES / "compat_nflab.h", d)
        (d / probes.FEATURES_H).write_text(features_h)
        (tmp_path / f"{label}.c").write_text(COMPAT_USER.replace('"compat_nflab.h"',
                                                                 f'"{label}/compat_nflab.h"'))
        objects.append(f"{label}.o")
    (tmp_path / "Kbuild").write_text("".join(f"obj-m += {o}\n" for o in objects) +
                                     "ccflags-y += -Werror\n")
    res = probes.kbuild_objects(kernel, tmp_path, objects)
    missing = [o for o in objects if not (tmp_path / o).is_file()]
    assert not missing, f"{missing} did not build on {kernel.release}:\n{res.stdout}{res.stderr}"


@pytest.mark.slow
def test_extension_calling_a_missing_api_is_refused_before_kbuild(tmp_path, fresh_build, monkeypatch):
    """A table where timer_container_of has no fallback: an extension calling it is
    refused on 6.12 (whose headers lack it) with one line naming it, and Kbuild never runs."""
    from kmods import build
    from tests.conftest import HOOK_RAW, get_kernel
    kernel = get_kernel("6.12")
    table = tmp_path / "probes.toml"
    text = probes.TABLE.read_text()
    text = text.replace('since = "6.16"\nfallback = "from_timer()"',
                        "since = \"6.16\"\nuses = '\\btimer_container_of\\s*\\('")
    assert text != probes.TABLE.read_text()
    table.write_text(text)
    monkeypatch.setattr(probes, "TABLE", table)
    folder = tmp_path / "cat" / "nflhook"
    folder.mkdir(parents=True)
    (folder / "nflab_nflhook.c.j2").write_text(
        '{% extends "hook.c.j2" %}\n{% block helpers %}\n'
        "static void __maybe_unused nflhook_fire(struct timer_list *t)\n{\n"
        "\tvoid *p = timer_container_of(p, t, entry);\n}\n\n{% endblock %}\n")
    ext = spec.validate(copy.deepcopy(HOOK_RAW), folder / "ext.toml")
    with pytest.raises(probes.MissingFeature) as info:
        build.build_extension(ext, kernel, with_plugin=False)
    msg = str(info.value)
    assert "timer_container_of" in msg and kernel.release in msg and "\n" not in msg
    out = fresh_build / kernel.release / ext.name
    assert not (out / "build.log").exists() and not list(out.glob("*.o"))
    assert "#define NFLAB_HAVE_TIMER_CONTAINER_OF 0" in (out / probes.FEATURES_H).read_text()
