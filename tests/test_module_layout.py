"""The module layout the code relies on (DEVELOPERS.md): the request path reads routes -> pipeline ->
batcher -> engine -> decoding, so no route module imports another, and the serving side never imports
the training side."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_route_module_imports_another():
    routes = sorted((REPO / "app" / "routes").glob("*.py"))
    route_modules = {f"app.routes.{p.stem}" for p in routes if p.stem != "__init__"}
    assert len(route_modules) >= 5
    for path in routes:
        own = f"app.routes.{path.stem}"
        others = (imported_modules(path) & route_modules) - {own}
        assert not others, f"{path.relative_to(REPO)} imports {sorted(others)}: shared code belongs in app/pipeline.py " \
                           "or app/routes/__init__.py"


def test_the_serving_side_never_imports_the_training_side():
    for path in sorted((REPO / "app").rglob("*.py")):
        training = {m for m in imported_modules(path) if m == "model_export" or m.startswith("model_export.")}
        assert not training, f"{path.relative_to(REPO)} imports {sorted(training)}"
