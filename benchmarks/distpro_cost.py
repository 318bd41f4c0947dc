"""DistPro's cost: a search step vs a plain multi-pathway KD step, and what pathway dropping saves.

    python benchmarks/distpro_cost.py --process runs/fmnist_distpro_process.json        # full measurement
    python benchmarks/distpro_cost.py --steps 2 --reps 2 --batch 16 --per-class 4 --search-steps 3 \
        --random-teacher --no-write                                                   # smoke test
    python benchmarks/distpro_cost.py --pool-first     # 3x3 adapters pool first (own RESULTS section;
                                                       # dropping from a short search unless --process)

Measured on the FMNIST-5k pair (shipped ResNet-56 teacher -> ResNet-8 student), the search space of
configs/fmnist/distpro_search.yaml (all 3 x 3 stage pairs x 3 transforms = 27 HCL pathways):

1. **step cost** — median time of one *plain* multi-pathway KD step (teacher forward, student
   forward/backward through all 27 pathways with fixed weights, SGD step) vs one *search* step
   (α update by the finite-difference hypergradient of eq. 5 + the real step, every pathway
   computed: the search never drops, §3.4's saving is the replay's). The issue's bound: ≤ 3.0×.
2. **dropping in retraining** — with a process file (``--process``; without one a short search of
   ``--search-steps`` steps makes one), the process stretched to the retrain length (30 epochs of
   5000 images): the fraction of pathway losses computed at τ = 0.5 (the bound: ≤ 60 % of those
   without dropping), and the retrain step time with vs without dropping at steps spread over the
   schedule — the time saved.
3. **search cost / retrain cost** — (search steps × search step time) / (retrain steps × retrain
   step time with dropping at replay), for the configs' lengths (10 search epochs on 4000 images, 30 retrain
   epochs on 5000).

Blocks of ``--steps`` steps of each kind alternate ``--reps`` times (machine noise hits all
kinds); timings are medians over blocks of process CPU time (and wall time). The KD step puts the
pathways in scale; the search step is timed as :class:`DistProCallback` runs it (the look-ahead's
pass at θ shared with the real step) and without that sharing; the pathway step with the
distiller's default (each pathway's input conv separately) and with ``fuse_input_convs``. Writes
the table between ``<!-- table:distpro_cost -->`` markers in benchmarks/RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from timing import interleaved, load_note

from kdtune.data import BatchLoader, balanced_subset, load_fashion_mnist, train_val_split
from kdtune.distiller import Distiller
from kdtune.models import create_model
from kdtune.search.distpro import DistProSearch, pathways_from_process, search_space
from kdtune.weighting.process import Process, ProcessWeighting
from kdtune.zoo import load_teacher

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)
TRANSFORMS = ("conv1x1", "conv3x3", "distpro")
#: Transform arguments of the search space (``--pool-first`` sets pool_first on the 3x3 adapters).
TRANSFORM_KWARGS: dict[str, dict] = {}


def build(weighting: str, kwargs: dict, teacher: torch.nn.Module,
          pathways=None, fused: bool = False, logit_losses=()) -> tuple[Distiller, torch.optim.Optimizer]:
    """A distiller + optimiser, channels-last as the Trainer runs it; ``fused``: input convs of the
    pathways on one student feature as one conv (``Distiller.fuse_input_convs``)."""
    torch.manual_seed(0)
    student = create_model("resnet8", in_channels=1, num_classes=10)
    if pathways is None:
        pathways, _ = search_space(teacher, student, SHAPE, "all", TRANSFORMS, "hcl", transform_kwargs=TRANSFORM_KWARGS)
        kwargs = {"learned": [p.name for p in pathways], **kwargs} if weighting == "distpro" else kwargs
    d = Distiller(student, teacher, pathways, logit_losses, weighting=weighting, weighting_kwargs=kwargs,
                  input_shape=SHAPE)
    d.fuse_input_convs = fused
    d.to(memory_format=torch.channels_last)
    d.train()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    return d, opt


def real_step(d: Distiller, opt: torch.optim.Optimizer, x, y, step: int) -> None:
    out = d(x, y, step)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()


def batches(ds, batch: int, seed: int):
    loader = BatchLoader(ds, batch, shuffle=True, seed=seed, channels_last=True)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process", help="process file of a search (default: a short search makes one)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--per-class", type=int, default=500, help="training images per class (FMNIST-5k: 500)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--reps", type=int, default=2, help="blocks per kind (interleaved rounds)")
    p.add_argument("--search-steps", type=int, default=40, help="search steps for a process when none is given")
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=30)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--pool-first", action="store_true",
                   help="conv3x3 / distpro adapters pool a larger student map first (distpro.transform_kwargs); "
                        "give a --process searched so, or none")
    p.add_argument("--random-teacher", action="store_true", help="untrained ResNet-56 (smoke tests only)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pool_first:
        TRANSFORM_KWARGS.update({"conv3x3": {"pool_first": True}, "distpro": {"pool_first": True}})
        if args.process and not any(p.transform_kwargs for p in Process.load(args.process).pathways):
            p.error(f"--pool-first with {args.process}, a process searched without it: retrain steps would not "
                    "pool first; give a process searched with distpro.transform_kwargs pool_first, or none")

    if args.random_teacher:  # smoke tests before the zoo teacher exists: timings are the same, α is not
        torch.manual_seed(0)
        teacher = create_model("resnet56", in_channels=1, num_classes=10)
    else:
        teacher = load_teacher("resnet56_fashion_mnist")
    full = balanced_subset(load_fashion_mnist("train"), args.per_class, seed=0)
    train, val = train_val_split(full, 0.2, seed=0)
    data, held_out = batches(train, args.batch, 0), batches(val, args.batch, 1)

    kd, kd_opt = build("fixed", {}, teacher, pathways=[], logit_losses=["kd"])
    plain, plain_opt = build("equal", {"normalize": True}, teacher)
    plain_fused, plain_fused_opt = build("equal", {"normalize": True}, teacher, fused=True)
    search_d, search_opt = build("distpro", {"tau": args.tau}, teacher)
    unshared_d, unshared_opt = build("distpro", {"tau": args.tau}, teacher)
    n_paths = len(plain.pathways)
    search, unshared = DistProSearch(search_d), DistProSearch(unshared_d)
    step_no = [0]

    def plain_step(d, opt) -> None:
        x, y = next(data)
        real_step(d, opt, x, y, 0)

    def search_step(d, opt, s, share: bool = True) -> None:
        """One step as DistProCallback + Trainer run it (share: the look-ahead's pass at θ is the real forward)."""
        x, y = next(data)
        xv, yv = next(held_out)
        t, _ = s.step(x, y, xv, yv, opt, step_no[0], share_forward=share)
        d.reuse_teacher_output(x, t)
        real_step(d, opt, x, y, step_no[0])
        step_no[0] += 1

    # A process for the dropping measurement: given, or from a short search.
    if args.process:
        process = Process.load(args.process)
    else:
        for _ in range(args.search_steps):
            search_step(search_d, search_opt, search)
        w = search_d.weighting
        _, infos = search_space(teacher, search_d.student, SHAPE, "all", TRANSFORMS, "hcl",
                                transform_kwargs=TRANSFORM_KWARGS)
        assert [i.name for i in infos] == w.learned
        process = Process(infos, [0], w.alpha().detach()[None], w.alpha_tilde[None].clone(), tau=args.tau)
        print(f"(no --process: a {args.search_steps}-step search made a one-step process; pass --process for "
              f"the real measurement)", file=sys.stderr)

    timed = interleaved({
        "kd": lambda: plain_step(kd, kd_opt),
        "plain": lambda: plain_step(plain, plain_opt),
        "plain_fused": lambda: plain_step(plain_fused, plain_fused_opt),
        "search": lambda: search_step(search_d, search_opt, search),
        "search_unshared": lambda: search_step(unshared_d, unshared_opt, unshared, share=False),
    }, args.steps, args.reps)
    kd_s, search_s = timed["kd"]["cpu_ms"] / 1000, timed["search"]["cpu_ms"] / 1000

    # Retraining: the process stretched to the retrain length; dropping at tau vs none.
    retrain_steps = args.retrain_epochs * -(-len(full) // args.batch)
    search_len = args.search_epochs * -(-len(train) // args.batch)
    names = process.names
    rebuilt = pathways_from_process(process, teacher, create_model("resnet8", in_channels=1, num_classes=10), SHAPE)
    replay_drop, replay_opt = build("process", {"process": process, "tau": args.tau}, teacher, rebuilt)
    replay_all, replay_all_opt = build("process", {"process": process, "tau": None}, teacher, rebuilt)
    for w in (replay_drop.weighting, replay_all.weighting):
        assert isinstance(w, ProcessWeighting)
        w.set_total_steps(retrain_steps)
    _, stretched_tilde = process.stretch(retrain_steps)
    kept = (stretched_tilde > args.tau).float().mean(1)  # (T',) fraction computed per step
    kept_fraction = float(kept.mean())
    probe_steps = torch.linspace(0, retrain_steps - 1, max(2, args.reps * args.steps)).long().tolist()

    def replay_block(d, opt) -> None:
        for s in probe_steps:
            x, y = next(data)
            real_step(d, opt, x, y, s)

    replay = interleaved({"drop": lambda: replay_block(replay_drop, replay_opt),
                          "all": lambda: replay_block(replay_all, replay_all_opt)}, 1, args.reps, warmup=1)
    drop_s, all_s = (replay[k]["cpu_ms"] / 1000 / len(probe_steps) for k in ("drop", "all"))

    search_total = search_len * search_s
    retrain_total = retrain_steps * drop_s

    def row(label: str, key: str, base: str = "kd") -> tuple[str, ...]:
        t = timed[key]
        return (label, f"{t['cpu_ms']:.0f}", f"{t['wall_ms']:.0f}", f"{t['cpu_ms'] / timed[base]['cpu_ms']:.2f}×",
                f"{t['cpu_ms'] / timed['plain']['cpu_ms']:.2f}×")

    rows = [
        row("KD step (teacher + student + KD, no pathway)", "kd"),
        row(f"{n_paths}-pathway step (fixed weights)", "plain"),
        row(f"{n_paths}-pathway step, input convs fused (`fuse_input_convs`)", "plain_fused"),
        row("search step (every pathway computed; look-ahead pass at θ shared with the real step)", "search"),
        row("search step, look-ahead pass at θ not shared", "search_unshared"),
    ]
    lines = [
        f"### DistPro cost (ResNet-56 -> ResNet-8, FMNIST 28×28, {n_paths} pathways"
        f"{', 3x3 adapters pool first' if args.pool_first else ''})", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/distpro_cost.py {' '.join(sys.argv[1:])}` — "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, {load_note()} at the end, torch threads "
        f"{torch.get_num_threads()}, batch {args.batch}; interleaved blocks of {args.steps} steps of each kind, "
        f"{args.reps} rounds; medians of process CPU time (robust to the shared machine's load) and wall time; "
        "ratios of the CPU medians.", "",
        "| step | CPU ms | wall ms | vs KD step | vs pathway step |", "|---|---:|---:|---:|---:|",
        *[f"| {' | '.join(r)} |" for r in rows], "",
        f"- Retrain step (process replayed, CPU): every pathway computed {1000 * all_s:.0f} ms "
        f"({all_s / kd_s:.2f}× the KD step), dropping at τ = {args.tau:g} {1000 * drop_s:.0f} ms "
        f"({drop_s / kd_s:.2f}× the KD step).",
        f"- Pathway losses computed in retraining with dropping at τ = {args.tau:g}: **{100 * kept_fraction:.1f} %** "
        f"of those without dropping ({n_paths} pathways; process {args.process or '(short search)'} "
        f"stretched to {retrain_steps} steps); retrain step time saved: **{100 * (1 - drop_s / all_s):.1f} %**.",
        f"- Search cost / retrain cost: {search_len} search steps × {1000 * search_s:.0f} ms = "
        f"{search_total / 60:.1f} min vs {retrain_steps} retrain steps × {1000 * drop_s:.0f} ms = "
        f"{retrain_total / 60:.1f} min: **{search_total / retrain_total:.2f}**.",
        f"- Pathways of the process: {len(names)}; kept at its last step: "
        f"{int((process.alpha_tilde[-1] > args.tau).sum())}.",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import write_section

        write_section("distpro_cost_pool_first" if args.pool_first else "distpro_cost", body)


if __name__ == "__main__":
    main()
