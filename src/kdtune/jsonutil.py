"""Strict JSON for every file kdtune writes: a non-finite float becomes ``null``.

Python's ``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON: ``jq``,
JavaScript and most readers reject the whole file. A diverged step's loss is exactly such a value.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN / ±inf float (in nested dicts, lists, tuples) replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that writes non-finite floats as ``null`` and refuses anything else non-standard."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)
