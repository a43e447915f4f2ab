"""Imports only point down the pipeline (STYLE.md section 1): every `protfold` import in every module, those inside
functions included, goes to the module's own unit or to a unit of a lower layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "protfold"

# unit (top-level module or subpackage of protfold) -> layer. A unit may import its own modules and any unit of a
# lower layer, never one of its own layer or above: model and losses sit side by side, and bench may use train,
# never the reverse.
LAYERS = {
    "constants": 0, "errors": 0, "config": 0, "env": 0,
    "geometry": 1, "io": 1, "numerics": 1,
    "data": 2,
    "metrics": 3, "violations": 3,
    "model": 4, "losses": 4,
    "weights": 5, "plan": 5,
    "train": 6,
    "bench": 7,
    "cli": 8,
}


def _unit(module: str) -> str | None:
    """`protfold.model.memory` -> `model`; None for a module outside protfold or the package root itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "protfold" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute or relative import in `path`, at any depth."""
    own = ["protfold", *path.relative_to(PACKAGE).with_suffix("").parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = own[: len(own) - node.level] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "protfold":  # `from protfold import constants`
                found += [(node.lineno, f"protfold.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0].removesuffix(".py")
        if unit == "__init__":
            continue
        for line, module in _imports(path):
            target = _unit(module)
            if target is None or target == unit or target == "__init__":
                continue
            if LAYERS.get(target, len(LAYERS)) >= LAYERS[unit]:  # an unknown unit: test_every_unit_has_a_layer
                bad.append(f"protfold/{rel}:{line} ({unit}, layer {LAYERS[unit]}) imports {module} "
                           f"({target}, layer {LAYERS.get(target)})")
    return bad


def test_every_unit_has_a_layer():
    units = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert units - {"__init__"} == set(LAYERS), "give each new unit of protfold a layer in LAYERS"


def test_imports_only_point_down():
    assert _violations() == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A lazy import of a higher layer inside a function is caught too (the check can fail)."""
    fake = tmp_path / "protfold"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from protfold.train.module import ProtfoldModule\n"
                                          "    from ..model import alphafold\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    found = _violations()
    assert len(found) == 2 and "imports protfold.train.module" in found[0], found
    assert "imports protfold.model" in found[1], found
