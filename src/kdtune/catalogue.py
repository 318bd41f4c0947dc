"""A static index of the component registries, so ``kdtune list`` answers without importing torch.

The registries stay the one source of truth: ``catalogue.json`` is generated from them by

    .venv/bin/python -m kdtune.catalogue        # rewrite src/kdtune/catalogue.json

and ``tests/test_catalogue.py`` fails when it no longer matches them (a component added, renamed,
re-described or re-weighted without regenerating the index).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")

#: Modules whose import registers the entries of every kind ``kdtune list`` shows.
REGISTERING_MODULES = ("kdtune.data", "kdtune.distances", "kdtune.losses", "kdtune.models", "kdtune.transforms",
                       "kdtune.weighting")


def live_catalogue() -> dict[str, list[dict[str, Any]]]:
    """``{kind: [{"name", "description"[, "weight"]}, ...]}`` read from the registries (imports torch).

    ``weight`` is a loss's catalogue weight (:attr:`kdtune.losses.LossSpec.weight`).
    """
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
    from kdtune.registry import REGISTRIES

    out: dict[str, list[dict[str, Any]]] = {}
    for kind in sorted(REGISTRIES):
        registry = REGISTRIES[kind]
        entries = []
        for name in registry.names():
            entry: dict[str, Any] = {"name": name, "description": registry.describe(name)}
            weight = getattr(registry.get(name), "weight", None)
            if isinstance(weight, int | float) and not isinstance(weight, bool):
                entry["weight"] = float(weight)
            entries.append(entry)
        out[kind] = entries
    return out


def load_catalogue() -> dict[str, list[dict[str, Any]]]:
    """The index written by :func:`write_catalogue` (no torch import)."""
    return json.loads(CATALOGUE_PATH.read_text())


def write_catalogue() -> Path:
    CATALOGUE_PATH.write_text(json.dumps(live_catalogue(), indent=1) + "\n")
    return CATALOGUE_PATH


if __name__ == "__main__":
    print(f"wrote {write_catalogue()}")
