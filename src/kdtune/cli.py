"""The ``kdtune`` command line.

    kdtune list losses                               # models, transforms, distances, weightings, datasets, teachers
    kdtune run configs/fmnist/kd.yaml train.epochs=3 # any config, key=value overrides
    kdtune run --plugin mypkg.models my.yaml         # the user's own models (registered on import)
    kdtune run --resume runs/<name>                  # continue an interrupted run exactly
    kdtune report runs/a runs/b                      # table + comparison plot
    kdtune probe resnet56 --input 1,28,28            # every module's output shape, stage outputs
    kdtune export runs/<name> student.pt             # the plain trained student's weights
    kdtune quickstart                                # the demo table (student alone, KD, FitNets+KD)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = {"models": "model", "losses": "loss", "transforms": "transform", "distances": "distance",
         "weightings": "weighting", "datasets": "dataset", "teachers": "teacher"}


def _import_plugins(args: argparse.Namespace) -> None:
    """Import the ``--plugin`` modules first: they register the user's models before names are looked up."""
    from kdtune.plugins import import_plugins

    import_plugins(args.plugin)


def _cmd_list(args: argparse.Namespace) -> int:
    _import_plugins(args)
    import kdtune.data  # noqa: F401  (importing registers the entries)
    import kdtune.distances  # noqa: F401
    import kdtune.losses  # noqa: F401
    import kdtune.models  # noqa: F401
    import kdtune.transforms  # noqa: F401
    import kdtune.weighting  # noqa: F401
    from kdtune.registry import REGISTRIES
    from kdtune.zoo import list_teachers, teacher_record

    if args.kind == "teachers":
        for name in list_teachers():
            rec = teacher_record(name)
            print(f"{name:32s} test acc {100 * rec['test_acc']:.2f}%  ({rec['model']}, {len(rec['epochs'])} epochs)")
        return 0
    registry = REGISTRIES[KINDS[args.kind]]
    for name in registry.names():
        # losses: the catalogue weight each method is run with unless a config gives one (or calibrates)
        weight = f"weight {registry.get(name).weight:<7g} " if args.kind == "losses" else ""
        print(f"{name:18s} {weight}{registry.describe(name)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kdtune.config import load_config
    from kdtune.recipe import resume_run, run

    _import_plugins(args)
    if args.resume:
        if args.config or args.overrides:
            # `kdtune run cfg.yaml --resume DIR`: the run's own saved config is what resumes.
            print(f"resuming {args.resume} with its saved config.yaml (config/overrides given are ignored)")
        run_dir, summary = resume_run(args.resume)
    else:
        if not args.config:
            raise SystemExit("kdtune run: give a config file (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        # Recorded in the run's config.yaml, so that `--resume` imports them again.
        cfg.plugins = list(dict.fromkeys([*cfg.plugins, *args.plugin]))
        run_dir, summary = run(cfg)
    acc = summary.get("test_acc")
    agree = summary.get("agreement_error")
    print(f"run: {run_dir}")
    if acc is not None:
        extra = f", agreement error {100 * agree:.2f}%" if agree is not None else ""
        print(f"final test accuracy {100 * acc:.2f}%{extra}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kdtune.report import comparison_rows, format_table, plot_comparison, plot_weights

    print(format_table(comparison_rows(args.runs)))
    out = Path(args.out) if args.out else Path(args.runs[0]) / "comparison.png"
    if plot_comparison(args.runs, out) is not None:
        print(f"plot: {out}")
    for run in args.runs:  # each run's path weights over training (Adaptive Distillation Fig. 4)
        weights = plot_weights(run)
        if weights is not None:
            print(f"weights: {weights}")
        if (Path(run) / "autokd.json").exists():  # an Auto-KD search: explored tree and reward per trial
            import json

            from kdtune.search.autokd import plot_search

            info = json.loads((Path(run) / "autokd.json").read_text())
            tree, rewards = plot_search(run)
            print(f"Auto-KD best spec (reward {info['best_reward']:.4f}): {Path(run) / 'best.yaml'}\n"
                  f"  tree: {tree}\n  rewards: {rewards}")
        if (Path(run) / "process.json").exists():  # a DistPro search: α per pathway, one panel per teacher stage
            from kdtune.search.distpro import plot_process
            from kdtune.weighting.process import Process

            png = plot_process(Process.load(Path(run) / "process.json"), Path(run) / "process.png")
            print(f"DistPro process (Fig. 6): {png}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import torch

    from kdtune.capture import find_stage_outputs, probe
    from kdtune.models import create_model

    _import_plugins(args)
    shape = tuple(int(v) for v in args.input.split(","))
    model = create_model(args.model, in_channels=shape[0], num_classes=args.num_classes)
    x = torch.zeros(2, *shape)
    stages = set(find_stage_outputs(model, x))
    for path, info in probe(model, x).items():
        mark = "  <- stage" if path in stages else ""
        print(f"{path or '(model)':40s} {info.type:20s} {info.shape}{mark}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from kdtune.checkpoint import load_checkpoint, save_atomic

    ckpt = load_checkpoint(Path(args.run) / "checkpoints" / "last.pt")
    student = {k.removeprefix("student."): v for k, v in ckpt["distiller"].items() if k.startswith("student.")}
    save_atomic(student, args.out)
    n = sum(v.numel() for v in student.values() if isinstance(v, torch.Tensor))
    print(f"wrote {args.out}: {len(student)} tensors, {n} values (student only; adapters dropped)")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from kdtune.quickstart import main as quickstart

    return quickstart(args.out, args.epochs, args.per_class, args.jobs, args.test_images)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdtune", description="Automated knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True)

    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this Python module first (it registers your models); repeatable")

    s = sub.add_parser("list", help="list registered components", parents=[plugin])
    s.add_argument("kind", choices=sorted(KINDS))
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("run", help="train from a YAML config", parents=[plugin])
    s.add_argument("config", nargs="?", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("report", help="compare runs: table and plot")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", help="comparison plot path (default: <first run>/comparison.png)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("probe", help="output shape of every module of a model, stage outputs marked",
                       parents=[plugin])
    s.add_argument("model")
    s.add_argument("--input", default="1,28,28", help="C,H,W of one input")
    s.add_argument("--num-classes", type=int, default=10)
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("export", help="write a run's plain student weights (adapters dropped)")
    s.add_argument("run")
    s.add_argument("out")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("quickstart", help="the demo: distill ResNet-8 from a shipped teacher, print a table")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--jobs", type=int, default=2, help="worker processes training rows side by side (1 thread each)")
    s.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images (default: all)")
    s.set_defaults(func=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kdtune.checkpoint import CheckpointError
    from kdtune.config import ConfigError
    from kdtune.data import DatasetNotFoundError

    try:
        return args.func(args)
    except (ConfigError, DatasetNotFoundError, CheckpointError, KeyError, ValueError) as err:
        # Expected user errors: the message says what to do; a traceback would bury it.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"kdtune {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
