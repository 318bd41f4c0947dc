"""The user's own code in configs and the CLI: plugin modules and ``module:callable`` names.

``kdtune run --plugin mypkg.models cfg.yaml`` (or ``plugins: [mypkg.models]`` in the YAML) imports
the named modules before any name is resolved, so the models they register become available::

    import kdtune

    @kdtune.register_model("sep_student")
    def sep_student(in_channels: int, num_classes: int) -> nn.Module: ...

A model may also be named as ``module:callable`` (``student: {name: mypkg.models:SepStudent}``).
Only modules the user names are imported: a YAML file itself stays data (``yaml.safe_load``).
The current directory is searched first, as for ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any


class PluginError(ValueError):
    """A plugin module or a ``module:callable`` name cannot be imported."""


def _import(module: str, what: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):  # the module itself is missing, not one it imports
            raise PluginError(f"cannot import {what} {module!r}: no such module (searched the current directory "
                              f"{cwd} and PYTHONPATH); check the name or add its directory to PYTHONPATH") from None
        raise


def import_plugins(modules: Iterable[str]) -> None:
    """Import each named module (their decorators register models, losses ...)."""
    for module in modules:
        _import(module, "plugin")


def resolve_callable(spec: str) -> Callable[..., Any]:
    """``"pkg.module:attr"`` -> the object ``attr`` of ``pkg.module`` (imported)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise PluginError(f"{spec!r}: write a callable as module:name, e.g. mypkg.models:SepStudent")
    obj = _import(module, "module")
    try:
        return getattr(obj, attr)
    except AttributeError:
        from kdtune.registry import closest

        near = closest(attr, [n for n in dir(obj) if not n.startswith("_")])
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise PluginError(f"module {module!r} has no {attr!r}.{hint}") from None
