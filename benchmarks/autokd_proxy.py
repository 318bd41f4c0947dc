"""Auto-KD proxy fidelity and cost (papers/auto-kd.txt §2.3, Table 2) on FMNIST-5k.

    python benchmarks/autokd_proxy.py                       # 8 random specs, full protocol (hours on 2 cores)
    python benchmarks/autokd_proxy.py --specs 10 --seed 1
    python benchmarks/autokd_proxy.py --smoke               # tiny settings: checks the script runs (~1 min)

For ``--specs`` leaves drawn at random from Table 1's space it measures, on the 80/20 split of
``configs/fmnist/autokd_search.yaml``:

* the proxy trial (20 % data, 20 % epochs, 50 % sparse, cached teacher): reward (eq. 3), seconds;
* full training of the same spec (all the 80 % split, all epochs, dense, live teacher): validation
  accuracy and seconds;
* the Spearman rank correlation between proxy reward and full-training accuracy (paper: the proxy
  must rank distillers like full training), and the per-candidate cost ratio (paper: ~40x);
* the offline-teacher speedup: seconds per training step with and without the cache on the
  proxy's batches (paper: 1.29x), teacher-cache build time excluded (paid once per search).

Results go between ``<!-- table:autokd_proxy -->`` markers in benchmarks/RESULTS.md (not with --smoke).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import write_section  # noqa: E402

from kdtune.config import load_config  # noqa: E402
from kdtune.search.autokd import REWARD_FLOOR, TrialContext, reward_metrics  # noqa: E402
from kdtune.search.proxies import spearman  # noqa: E402
from kdtune.search.space import LEVELS, DistillerSpec  # noqa: E402
from kdtune.trainer import NonFiniteLossError  # noqa: E402


def step_seconds(ctx: TrialContext, spec: DistillerSpec, cached: bool, steps: int) -> float:
    """Mean seconds per training step (teacher + student) over ``steps`` steps of epoch 0."""
    trainer = ctx.trainer(ctx.spec_config(spec), None, full=True)
    cache_cb = None
    if cached:
        from kdtune.search.proxies import CachedTeacher

        cache_cb = CachedTeacher(ctx.cache)
        trainer.callbacks.append(cache_cb)
    trainer.distiller.train()
    trainer.train_loader.set_epoch(0)
    times = []
    for i, (x, y) in enumerate(trainer.train_loader):
        if i >= steps:
            break
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        times.append(time.perf_counter() - t0)
    times = times[1:] or times  # the first step warms up
    return sum(times) / len(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/fmnist/autokd_search.yaml"))
    ap.add_argument("--specs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny data and epochs; nothing written to RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=10")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        overrides += ["data.train_per_class=50", "train.epochs=2", "autokd.epoch_fraction=0.5",
                      "autokd.subset=0.5", "train.progress=false"]
    cfg = load_config(args.config, overrides)
    cfg.train.progress = False
    rng = random.Random(args.seed)
    specs = [DistillerSpec.from_path(tuple(rng.randrange(len(lv.choices)) for lv in LEVELS)) for _ in range(args.specs)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proxy_ctx = TrialContext(cfg, Path(tmp))
        full_cfg = copy.deepcopy(cfg)
        assert full_cfg.autokd is not None
        full_cfg.autokd.subset, full_cfg.autokd.epoch_fraction = 1.0, 1.0
        full_cfg.autokd.cache, full_cfg.autokd.sparsity = False, 0.0
        full_ctx = TrialContext(full_cfg, Path(tmp) / "full")
        for spec in specs:
            t0 = time.perf_counter()
            try:
                proxy = proxy_ctx.evaluate(proxy_ctx.spec_config(spec))
            except NonFiniteLossError:  # a diverging distiller: the floor reward, as in the search
                proxy = {"reward": REWARD_FLOOR, "reward_metrics": {"acc": float("nan")}}
            proxy_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            trainer = full_ctx.trainer(full_ctx.spec_config(spec), None, full=True)
            try:
                trainer.fit()
            except NonFiniteLossError:
                pass  # scored as it stands (accuracy of the diverged student)
            full_s = time.perf_counter() - t0
            d = trainer.distiller
            full = reward_metrics(d.student, d.teacher, full_ctx.val_loader(), cfg.autokd.student_layers,
                                  cfg.autokd.teacher_layers)
            rows.append((spec.key(), proxy["reward"], proxy["reward_metrics"]["acc"], proxy_s, full["acc"], full_s))
            print(f"{spec.key():55s} proxy reward {proxy['reward']:.4f} ({proxy_s:.1f}s)  "
                  f"full val acc {100 * full['acc']:.2f}% ({full_s:.1f}s)", flush=True)
        steps = 5 if args.smoke else 30
        live = step_seconds(proxy_ctx, specs[0], cached=False, steps=steps)
        cached = step_seconds(proxy_ctx, specs[0], cached=True, steps=steps)

    rho = spearman([r[1] for r in rows], [r[4] for r in rows])
    rho_acc = spearman([r[2] for r in rows], [r[4] for r in rows])  # Table 9: accuracy as the reward
    cost = sum(r[5] for r in rows) / sum(r[3] for r in rows)
    command = " ".join(["python benchmarks/autokd_proxy.py", *sys.argv[1:]])
    lines = [f"Auto-KD proxy fidelity — `{command}`, {datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
             "", "| spec | proxy reward | proxy val acc % | proxy s | full val acc % | full s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r:.4f} | {100 * pa:.2f} | {ps:.1f} | {100 * fa:.2f} | {fs:.1f} |"
              for k, r, pa, ps, fa, fs in rows]
    lines += ["", f"Spearman rank correlation (proxy reward vs full-training val acc, {len(rows)} specs): {rho:.3f}",
              f"Spearman of the proxy's own val acc (the `acc` reward) vs full-training val acc: {rho_acc:.3f}",
              f"Per-candidate cost, full / proxy: {cost:.1f}x (paper Table 2: ~40x)",
              f"Step time live teacher {1000 * live:.1f} ms, cached {1000 * cached:.1f} ms: "
              f"{live / cached:.2f}x (paper: 1.29x); cache build {proxy_ctx.cache_seconds:.1f}s, once per search", ""]
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        write_section("autokd_proxy", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
