"""The kit's one Kconfig parser (fragments, cached configs, a guest's config)."""

from __future__ import annotations

import pytest

from ground import kconfig
from ground.errors import KernelError


def test_fragment_lines_parse_including_unset_and_strings():
    text = ('# a comment\n\nCONFIG_KASAN=y\n# CONFIG_KASAN_OUTLINE is not set\n'
            'CONFIG_LOCALVERSION="-x y"\nCONFIG_NR_CPUS=8\nCONFIG_VETH=m\n')
    assert kconfig.parse(text) == {"CONFIG_KASAN": "y", "CONFIG_KASAN_OUTLINE": "n",
                                   "CONFIG_LOCALVERSION": '"-x y"', "CONFIG_NR_CPUS": "8",
                                   "CONFIG_VETH": "m"}


@pytest.mark.parametrize("bad", ["KASAN=y", "CONFIG_KASAN y", "make menuconfig", "CONFIG_=y"])
def test_a_line_that_is_no_option_is_named(bad):
    with pytest.raises(KernelError, match=r"frag.config:2: not a Kconfig option line") as info:
        kconfig.parse(f"CONFIG_X=y\n{bad}\n", "frag.config")
    assert "CONFIG_NAME=y" in info.value.hint and "fetch" in info.value.hint


def test_a_guest_config_among_other_output_is_read_leniently():
    text = "zcat: /proc/config.gz: No such file\nCONFIG_NF_TABLES=m\n# CONFIG_NFT_COMPAT is not set\n"
    assert kconfig.parse(text, strict=False) == {"CONFIG_NF_TABLES": "m", "CONFIG_NFT_COMPAT": "n"}


def test_value_unquotes_and_reads_not_set_as_absent(tmp_path):
    path = tmp_path / ".config"
    path.write_text('CONFIG_MODULES=y\nCONFIG_LOCALVERSION="-nflab"\n# CONFIG_KASAN is not set\n')
    config = kconfig.read(path)
    assert kconfig.value(config, "MODULES") == "y"
    assert kconfig.value(config, "CONFIG_LOCALVERSION") == "-nflab"
    assert kconfig.value(config, "KASAN") is None and kconfig.value(config, "NOPE") is None
