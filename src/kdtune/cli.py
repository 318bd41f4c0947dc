"""The ``kdtune`` command line.

    kdtune list losses                               # models, transforms, distances, weightings, datasets, teachers
    kdtune run configs/fmnist/kd.yaml train.epochs=3 # any config, key=value overrides
    kdtune run --plugin mypkg.models my.yaml         # the user's own models (registered on import)
    kdtune run --resume runs/<name>                  # continue an interrupted run exactly
    kdtune report runs/a runs/b                      # table + comparison plot
    kdtune probe resnet56 --input 1,28,28            # every module's output shape, stage outputs
    kdtune export runs/<name> student.pt             # the plain trained student's weights
    kdtune quickstart                                # the demo table (student alone, KD, FitNets+KD)

A mistake in the input (a bad config, a missing file, a run directory in use ...) is one line on
stderr naming the problem and the fix, exit code 2; ``kdtune --debug <command>`` adds the traceback.
Commands import torch only when they need it, so ``--help`` and ``list`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from kdtune.errors import InputFileError, RunDirError, is_user_error, one_line

KINDS = {"models": "model", "losses": "loss", "transforms": "transform", "distances": "distance",
         "weightings": "weighting", "datasets": "dataset", "teachers": "teacher"}


def _import_plugins(args: argparse.Namespace) -> None:
    """Import the ``--plugin`` modules first: they register the user's models before names are looked up."""
    from kdtune.plugins import import_plugins

    import_plugins(args.plugin)


def _catalogue(plugins: bool) -> dict[str, list[dict[str, object]]]:
    """The registries' entries: a static index (kdtune/catalogue.json, checked by a test to match
    them), as importing the registries would import torch, seconds for a few lines of text; the
    registries themselves when plugins may have added entries of their own."""
    from kdtune.catalogue import live_catalogue, load_catalogue

    return live_catalogue() if plugins else load_catalogue()


def _cmd_list(args: argparse.Namespace) -> int:
    _import_plugins(args)
    from kdtune.zoo import list_teachers, teacher_record

    if args.kind == "teachers":
        for name in list_teachers():
            rec = teacher_record(name)
            print(f"{name:32s} test acc {100 * rec['test_acc']:.2f}%  ({rec['model']}, {len(rec['epochs'])} epochs)")
        return 0
    for entry in _catalogue(bool(args.plugin))[KINDS[args.kind]]:
        # losses: the catalogue weight each method is run with unless a config gives one (or calibrates)
        weight = f"weight {entry['weight']:<7g} " if "weight" in entry else ""
        print(f"{entry['name']:18s} {weight}{entry['description']}")
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
    for run in args.runs:
        if not Path(run).is_dir():
            raise RunDirError(f"report {run}: no such run directory")
        if not (Path(run) / "metrics.jsonl").exists() and not (Path(run) / "config.yaml").exists():
            raise RunDirError(f"report {run}: not a kdtune run directory (no config.yaml, no metrics.jsonl)")
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


def _input_shape(text: str) -> tuple[int, int, int]:
    """``C,H,W`` of ``probe --input`` as three positive ints."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputFileError(f"--input {text!r}: give the C,H,W of one image as three positive integers, "
                             f"e.g. --input 1,28,28 (Fashion-MNIST) or --input 3,32,32 (CIFAR)")
    return shape  # type: ignore[return-value]


def _cmd_probe(args: argparse.Namespace) -> int:
    shape = _input_shape(args.input)
    import torch

    from kdtune.capture import find_stage_outputs, probe
    from kdtune.models import create_model

    _import_plugins(args)
    model = create_model(args.model, in_channels=shape[0], num_classes=args.num_classes)
    x = torch.zeros(2, *shape)
    stages = set(find_stage_outputs(model, x))
    for path, info in probe(model, x).items():
        mark = "  <- stage" if path in stages else ""
        print(f"{path or '(model)':40s} {info.type:20s} {info.shape}{mark}")
    return 0


def _export_target(run: Path, out: Path, force: bool) -> None:
    """Refuse to write over an existing file without ``--force``, and over a run's own files ever."""
    run_files = {p.resolve() for p in (run / "checkpoints").glob("*")} | {(run / "config.yaml").resolve()}
    if out.resolve() in run_files or out.resolve().parent == (run / "checkpoints").resolve():
        raise InputFileError(f"export {out}: that is {run}'s own checkpoint/config; writing the student there "
                             f"would break --resume. Choose a path outside {run / 'checkpoints'}")
    if out.is_dir():
        raise InputFileError(f"export {out}: is a directory; give a file name, e.g. {out / 'student.pt'}")
    if out.exists() and not force:
        raise InputFileError(f"export {out}: the file exists; pass --force to overwrite it, or choose another path")


def _cmd_export(args: argparse.Namespace) -> int:
    run, out = Path(args.run), Path(args.out)
    if not (run / "config.yaml").exists():
        raise RunDirError(f"export {run}: not a kdtune run directory (no config.yaml)")
    _export_target(run, out, args.force)
    import torch

    from kdtune.checkpoint import load_checkpoint, save_atomic

    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    if not isinstance(ckpt.get("distiller"), dict):
        raise RunDirError(f"export {run}: checkpoints/last.pt is not a kdtune training checkpoint (no 'distiller')")
    student = {k.removeprefix("student."): v for k, v in ckpt["distiller"].items() if k.startswith("student.")}
    save_atomic(student, out)
    n = sum(v.numel() for v in student.values() if isinstance(v, torch.Tensor))
    print(f"wrote {out}: {len(student)} tensors, {n} values (student only; adapters dropped)")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from kdtune.quickstart import main as quickstart

    return quickstart(args.out, args.epochs, args.per_class, args.jobs, args.test_images, args.verbose)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdtune", description="Automated knowledge distillation.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this Python module first (it registers your models); repeatable")

    s = sub.add_parser("list", parents=[common, plugin], help="list registered components")
    s.add_argument("kind", choices=sorted(KINDS))
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("run", parents=[common, plugin], help="train from a YAML config")
    s.add_argument("config", nargs="?", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("report", parents=[common], help="compare runs: table and plot")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", help="comparison plot path (default: <first run>/comparison.png)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("probe", parents=[common, plugin],
                       help="output shape of every module of a model, stage outputs marked")
    s.add_argument("model")
    s.add_argument("--input", default="1,28,28", help="C,H,W of one input")
    s.add_argument("--num-classes", type=int, default=10)
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("export", parents=[common], help="write a run's plain student weights (adapters dropped)")
    s.add_argument("run")
    s.add_argument("out")
    s.add_argument("--force", action="store_true", help="overwrite OUT if it exists (never the run's own files)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("quickstart", parents=[common],
                       help="the demo: distill ResNet-8 from a shipped teacher, print a table")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--jobs", type=int, default=2, help="worker processes training rows side by side (1 thread each)")
    s.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images (default: all)")
    s.add_argument("-v", "--verbose", action="store_true", help="show each row's own log (search trials, Optuna)")
    s.set_defaults(func=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (see :func:`kdtune.errors.is_user_error`) is one line on stderr
    and exit code 2, any other exception keeps its traceback. ``--debug``: a traceback for all."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if not is_user_error(err):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"kdtune {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
