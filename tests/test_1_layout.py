"""The package's shape: pure modules stay pure, no module imports itself back,
and the FUSE side knows no kind of source and no server's state.

Pure modules (formats, sources' rules, views, extents, errors, runtime, the
tree and layout, the NBD specs and pool logic, the data services) must load
neither pyfuse3 nor libnbd nor libvirt, so their tests run without them;
only the modules named in ``IMPURE`` may. Every module is checked, so a new
one is pure unless it is added here on purpose.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "snapfs")

# module -> what it may load (and why).
IMPURE = {
    "snapfs.fs.operations": {"pyfuse3"},  # the FUSE handlers
    "snapfs.fs.attrs": {"pyfuse3"},  # builds pyfuse3.EntryAttributes
    "snapfs.fs.handles": {"pyfuse3"},  # open files answer with FUSE errnos
    "snapfs.fs.control": {"pyfuse3"},  # invalidates entries after a refresh
    "snapfs.fs.mount": {"pyfuse3"},  # the FUSE session
    "snapfs.nbd.client": {"nbd"},  # the one importer of libnbd
    "snapfs.sources.libvirt": {"libvirt"},
    "snapfs.sources.backup": {"libvirt"},
}
WATCHED = ("pyfuse3", "nbd", "libvirt")


def modules() -> list[str]:
    out = []
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py") and f != "__main__.py":  # that one runs the command
                rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                out.append(rel.removesuffix(".__init__"))
    return sorted(out)


def test_pure_modules_load_no_fuse_nbd_or_libvirt():
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            f"    out[name] = sorted(m for m in {WATCHED!r} if m in sys.modules)\n"
            "print(json.dumps(out))\n")
    loaded = {}
    for name in modules():  # one process each: what a module loads is its own
        r = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                           check=True, cwd=REPO)
        loaded.update(json.loads(r.stdout))
    wrong = {name: got for name, got in loaded.items() if not set(got) <= IMPURE.get(name, set())}
    assert wrong == {}
    assert "snapfs.formats" in loaded and "snapfs.views.dirty" in loaded


def _imports(path: str, name: str, is_pkg: bool) -> set[str]:
    """Modules of snapfs that ``name`` imports (at any level, TYPE_CHECKING blocks aside)."""
    tree = ast.parse(open(path).read())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("snapfs")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            if not mod or not mod.startswith("snapfs"):
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # "from . import views"
    return out


def _path(name: str) -> tuple[str, bool]:
    rel = name.replace(".", os.sep)
    is_pkg = os.path.isdir(os.path.join(REPO, rel))
    return (os.path.join(REPO, rel, "__init__.py") if is_pkg else os.path.join(REPO, rel + ".py")), is_pkg


def _graph() -> dict[str, set[str]]:
    names = modules()
    graph = {}
    for name in names:
        path, is_pkg = _path(name)
        graph[name] = {m for m in _imports(path, name, is_pkg) if m in names and m != name}
    return graph


def test_no_import_cycles():
    names = modules()
    graph = _graph()
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in names:
        if n not in state:
            visit(n, [n])
    assert cycles == []
    assert "snapfs.runtime" in graph["snapfs.sources.backup"]  # the graph is really read


# What a server's or a write session's state is made of: only nbd/ and data/ change it.
SERVER_STATE = {"users", "closing", "changed", "dead", "retired", "process", "files", "ending", "server"}


def test_the_fuse_side_knows_no_kind_of_source_and_sets_no_server_state():
    graph = _graph()
    fs = [n for n in graph if n.startswith("snapfs.fs.")]
    concrete = {n for n in graph if n.startswith("snapfs.sources.") and n != "snapfs.sources.base"}
    assert {n: sorted(graph[n] & concrete) for n in fs if graph[n] & concrete} == {}
    assert "snapfs.sources.base" in graph["snapfs.fs.layout"]  # the graph is really read
    stores = {}
    for name in fs:
        tree = ast.parse(open(_path(name)[0]).read())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for a in ast.walk(t):
                    if isinstance(a, ast.Attribute) and isinstance(a.ctx, ast.Store) and a.attr in SERVER_STATE \
                            and not (isinstance(a.value, ast.Name) and a.value.id == "self"):
                        stores.setdefault(name, []).append(f"line {a.lineno}: .{a.attr}")
    assert stores == {}
