"""The packages stand in layers: common < quant < models < eval < rptq < docgen (main.py on top).

Parses every module's imports (function-level ones too) and fails on an import of a higher
layer, on an import cycle between modules, on a project import inside a function that does not
say why it is lazy (the usual way to dodge a cycle), on a module without an opening docstring, and on a file over the
size the project aims for.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"common": 0, "quant": 1, "models": 2, "eval": 3, "rptq": 4, "docgen": 5}
MAX_LINES = 300
# One job that reads better whole: FlatQuant's method module holds its settings, learnable transforms, training
# taps and weights, placement and policy (a method is one file; splitting it would spread one algorithm).
LONGER = {"rptq.methods.flatquant": 380}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported project module, hidden?) for every import statement of ``path``; hidden: inside a
    function whose text does not say why it is lazy (an import cost worth deferring)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    text = path.read_text()
    tree = ast.parse(text)
    hidden = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              if "lazy" not in (ast.get_source_segment(text, f) or "").lower()
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in LAYERS:
                continue
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.append((name, id(node) in hidden))
                break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {dep for dep, _ in _imports(p, modules)} - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_module_imports_a_higher_layer():
    upward = [(m, dep) for m, deps in _graph().items() for dep in deps if _layer(dep) > _layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_project_imports_sit_at_module_level():
    """Imports inside functions count in the cycle test above too; here they must also say why they
    are deferred (the word 'lazy' and the cost), so none hides a cycle or an upward reach."""
    modules = _modules()
    hidden = [(m, dep) for m, p in modules.items() for dep, inside in _imports(p, modules) if inside]
    assert hidden == []


def test_every_module_says_its_job_and_stays_short():
    missing = [m for m, p in _modules().items() if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    long = {m: n for m, p in _modules().items()
            if (n := len(p.read_text().splitlines())) > LONGER.get(m, MAX_LINES)}
    assert missing == [] and long == {}


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above would fail on a planted violation (so a pass means something)."""
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
    (tmp_path / "quant" / "a.py").write_text('"""a"""\nfrom rptq import b\n')
    (tmp_path / "rptq" / "b.py").write_text('"""b"""\ndef f():\n    from quant import a\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = _graph()
    assert graph == {"quant.a": {"rptq.b"}, "rptq.b": {"quant.a"}}
    modules = _modules()
    assert _imports(modules["rptq.b"], modules) == [("quant.a", True)]
