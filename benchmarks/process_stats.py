"""How far a DistPro process moved its weights from uniform (``distance_from_uniform``), per process file.

    python benchmarks/process_stats.py benchmarks/data/distpro_process_fmnist5k*.json

Prints, for each file, the largest share over the uniform 1/L and the KL from uniform of α at the
first step, at the middle and at the last step of the search, and which pathway holds the largest share.
"""

from __future__ import annotations

import argparse

import torch

from kdtune.weighting.process import Process, distance_from_uniform


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    args = p.parse_args()
    print("| process file | steps | max share x L (first / middle / last) | KL from uniform, nats (last) | "
          "largest pathway (last) |")
    print("|---|---:|---:|---:|---|")
    for path in args.files:
        process = Process.load(path)
        alpha = torch.as_tensor(process.alpha)  # (steps, L)
        picks = [alpha[0], alpha[len(alpha) // 2], alpha[-1]]
        stats = [distance_from_uniform(a) for a in picks]
        top = process.names[int(alpha[-1].argmax())]
        shares = " / ".join(f"{s['alpha_max_vs_uniform']:.2f}" for s in stats)
        print(f"| `{path}` | {len(alpha)} | {shares} | {stats[-1]['alpha_kl_from_uniform']:.3f} | `{top}` |")


if __name__ == "__main__":
    main()
