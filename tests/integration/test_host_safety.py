from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ground import proc
from ground.paths import REPO

LOADERS = {"insmod", "modprobe", "rmmod", "kmod"}

# Host-side execution: these callables (reached through any import alias) run
# their command on the host. The value says where the command is: the index of
# the positional argument holding argv (a list) or a command line (a string), or
# "argv" when the positional arguments themselves are argv. Methods of other
# objects (guest.run(), host.run(), lab.exec(vm, ...)) run inside the VM over
# ssh and are not scanned.
HOST_EXEC = {
    **{f"subprocess.{n}": 0 for n in ("run", "Popen", "call", "check_call", "check_output",
                                       "getoutput", "getstatusoutput")},
    **{f"os.{n}": 0 for n in ("system", "popen", "execv", "execve", "execvp", "execvpe", "execl",
                               "execle", "execlp", "execlpe", "posix_spawn", "posix_spawnp")},
    **{f"os.{n}": 1 for n in ("spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                               "spawnlp", "spawnlpe")},
    "asyncio.create_subprocess_exec": "argv", "asyncio.create_subprocess_shell": 0,
    "pty.spawn": 0,
    # the kit's own wrappers of subprocess (ground/proc.py)
    "ground.proc.run": 0, "ground.proc.run_group": 0,
}
# a bare call of one of these names that no import explains (a local wrapper,
# say) is taken as host-side too, as before the import resolution
BARE_EXEC = {"run", "run_group", "Popen", "call", "check_call", "check_output", "system", "execvp"}
# commands that run the rest of their argv on the host / shells whose -c runs a script
PREFIXES = {"sudo", "doas", "env", "nice", "ionice", "nohup", "setsid", "timeout", "unshare",
            "nsenter", "stdbuf", "busybox", "exec", "command", "xargs"}
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "ash"}
# the command after these runs in the guest
REMOTE = {"ssh", "scp", "sftp", "dbclient"}
_SHELL_KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "time", "{"}
_UNKNOWN = "\0"   # stands for an f-string's formatted value


# ---- the scanner -------------------------------------------------------------------

def kit_packages(root: Path = REPO) -> list[str]:
    """Every package of the kit: the import-linter root packages and setuptools
    packages of pyproject.toml, and every top-level folder with an __init__.py
    (a new package is scanned without editing this test); not tests/."""
    conf = tomllib.loads((root / "pyproject.toml").read_text()) if (root / "pyproject.toml").is_file() else {}
    tool = conf.get("tool", {})
    names = set(tool.get("importlinter", {}).get("root_packages", []))
    names |= set(tool.get("setuptools", {}).get("packages", []))
    names |= {p.parent.name for p in root.glob("*/__init__.py")}
    return sorted(n for n in names - {"tests"} if (root / n).is_dir())


def kit_files(root: Path = REPO) -> list[Path]:
    """The kit's Python files: every package's, and the top-level modules (tasks.py)."""
    files = sorted(root.glob("*.py"))
    for pkg in kit_packages(root):
        files += sorted((root / pkg).rglob("*.py"))
    return files


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def _aliases(tree: ast.AST, module: str = "", is_pkg: bool = False) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import in *tree*."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                base = ".".join([*pkg, *([base] if base else [])])
            for a in node.names:
                out[a.asname or a.name] = f"{base}.{a.name}" if base else a.name
    return out


def _dotted(func: ast.AST, aliases: dict[str, str]) -> tuple[str, bool] | None:
    """The dotted name *func* resolves to and whether its root name came from an import."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    root = aliases.get(func.id)
    return ".".join([root or func.id, *reversed(parts)]), root is not None


def _literals(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """name -> the values assigned to it anywhere in the module (cmd = [...] ; run(cmd))."""
    out: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            out.setdefault(node.target.id, []).append(node.value)
    return out


def _text(node: ast.AST) -> str | None:
    """A string literal or f-string (formatted values as _UNKNOWN), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else _UNKNOWN for v in node.values)
    return None


def _argv_loaders(words: list[str | None]) -> list[str]:
    """The loader that argv *words* runs on the host ([] when none or unknown)."""
    for i, w in enumerate(words):
        if w is None or _UNKNOWN in w:
            return []
        base = os.path.basename(w)
        if base in REMOTE:
            return []
        if base in LOADERS:
            return [w]
        if base in SHELLS:
            for j in range(i + 1, len(words) - 1):
                if words[j] and re.fullmatch(r"-[a-z]*c", words[j]):
                    return _shell_loaders(words[j + 1]) if words[j + 1] else []
            return []
        if base in PREFIXES or (i and (w.startswith("-") or "=" in w or w.replace(".", "").isdigit())):
            continue
        return []
    return []


def _shell_loaders(text: str) -> list[str]:
    """Loaders a shell command line runs (each command of a list or pipeline)."""
    found = []
    for part in re.split(r"\$\(|[;&|\n()`]", text):
        words = part.split()
        while words and words[0] in _SHELL_KEYWORDS:
            words.pop(0)
        found += _argv_loaders(words)
    return found


def _command_loaders(node: ast.AST | None, names: dict, depth: int = 0) -> list[str]:
    """Loaders the command in *node* (argv list/tuple, command string, or a name
    assigned one of those in the module) runs."""
    if node is None or depth > 3:
        return []
    text = _text(node)
    if text is not None:
        return _shell_loaders(text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _list_words(node.left, names, depth), _list_words(node.right, names, depth)
        if left is not None and right is not None:
            return _argv_loaders(left + right)
        return _command_loaders(node.left, names, depth + 1) if left is None else []
    if isinstance(node, (ast.List, ast.Tuple)):
        return _argv_loaders(_list_words(node, names, depth) or [])
    if isinstance(node, ast.Name):
        return [c for v in names.get(node.id, []) for c in _command_loaders(v, names, depth + 1)]
    return []


def _list_words(node, names, depth) -> list[str | None] | None:
    if isinstance(node, ast.Name) and len(names.get(node.id, [])) == 1 and depth < 3:
        return _list_words(names[node.id][0], names, depth + 1)
    if not isinstance(node, (ast.List, ast.Tuple)):
        return None
    words = []
    for e in node.elts:
        if isinstance(e, ast.Starred):
            inner = _list_words(e.value, names, depth + 1)
            words += inner if inner is not None else [None]
        else:
            words.append(_text(e))
    return words


def _host_exec_calls(tree: ast.AST, module: str = "", is_pkg: bool = False):
    """(lineno, loader) of every host-side call (HOST_EXEC through any import
    alias, or a bare BARE_EXEC name) whose command runs a module loader."""
    aliases = _aliases(tree, module, is_pkg)
    names = _literals(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        got = _dotted(node.func, aliases)
        if got is None:
            continue
        dotted, imported = got
        where = HOST_EXEC.get(dotted)
        if where is None and isinstance(node.func, ast.Name) and not imported and dotted in BARE_EXEC:
            where = 0
        if where is None:
            continue
        if where == "argv":
            cmds = _argv_loaders([_text(a) for a in node.args])
        else:
            arg = node.args[where] if len(node.args) > where else next(
                (k.value for k in node.keywords if k.arg in ("args", "cmd", "command", "path")), None)
            cmds = _command_loaders(arg, names)
        for cmd in cmds:
            yield node.lineno, cmd


def scan(root: Path = REPO) -> list[str]:
    offenders = []
    for path in kit_files(root):
        tree = ast.parse(path.read_text(), str(path))
        found = _host_exec_calls(tree, _module_name(path, root), path.name == "__init__.py")
        offenders += [f"{path.relative_to(root)}:{ln}: {cmd}" for ln, cmd in found]
    return offenders


# ---- the kit --------------------------------------------------------------------

def test_every_kit_package_and_tasks_py_is_scanned():
    pkgs = kit_packages()
    assert {"cli", "ground", "supply", "kmods", "userspace_ext", "vm", "nflab"} <= set(pkgs), pkgs
    assert "tests" not in pkgs
    files = kit_files()
    assert REPO / "tasks.py" in files and REPO / "ground" / "proc.py" in files
    # the wrappers the scanner knows are the ones ground/proc.py has
    assert all(callable(getattr(proc, d.rsplit(".", 1)[1], None))
               for d in HOST_EXEC if d.startswith("ground.proc."))


def test_no_host_side_module_loader_calls():
    offenders = scan()
    assert not offenders, "host-side module loader calls:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_build_never_calls_a_loader(tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    log = tmp_path / "called.log"
    for tool in LOADERS:
        script = trap / tool
        script.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {log}\nexit 99\n")
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{trap}:{os.environ['PATH']}", NFLAB_BUILD=str(tmp_path / "build"),
               CI="1")
    res = subprocess.run([sys.executable, "-m", "invoke", "build-module", "--name=iprange",
                          "--kernel=6.1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"a module loader was called on the host: {log.read_text()}"


def _found(src: str, module: str = "nflab.x") -> list[str]:
    return [c for _, c in _host_exec_calls(ast.parse(src), module)]


def test_scanner_catches_host_calls_and_ignores_guest_calls():
    src = ("import subprocess, os\nfrom ground.proc import run\n"
           "subprocess.run(['modprobe', 'x'])\nrun(['insmod', 'a.ko'])\n"
           "guest.run('modprobe y')\nhost.run('rmmod z')\nos.system('rmmod z')\n")
    assert _found(src) == ["modprobe", "insmod", "rmmod"]


@pytest.mark.parametrize("src", [
    "import subprocess as sp\nsp.run(['modprobe', 'x'])\n",
    "import subprocess as sp\nsp.Popen(['/sbin/insmod', 'a.ko'])\n",
    "from subprocess import check_call as cc\ncc(['rmmod', 'x'])\n",
    "import os as o\no.system('modprobe x')\n",
    "from os import system as sy\nsy('set -e; rmmod x && insmod y.ko')\n",
    "from ground.proc import run_group\nrun_group(['modprobe', 'x'], timeout=5)\n",
    "from ground.proc import run as prun\nprun(['insmod', 'a.ko'])\n",
    "from ground import proc\nproc.run(['modprobe', 'x'])\n",
    "import ground.proc as gp\ngp.run_group(['rmmod', 'x'], timeout=1)\n",
    "import ground.proc\nground.proc.run(['kmod', 'load'])\n",
    "from .proc import run_group as rg\nrg(['modprobe', 'x'], timeout=5)\n",
    "import subprocess\nsubprocess.run(['sudo', 'modprobe', 'x'])\n",
    "import subprocess\nsubprocess.run(['sh', '-c', f'rmmod {m}; insmod {ko}'])\n",
    "import subprocess\nsubprocess.run(f'modprobe {m}', shell=True)\n",
    "import subprocess\ncmd = ['modprobe', 'x']\nsubprocess.run(cmd)\n",
    "import subprocess\nsubprocess.run(['nsenter', '-t', '1', '-m', 'modprobe', 'x'])\n",
    "import asyncio\nasyncio.create_subprocess_exec('insmod', 'a.ko')\n",
])
def test_scanner_resolves_aliases_wrappers_and_shells(src):
    assert _found(src, "ground.x"), src


@pytest.mark.parametrize("src", [
    "from ground.proc import run\nrun(['ssh', 'guest', 'modprobe x'])\n",
    "import subprocess\nsubprocess.run(['apt-get', 'install', 'kmod'])\n",
    "from vm import lab\nlab.exec(vm, f'rmmod {m}; insmod {ko}')\n",
    "from vm import remote\nremote.run(host, 'modprobe x')\n",
    "def f(guest):\n    guest.run('modprobe nfnetlink_hook')\n",
    "import subprocess\nsubprocess.run([f'{tool}', 'x'])\n",
])
def test_scanner_leaves_guest_and_harmless_calls_alone(src):
    assert not _found(src), src


def test_a_new_package_is_scanned_without_editing_this_test(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.importlinter]\nroot_packages = ["ground"]\n')
    (tmp_path / "ground").mkdir()
    (tmp_path / "ground" / "__init__.py").write_text("")
    (tmp_path / "newpkg" / "sub").mkdir(parents=True)
    (tmp_path / "newpkg" / "__init__.py").write_text("")
    (tmp_path / "newpkg" / "sub" / "m.py").write_text(
        "import subprocess as sp\nsp.run(['modprobe', 'x'])\n")
    (tmp_path / "tasks.py").write_text("from ground.proc import run_group\nrun_group(['rmmod', 'y'], timeout=1)\n")
    assert scan(tmp_path) == ["tasks.py:2: rmmod", "newpkg/sub/m.py:2: modprobe"]
