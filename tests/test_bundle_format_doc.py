"""docs/bundle-format.md cannot drift from the manifest's one definition (`app.inference.bundle.Manifest`):
its example manifest is a valid manifest, shows every field the model defines, and has no key the
model does not; the shipped bundles' manifests validate and have no unknown keys either."""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from app.inference.bundle import Manifest, unknown_keys
from model_export.tiny_bundle import make_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bundle-format.md"
BUNDLES = (REPO / "models" / "default", REPO / "tests" / "fixtures" / "scenes-sat-lite0")


def _example() -> dict:
    blocks = re.findall(r"^```json\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.M | re.S)
    assert len(blocks) == 1, f"{DOC.name} should hold exactly one ```json block (the example manifest), not {len(blocks)}"
    return json.loads(blocks[0])


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (in Optional, dict values, lists, tuples)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, dict):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _fields_shown(value, shown: dict[type[BaseModel], set[str]]) -> None:
    """Record, per model class, the fields that the validated `value` (and what it holds) was given."""
    if isinstance(value, BaseModel):
        shown.setdefault(type(value), set()).update(value.model_fields_set)
        for name in type(value).model_fields:
            _fields_shown(getattr(value, name), shown)
    elif isinstance(value, dict):
        for item in value.values():
            _fields_shown(item, shown)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _fields_shown(item, shown)


def _all_models(model: type[BaseModel], seen: dict[type[BaseModel], None] | None = None) -> list[type[BaseModel]]:
    seen = {} if seen is None else seen
    if model not in seen:
        seen[model] = None
        for field in model.model_fields.values():
            for inner in _models_in(field.annotation):
                _all_models(inner, seen)
    return list(seen)


def test_the_documented_example_is_a_valid_manifest_without_unknown_keys():
    manifest = Manifest.model_validate(_example())
    assert unknown_keys(manifest) == []


def test_the_documented_example_shows_every_field_of_the_model():
    shown: dict[type[BaseModel], set[str]] = {}
    _fields_shown(Manifest.model_validate(_example()), shown)
    missing = [
        f"{model.__name__}.{field.alias or name}"
        for model in _all_models(Manifest)
        for name, field in model.model_fields.items()
        if name not in shown.get(model, set())
    ]
    assert missing == [], f"fields of app/inference/bundle.py's Manifest that {DOC.name}'s example does not show: {missing}"


def test_the_document_names_every_top_level_field():
    text = DOC.read_text(encoding="utf-8").split("```json", 1)[1].split("```", 1)[1]  # the prose after the example
    unexplained = [name for name in Manifest.model_fields if f"`{name}`" not in text]
    assert unexplained == []


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_shipped_manifests_validate_without_unknown_keys(bundle: Path):
    raw = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    manifest = Manifest.model_validate(raw)
    assert unknown_keys(manifest) == []
    # written back, the manifest is what was read (precision: its default, where it was not written)
    assert json.loads(manifest.to_json()) == {"precision": "fp32", **raw}


def test_factory_manifests_have_no_unknown_keys(tmp_path: Path):
    for i, kwargs in enumerate(({}, {"attention": False}, {"row_layout": True},
                                {"decoding": {"length_penalty": 1.0, "no_repeat_ngram_size": 2, "chosen_on": "x"}})):
        path = make_tiny_bundle(tmp_path / str(i), **kwargs)
        manifest = Manifest.model_validate_json((path / "manifest.json").read_text(encoding="utf-8"))
        assert unknown_keys(manifest) == []
