"""The layers of the library, read from the source of every module: imports point one way.

1. bucketing core: no transforms, no samplers, no torch at module level (the distributed
   scan may import ``torch.distributed`` in a function, when the caller already runs it);
2. samplers: numpy and torch (and the standard library) only;
3. transforms: may import the bucketing core;
4. composition (``bucketing.pipeline``, ``bucketing.cli``): may import anything; nothing
   imports it, except ``bucketing/__init__`` lazily.
No function-level import of one of our own modules anywhere (no cycles dodged that way).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bucketing

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bucketing", "samplers", "transforms")
OURS = set(PACKAGES)
# Floors by package: a module belongs to the longest prefix listed.
FLOORS = {
    "bucketing": "bucketing",
    "bucketing.pipeline": "composition",
    "bucketing.cli": "composition",
    "samplers": "samplers",
    "transforms": "transforms",
}
STDLIB = set(sys.stdlib_module_names)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only, never executed
            if isinstance(child, ast.Import):
                out.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, top))
                out.extend((f"{child.module}.{a.name}", top) for a in child.names
                           if f"{child.module}.{a.name}" in MODULES)
            visit(child, inner)

    visit(tree, True)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _layer(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    return parts[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    layer = _layer(module)
    for imported, top in _imports(MODULES[module]):
        root = imported.split(".")[0]
        where = f"{module} imports {imported}"
        if root in OURS:
            assert top, f"{where} inside a function (import it at module level)"
            if _layer(imported) == "composition":
                assert layer == "composition", f"{where}: nothing below composition imports it"
            if layer == "bucketing":
                assert root == "bucketing", f"{where}: the bucketing core is the bottom layer"
            elif layer == "samplers":
                assert root == "samplers", f"{where}: samplers use numpy and torch only"
            elif layer == "transforms":
                assert root in ("bucketing", "transforms"), f"{where}: transforms sit below"
        elif layer == "bucketing" and root == "torch":
            assert not top, f"{where} at module level: the core must not load torch"
            assert imported == "torch.distributed", f"{where}: only the distributed scan may"
        elif layer == "samplers":
            assert root in STDLIB or root in ("numpy", "torch"), f"{where}: numpy + torch only"


def test_core_holds_no_composition() -> None:
    """Directly in ``bucketing/`` and ``bucketing/sources/`` live only core modules."""
    for module in MODULES:
        if module.startswith("bucketing") and _layer(module) == "bucketing":
            path = MODULES[module].relative_to(REPO)
            assert path.parts[1] in ("sources",) or len(path.parts) == 2, path


def test_layer_test_sees_every_module() -> None:
    """The modules named as composition exist or are planned; the core ones are scanned."""
    assert {"bucketing.scan", "bucketing.assign", "samplers.bucket_batch_sampler",
            "transforms.resize_crop", "bucketing.pipeline.dataset"} <= set(MODULES)
    imports = dict.fromkeys(m for m, _ in _imports(MODULES["bucketing.pipeline.dataset"]))
    assert "transforms.image" in imports  # the reader really finds imports


@pytest.mark.parametrize("module", ["bucketing", "bucketing.assign", "bucketing.scan",
                                    "bucketing.ladder", "bucketing.index"])
def test_core_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"importing {module} loaded torch\n{proc.stderr}"


def test_composition_is_exported_lazily() -> None:
    code = ("import sys, bucketing; assert 'bucketing.pipeline.dataset' not in sys.modules; "
            "from bucketing import TextToImageDataset; "
            "assert TextToImageDataset.__module__ == 'bucketing.pipeline.dataset'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_all_lists_every_lazy_name() -> None:
    """``bucketing.__all__`` is the core's names plus every lazily exported one."""
    assert set(bucketing._LAZY) <= set(bucketing.__all__)
    for name in bucketing.__all__:
        assert getattr(bucketing, name) is not None


@pytest.mark.parametrize("name", ["transforms", "samplers"])
def test_a_users_module_shadowing_ours_is_named(tmp_path: Path, name: str) -> None:
    """A training script beside its own ``transforms.py`` gets an ImportError naming it."""
    shadow = tmp_path / f"{name}.py"
    shadow.write_text("HELLO = 1\n")
    script = tmp_path / "train.py"
    script.write_text("from bucketing import TextToImageDataset\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and str(shadow) in proc.stderr, proc.stderr
    assert "rename" in proc.stderr
