"""The import graph of ttfm_np has no cycle.

An import cycle works or fails depending on which module is imported first (and
a function-level import only hides it until that function runs), so the graph
is checked statically: every `import` statement of every ttfm_np/*.py file,
at module level or inside a function, is an edge. The check is a topological
sort; a cycle is reported with its modules in order.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ttfm_np")


def _imports_of(path: str, modules: set) -> set:
    """The ttfm_np modules a file imports anywhere in it (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "ttfm_np"):
                parts = (node.module or "").split(".")
                parts = parts[1:] if node.level == 0 else parts      # drop "ttfm_np" of an absolute import
                if parts and parts[0]:
                    found.add(parts[0])                              # from .x import y / from ttfm_np.x import y
                else:
                    found |= {a.name for a in node.names}            # from . import x / from ttfm_np import x
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ttfm_np.")}
    return found & modules


def import_graph(pkg_dir: str = PKG_DIR) -> dict:
    """{module: sorted modules it imports} over the package's top-level .py files."""
    modules = {f[:-3] for f in os.listdir(pkg_dir) if f.endswith(".py") and f != "__init__.py"}
    return {m: sorted(_imports_of(os.path.join(pkg_dir, m + ".py"), modules) - {m}) for m in sorted(modules)}


def find_cycle(graph: dict):
    """A list [a, b, ..., a] of modules that import each other in a circle, or None."""
    state, stack = {}, []                   # state: 1 = on the current path, 2 = done

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in graph.get(u, ()):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                cycle = visit(v)
                if cycle:
                    return cycle
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The check can fail: the issue's cycle data -> progress -> distributed -> fid -> data, with the
    two middle links as function-level imports, is found."""
    files = {"data": "from .progress import log\n",
             "progress": "def log(m):\n    from .distributed import current\n",
             "distributed": "import numpy\n\ndef merge():\n    from .fid import FeatureStats\n",
             "fid": "from . import backend\nfrom .data import IMAGE_EXTS\n",
             "backend": "import os\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    graph = import_graph(str(tmp_path))
    assert graph["progress"] == ["distributed"] and graph["fid"] == ["backend", "data"]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"data", "progress", "distributed", "fid"}


def test_ttfm_np_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "pipeline" in graph                  # the real package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_progress_imports_nothing_of_ttfm_np_and_distributed_nothing_of_fid():
    graph = import_graph()
    assert graph["progress"] == [], graph["progress"]                # every module may log
    assert "fid" not in graph["distributed"], graph["distributed"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first in its own interpreter (one interpreter runs them all in turn,
    forgetting ttfm_np between them): an order-dependent import failure shows up here."""
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'ttfm_np' or k.startswith('ttfm_np.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module('ttfm_np.' + m)\n")
    out = subprocess.run([sys.executable, "-c", code, *sorted(import_graph())], capture_output=True, text=True,
                         cwd=os.path.dirname(PKG_DIR), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
