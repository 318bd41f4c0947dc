"""Every bad input of issue 15's table (and the ones that already failed well): the command exits
with code 2, prints one line on stderr naming the problem, no traceback, and no existing file changes.

The commands run in-process (``kdtune.cli.main``) on a tiny finished run (Fashion-MNIST, 2 images
per class, 1 epoch, student alone) shared by the module; each case gets its own copy of it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kdtune.cli import main
from kdtune.rundir import run_lock

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fmnist"
TINY = ["data.train_per_class=2", "data.test_limit=50", "data.batch_size=10", "train.epochs=1",
        "train.progress=false"]
# 10 steps an epoch: enough for a huge learning rate to reach NaN (on 2 steps the loss stays finite).
NAN_DATA = ["data.train_per_class=10", "train.epochs=2"]
RUN_CONFIG = {
    "seed": 0, "name": "tiny",
    "data": {"dataset": "fashion_mnist", "train_per_class": 2, "test_limit": 50, "batch_size": 10},
    "student": {"name": "resnet8"},
    "train": {"epochs": 1, "progress": False},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**RUN_CONFIG, "output_dir": str(root / "runs")}))
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


@pytest.fixture
def run_dir(tmp_path, finished_run) -> Path:
    """A private copy of the finished run (a case may try to damage it)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but lock files (they hold whoever holds the lock)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


BINARY = bytes(range(256)) * 4  # not UTF-8, not YAML, not JSON


class _OpenFile:
    """Pickles to ``builtins.open(<marker>, "w")``: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_cifar(tmp: Path) -> Path:
    root = tmp / "cifar"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write(root / name, pickle.dumps({b"data": _OpenFile(tmp / "PWNED"), b"labels": [0]}, protocol=2))
    return root


def without_checkpoint(run: Path) -> Path:
    (run / "checkpoints" / "last.pt").unlink()
    return run


# Each case: (tmp_path, run_dir) -> (argv, a regex the one-line message must match).
Case = Callable[[Path, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {
    # --- issue 15's table
    "resume a missing directory": lambda tmp, run: (
        ["run", "--resume", str(tmp / "nope")], r"--resume .*nope: no such directory"),
    "resume a directory that is not a run": lambda tmp, run: (
        ["run", "--resume", str(write(tmp / "x" / "a.txt", "x").parent)], r"no config\.yaml in it"),
    "resume without checkpoints/last.pt keeps the metrics": lambda tmp, run: (
        ["run", "--resume", str(without_checkpoint(run))],
        r"1 recorded epoch\(s\) in metrics\.jsonl but no checkpoints/last\.pt.*nothing was changed"),
    "resume a run another process holds": lambda tmp, run: (
        ["run", "--resume", str(run)], r"in use by process \d+"),
    "report a missing directory": lambda tmp, run: (
        ["report", str(tmp / "nope")], r"report .*nope: no such run directory"),
    "process= a missing file": lambda tmp, run: (
        ["run", str(CONFIGS / "distpro_retrain.yaml"), f"process={tmp / 'nope.json'}", *TINY],
        r"no process file at .*nope\.json"),
    "process= a binary file": lambda tmp, run: (
        ["run", str(CONFIGS / "distpro_retrain.yaml"), f"process={write(tmp / 'p.json', BINARY)}", *TINY],
        r"p\.json: not a process JSON file"),
    "spec= a missing file": lambda tmp, run: (
        ["run", str(CONFIGS / "autokd_final.yaml"), f"spec={tmp / 'nope.yaml'}", *TINY],
        r"distiller spec not found: .*nope\.yaml"),
    "spec= a binary file": lambda tmp, run: (
        ["run", str(CONFIGS / "autokd_final.yaml"), f"spec={write(tmp / 's.yaml', BINARY)}", *TINY],
        r"s\.yaml: not a distiller spec YAML file"),
    "probe --input with two numbers": lambda tmp, run: (
        ["probe", "resnet8", "--input", "1,28"], r"--input '1,28': give the C,H,W"),
    "cifar root with crafted pickles": lambda tmp, run: (
        ["run", str(CONFIGS / "student.yaml"), "data.dataset=cifar10", f"data.root={crafted_cifar(tmp)}",
         "teacher=null", *TINY],
        r"data_batch_1: not a batch of the CIFAR python archive.*refers to io\.open"),
    "NaN loss before any checkpoint": lambda tmp, run: (
        ["run", str(CONFIGS / "student.yaml"), *TINY, *NAN_DATA, "train.optimizer.lr=1e12",
         "teacher=null", f"output_dir={tmp / 'runs'}"],
        r"loss is nan at epoch 1.*no checkpoint was written yet"),
    "NaN loss after a checkpoint": lambda tmp, run: (
        ["run", str(CONFIGS / "student.yaml"), *TINY, *NAN_DATA, "train.schedule.name=step",
         "train.schedule.gamma=1e12", "train.schedule.step_size=1", "teacher=null", f"output_dir={tmp / 'runs'}"],
        r"loss is nan at epoch 2.*the checkpoint of epoch 1 is kept at .*checkpoints/last\.pt"),
    "export over the run's own checkpoint, even with --force": lambda tmp, run: (
        ["export", str(run), str(run / "checkpoints" / "last.pt"), "--force"], r"own checkpoint.*--resume"),
    "export over an existing file": lambda tmp, run: (
        ["export", str(run), str(write(tmp / "student.pt", "keep me"))], r"the file exists; pass --force"),
    "duplicate keys in a YAML config": lambda tmp, run: (
        ["run", str(write(tmp / "dup.yaml", "seed: 0\ntrain:\n  epochs: 1\n  epochs: 3\n"))],
        r"dup\.yaml: key 'epochs' is given twice in one mapping, on lines 3 and 4"),
    # --- inputs that already failed well (kept)
    "a config file that does not exist": lambda tmp, run: (
        ["run", str(tmp / "nope.yaml")], r"config file not found: .*nope\.yaml"),
    "a binary config file": lambda tmp, run: (
        ["run", str(write(tmp / "bin.yaml", BINARY))], r"bin\.yaml: not a text"),
    "a misspelt config key": lambda tmp, run: (
        ["run", str(CONFIGS / "kd.yaml"), "train.epochz=1"], r"epochz.*epochs"),
    "an unknown model name": lambda tmp, run: (
        ["run", str(CONFIGS / "student.yaml"), "student.name=resnt8", "teacher=null", *TINY],
        r"unknown model 'resnt8'.*resnet8"),
    "an unknown dataset name": lambda tmp, run: (
        ["run", str(CONFIGS / "student.yaml"), "data.dataset=fashion", "teacher=null", *TINY],
        r"unknown dataset 'fashion'.*fashion_mnist"),
    "a negative epoch count": lambda tmp, run: (
        ["run", str(CONFIGS / "kd.yaml"), "train.epochs=-1"], r"train\.epochs"),
    "a YAML tag that would run code": lambda tmp, run: (
        ["run", str(write(tmp / "tag.yaml", f"seed: !!python/object/apply:os.system ['touch {tmp / 'PWNED'}']\n"))],
        r"tag\.yaml: invalid YAML"),
    "an override that is not key=value": lambda tmp, run: (
        ["run", str(CONFIGS / "kd.yaml"), "train.epochs"], r"train\.epochs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, tmp_path, run_dir, capsys, monkeypatch):
    argv, expected = CASES[case](tmp_path, run_dir)
    monkeypatch.chdir(tmp_path)  # configs without output_dir write to ./runs: keep it in the test's directory
    before = checksums(tmp_path)
    if case == "resume a run another process holds":
        with run_lock(run_dir):  # another open file description: flock refuses it as it would another process
            code = main(argv)
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kdtune {argv[0]}: error: ")
    assert re.search(expected, lines[0]), lines[0]
    after = checksums(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # no existing file changed or lost
    assert not (tmp_path / "PWNED").exists()  # no payload ran
    left = [d for d in (tmp_path / "runs").glob("*") if not [f for f in d.iterdir() if f.name != ".lock"]]
    assert not left, f"a refused run left an empty run directory: {left}"


def test_the_nan_run_keeps_its_files_as_they_were_before_the_bad_step(tmp_path, capsys):
    argv, _ = CASES["NaN loss after a checkpoint"](tmp_path, tmp_path)
    assert main(argv) == 2
    (run,) = (tmp_path / "runs").iterdir()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "summary.json").exists()
    from kdtune.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("lr", ["30", "300"])
def test_a_diverging_run_is_flagged_in_the_log_and_the_summary(tmp_path, capsys, lr):
    argv = ["run", str(CONFIGS / "student.yaml"), *TINY, "train.epochs=2", f"train.optimizer.lr={lr}", "teacher=null",
            f"output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 0  # finite: the run ends, but says it diverged
    assert "warning: training diverged: mean training loss" in capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert "x the first step's" in summary["diverged"]


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    assert main(["--debug", "run", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RunDirError" in err and err.strip().endswith("no such directory "
                                                                                  "(give a run directory, e.g. "
                                                                                  "runs/<name>-s0-<time>)")


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    import kdtune.catalogue

    def broken():
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(kdtune.catalogue, "load_catalogue", broken)
    with pytest.raises(ZeroDivisionError):
        main(["list", "losses"])
