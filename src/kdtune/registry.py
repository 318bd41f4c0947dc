"""One generic registry, instanced once per kind of component (timm-style).

Every pluggable piece of kdtune (models, transforms, distances, losses, weightings, datasets)
lives in a :class:`Registry`. ``kdtune list <kind>`` prints them, configs name them, and a wrong
name fails fast with the closest valid names.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from kdtune.errors import KdtuneError

T = TypeVar("T")


class UnknownNameError(KdtuneError, KeyError):
    """A component name that no registry entry has; the message lists the nearest valid names."""

    def __str__(self) -> str:  # a plain KeyError prints the repr of its message
        return str(self.args[0]) if self.args else ""

#: All registries by kind, e.g. ``REGISTRIES["distance"]``.
REGISTRIES: dict[str, Registry[Any]] = {}


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` names from ``candidates`` that look most like ``name``."""
    candidates = list(candidates)
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    # Substring matches catch "layer3" -> "layer3.8" that difflib ranks low.
    hits += [c for c in candidates if name and name in c and c not in hits]
    return hits[:n]


class Registry(Generic[T]):
    """A name -> object map with decorator registration and helpful lookup errors.

    Example:
        >>> distances = Registry("distance")
        >>> @distances.register("mse")
        ... def mse(s, t): ...
        >>> distances.get("mse") is mse
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        REGISTRIES[kind] = self

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` (default: its ``__name__``)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register an unnamed {self.kind}: pass name=")
            if key in self._items and not overwrite and self._items[key] is not obj:
                warnings.warn(f"{self.kind} {key!r} registered twice; the later one wins", stacklevel=2)
            self._items[key] = obj
            return obj

        return add

    def get(self, name_or_obj: str | T) -> T:
        """Look an entry up by name; a non-string is returned unchanged (already an object)."""
        if not isinstance(name_or_obj, str):
            return name_or_obj
        try:
            return self._items[name_or_obj]
        except KeyError:
            near = closest(name_or_obj, self._items)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name_or_obj!r}.{hint} Available: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        """First line of the entry's docstring (used by ``kdtune list``)."""
        doc = getattr(self._items[name], "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
