"""The import structure: modules import downwards only (cli -> training-data
preparation -> pipelines -> train -> convert -> branch / encoders / synth -> bundle, io, weights,
sampling -> models -> progress, memory, compositing -> errors), nothing
imports the command line, and no project import hides inside a function
(the way a cycle is usually dodged)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"mlx_omnimatte": ROOT / "mlx_omnimatte", "mlx_omnimatte.convert": ROOT / "convert",
           "mlx_omnimatte.cli": ROOT / "cli"}

# module (or package prefix) -> layer; the longest matching prefix decides
LAYERS = {
    "mlx_omnimatte.errors": 0,
    "mlx_omnimatte.memory": 1, "mlx_omnimatte.compositing": 1, "mlx_omnimatte.jsonfile": 1,
    "mlx_omnimatte.progress": 2, "mlx_omnimatte.models.base": 2, "mlx_omnimatte.evaluation.metrics": 2,
    "mlx_omnimatte.layer_solver": 2,
    "mlx_omnimatte.models": 3,
    "mlx_omnimatte.weights": 4, "mlx_omnimatte.sampling": 4, "mlx_omnimatte.io": 4,
    "mlx_omnimatte.removers": 4,
    "mlx_omnimatte.bundle": 5, "mlx_omnimatte.step_cache": 5, "mlx_omnimatte.branch": 5, "mlx_omnimatte.encoders": 5,
    "mlx_omnimatte.synth": 5, "mlx_omnimatte.analysis": 5,
    "mlx_omnimatte.evaluation": 5,
    "mlx_omnimatte.convert": 6,
    "mlx_omnimatte.train": 7,
    "mlx_omnimatte.pipelines": 8,
    # work over data sets, built from the pipelines' pieces
    "mlx_omnimatte.train.prepare": 9, "mlx_omnimatte.analysis.run": 9,
    "mlx_omnimatte.cli": 10,
}
# the package's lazy API (`mo.decompose`) sits above everything by design
EXEMPT = {"mlx_omnimatte"}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module}: no layer assigned (add it to LAYERS)")
    return LAYERS[best]


def group_of(module: str) -> str:
    """The package a module belongs to for same-layer imports."""
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def modules():
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "mlx_omnimatte" and parts[:1] in (["convert"], ["cli"]):
                continue
            yield name, path, path.name == "__init__.py"


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    if node.module is None or node.level and not node.module:
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def project_imports(tree, module, is_package):
    """(target module, line, inside a function?) for every project import."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend((t, child.lineno, in_function) for t in resolve(child, module, is_package))
            visit(child, inner)

    visit(tree, False)
    return [(t, line, f) for t, line, f in out if t == "mlx_omnimatte" or t.startswith("mlx_omnimatte.")]


def _known(target: str) -> str:
    """A `from package import name` may name a module or an attribute."""
    while target not in LAYERS and not any(target.startswith(p + ".") for p in LAYERS):
        if "." not in target:
            raise AssertionError(f"{target}: no layer assigned (add it to LAYERS)")
        target = target.rsplit(".", 1)[0]
    return target


ALL = list(modules())


@pytest.mark.parametrize("name,path,is_package", ALL, ids=[m[0] for m in ALL])
def test_imports_go_downwards(name, path, is_package):
    if name in EXEMPT:
        return
    tree = ast.parse(path.read_text(), str(path))
    mine = layer_of(name)
    for target, line, in_function in project_imports(tree, name, is_package):
        if target == "mlx_omnimatte":
            raise AssertionError(f"{path}:{line}: imports the package root (import the module itself)")
        target = _known(target)
        assert not in_function, f"{path}:{line}: imports {target} inside a function"
        theirs = layer_of(target)
        same_group = group_of(target) == group_of(name)
        assert theirs < mine or (theirs == mine and same_group), (
            f"{path}:{line}: {name} (layer {mine}) imports {target} (layer {theirs})")


def test_every_module_has_a_layer():
    assert len(ALL) > 50
    for name, _, _ in ALL:
        if name not in EXEMPT:
            layer_of(name)
