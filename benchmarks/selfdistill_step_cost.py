"""Per-step process-CPU cost of self-distillation: a plain step, a DSN step, an MD step, an MD meta step.

    OMP_NUM_THREADS=1 python benchmarks/selfdistill_step_cost.py --models resnet8 wrn_16_1
    OMP_NUM_THREADS=1 python benchmarks/selfdistill_step_cost.py --against de0cf31   # A/B the meta step

One batch of 128 random (1, 28, 28) images (channels-last, as the Trainer runs), SGD steps for the
model (and exits), and for MD the meta-gradient (``SelfDistiller.meta_gradient``, all of a meta step but
its Adam update of the generator) with a second batch as D_test. The variants run
interleaved (A/B/A/B) in one process and each figure is the median of ``--reps`` rounds of
``time.process_time`` (CPU time of this process: less sensitive than wall time to other jobs on the
machine). With ``--against REV`` the meta step of ``src/kdtune/selfdistill/selfdistiller.py`` at git
revision REV runs beside this tree's, on the same weights and batches, and the largest difference of
their meta-gradients is printed (float rounding only, when both compute the same thing).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtune.models import create_model
from kdtune.selfdistill import SelfDistiller

ROOT = Path(__file__).resolve().parents[1]


def _old_class(rev: str) -> type:
    """SelfDistiller as of git revision ``rev`` (its selfdistiller.py loaded as a separate module)."""
    src = subprocess.run(["git", "show", f"{rev}:src/kdtune/selfdistill/selfdistiller.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "selfdistiller_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("selfdistiller_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SelfDistiller


def measure(model: str, reps: int, against: str | None) -> None:
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    x, xv = (torch.randn(128, 1, 28, 28, generator=g).contiguous(memory_format=cl) for _ in range(2))
    y, yv = (torch.randint(0, 10, (128,), generator=g) for _ in range(2))

    def build(cls: type, method: str) -> torch.nn.Module:
        torch.manual_seed(1)
        return cls(create_model(model, in_channels=1), (1, 28, 28), method=method).to(memory_format=cl)

    torch.manual_seed(1)
    plain = create_model(model, in_channels=1).to(memory_format=cl)
    dsn, md = build(SelfDistiller, "dsn"), build(SelfDistiller, "md")
    with torch.no_grad():  # a generator that has left its zero start (its refine convolutions begin at 0)
        for p in md.generator.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    variants: dict[str, Callable[[], object]] = {}

    def sgd_step(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step() -> None:
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    variants["plain step"] = sgd_step(plain, lambda: F.cross_entropy(plain(x), y))
    variants["DSN step"] = sgd_step(dsn, lambda: dsn(x, y)["loss"])
    md_params = md.trainable_parameters()
    md_opt = torch.optim.SGD(md_params, lr=0.01, momentum=0.9)

    def md_step() -> None:
        loss = md(x, y)["loss"]
        md_opt.zero_grad()
        loss.backward()
        md_opt.step()

    variants["MD step"] = md_step
    variants["MD meta step"] = lambda: md.meta_gradient(x, y, xv, yv, 0.1)
    if against:
        old = build(_old_class(against), "md")
        old.load_state_dict(md.state_dict())
        _, new_grads = md.meta_gradient(x, y, xv, yv, 0.1)
        _, old_grads = old.meta_gradient(x, y, xv, yv, 0.1)
        scale = max(float(o.abs().max()) for o in old_grads)
        diff = max(float((a - b).abs().max()) for a, b in zip(new_grads, old_grads, strict=True))
        print(f"{model}: meta-gradient here vs {against}: max |difference| / max |gradient| = {diff / scale:.1e}")
        variants[f"MD meta step @{against}"] = lambda: old.meta_gradient(x, y, xv, yv, 0.1)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    base = statistics.median(times["plain step"])
    print(f"| {model} | variant | ms / step (median of {reps}) | × plain step |")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {model} | {k} | {med * 1000:.1f} | {med / base:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet8"])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--against", default=None, help="a git revision whose meta step runs beside this one")
    args = p.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        measure(model, args.reps, args.against)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
