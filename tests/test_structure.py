"""How the library's modules import each other.

- They form no import cycle, counting imports inside functions too (they would hide one).
- An import inside a function only defers a heavy or optional library (torch, diffusers, ComfyUI, ...)
  and says so in a comment with "deferred": a project module may be imported there only by a module
  that does not load those libraries itself, and only when the imported module loads them.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "duge"
# Libraries worth deferring in a module that does not load them: seconds of import for torch, diffusers,
# transformers, accelerate and ComfyUI's model code. numpy and PIL (0.3 s of `import duge.cli`) are not deferred.
HEAVY = {"torch", "diffusers", "transformers", "accelerate", "comfy"}
# Libraries a function may import itself: the heavy ones, and those that may be missing (xformers is
# optional, `folder_paths` exists only inside ComfyUI, `resource` only on POSIX).
DEFERRABLE = {"torch", "diffusers", "transformers", "accelerate", "comfy", "folder_paths", "xformers", "resource"}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path = REPO, packages: tuple[str, ...] = ("duge",)) -> dict[str, Path]:
    """Module name -> file, for every module of `packages` under `root`."""
    return {_module_name(p, root): p for package in packages for p in (root / package).rglob("*.py")}


def imported_names(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The modules an import statement in `module` (file `path`) may load: the module and, for `from X import
    a`, `X.a` (which is a module when `a` is a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(tree: ast.AST, inside_functions: bool):
    """The import statements of `tree` that run at import time (`inside_functions=False`: outside every
    function body) or only when a function runs (True)."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function == inside_functions:
                yield child
            yield from visit(child, nested)

    yield from visit(tree, False)


def import_graph(files: dict[str, Path] | None = None, inside_functions: bool | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports: at import time (`inside_functions=False`), inside functions
    (True) or anywhere (None)."""
    files = source_files() if files is None else files
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modes = (False, True) if inside_functions is None else (inside_functions,)
        for node in (n for mode in modes for n in _imports(tree, mode)):
            graph[name].update(t for t in imported_names(node, name, path) if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def undeferred_imports(files: dict[str, Path]) -> list[str]:
    """`path:line: why` for each import inside a function that breaks the rule of the module doc."""
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in files.items()}
    external = {name: {root.split(".")[0] for node in _imports(tree, False)
                       for root in imported_names(node, name, files[name])[:1]} for name, tree in trees.items()}
    top = import_graph(files, inside_functions=False)

    def loads_heavy(name: str, seen: set[str]) -> bool:
        seen.add(name)
        return bool(external[name] & HEAVY) or any(loads_heavy(t, seen) for t in top[name] if t not in seen)

    problems = []
    for name, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _imports(trees[name], True):
            where = f"{path.relative_to(path.parents[len(name.split('.')) - 1])}:{node.lineno}"
            targets = imported_names(node, name, path)
            project = [t for t in targets if t in files]
            if project and loads_heavy(name, set()):
                problems.append(f"{where}: {name} loads the heavy libraries already; import {project[0]} at the top")
            elif project and not any(loads_heavy(t, set()) for t in project):
                problems.append(f"{where}: {project[-1]} loads no heavy library; import it at the top")
            elif not project and targets[0].split(".")[0] not in DEFERRABLE:
                problems.append(f"{where}: {targets[0]} is neither heavy nor optional; import it at the top")
            else:
                above = node.lineno - 2  # the comment may sit on the statement or on the block of imports above it
                while above >= 0 and lines[above].strip().startswith(("#", "import ", "from ")):
                    above -= 1
                if not any("deferred" in line for line in lines[above + 1 : node.end_lineno]):
                    problems.append(f"{where}: an import inside a function needs a comment saying what it defers")
    return problems


def test_no_import_cycle_among_duge_modules():
    graph = import_graph()
    assert "duge.trainer" in graph and "duge.objective" in graph["duge.trainer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_only_defer_heavy_or_optional_libraries():
    files = source_files(REPO, ("duge", "nodes"))
    assert "nodes.unlearn" in files and "duge.cli" in files
    problems = undeferred_imports(files)
    assert not problems, "\n".join(problems)


def test_the_deferral_check_finds_hidden_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "light.py").write_text("import json\n")
    (package / "heavy.py").write_text("import torch\n")
    (package / "user.py").write_text(
        "def a():\n    from .light import json  # deferred: nothing\n"  # a light module: import it at the top
        "def b():\n    from .heavy import torch\n"  # heavy, but no comment
        "def c():\n    import json  # deferred\n"  # the standard library: at the top
        "def d():\n    # deferred: torch\n    from . import heavy\n"  # allowed
        "def e():\n    import torch  # deferred: torch\n")  # allowed
    (package / "top.py").write_text("import torch\n\ndef f():\n    from .heavy import torch  # deferred: torch\n")
    (package / "pictures.py").write_text("import numpy\nimport PIL\n")  # not heavy: no reason to defer it
    (package / "cli.py").write_text("def g():\n    from .pictures import numpy  # deferred: numpy and PIL\n"
                                    "def h():\n    import PIL  # deferred: PIL\n")
    problems = undeferred_imports(source_files(tmp_path, ("pkg",)))
    assert [p.split(":")[1] for p in sorted(problems)] == ["2", "4", "4", "2", "4", "6"], problems
    assert "top.py:4" in " ".join(problems) and "cli.py:2" in " ".join(problems) and "cli.py:4" in " ".join(problems)
