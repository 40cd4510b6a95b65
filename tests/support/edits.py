"""Shared by the loader tests: a fixture with one item replaced or removed."""

from __future__ import annotations

from typing import Any

DELETE = object()


def changed(data: Any, *keys: Any, to: Any) -> Any:
    """`data` with the item at `keys` replaced by `to` (or removed when `to` is DELETE)."""
    parent = data
    for key in keys[:-1]:
        parent = parent[key]
    if to is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = to
    return data
