"""Cost of NST's distance: the spatial-Gram form kdtune computes vs the channel-kernel form of eq. 4.

    OMP_NUM_THREADS=1 python benchmarks/nst_cost.py        # MobileNetV2 x0.5's last map vs WRN-40-2's, pooled
    OMP_NUM_THREADS=1 python benchmarks/nst_cost.py --student 128 64 7 7 --teacher 128 64 7 7   # ResNet-8 vs ResNet-56

For the polynomial kernel of degree 2 without offset, eq. 4's three kernel means over channel pairs
equal ``||S^T S / Cs - T^T T / Ct||_F^2`` (spatial Gram matrices, H*W x H*W), which
:func:`kdtune.distances.nst` computes when ``(H*W)^2 < Cs * Ct``. The channel form is written out here
independently (the (N, C, C) kernels of the reference code) and timed beside it: one forward +
backward on the student map, best of ``--reps``, one thread. Prints both times, their ratio and the
two losses (they must agree). Default shapes: FMNIST-2k-x's NST pathway without an adapter, batch 128
(student ``conv2`` 1280x4x4, teacher ``relu`` 128x7x7 average-pooled to 4x4).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kdtune.distances import nst


def channel_kernel_nst(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with k(x, y) = (x^T y)^2 over channel pairs: (N, Cs, Cs), (N, Ct, Ct), (N, Cs, Ct) kernels."""
    a, b = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)

    def kernel_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.transpose(1, 2)).pow(2).mean()

    return kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)


def best_time(fn, s: torch.Tensor, t: torch.Tensor, reps: int) -> tuple[float, float]:
    """(seconds of the fastest forward + backward, the loss)."""
    times, loss = [], float("nan")
    for _ in range(reps):
        s.grad = None
        start = time.perf_counter()
        out = fn(s, t)
        out.backward()
        times.append(time.perf_counter() - start)
        loss = out.item()
    return min(times), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=int, nargs=4, default=[128, 1280, 4, 4], metavar=("N", "C", "H", "W"))
    parser.add_argument("--teacher", type=int, nargs=4, default=[128, 128, 4, 4], metavar=("N", "C", "H", "W"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = torch.randn(*args.student, requires_grad=True)
    t = torch.randn(*args.teacher)
    gram, gram_loss = best_time(nst, s, t, args.reps)
    channel, channel_loss = best_time(channel_kernel_nst, s, t, args.reps)
    print(f"student {tuple(args.student)}, teacher {tuple(args.teacher)}, 1 thread, best of {args.reps}")
    print(f"kdtune.distances.nst:  {gram:.4f} s  (loss {gram_loss:.6g})")
    print(f"channel-kernel form:   {channel:.4f} s  (loss {channel_loss:.6g})")
    print(f"ratio: {channel / gram:.1f}x")


if __name__ == "__main__":
    main()
