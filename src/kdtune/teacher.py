"""A frozen teacher prepared once for inference: logits and captured features, cheaper.

    runner = TeacherRunner(teacher, ["layer2", "layer3"], precision="fp32")
    logits, features = runner(x)        # (N, K), {"layer2": (N, 32, 14, 14), ...}, no graph

The reference computation is the teacher's own forward with forward hooks on the captured modules
(:class:`kdtune.capture.FeatureCapture`, last call wins). The fast path computes the same values:

1. ``torch.fx`` traces the teacher into one graph whose output is ``(logits, *features)``: each
   captured module's output is a graph value, so no hook is needed and no later rewrite can move it;
2. an eval BatchNorm whose input is a Conv2d output used by nothing else is folded into that
   convolution (``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``)
   and removed — a captured BN output becomes the folded conv's output (the same value); a captured
   pre-BN conv output has a second user, so that pair is never folded;
3. fp32: the graph is traced by TorchScript, frozen and optimised for inference (oneDNN kernels with
   fused ReLU/add); bf16: the graph runs in bfloat16, channels-last, and outputs are cast back to
   fp32 (losses stay fp32).

For every new input shape the fast path is checked once against the reference on that batch
(max |difference| <= 1e-4 x the reference's scale in fp32, predictions identical); a teacher that
fx cannot trace (data-dependent control flow), or that fails the check, silently keeps the
reference path. Outputs are made under ``no_grad`` (not ``inference_mode``: inference tensors
cannot be saved for the backward of a loss that multiplies them with the student's features).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kdtune.capture import INPUT_TAP, FeatureCapture, Selector

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
_FP32_TOLERANCE = 1e-4  # relative to max(1, max |reference|): a few float32 ulps of a deep sum


class _FeatureTracer(torch.fx.Tracer):
    """An fx tracer that remembers, for each wanted module path, the value its last call returned
    (for a ``"<path>:input"`` tap, its first input), as the hooks of a FeatureCapture would."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__()
        self.wanted = set(paths)
        self.found: dict[str, Any] = {}

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if path + INPUT_TAP in self.wanted and args and isinstance(args[0], torch.fx.Proxy):
            # The module's first input (a pre-activation tap); cloned before an in-place module runs.
            self.found[path + INPUT_TAP] = args[0].clone() if getattr(m, "inplace", False) else args[0]
        out = super().call_module(m, forward, args, kwargs)
        if path in self.wanted:
            self.found[path] = out  # overwritten by a later call: the last call wins, as with hooks
        return out


def feature_graph(teacher: nn.Module, paths: Sequence[str]) -> torch.fx.GraphModule:
    """The teacher as an fx graph returning ``(logits, *features)`` in ``paths`` order.

    ``""`` (the model itself) is the logits. Raises if fx cannot trace the teacher or a captured
    module's output is not a single tensor.
    """
    tracer = _FeatureTracer(paths)
    with _hooks_disabled(teacher):
        graph = tracer.trace(teacher)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    values = []
    for path in paths:
        value = logits if path == "" else tracer.found.get(path)
        if not isinstance(value, (torch.fx.Proxy, torch.fx.Node)):
            raise TypeError(f"module {path!r}: not traced to a single tensor ({type(value).__name__})")
        values.append(value.node if isinstance(value, torch.fx.Proxy) else value)
    output.args = ((logits, *values),)
    gm = copy.deepcopy(torch.fx.GraphModule(teacher, graph))  # a GraphModule shares the teacher's leaves
    for m in gm.modules():  # hooks (copied with the leaves) have no business in the graph
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return gm.eval()


@contextmanager
def _hooks_disabled(model: nn.Module) -> Iterator[None]:
    """Forward (pre-)hooks off while tracing: a capture hook would be handed an fx proxy."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in saved:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks


def fold_batchnorms(gm: torch.fx.GraphModule) -> int:
    """Fold each eval ``BatchNorm2d`` into the ``Conv2d`` feeding it, in place; returns how many.

    Only pairs where the conv's output feeds the BN alone (a captured pre-BN output is a graph
    output, so it has a second user) and each module runs once.
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        bn = modules[node.target]
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"
                and isinstance(modules[conv_node.target], nn.Conv2d) and len(conv_node.users) == 1
                and calls[conv_node.target] == 1 and calls[node.target] == 1
                and bn.track_running_stats and bn.running_mean is not None and not bn.training):
            continue
        _set_submodule(gm, conv_node.target, fuse_conv_bn_eval(modules[conv_node.target], bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        folded += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class TeacherRunner:
    """``runner(x) -> (logits, {path: feature})`` for a frozen (eval, no-grad) teacher.

    Args:
        teacher: the frozen teacher; never modified (the fast path works on a copy of its graph).
        paths: module paths whose outputs are captured (``""`` = the logits), or ``{name: path}``.
        precision: ``"fp32"`` (exact up to float rounding) or ``"bf16"`` (faster, approximate).
        fast: False keeps the reference (hooked eager forward) path; so do ``selectors`` (as for
            :class:`~kdtune.capture.FeatureCapture`) and a forward under autocast.
    """

    def __init__(self, teacher: nn.Module, paths: Sequence[str] | Mapping[str, str], precision: Precision = "fp32",
                 fast: bool = True, selectors: Mapping[str, Selector] | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"teacher precision {precision!r} is not one of {list(PRECISIONS)}")
        self.teacher, self.precision = teacher, precision
        self.features = dict(paths) if isinstance(paths, Mapping) else {p: p for p in paths}  # name -> path
        self.selectors = dict(selectors or {})
        self.capture = (FeatureCapture(teacher, self.features, self.selectors, detach=True).attach()
                        if self.features else None)
        self.fast = fast and not self.selectors  # selected outputs: the reference path
        self._graph: Callable[[Tensor], tuple[Tensor, ...]] | None = None
        self._checked: set[tuple[tuple[int, ...], torch.dtype, torch.device]] = set()
        self._version = -1  # of the teacher's weights the graph was prepared from
        self.folded = 0
        self._channels_last: set[str] = set()  # features the teacher's own forward gives channels-last

    def reset(self) -> None:
        """Forget the prepared graph (after the teacher moved device or dtype)."""
        self._graph, self._checked = None, set()

    @torch.no_grad()
    def reference(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher's own forward, features from hooks."""
        logits = self.teacher(x)
        return logits, dict(self.capture.features) if self.capture is not None else {}

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.fast or torch.is_autocast_enabled(x.device.type):  # autocast: the forward it asks for
            return self.reference(x)
        if self._graph is not None and self._weights_version() != self._version:
            self.reset()  # the teacher's weights were changed in place (e.g. load_state_dict)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._checked:
            return self._first_call(x, key)
        return self._run(x)

    def _run(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        assert self._graph is not None
        if self.precision == "bf16":
            x = x.to(torch.bfloat16, memory_format=torch.channels_last)
        logits, *feats = self._graph(x)
        if self.precision == "bf16":
            logits, feats = logits.float(), [f.float() for f in feats]
        out = dict(zip(self.features, feats, strict=True))
        # In the memory format of the teacher's own forward (a channels-last model gives channels-last maps),
        # converted once here: every distance reading an NCHW map against a channels-last one would be slow.
        for name in self._channels_last:
            out[name] = out[name].contiguous(memory_format=torch.channels_last)
        return logits, out

    def _first_call(self, x: Tensor, key: tuple) -> tuple[Tensor, dict[str, Tensor]]:
        """Prepare the graph if needed and check it against the reference on this batch."""
        ref_logits, ref_feats = self.reference(x)
        self._channels_last = {name for name, f in ref_feats.items() if f.dim() == 4 and not f.is_contiguous()
                               and f.is_contiguous(memory_format=torch.channels_last)}
        if not isinstance(ref_logits, Tensor):  # a tuple/dict output: the caller picks the logits
            self.fast = False
            return ref_logits, ref_feats
        try:
            if self._graph is None:
                self._graph = self._prepare(x)
            logits, feats = self._run(x)
        except Exception as err:  # untraceable teacher (control flow, non-tensor outputs ...)
            warnings.warn(f"teacher fast path unavailable ({type(err).__name__}: {err}); "
                          f"using the teacher's own forward", stacklevel=3)
            self.fast = False
            return ref_logits, ref_feats
        if self.precision == "fp32" and not _close(logits, feats, ref_logits, ref_feats):
            warnings.warn("teacher fast path differs from the teacher's own forward; using the latter", stacklevel=3)
            self.fast = False
            return ref_logits, ref_feats
        self._checked.add(key)
        return logits, feats

    def _weights_version(self) -> int:
        """Sum of the in-place-modification counters of the teacher's parameters and buffers."""
        return sum(t._version for t in (*self.teacher.parameters(), *self.teacher.buffers()))

    def _prepare(self, x: Tensor) -> Callable[[Tensor], tuple[Tensor, ...]]:
        self._version = self._weights_version()
        gm = feature_graph(self.teacher, list(self.features.values()))
        self.folded = fold_batchnorms(gm)
        if self.precision == "bf16":
            return gm.to(torch.bfloat16, memory_format=torch.channels_last)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's tracer warnings about the fx-generated code
            traced = torch.jit.trace(gm, (x,), check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _close(logits: Tensor, feats: dict[str, Tensor], ref_logits: Tensor, ref_feats: dict[str, Tensor]) -> bool:
    pairs = [(logits, ref_logits), *((feats[k], ref_feats[k]) for k in ref_feats)]
    for a, b in pairs:
        if a.shape != b.shape:
            return False
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        if float((a - b).abs().max()) > _FP32_TOLERANCE * scale:
            return False
    return bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()) if logits.dim() > 1 else True
