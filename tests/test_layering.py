"""The package's folders follow the data path, and import only backwards along
it: the folder table of docs/ARCHITECTURE.md is the order, and this test holds
the import graph to it (also imports inside functions), with no cycle among
modules and nothing but the package ``__init__`` beside the folders. The old
flat module names still import, as the moved modules themselves."""

import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

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
                # "from .. import logger" names a module, not the package it is in.
                if isinstance(node, ast.ImportFrom) and target == base and any(
                        f"{base}.{alias.name}"[len(PKG) + 1:] in known for alias in node.names):
                    continue
                found.add(short)
    return found


def folder_order():
    """``{folder: position}`` from the table of docs/ARCHITECTURE.md (``| 3 | `data/` | ... |``)."""
    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
    return {folder: int(position) for position, folder in re.findall(r"^\| (\d+) \| `(\w+)/` \|", text, flags=re.M)}


def folder_of(name):
    return None if name == PKG else name.split(".")[0]


def test_every_module_sits_in_a_folder_of_the_table_and_imports_only_backwards():
    known = modules()
    order = folder_order()
    assert len(order) >= 10 and sorted(order.values()) == list(range(len(order)))
    on_disk = {entry for entry in os.listdir(os.path.join(ROOT, PKG))
               if os.path.isdir(os.path.join(ROOT, PKG, entry)) and not entry.startswith("__")}
    assert on_disk - {"configs"} == set(order), "folders on disk and in the table differ"
    loose = sorted(name for name in known if name != PKG and "." not in name and name not in order)
    assert loose == [], "modules beside the folders"
    backwards = [f"{name} imports {dep}" for name, path in known.items() for dep in sorted(imports_of(name, path, known))
                 if folder_of(name) and folder_of(dep) and order[folder_of(dep)] > order[folder_of(name)]]
    assert backwards == []
    # The package __init__ documents and maps old names; it imports none of the folders.
    assert imports_of(PKG, known[PKG], known) == set()


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


def test_the_checker_sees_a_backward_import_inside_a_function(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..training.diffusion_training import run_training\n"
                    "    from ..runtime import logger\n")
    known = {"training.diffusion_training": "", "runtime.logger": "", "runtime": "", "training": "",
             "data.mod": str(path)}
    assert imports_of("data.mod", str(path), known) == {"training.diffusion_training", "runtime.logger"}


def test_the_old_flat_names_import_the_moved_modules_themselves():
    moved = importlib.import_module(PKG).MOVED_MODULES
    for old, new in moved.items():
        assert f"{PKG}.{new}"[len(PKG) + 1:] in modules(), new
        alias = importlib.import_module(f"{PKG}.{old}")
        assert alias is importlib.import_module(f"{PKG}.{new}")
        assert alias.__spec__.name == f"{PKG}.{new}"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"{PKG}.no_such_module")


def test_guided_diffusion_users_imports_work_in_a_fresh_interpreter():
    """The original's import lines, as its users type them; a patch through the
    old name reaches the moved module."""
    code = (
        "import guided_diffusion_vae.gaussian_diffusion as gd\n"
        "from guided_diffusion_vae import dist_util, logger, script_util\n"
        "from guided_diffusion_vae.script_util import create_model_and_diffusion, model_and_diffusion_defaults\n"
        "from guided_diffusion_vae.train_util import TrainLoop\n"
        "from guided_diffusion_vae.unet import UNetModel\n"
        "from guided_diffusion_vae.resample import create_named_schedule_sampler\n"
        "from guided_diffusion_vae.image_datasets import load_data\n"
        "import guided_diffusion_vae.core.script_util as moved\n"
        "script_util.marker = 1\n"
        "assert moved.marker == 1 and gd.GaussianDiffusion.__module__ == 'guided_diffusion_vae.core.gaussian_diffusion'\n"
        "model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), 'image_size': 32,\n"
        "    'num_channels': 32, 'num_res_blocks': 1, 'attention_resolutions': '16'})\n"
        "assert isinstance(model, UNetModel)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_no_function_outside_the_core_is_longer_than_80_lines():
    """The original's core keeps its shape; everything else reads in small pieces."""
    long = []
    for name, path in modules().items():
        if name.startswith("core.") or name == "core":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_scripts_share_one_shape():
    """Each script: its docstring, imports, ``main(argv=None)`` that parses the
    flags and calls the package (at most three statements), and
    ``sys.exit(run_main(main))``; the work lives in the package."""
    folder = os.path.join(ROOT, "scripts")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        assert ast.get_docstring(tree), name
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert [f.name for f in functions] == ["main"], name
        main = functions[0]
        assert [a.arg for a in main.args.args] == ["argv"] and len(main.args.defaults) == 1, name
        assert len(main.body) <= 3, name
        assert ast.unparse(tree.body[-1]) == "if __name__ == '__main__':\n    sys.exit(run_main(main))", name
        classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
        assert classes == [], name
