"""ground.compiler: gcc's output read for the names a generated source took from
the headers. The outputs below are gcc 12's and gcc 14's own (a.c against a.h
below; the kit's build roots), with ASCII quotes and with LANG's U+2018/U+2019."""

from __future__ import annotations

from pathlib import Path

import pytest

from ground import compiler
from ground.errors import BuildError

# a.h: enum { A_X = 1 }; int f_value(void); int K_X; struct xt_s { int a; };
#      #define M_V(x) ((x) + 1)
# a.c: #include "a.h", then each of them defined again
TWICE = """\
a.c:2:8: error: redeclaration of enumerator 'A_X'
    2 | enum { A_X = 2 };
      |        ^~~
In file included from a.c:1:
a.h:1:8: note: previous definition of 'A_X' with type 'enum <anonymous>'
a.c:3:20: error: conflicting types for 'f_value'; have 'long int(int)'
a.h:2:5: note: previous declaration of 'f_value' with type 'int(void)'
a.c:4:8: error: 'K_X' redeclared as different kind of symbol
a.h:3:5: note: previous declaration of 'K_X' with type 'int'
a.c:5:8: error: redefinition of 'struct xt_s'
a.h:4:8: note: originally defined here
a.c:6:23: error: expected identifier or '(' before 'const'
a.h:5:18: note: in definition of macro 'M_V'
a.h:5:21: error: expected ')' before '+' token
a.c:6:19: note: in expansion of macro 'M_V'
"""

# the kit's xt_ip.h (option --ttl of a match named ip) against 6.12's headers
KBUILD = """\
In file included from /c/kernels/6.12/root/usr/src/linux-headers-6.12.118+deb13-common/include/linux/in.h:19,
                 from /b/ip/xt_ip.c:13:
/c/kernels/6.12/root/usr/src/linux-headers-6.12.118+deb13-common/include/uapi/linux/in.h:100:25: \
error: expected identifier before numeric constant
  100 | #define IP_TTL          2
      |                         ^
/b/ip/xt_ip.h:22:9: note: in expansion of macro \u2018IP_TTL\u2019
   22 |         IP_TTL = 1 << 0,        /* --ttl given */
"""


def test_each_kind_of_name_declared_twice_is_found_with_its_first_site():
    names = {"A_X": "--a", "f_value": "--f", "K_X": "--k", "xt_s": "the name", "M_V": "--m"}
    found = {c.name: c.where for c in compiler.clashes(TWICE, names)}
    assert found == {"A_X": "a.h:1", "f_value": "a.h:2", "K_X": "a.h:3", "xt_s": "a.h:4",
                     "M_V": "a.h:5"}


def test_a_macro_expanded_in_our_header_is_placed_at_its_define_in_the_headers():
    [c] = compiler.clashes(KBUILD, {"IP_TTL": "--ttl"})
    assert (c.name, c.origin, c.where) == ("IP_TTL", "--ttl", "include/uapi/linux/in.h:100")


def test_names_not_ours_and_other_errors_are_no_clash():
    assert compiler.clashes(TWICE, {"B_X": "--b"}) == []
    assert compiler.clashes("x.c:3:5: error: 'nflab_broken' undeclared (first use in this function)\n",
                            {"nflab_broken": "--b"}) == []


def test_a_prefix_claims_the_symbols_a_name_generates():
    out = ("/b/nflab_tcp_v4.c:266:19: error: conflicting types for 'tcp_v4_init'; have 'int(void)'\n"
           "/c/usr/src/linux-headers-6.12.118+deb13-common/include/net/tcp.h:2429:6: note: "
           "previous declaration of 'tcp_v4_init' with type 'void(void)'\n")
    [c] = compiler.clashes(out, {}, {"tcp_v4_": "the name 'tcp_v4'"})
    assert (c.name, c.origin, c.where) == ("tcp_v4_init", "the name 'tcp_v4'", "include/net/tcp.h:2429")


@pytest.mark.parametrize("line, col", [("\tEXIT_FAILURE = 1 << 0,", 9), ("    EXIT_FAILURE = 1,", 5)])
def test_a_system_macro_gcc_does_not_note_is_read_at_the_column(tmp_path: Path, line, col):
    """A macro of a system header (glibc's EXIT_FAILURE) leaves no "in expansion
    of macro" note: the error points at our line, columns counted as displayed."""
    header = tmp_path / "xt_exit.h"
    header.write_text(f"/* x */\n{line}\n")
    out = f"{header}:2:{col}: error: expected identifier before numeric constant\n"
    [c] = compiler.clashes(out, {"EXIT_FAILURE": "--failure"})
    assert (c.name, c.where) == ("EXIT_FAILURE", "")
    err = compiler.failure("plugin libxt_exit.so", out, tmp_path, tmp_path / "plugin.log",
                           {"EXIT_FAILURE": "--failure"})
    assert err.message == ("plugin libxt_exit.so failed to build: --failure generates the C name "
                           "EXIT_FAILURE, which a header it includes already uses")
    assert err.hint.startswith(compiler.FIELD_HINT)


def test_a_failure_without_a_clash_is_the_errors_and_the_log(tmp_path: Path):
    out = f"{tmp_path}/xt_a.c:7:2: error: 'x' undeclared\n"
    err = compiler.failure("kernel module xt_a", out, tmp_path, tmp_path / "build.log", {"A_B": "--b"})
    assert isinstance(err, BuildError)
    assert (err.message, err.hint) == ("kernel module xt_a failed to build", f"full log: {tmp_path / 'build.log'}")
    assert err.detail == f"{tmp_path}/xt_a.c:7: error: 'x' undeclared"


def test_a_name_defined_twice_in_our_own_sources_is_no_clash(tmp_path: Path):
    """A workshop student defines foo_mt twice: renaming the extension would not help."""
    src = tmp_path / "xt_foo.c"
    out = (f"{src}:9:13: error: redefinition of 'foo_mt'\n"
           f"{src}:2:13: note: previous definition of 'foo_mt' with type 'bool(void)'\n")
    assert compiler.clashes(out, {}, {"foo_": "the name 'foo'"}, ours=tmp_path) == []
    err = compiler.failure("kernel module xt_foo", out, tmp_path, tmp_path / "build.log",
                           {}, {"foo_": "the name 'foo'"}, target=" for 6.12")
    assert err.message == "kernel module xt_foo failed to build for 6.12"
