"""Where to distil: named intermediate outputs of any ``nn.Module``, by dotted module path.

Features are captured with forward hooks, so no model has to be edited or taught to return its
features (torchdistill's approach; unlike it, a bad path fails at once and lists the closest real
ones). A path is what ``model.named_modules()`` prints: ``"layer2"``, ``"layer2.0.conv1"``; the empty
path ``""`` is the model itself (its output, e.g. the logits).

Example:
    >>> model = create_model("resnet8", in_channels=1)
    >>> with FeatureCapture(model, ["layer1", "layer3"]) as cap:
    ...     logits = model(x)                  # x: (N, 1, 28, 28)
    >>> cap["layer3"].shape                     # graph kept: losses on it train the model
    torch.Size([N, 64, 7, 7])

``probe`` lists every module's output shape for an example input, and ``find_stage_outputs`` picks
the feature maps after each downsampling stage (SPEC, "Stage outputs") from that listing.

A path ending in ``":input"`` (e.g. ``"layer1.2.relu:input"``) captures that module's *input*
instead of its output (a forward pre-hook). :func:`pre_activation_path` uses it for pre-activation
taps: the stage output before its final activation (what ReviewKD and DistPro distil).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdtune.registry import closest

__all__ = [
    "LayerNotFoundError",
    "FeatureNotCapturedError",
    "get_module",
    "Selector",
    "select_output",
    "describe_output",
    "FeatureCapture",
    "ModuleInfo",
    "probe",
    "find_stage_outputs",
    "INPUT_TAP",
    "split_tap",
    "pre_activation_path",
    "feature_shape",
]

#: Suffix of a path whose module's *input* is captured (forward pre-hook) instead of its output.
INPUT_TAP = ":input"

#: Element-wise activation modules: a pre-activation tap reads the input of the last one a stage runs.
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
                                            nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)


def split_tap(path: str) -> tuple[str, bool]:
    """``"a.b:input"`` -> (``"a.b"``, True); any other path -> (path, False)."""
    if path.endswith(INPUT_TAP):
        return path[: -len(INPUT_TAP)], True
    return path, False

#: How to pick one tensor out of a module's output: ``None`` (the output is a tensor), an ``int``
#: (index into a tuple/list), a ``str`` (dict key, or attribute such as a HF ``ModelOutput`` field),
#: or a callable ``output -> Tensor``.
Selector = int | str | Callable[[Any], Tensor] | None


class _MessageKeyError(KeyError):
    """A KeyError whose ``str()`` is its message (plain KeyError prints the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(_MessageKeyError):
    """A module path that does not exist in a model; the message lists the closest real paths.

    Attributes:
        path: the path that was asked for.
        suggestions: up to 5 real module paths that look like it.
    """

    def __init__(self, message: str, path: str = "", suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.path = path
        self.suggestions = list(suggestions)


class FeatureNotCapturedError(_MessageKeyError):
    """A feature was asked for that the last forward did not produce (or that was never declared)."""


# --------------------------------------------------------------------------- module paths


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a (Distributed)DataParallel wrapper; other modules unchanged."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _list_children(prefix: str, module: nn.Module, limit: int = 12) -> str:
    names = [f"{prefix}.{c}" if prefix else c for c in module._modules]
    if len(names) > limit:
        names = [*names[: limit - 2], "...", names[-1]]
    return ", ".join(names)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at a dotted ``path``; ``""`` is ``model`` itself.

    Args:
        model: any module.
        path: dotted path as printed by ``model.named_modules()``, e.g. ``"layer2.0.conv1"``.

    Raises:
        LayerNotFoundError: the path does not exist. The message names the model class, the
            children of the longest valid prefix of the path, and up to 5 closest real paths.
    """
    if not isinstance(path, str):
        raise TypeError(f"module path must be a str like 'layer2.0', got {type(path).__name__}: {path!r}")
    if path == "":
        return model
    module, prefix = model, ""
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            raise _not_found(model, path, prefix, module, part)
        module = child
        prefix = f"{prefix}.{part}" if prefix else part
    return module


def _not_found(model: nn.Module, path: str, prefix: str, parent: nn.Module, part: str) -> LayerNotFoundError:
    model_name = type(model).__name__
    msg = f"no module {path!r} in {model_name}."
    if hasattr(parent, part):
        # e.g. "conv1.weight": a parameter, buffer or plain attribute, not a module.
        kind = type(getattr(parent, part)).__name__
        msg += f" ({part!r} of {prefix or model_name!r} is a {kind}, not a module.)"
    children = _list_children(prefix, parent)
    if prefix:
        has = f"has children: {children}" if children else "has no child modules"
        msg += f" {prefix!r} ({type(parent).__name__}) {has}."
    else:
        msg += f" Top-level modules: {children or '(none)'}."
    suggestions = closest(path, [name for name, _ in model.named_modules() if name])
    if suggestions:
        msg += f" Closest module paths: {', '.join(suggestions)}."
    if "module" in model._modules and prefix == "":
        msg += " The model looks wrapped (e.g. DistributedDataParallel): pass model.module."
    msg += " All paths: [name for name, _ in model.named_modules()]."
    return LayerNotFoundError(msg, path, suggestions)


# --------------------------------------------------------------------------- output selection


def describe_output(output: Any, depth: int = 0) -> str:
    """A short structural description of a module output, e.g. ``tuple(Tensor(2, 8), dict(aux=...))``."""
    if isinstance(output, Tensor):
        return f"Tensor{tuple(output.shape)}"
    if depth >= 2:
        return type(output).__name__
    if isinstance(output, Mapping):
        items = [f"{k!r}: {describe_output(v, depth + 1)}" for k, v in list(output.items())[:6]]
        more = ", ..." if len(output) > 6 else ""
        return f"{type(output).__name__}{{{', '.join(items)}{more}}}"
    if isinstance(output, (tuple, list)):
        items = [describe_output(v, depth + 1) for v in output[:6]]
        more = ", ..." if len(output) > 6 else ""
        return f"{type(output).__name__}[{', '.join(items)}{more}]"
    return type(output).__name__


def select_output(output: Any, selector: Selector) -> Tensor:
    """Pick the tensor to capture out of a module's output.

    Args:
        output: whatever the module's forward returned.
        selector: ``None`` -> ``output`` must be a Tensor; ``int`` -> ``output[i]`` of a tuple/list;
            ``str`` -> ``output[key]`` of a mapping, else ``getattr(output, key)`` (e.g. a HF
            ``ModelOutput`` field); callable -> ``selector(output)``.

    Returns:
        The selected tensor.

    Raises:
        TypeError / IndexError / KeyError: the output does not fit the selector, or the selection is
            not a tensor. The message describes the output's structure.
    """
    return _select(output, selector, "module output")


def _select(output: Any, selector: Selector, where: str) -> Tensor:
    structure = describe_output(output)
    if selector is None:
        picked = output
        if not isinstance(picked, Tensor):
            raise TypeError(
                f"{where} is not a Tensor but {structure}; give a selector to pick one tensor: an int "
                f"index (tuple/list), a str key (dict/attribute) or a callable output -> Tensor."
            )
        return picked
    if isinstance(selector, bool):  # bool is an int subclass; True as an index is surely a mistake
        raise TypeError(f"selector must be an int, str, callable or None, got bool {selector!r}")
    if isinstance(selector, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(f"int selector {selector} needs a tuple/list, but {where} is {structure}")
        if not -len(output) <= selector < len(output):
            raise IndexError(f"selector index {selector} out of range for {where} {structure}")
        picked = output[selector]
    elif isinstance(selector, str):
        if isinstance(output, Mapping):
            if selector not in output:
                near = closest(selector, [str(k) for k in output])
                hint = f" Did you mean: {', '.join(near)}?" if near else ""
                raise _MessageKeyError(f"key {selector!r} not in {where} {structure}.{hint}")
            picked = output[selector]
        elif hasattr(output, selector):
            picked = getattr(output, selector)
        else:
            raise _MessageKeyError(f"{where} {structure} has no key or attribute {selector!r}")
    elif callable(selector):
        picked = selector(output)
    else:
        raise TypeError(f"selector must be an int, str, callable or None, got {type(selector).__name__}")
    if not isinstance(picked, Tensor):
        raise TypeError(
            f"selector {selector!r} picked {describe_output(picked)} from {where} {structure}; "
            f"it must pick a Tensor."
        )
    return picked


# --------------------------------------------------------------------------- capture


class FeatureCapture:
    """Capture named intermediate outputs of a model with forward hooks.

    Use it as a context manager for one forward, or ``attach()`` it once and keep it for a whole
    training run (the Distiller does). ``features[name]`` is the output of the module at
    ``paths[name]`` in the model's most recent forward:

    - the graph is kept (no detach unless ``detach=True``), so losses on features train the model;
    - features are cleared when the model's forward starts, so a feature is never stale from an
      earlier batch; a module called several times in one forward keeps its LAST call's output;
    - hooks also fire under ``torch.func.functional_call`` (DistPro's functional look-ahead);
    - a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped: paths are those of the
      bare model (``model.module``); passing ``model.module`` yourself is equivalent.

    Outputs that a later in-place op modifies (``nn.ReLU(inplace=True)`` applied to them) are seen
    modified; capture the module after the in-place op instead.

    Args:
        model: any ``nn.Module``.
        paths: module paths (each is also the feature's name), or a mapping ``{name: path}``.
            Validated here: an unknown path raises :class:`LayerNotFoundError`.
        selectors: optional ``{name: Selector}`` for modules whose output is not a single tensor
            (see :func:`select_output`).
        detach: store ``output.detach()`` (e.g. for a frozen teacher or for logging).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str] | Mapping[str, str],
                 selectors: Mapping[str, Selector] | None = None, detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureCapture needs an nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        if isinstance(paths, str):
            raise TypeError(f"paths must be a list of module paths or a {{name: path}} dict; "
                            f"got the single string {paths!r} — wrap it in a list: [{paths!r}]")
        if isinstance(paths, Mapping):
            self.paths: dict[str, str] = dict(paths)
        else:
            paths = list(paths)
            repeated = sorted({p for p in paths if paths.count(p) > 1})
            if repeated:
                raise ValueError(f"paths listed more than once: {repeated}")
            self.paths = {p: p for p in paths}
        if not self.paths:
            raise ValueError("FeatureCapture needs at least one module path")
        self.modules: dict[str, nn.Module] = {n: get_module(self.model, split_tap(p)[0]) for n, p in self.paths.items()}
        self.selectors: dict[str, Selector] = dict(selectors or {})
        unknown = [name for name in self.selectors if name not in self.paths]
        if unknown:
            raise ValueError(f"selectors given for unknown feature names {unknown}; "
                             f"feature names are {list(self.paths)}")
        for name, sel in self.selectors.items():
            if not (sel is None or isinstance(sel, (int, str)) or callable(sel)) or isinstance(sel, bool):
                raise TypeError(f"selector for {name!r} must be an int, str, callable or None, got {sel!r}")
        self.detach = detach
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    # -- lifecycle

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> FeatureCapture:
        """Register the hooks (idempotent) and clear old features. Returns ``self``."""
        if self._handles:
            return self
        self.clear()
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start))
        for name, module in self.modules.items():
            if split_tap(self.paths[name])[1]:
                self._handles.append(module.register_forward_pre_hook(_StoreInput(self, name)))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook this capture registered. Captured features stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget captured features (frees the graphs they hold)."""
        self.features.clear()

    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()  # also on exceptions; they propagate

    # -- hooks

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        self.features.clear()

    def _make_hook(self, name: str) -> _StoreFeature:
        return _StoreFeature(self, name)

    # -- access

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.features[name]
        except KeyError:
            pass
        if name not in self.paths:
            near = closest(str(name), self.paths)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise FeatureNotCapturedError(
                f"no feature named {name!r} in this capture.{hint} Features: {list(self.paths)}"
            )
        state = "" if self.attached else (
            " The capture is not attached: use `with FeatureCapture(...)` or .attach()."
        )
        raise FeatureNotCapturedError(
            f"feature {name!r} (module {self.paths[name]!r}) was not captured: the model's forward did not "
            f"reach that module — the forward has not run yet since the capture was attached/cleared, or "
            f"the module is not used in forward.{state}"
        )

    def __repr__(self) -> str:
        return (f"FeatureCapture({type(self.model).__name__}, {self.paths}, attached={self.attached}, "
                f"captured={list(self.features)})")


class _StoreFeature:
    """The forward hook of one captured module: stores its (selected) output in the capture.

    An object rather than a closure so that ``copy.deepcopy`` of a model carrying the hook
    yields a hook writing into the *copied* capture (a closure would be shared by the copy and
    keep writing into the original's features).
    """

    def __init__(self, capture: FeatureCapture, name: str) -> None:
        self.capture, self.name = capture, name
        self.selector = capture.selectors.get(name)
        self.where = f"output of {capture.paths[name]!r} ({type(capture.modules[name]).__name__}, feature {name!r})"

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        feature = _select(output, self.selector, self.where)
        # Overwriting keeps the last call when a module runs several times in one forward.
        self.capture.features[self.name] = feature.detach() if self.capture.detach else feature


class _StoreInput:
    """The forward pre-hook of a ``":input"`` path: stores the module's first positional input.

    An in-place module (``nn.ReLU(inplace=True)``) would overwrite that tensor, so it is cloned
    first (the clone keeps the graph)."""

    def __init__(self, capture: FeatureCapture, name: str) -> None:
        self.capture, self.name = capture, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{self.capture.paths[self.name]!r}: the module's first input is not a Tensor")
        x = args[0].clone() if getattr(module, "inplace", False) else args[0]
        self.capture.features[self.name] = x.detach() if self.capture.detach else x


# --------------------------------------------------------------------------- probing


@dataclass
class ModuleInfo:
    """What one module did in a probe forward.

    Attributes:
        path: dotted module path (``""`` for the model itself).
        type: class name, e.g. ``"Conv2d"``.
        shape: output shape of its last call, or ``None`` if that output is not a tensor (or it
            was never called).
        calls: how many times it ran in the forward.
        order: rank of its last call's completion (0 = finished first); -1 if never called. A
            container finishes after its children.
    """

    path: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    order: int


def _call(model: nn.Module, example_input: Tensor | tuple | Mapping) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def probe(model: nn.Module, example_input: Tensor | tuple | Mapping) -> dict[str, ModuleInfo]:
    """Run one forward and report every module's output shape, ordered by completion.

    The forward runs in eval mode under ``torch.no_grad()``, so BatchNorm running statistics do
    not move; every module's own train/eval flag is restored afterwards, and the hooks are removed
    even if the forward raises.

    Args:
        model: any module (a DDP/DataParallel wrapper is unwrapped).
        example_input: a tensor ``model(x)``, a tuple ``model(*x)`` or a mapping ``model(**x)``;
            a batch of 1-2 small samples is enough.

    Returns:
        ``{path: ModuleInfo}`` for every module, in completion order of each module's last call;
        modules the forward never called come last with ``calls=0``.
    """
    model = _unwrap(model)
    modules = list(model.named_modules())
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {path: 0 for path, _ in modules}
    finished: dict[str, int] = {}
    counter = [0]

    def make_hook(path: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shapes[path] = tuple(output.shape) if isinstance(output, Tensor) else None
            calls[path] += 1
            finished[path] = counter[0]
            counter[0] += 1

        return hook

    _eval_forward(model, example_input, [(m, make_hook(path)) for path, m in modules])

    types = {path: type(m).__name__ for path, m in modules}
    ran = sorted(finished, key=finished.__getitem__)
    infos = {p: ModuleInfo(p, types[p], shapes[p], calls[p], rank) for rank, p in enumerate(ran)}
    for path, _ in modules:
        if path not in infos:
            infos[path] = ModuleInfo(path, types[path], None, 0, -1)
    return infos


def _eval_forward(model: nn.Module, example_input: Tensor | tuple | Mapping,
                  hooks: Sequence[tuple[nn.Module, Callable[..., None]]]) -> None:
    """One eval-mode, no-grad forward with the given forward hooks; hooks removed, and every module's own
    mode restored (a model may deliberately keep some parts in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.train(training)


def pre_activation_path(model: nn.Module, path: str, example_input: Tensor | tuple | Mapping) -> str:
    """The capture path of ``path``'s output *before* its final activation.

    Finds the activation module (:data:`ACTIVATIONS`) inside ``path`` (or ``path`` itself) whose
    last call returned exactly the tensor ``path`` returns, and gives ``"<its path>:input"``
    (e.g. ``"layer1"`` of a ResNet -> ``"layer1.2.relu:input"``: ``out + shortcut`` before the
    block's last ReLU). When no activation produced the output (a pre-activation WideResNet block,
    a linear bottleneck), the output is already pre-activation and ``path`` is returned.

    Args:
        model: any module; path: a module path in it; example_input: as for :func:`probe`.
    """
    model = _unwrap(model)
    target = get_module(model, path)
    outputs: dict[str, Any] = {}

    def remember(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[name] = output
        return hook

    prefix = f"{path}." if path else ""
    acts = [(prefix + sub if sub else path, m) for sub, m in target.named_modules() if isinstance(m, ACTIVATIONS)]
    _eval_forward(model, example_input, [(target, remember("")), *((m, remember(p)) for p, m in acts)])
    out = outputs.get("")
    found = [p for p, _ in acts if out is not None and outputs.get(p) is out]
    return found[-1] + INPUT_TAP if found else path


def feature_shape(model: nn.Module, path: str, example_input: Tensor | tuple | Mapping) -> tuple[int, ...]:
    """Shape of the feature a :class:`FeatureCapture` path (``":input"`` taps included) gives for an example."""
    capture = FeatureCapture(model, [path], detach=True)
    with capture:
        _eval_forward(_unwrap(model), example_input, [])
    return tuple(capture[path].shape)


def find_stage_outputs(model: nn.Module, example_input: Tensor | tuple | Mapping) -> list[str]:
    """Module paths of the feature maps after each downsampling stage (SPEC, "Stage outputs").

    Walks the modules of a :func:`probe` in completion order, keeping those (other than the model
    itself) that ran exactly once and output a 4-D (N, C, H, W) map with H x W larger than 1 x 1
    (a globally pooled map is a vector, not a stage). Whenever (H, W) changes between two
    consecutive ones, the stage output is the last map at the old size that is *not inside the
    block doing the down-sampling* (the parent of the first module at the new size): in a
    pre-activation net (WRN) that block first applies BN-ReLU at the old size, which is the next
    stage's input processing, not the previous stage's output. The last map overall is the final
    stage (the map before global pooling). Maps larger than one seen earlier (the other branch
    of a two-branch down-sampling block) are ignored. Because a container finishes after its children, a
    stage container (``layer1``) is preferred to its last block: CIFAR ResNets give
    ``["layer1", "layer2", "layer3"]``, WRNs ``["block1", "block2", "relu"]`` (the final BN-ReLU).
    Pass explicit paths where a different choice matters.

    Transformers: when a container (``nn.Sequential`` / ``nn.ModuleList``) holds two or more blocks
    that each ran once and output (N, L, D) tokens of one shape, after the last 4-D map (a patch
    embedding), every block is a stage: a ViT gives ``["blocks.0", ..., "blocks.<depth-1>"]``.

    Args:
        model: any module.
        example_input: as for :func:`probe`; its spatial size must be the one used in training.

    Returns:
        Paths ordered from the input side, e.g. ``["layer1", "layer2", "layer3"]``.

    Raises:
        ValueError: no module produced a usable 4-D map, nor a run of token blocks.
    """
    infos = probe(model, example_input)
    maps = [
        info for info in infos.values()
        if info.path and info.calls == 1 and info.shape is not None and len(info.shape) == 4
        and info.shape[2:] != (1, 1)
    ]
    blocks = _token_blocks(_unwrap(model), infos)
    if blocks and (not maps or infos[blocks[0]].order > maps[-1].order):
        return blocks
    if not maps:
        raise ValueError(
            f"{type(_unwrap(model)).__name__}: no submodule ran once and produced a 4-D (N, C, H, W) map "
            f"larger than 1x1, nor are there >= 2 blocks giving (N, L, D) tokens of one shape, so stage outputs "
            f"cannot be found automatically; pass explicit module paths (`kdtune probe` lists every module's "
            f"output shape; a block returning a tuple needs Pathway(selector=...))."
        )
    maps = _monotone(maps)
    stages = [_stage_before(maps, i) for i in range(len(maps) - 1)
              if maps[i].shape[2:] != maps[i + 1].shape[2:]]  # type: ignore[index]
    if maps[-1].path not in stages:
        stages.append(maps[-1].path)
    return stages


def _token_blocks(model: nn.Module, infos: Mapping[str, ModuleInfo]) -> list[str]:
    """Paths of the longest run of sibling blocks (children of one Sequential / ModuleList) that
    each ran once and output (N, L, D) tokens of one shape; [] if there is none of length >= 2."""
    best: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        children = [f"{path}.{name}" if path else name for name, _ in module.named_children()]
        shapes = {infos[c].shape for c in children if c in infos}
        if (len(shapes) == 1 and all(infos[c].calls == 1 for c in children)
                and (shape := next(iter(shapes))) is not None and len(shape) == 3 and len(children) > len(best)):
            best = children
    return best


def _stage_before(maps: list[ModuleInfo], i: int) -> str:
    """The stage output for the size change between ``maps[i]`` and ``maps[i + 1]``.

    The last map of the old size, skipping modules inside the down-sampling block (the parent
    of ``maps[i + 1]``), unless that block is the model itself (a flat ``nn.Sequential``).
    """
    block = maps[i + 1].path.rpartition(".")[0]
    size = maps[i].shape[2:]  # type: ignore[index]
    for info in reversed(maps[: i + 1]):
        if info.shape[2:] != size:  # type: ignore[index]
            break  # back in the previous stage: nothing outside the block at this size
        if not (block and info.path.startswith(block + ".")):
            return info.path
    return maps[i].path


def _monotone(maps: list[ModuleInfo]) -> list[ModuleInfo]:
    """Drop maps larger than one already seen: in a two-branch block (ShuffleNetV2) one branch
    may finish down-sampling before the other branch starts at the old size."""
    kept, smallest = [], float("inf")
    for info in maps:
        area = info.shape[2] * info.shape[3]  # type: ignore[index]
        if area <= smallest:
            kept.append(info)
            smallest = area
    return kept
