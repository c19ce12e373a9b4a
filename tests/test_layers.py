"""The layering rules of docs/architecture.md, checked on the source: every import statement,
module level or inside a function, of every product module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "datagen", "ray_jobs", "training", "fixtures")


def product_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Every module name an import statement in ``path`` names (relative imports resolved)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = product_modules()
IMPORTS = {name: imports_of(path, name) for name, path in MODULES.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_rules_see_the_whole_product():
    assert {top(m) for m in MODULES} == set(PACKAGES)
    assert "ray_jobs.job" in MODULES and "datagen.stages.matcher" in MODULES and "cli.main" in MODULES
    assert "ray" in IMPORTS["ray_jobs.job"]  # the parser sees imports


def test_ray_is_imported_only_under_ray_jobs():
    offenders = {
        m for m, names in IMPORTS.items()
        if any(n == "ray" or n.startswith("ray.") for n in names) and top(m) != "ray_jobs"
    }
    assert not offenders, f"import ray outside ray_jobs/: {sorted(offenders)}"


def test_the_ray_train_launcher_is_importable_from_ray_jobs_only():
    import importlib
    import importlib.util

    launcher = importlib.import_module("ray_jobs.train")
    assert callable(launcher.run_training) and callable(launcher.train_worker)
    assert "ray.train" in IMPORTS["ray_jobs.train"]
    assert importlib.util.find_spec("training.ray_train") is None  # its old home is gone
    others = sorted(m for m, path in MODULES.items() if m != "ray_jobs.train" and "def run_training(" in path.read_text())
    assert not others, f"a second Ray Train launcher: {others}"
    assert "ray_jobs.train" in IMPORTS["cli.train"]  # the train command launches through it


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("datagen", {"ray_jobs", "training", "cli", "fixtures", "tests"}),
        ("training", {"cli", "fixtures", "tests"}),
        ("ray_jobs", {"cli", "fixtures", "tests"}),
        ("fixtures", {"cli", "tests"}),
        ("cli", {"tests"}),
    ],
)
def test_imports_run_downward(package, forbidden):
    bad = sorted(
        f"{m} imports {n}" for m, names in IMPORTS.items() if top(m) == package for n in names if top(n) in forbidden
    )
    assert not bad, bad


def test_only_the_ray_train_launcher_and_the_evaluation_pool_of_ray_jobs_import_training():
    bad = sorted(f"{m} imports {n}" for m, names in IMPORTS.items()
                 if top(m) == "ray_jobs" and m not in ("ray_jobs.train", "ray_jobs.evaluation")
                 for n in names if top(n) == "training")
    assert not bad, bad


def test_training_imports_of_ray_jobs_are_none():
    # training/ is Ray-free: the Ray Train launcher (ray_jobs/train.py) imports training, never the reverse
    bad = sorted(m for m, names in IMPORTS.items() if top(m) == "training" and any(top(n) == "ray_jobs" for n in names))
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {n for n in names if n in MODULES and n != m} for m, names in IMPORTS.items()}
    # a package's __init__ importing its own modules is not a cycle of ideas; ours are empty anyway
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


# ---- size: a module is one idea, a function one step ----------------------------------------------

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# "path::qualified name" of the functions allowed past MAX_FUNCTION_LINES
LONG_FUNCTIONS_ALLOWED = {
    "training/loop.py::train_loop",  # the training loop: the one exception the architecture issue allows
}


def functions_in(source: str, filename: str = "<source>") -> dict[str, int]:
    """``qualified name -> lines`` (``def`` line to last line) of every function and method in ``source``,
    nested ones included (``Class.method``, ``outer.inner``)."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[name] = child.end_lineno - child.lineno + 1
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source, filename), "")
    return found


def functions_of(path: Path) -> dict[str, int]:
    return functions_in(path.read_text(), str(path))


def test_no_product_module_is_longer_than_500_lines():
    long = {str(path.relative_to(REPO)): n for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by idea): {long}"


def test_no_product_function_is_longer_than_80_lines():
    long = {key: n for path in MODULES.values() for name, n in functions_of(path).items()
            if n > MAX_FUNCTION_LINES and (key := f"{path.relative_to(REPO).as_posix()}::{name}") not in LONG_FUNCTIONS_ALLOWED}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_the_size_rules_see_long_code_and_the_allow_list_is_current():
    source = ("def f():\n" + "    x = 1\n" * 80 + "class C:\n    async def m(self):\n        def inner():\n"
              "            pass\n")
    assert functions_in(source) == {"f": 81, "C.m": 3, "C.m.inner": 2}
    assert "Record.validate" in functions_of(REPO / "datagen" / "record" / "schema.py")  # methods are seen
    for key in LONG_FUNCTIONS_ALLOWED:  # every allowed function still exists and still needs its place
        path, name = key.split("::")
        assert functions_of(REPO / path)[name] > MAX_FUNCTION_LINES, key
