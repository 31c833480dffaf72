"""The import graph points one way: core <- features <- runtime <- entry points, with no cycles. Parsed with ast
(every import, also those inside functions; `if TYPE_CHECKING:` blocks excepted, since they never run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moetandem"
#: the core: model code, the engine, checkpoints, KV cache, sampling, plain configs, and the interfaces features
#: implement (the expert provider) with the expert bytes they read (store, budget), and the device kernels
#: (kernels/: Triton with PyTorch references, imported by model code and features alike)
CORE = ("moetandem", "moetandem.errors", "moetandem.config", "moetandem.checkpoint", "moetandem.loader",
        "moetandem.engine", "moetandem.batcher", "moetandem.text2text", "moetandem.graphs", "moetandem.sampling",
        "moetandem.streaming", "moetandem.assets", "moetandem.models", "moetandem.kernels", "moetandem.experts.provider",
        "moetandem.experts.store",
        "moetandem.experts.budget", "moetandem.products", "moetandem.quantization", "moetandem.gpu_memory",
        "moetandem.host_memory")
FEATURES = ("moetandem.experts", "moetandem.gating", "moetandem.split", "moetandem.analysis")
ASSEMBLY = ("moetandem.runtime",)
ENTRY = ("moetandem.cli", "moetandem.serve", "moetandem.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(mod: str) -> int:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(mod == p or mod.startswith(p + ".") for p in prefixes if p != "moetandem") or mod == "moetandem"
    for rank, group in ((0, CORE), (1, FEATURES), (2, ASSEMBLY), (3, ENTRY)):
        if under(group):
            return rank
    raise AssertionError(f"{mod} belongs to no layer: add it to tests/test_layers.py")


def imports(mod: str) -> set[str]:
    tree = ast.parse(MODULES[mod].read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` bodies never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out: set[str] = set()
    package = mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n.startswith("moetandem") and n != mod:
                out.add(n)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_imports_point_down_the_layers():
    wrong = sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in GRAPH.items() for d in deps
                   if d != "moetandem" and layer(d) > layer(m))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m] - {"moetandem"}):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_attach_functions_remain():
    found = [f"{m}: {n.name}" for m, p in MODULES.items() for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.FunctionDef) and n.name.startswith(("attach_", "set_provider"))]
    assert not found, found
