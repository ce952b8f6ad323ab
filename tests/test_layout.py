"""The package's layout (DESIGN §6): imports run one way, the model files stay free of the
training, data and evaluation layers, and ``lit.py`` has no mid-file imports.

Every module of ``movegen/`` is parsed with ``ast``; every import counts, at module level or
inside a function, relative or absolute.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "movegen"
MODEL_FILES = (
    "movegen.tokenizer",
    "movegen.move",
    "movegen.model",
    "movegen.kernels",
    "movegen.classifier",
)
# what a model file may not import: Lightning and the layers built on top of the models
FORBIDDEN_IN_MODEL_FILES = ("lightning", "pytorch_lightning", "movegen.data", "movegen.metrics",
                            "movegen.checkpoint", "movegen.cli", "movegen.lit", "movegen.evaluate",
                            "movegen.report", "movegen.study")  # fmt: skip


def module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in the tree. ``from .x import y`` gives
    ``pkg.x.y`` as well as ``pkg.x``, so importing a submodule by name counts as importing it."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - (node.level - 1)]
                mod = ".".join(up + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """Module -> the movegen modules it imports (names resolved to modules that exist)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for mod, _ in imported_names(tree, name, path.name == "__init__.py"):
            if mod in files and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def external_imports(root: Path = PKG) -> dict[str, set[str]]:
    """Module -> every name it imports (movegen's and third-party), for the forbidden lists."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        out[name] = {m for m, _ in imported_names(tree, name, path.name == "__init__.py")}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. A package's
    ``__init__`` importing its own submodules is not a cycle (Python runs it first)."""
    edges = {
        a: {b for b in bs if not (b.startswith(a + ".") and _is_package(a, graph))}
        for a, bs in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(a: str) -> list[str] | None:
        state[a] = 1
        stack.append(a)
        for b in sorted(edges.get(a, ())):
            if state.get(b) == 1:
                return stack[stack.index(b) :] + [b]
            if b not in state and (c := visit(b)):
                return c
        stack.pop()
        state[a] = 2
        return None

    for a in sorted(edges):
        if a not in state and (c := visit(a)):
            return c
    return None


def _is_package(name: str, graph: dict[str, set[str]]) -> bool:
    return any(m.startswith(name + ".") for m in graph)


def late_imports(path: Path) -> list[int]:
    """Lines of module-level imports after the first def or class."""
    body = ast.parse(path.read_text()).body
    first = next(
        (
            n.lineno
            for n in body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ),
        None,
    )
    return [
        n.lineno
        for n in body
        if isinstance(n, ast.Import | ast.ImportFrom) and first is not None and n.lineno > first
    ]


# --------------------------------------------------------------------------- the package


def test_no_import_cycle():
    graph = import_graph()
    assert {"movegen.lit", "movegen.checkpoint", "movegen.data.codes"} <= graph.keys()
    assert "movegen.checkpoint" in graph["movegen.metrics"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def forbidden_imports(name: str, forbidden: tuple[str, ...], imports=None) -> list[str]:
    imports = external_imports() if imports is None else imports
    return sorted(
        m for m in imports[name] if any(m == f or m.startswith(f + ".") for f in forbidden)
    )


def test_model_files_import_no_training_data_or_cli_code():
    for name in MODEL_FILES:
        assert not (bad := forbidden_imports(name, FORBIDDEN_IN_MODEL_FILES)), (
            f"{name} imports {bad}"
        )


ABOVE_DATA = ("movegen.lit", "movegen.metrics", "movegen.checkpoint", "movegen.cli",
              "movegen.evaluate", "movegen.report", "movegen.study")  # fmt: skip


@pytest.mark.parametrize(
    "name,forbidden",
    [
        ("movegen.data", ABOVE_DATA),
        ("movegen.data.images", ABOVE_DATA),
        ("movegen.data.codes", ABOVE_DATA),
        ("movegen.checkpoint", ("lightning", "movegen.data", *ABOVE_DATA[:2], *ABOVE_DATA[3:])),
        ("movegen.metrics", ("lightning", "movegen.data", "movegen.lit", *ABOVE_DATA[3:])),
    ],
)
def test_lower_layers_do_not_import_upper_ones(name, forbidden):
    assert not (bad := forbidden_imports(name, forbidden)), f"{name} imports {bad}"


@pytest.mark.parametrize("module", ["lit.py", "checkpoint.py", "metrics.py", "data/codes.py",
                                    "data/images.py", "evaluate.py", "report.py"])  # fmt: skip
def test_no_mid_file_imports(module):
    assert late_imports(PKG / module) == [], f"{module}: module-level imports after the first def"


def test_importing_the_model_does_not_import_lightning():
    code = (
        "import sys, movegen.model, movegen.tokenizer, movegen.sample, movegen.checkpoint; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad[:3]"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- the checks can fail


def test_the_checks_catch_a_cycle_a_forbidden_import_and_a_late_import(tmp_path):
    pkg = tmp_path / "movegen"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .model import GPT\n")
    (pkg / "data" / "__init__.py").write_text("from .codes import CodeStore\n")
    (pkg / "data" / "codes.py").write_text("from ..model import GPTConfig\nclass CodeStore: ...\n")
    (pkg / "model.py").write_text("import torch\n\ndef f():\n    from movegen.lit import x\n")
    (pkg / "lit.py").write_text("from . import model\n\nclass A: ...\n\nfrom .data import codes\n")
    graph = import_graph(pkg)
    assert graph["movegen.data.codes"] == {"movegen.model"}
    assert graph["movegen.data"] == {"movegen.data.codes"}  # a package's own submodules
    cycle = find_cycle(graph)
    assert cycle is not None and {"movegen.model", "movegen.lit"} <= set(cycle)
    assert "movegen.lit.x" in external_imports(pkg)["movegen.model"]  # a function-level import
    assert late_imports(pkg / "lit.py") == [5]
    (pkg / "model.py").write_text("import torch\n")
    assert find_cycle(import_graph(pkg)) is None
