"""How DistPro processes moved, quarter by quarter: α̃'s mean step size, Σα and g (if learned).

    python benchmarks/process_movement.py benchmarks/data/distpro_process_*.json

Shows whether α̃ kept moving over the whole search (with a step-decay schedule its steps shrink tenfold
a quarter unless ``distpro.undo_lr_decay`` is on) and whether the pathways' total weight Σα moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdtune.weighting.process import Process, distance_from_uniform, movement_by_quarter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        process = Process.load(path)
        final_alpha, final_tilde = process.final()
        kept = len(final_alpha) if process.tau is None else int((final_tilde > process.tau).sum())
        largest = distance_from_uniform(final_alpha)["alpha_max_vs_uniform"]
        top = process.names[int(final_alpha.argmax())]
        print(f"{path}: {len(process.pathways)} pathways, {len(process.steps)} steps, "
              f"Σα at start {float(process.alpha[0].sum()):.3f}; at the end the largest α is {largest:.2f}x "
              f"uniform ({top}), a replay keeps {kept} of {len(final_alpha)} pathways (α̃ > τ)")
        for q, row in enumerate(movement_by_quarter(process), 1):
            g = f", g {row['g']:.3f}" if "g" in row else ""
            print(f"  quarter {q}: mean |Δα̃| per step {row['mean_step']:.5f}, Σα at its end {row['alpha_sum']:.3f}{g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
