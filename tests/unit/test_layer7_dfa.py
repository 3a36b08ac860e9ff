"""The layer7 pattern compiler (kmods/catalog/layer7/layer7_dfa.c), compiled on
the host into a small harness: every automaton it builds must decide exactly
what a regex search decides (Python's ``re``: the same search semantics,
ASCII case folding, the data's NUL bytes removed first), for the kit's own
pattern set and for randomly generated patterns; what it refuses, it refuses
with a message naming the construct; ``.pat`` files are read as l7-filter
reads them."""

from __future__ import annotations

import random
import re
import subprocess

import pytest

from kmods.spec import CATALOG

LAYER7 = CATALOG / "layer7"
PROTOCOLS = LAYER7 / "protocols"
MAX_STATES, MAX_TABLE = 256, 8192

# reads commands from stdin, one per line:
#   c <hex pattern>         compile; prints "ok STATES CLASSES ACCEPT DEAD" or "error MESSAGE"
#   m <hex data>            walk the last automaton as the kernel does; prints 0 or 1
#   f <dir> <proto>         find and compile <proto>.pat under dir; prints path, then as c
HARNESS = r"""
#define _GNU_SOURCE
#include "layer7_dfa.c"

static struct l7_dfa dfa;

static size_t unhex(const char *s, char *out)
{
	size_t n = 0;

	while (s[0] && s[1] && s[0] != '\n') {
		out[n++] = l7_hexval(s[0]) << 4 | l7_hexval(s[1]);
		s += 2;
	}
	return n;
}

static void report(int ret, const char *err)
{
	if (ret)
		printf("error %s\n", err);
	else
		printf("ok %u %u %d %d\n", dfa.states, dfa.classes,
		       dfa.accept == L7_NONE ? -1 : (int)dfa.accept,
		       dfa.dead == L7_NONE ? -1 : (int)dfa.dead);
}

int main(void)
{
	static char line[65536], buf[32768], err[512], path[4096];
	size_t n, i;

	while (fgets(line, sizeof(line), stdin)) {
		if (line[0] == 'c') {
			free(dfa.next);
			n = unhex(line + 2, buf);
			report(l7_compile(buf, n, &dfa, %MAX_STATES%, %MAX_TABLE%, err, sizeof(err)), err);
		} else if (line[0] == 'f') {
			char dir[2048], proto[256];
			int ret;

			free(dfa.next);
			dfa.next = NULL;
			sscanf(line + 2, "%2047s %255s", dir, proto);
			ret = l7_find_pat(dir, proto, path, sizeof(path), buf, sizeof(buf), err,
					  sizeof(err));
			if (!ret)
				ret = l7_compile(buf, strlen(buf), &dfa, %MAX_STATES%, %MAX_TABLE%, err,
						 sizeof(err));
			printf("%s\n", ret ? "-" : path);
			report(ret, err);
		} else {
			unsigned int s = 0;

			n = unhex(line + 2, buf);
			for (i = 0; i < n && s != dfa.accept; i++)
				if (buf[i])
					s = dfa.next[s * dfa.classes + dfa.class_of[(unsigned char)buf[i]]];
			printf("%d\n", s == dfa.accept);
		}
		fflush(stdout);
	}
	return 0;
}
""".replace("%MAX_STATES%", str(MAX_STATES)).replace("%MAX_TABLE%", str(MAX_TABLE))


class Harness:
    def __init__(self, exe):
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, line: str, answers: int = 1) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return [self.proc.stdout.readline().strip() for _ in range(answers)]

    def compile(self, pattern: bytes) -> str:
        return self._ask("c " + pattern.hex())[0]

    def matches(self, data: bytes) -> bool:
        return self._ask("m " + data.hex())[0] == "1"

    def find(self, directory, proto) -> tuple[str, str]:
        path, result = self._ask(f"f {directory} {proto}", 2)
        return path, result


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    d = tmp_path_factory.mktemp("l7")
    (d / "harness.c").write_text(HARNESS)
    exe = d / "harness"
    res = subprocess.run(["gcc", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                          f"-I{LAYER7}", "-o", str(exe), str(d / "harness.c")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    h = Harness(exe)
    yield h
    h.proc.stdin.close()
    h.proc.wait(timeout=10)


def expected(pattern: bytes, data: bytes) -> bool:
    """l7-filter's semantics: search, ASCII case-insensitive, NULs stripped from the data."""
    return re.search(pattern, data.replace(b"\0", b""), re.IGNORECASE | re.DOTALL) is not None


def pattern_of(path) -> bytes:
    """The regex line of a .pat file (as l7_read_pat reads it)."""
    lines = [ln for ln in path.read_bytes().splitlines() if ln and not ln.startswith(b"#")]
    return lines[1]


# ---- the kit's pattern set ------------------------------------------------

def http(first, *headers):
    return (first + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


TLS12_HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(range(32)) + bytes.fromhex("20") + bytes(32)
SAMPLES = {
    "http": [http("GET / HTTP/1.1", "Host: 10.77.2.2"), http("post /form HTTP/1.0"),
             b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"OPTIONS * HTTP/1.1\r\n",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
    "ssh": [b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", b"SSH-2.0-dropbear_2022.83\r\n",
            b"SSH-1.99-Cisco-1.25\r\n"],
    "ssl": [TLS12_HELLO, bytes.fromhex("160301020001") + bytes.fromhex("0001fc0303") + b"r" * 32,
            bytes.fromhex("160303004a0100004603") + b"\x01" + b"x" * 32],
    "dns": [bytes.fromhex("ab12 0100 0001 0000 0000 0000") + b"\x03www\x07example\x04test\x00\x00\x01\x00\x01",
            bytes.fromhex("0000 0120 0001 0000 0000 0001") + b"\x07example\x03org\x00\x00\x1c\x00\x01",
            bytes.fromhex("ab12 8180 0001 0001 0000 0000") + b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"],
    "bittorrent": [b"\x13BitTorrent protocol" + bytes(8) + b"i" * 20 + b"-NF0001-abcdefghijkl",
                   b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe",
                   b"GET /announce?info_hash=%40%41&peer_id=x HTTP/1.0\r\n",
                   bytes.fromhex("0000041727101980 00000000 1234abcd")],
    "smtp": [b"220 mail.example.test ESMTP Postfix\r\n", b"220 mx.test Service ready\r\nEHLO client.test\r\n",
             b"220-mx.test greeting\r\n220 ready\r\nHELO client\r\n"],
    "ftp": [b"220 ProFTPD Server (Debian) [10.77.2.2]\r\n", b"220 Welcome\r\nUSER anonymous\r\n",
            b"220 (vsFTPd 3.0.3)\r\n"],
}
NEGATIVES = [
    b"", b"hello world\r\n", b"GET/ HTTP/1.1\r\n", b"xGET / HTTP/1.1\r\n", b"GETS / HTTP/1.1\r\n",
    b"SSH-3.0-x\r\n", b"ssh is a protocol", b"\x16\x02\x01\x00\x10\x01", b"\x17\x03\x03\x00\x20" + bytes(32),
    b"220 ready\r\nQUIT\r\n", b"BitTorrent protocol", b"\x12BitTorrent protocol",
    b"HTTP/1.1 999 nonsense", b"random \x01\x02\x03 bytes \xff\xfe",
]


def test_pattern_set_has_the_protocols_the_issue_names():
    names = sorted(p.stem for p in PROTOCOLS.glob("*.pat"))
    assert {"http", "ssh", "ssl", "dns", "bittorrent", "smtp", "ftp"} <= set(names), names


@pytest.mark.parametrize("proto", sorted(SAMPLES))
def test_pattern_set_compiles_and_decides_like_re(harness, proto):
    path, result = harness.find(PROTOCOLS, proto)
    assert path == f"{PROTOCOLS}/{proto}.pat" and result.startswith("ok "), result
    states, classes = map(int, result.split()[1:3])
    assert states <= MAX_STATES and states * classes <= MAX_TABLE
    pattern = pattern_of(PROTOCOLS / f"{proto}.pat")
    for sample in SAMPLES[proto]:
        assert expected(pattern, sample), f"{proto}: re does not match {sample!r} either"
        assert harness.matches(sample), f"{proto}: {sample!r}"
    others = [s for p, ss in SAMPLES.items() if p != proto for s in ss]
    for data in NEGATIVES + others:
        assert harness.matches(data) == expected(pattern, data), f"{proto}: {data!r}"


@pytest.mark.parametrize("proto", ["http", "ssh", "ssl", "dns", "bittorrent", "smtp", "ftp"])
def test_pattern_set_is_exclusive(harness, proto):
    """A sample of one protocol matches no other protocol's pattern (FTP and SMTP
    greetings both start with 220: each is told apart by its own words), but
    for a BitTorrent tracker announce, which is an HTTP request."""
    harness.find(PROTOCOLS, proto)
    for other, samples in SAMPLES.items():
        for s in samples:
            if other != proto and not (proto == "http" and s.startswith(b"GET /announce")):
                assert not harness.matches(s), f"{proto} matches the {other} sample {s!r}"


# ---- random patterns against re ---------------------------------------------

ATOMS = [b"a", b"b", b"A", b"B", b"c", b"\\x01", b".", b"[ab]", b"[^a]", b"[a-c]", b"[\\x01-b]",
         b"[^\\x01B]", b"\\.", b"[[:upper:]]"]


def _gen(rng, depth=0) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.2 and depth < 3:
            item = b"(" + _gen(rng, depth + 1) + b")"
        else:
            item = rng.choice(ATOMS)
        if rng.random() < 0.35:
            item = (b"(" + item + b")" if len(item) > 1 and not item.startswith(b"(") else item) \
                + rng.choice([b"*", b"+", b"?"])
        parts.append(item)
    alt = b"".join(parts)
    if rng.random() < 0.15:
        alt = b"^" + alt
    if rng.random() < 0.25 and depth < 3:
        alt += b"|" + _gen(rng, depth + 1)
    return alt


def _py(pattern: bytes) -> bytes:
    """Our syntax in Python's: only [[:upper:]] differs."""
    return pattern.replace(b"[[:upper:]]", b"[A-Z]")


def test_random_patterns_decide_like_re(harness):
    rng = random.Random(7)
    alphabet = [b"a", b"b", b"A", b"B", b"c", b"\x00", b"\x01", b".", b"z"]
    checked = 0
    for _ in range(400):
        pattern = _gen(rng)
        result = harness.compile(pattern)
        inputs = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(40)]
        if result.startswith("error"):
            assert "can never match" in result, (pattern, result)
            assert not any(expected(_py(pattern), d) for d in inputs), pattern
            continue
        for data in inputs:
            assert harness.matches(data) == expected(_py(pattern), data), (pattern, data)
            checked += 1
    assert checked > 10000


def test_unanchored_search_finds_the_pattern_anywhere(harness):
    assert harness.compile(b"needle[0-9]+x").startswith("ok ")
    assert harness.matches(b"x" * 3000 + b"NEEDLE12X")
    assert harness.matches(b"\0" * 50 + b"need\0le1\0x")          # NULs are skipped
    assert not harness.matches(b"needle x")


def test_minimal_automata(harness):
    # a literal search of n bytes needs n+1 states (KMP's automaton); anchored adds a dead state
    assert harness.compile(b"abcd").split()[1:3] == ["5", "5"]
    assert harness.compile(b"^abcd").split()[1:] == ["6", "5", "5", "1"]
    # case folding and the equal columns of b and B merge into one class
    assert harness.compile(b"a[bB]").split()[1:3] == ["3", "3"]


@pytest.mark.parametrize("pattern,needle", [
    (b"x$", "'$'"), (b"a{2}", "'{'"), (b"\\d+", "\\d"), (b"(a)\\1", "\\1"), (b"a(b", "( without"),
    (b"a)b", ") without"), (b"*a", "nothing to repeat"), (b"[abc", "[ without"), (b"[z-a]", "reversed"),
    (b"\\x4", "two hex digits"), (b"\\x00", "\\x00 never matches"), (b"[\\x00]", "matches no byte"),
    (b"[[:nope:]]", "unknown class"), (b"a\\", "at the end"),
    (b"(" * 70 + b"a" + b")" * 70, "nested deeper"),
])
def test_refusals_name_the_construct(harness, pattern, needle):
    result = harness.compile(pattern)
    assert result.startswith("error offset ") and needle in result, result


def test_never_matching_and_state_limits_are_reported(harness):
    assert harness.compile(b"a^b") == "error the pattern can never match"
    # a[ab]{n}c searched: the automaton remembers where each a of the last n bytes was:
    # 2^n + 1 states (n = 6 fits the kernel's 256, 7 does not, 12 explodes before minimising)
    assert harness.compile(b"a" + b"[ab]" * 6 + b"c").split()[:2] == ["ok", "129"]
    assert harness.compile(b"a" + b"[ab]" * 7 + b"c") == (
        "error the automaton has 257 states x 4 byte classes; the kernel table holds at most "
        "256 states and 8192 cells")
    assert harness.compile(b"a" + b"[ab]" * 12 + b"c") == (
        "error the automaton needs more than 4096 states before minimisation")


def test_pat_files_as_l7_filter_reads_them(harness, tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "demo.pat").write_text(
        "# comment\n\ndemo  the protocol line may carry words after a space\n^demo[0-9]\r\n"
        "userspace pattern=ignored\n")
    (tmp_path / "wrong.pat").write_text("notwrong\nabc\n")
    (tmp_path / "empty.pat").write_text("# only a comment\nempty\n")
    path, result = harness.find(tmp_path, "demo")
    assert path == f"{tmp_path}/extra/demo.pat" and result.startswith("ok ")
    assert harness.matches(b"DEMO7") and not harness.matches(b"xdemo7")
    assert "names protocol \"notwrong\"" in harness.find(tmp_path, "wrong")[1]
    assert "no pattern line" in harness.find(tmp_path, "empty")[1]
    assert "no pattern file nope.pat" in harness.find(tmp_path, "nope")[1]
    assert "not a protocol name" in harness.find(tmp_path, "../x")[1]


# ---- the extension around the compiler --------------------------------------

def test_plugin_includes_the_compiler_verbatim_and_the_table_fits_the_info():
    from kmods import render, spec
    ext = spec.load("layer7")
    files = render.render(ext)
    compiler = (LAYER7 / "layer7_dfa.c").read_text()
    # Jinja includes the file as it is (but its SPDX line: the plugin has its own, on
    # line 1): the unit tests compile exactly what the plugin does
    compiler = compiler.replace("/* SPDX-License-Identifier: GPL-2.0 */\n", "")
    assert "\n".join(ln.rstrip() for ln in compiler.splitlines() if ln.strip()) in \
        "\n".join(ln for ln in files["libxt_layer7.c"].splitlines() if ln.strip())
    header = files["xt_layer7.h"]
    assert f"__u8 next[{MAX_TABLE}];" in header and "__u8 class_of[256];" in header
    # about the classic l7-filter info (8448 bytes), well within xt's 16-bit sizes
    assert ext.info_size == 8760 and ext.userspace_size == 8752


def test_install_ships_the_pattern_set_into_l7_protocols():
    from nflab import deploy
    files = deploy.guest_files("layer7")
    assert sorted(files) == sorted(f"/etc/l7-protocols/protocols/{p.name}" for p in PROTOCOLS.glob("*.pat"))
    assert files["/etc/l7-protocols/protocols/http.pat"] == (PROTOCOLS / "http.pat").read_bytes()
