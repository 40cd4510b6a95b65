"""The layers of `app/` (DEVELOPERS.md, "The layers"), as import rules that a folder's name promises:

    app/inference/      bundle, engine, decoding, graphs, preprocess, confidence, attention_map: imports
                        only itself (no HTTP, no settings class, no metrics), so the training side and the
                        benchmarks can share it
    app/observability/  logs, metrics, tracing; app/security/: API key entries, token buckets: leaves
    app/serving/        the batcher and the model registry: inference, observability, settings
    app/api/            routes, pipeline, middleware, errors, schemas, openapi, auth: anything but bulk and the CLI
    app/bulk/           caption-dir: inference, settings, the shared CLI options; never the HTTP layer
    model_export/       imports only app.inference; bench/ too, except where a benchmark measures another layer

The request path reads routes -> pipeline -> batcher -> engine -> decoding, so no route module imports
another, and the serving side never imports the training side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

# Which parts of `app` each layer may import (besides itself). "app.settings" etc. are top-level modules.
ALLOWED: dict[str, set[str]] = {
    "app.inference": set(),
    "app.observability": set(),
    "app.security": set(),
    "app.serving": {"app.inference", "app.observability", "app.settings"},
    "app.api": {"app.inference", "app.serving", "app.observability", "app.security", "app.settings"},
    "app.bulk": {"app.inference", "app.settings", "app.cli_options"},
}
# The benchmarks that measure a layer above inference import it (and only it), by name.
BENCH_EXCEPTIONS = {
    "common.py": {"app.serving"},  # the dynamic batcher's benchmark drives DynamicBatcher in process
    "bulk.py": {"app.bulk"},  # local vs Ray caption-dir runs
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def app_layers(path: Path) -> set[str]:
    """The parts of `app` that the module at `path` imports: `app.<package>` or `app.<top-level module>`."""
    parts: set[str] = set()
    for name in imported_modules(path):
        pieces = name.split(".")
        if pieces[0] == "app" and len(pieces) > 1:
            parts.add(".".join(pieces[:2]))
    return parts


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_its_folder_allows(layer):
    folder = REPO / Path(*layer.split("."))
    paths = sorted(folder.rglob("*.py"))
    assert len(paths) >= 2, f"{layer}: no modules found in {folder}"
    allowed = ALLOWED[layer] | {layer}
    for path in paths:
        bad = app_layers(path) - allowed
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: {layer} may import only {sorted(allowed)}"


def test_the_inference_layer_knows_no_http_settings_or_metrics():
    third_party = {"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic_settings", "httpx", "opentelemetry"}
    for path in sorted((REPO / "app" / "inference").rglob("*.py")):
        top = {name.split(".")[0] for name in imported_modules(path)}
        assert not top & third_party, f"{path.relative_to(REPO)} imports {sorted(top & third_party)}"


def test_the_training_side_uses_only_the_inference_layer():
    paths = sorted((REPO / "model_export").rglob("*.py"))
    assert len(paths) >= 10
    for path in paths:
        bad = app_layers(path) - {"app.inference"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: model_export may use only app.inference"


def test_the_benchmarks_use_only_the_inference_layer_or_the_layer_they_measure():
    paths = sorted((REPO / "bench").glob("*.py"))
    assert len(paths) >= 5
    for path in paths:
        allowed = {"app.inference"} | BENCH_EXCEPTIONS.get(path.name, set())
        bad = app_layers(path) - allowed
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: bench may use only {sorted(allowed)}"
        assert not {m for m in imported_modules(path) if m == "tests" or m.startswith("tests.")}, (
            f"{path.relative_to(REPO)} imports the test suite: shared helpers belong in a package")


def test_no_route_module_imports_another():
    routes = sorted((REPO / "app" / "api" / "routes").glob("*.py"))
    route_modules = {module_name(p) for p in routes if p.stem not in ("__init__", "deps")}
    assert len(route_modules) >= 5
    for path in routes:
        others = (imported_modules(path) & route_modules) - {module_name(path)}
        assert not others, f"{path.relative_to(REPO)} imports {sorted(others)}: shared code belongs in " \
                           "app/api/pipeline.py or app/api/routes/deps.py"


def test_the_serving_side_never_imports_the_training_side():
    for path in sorted((REPO / "app").rglob("*.py")):
        training = {m for m in imported_modules(path) if m == "model_export" or m.startswith("model_export.")}
        assert not training, f"{path.relative_to(REPO)} imports {sorted(training)}"


def test_a_rule_breach_is_caught(tmp_path):
    """The checker itself: a module of the inference layer that imports the metrics is seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("from app.observability.metrics import Metrics\nimport app.settings\n")
    assert app_layers(bad) == {"app.observability", "app.settings"}


def _imports_within(package: Path, root: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package tree it imports, anywhere in its body (function-level
    imports included; relative imports resolved), from `ast` alone."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node):], node]
        if node in done:
            return None
        stack.append(node)
        for target in sorted(graph[node]):
            found = visit(target)
            if found:
                return found
        stack.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def test_model_export_has_no_import_cycles(tmp_path):
    """No model_export module imports, at any level (a function-level import counts: it only postpones the
    cycle), one that imports it back: shared code goes into a module of its own (as bundle_files.py holds
    what export.py and labels.py both write bundles with)."""
    graph = _imports_within(REPO / "model_export", REPO)
    assert len(graph) >= 15 and "model_export.bundle_files" in graph["model_export.export"]
    assert "model_export.data.errors" in graph["model_export.data.vocab"]  # relative imports are resolved
    cycle = _a_cycle(graph)
    assert cycle is None, "model_export import cycle: " + " -> ".join(cycle)
    # the checker itself: the old export <-> labels cycle, closed by an import inside a function, is seen
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "export.py").write_text("from pkg.labels import write_labels\n")
    (fake / "labels.py").write_text("def add_labels():\n    from .export import file_entries\n")
    (fake / "other.py").write_text("import pkg.labels\n")
    assert _a_cycle(_imports_within(fake, tmp_path)) == ["pkg.export", "pkg.labels", "pkg.export"]
