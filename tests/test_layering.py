"""The package's import graph matches the layer table of docs/ARCHITECTURE.md:
no upward import (also inside functions), no module left out, no cycle."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "guided_diffusion_vae"


def modules():
    """``{dotted name without the package prefix: path}``; the package itself is ``guided_diffusion_vae``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PKG)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                dotted = dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted
                found[PKG if dotted == PKG else dotted[len(PKG) + 1:]] = path
    return found


def imports_of(name, path, known):
    """The package modules ``path`` imports (any depth in the file)."""
    full = PKG if name == PKG else f"{PKG}.{name}"
    package = full.split(".") if path.endswith("__init__.py") else full.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            short = PKG if target == PKG else target[len(PKG) + 1:] if target.startswith(PKG + ".") else None
            if short in known and short != name:
                # "from . import logger" names the module, not the package.
                if short == PKG and isinstance(node, ast.ImportFrom) and node.module is None:
                    continue
                found.add(short)
    return found


def layer_table():
    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
    table = {}
    for layer, cells in re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M):
        for module in re.findall(r"`([\w.]+)`", cells):
            table[module] = int(layer)
    return table


def test_every_module_has_a_layer_and_imports_only_downwards():
    known = modules()
    table = layer_table()
    assert sorted(set(known) - set(table)) == [], "modules missing from the layer table"
    assert sorted(set(table) - set(known)) == [], "the table names modules that do not exist"
    upward = [f"{name} (layer {table[name]}) imports {dep} (layer {table[dep]})"
              for name, path in known.items() for dep in sorted(imports_of(name, path, known))
              if table[dep] >= table[name]]
    assert upward == []


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_checker_sees_upward_imports(tmp_path):
    """The checker itself: a function-level relative import is found."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..diffusion_training import run_training\n    from . import logger\n")
    known = {"diffusion_training": "", "logger": "", "evaluation.mod": str(path)}
    assert imports_of("evaluation.mod", str(path), known) == {"diffusion_training"}
