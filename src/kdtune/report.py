"""Tables and plots of runs: learning curves of one run, comparisons of several.

``kdtune report runs/a runs/b`` prints a table (final test accuracy, agreement error, time) and
writes ``comparison.png`` (test accuracy per epoch) next to the first run, or where ``--out`` says;
``weights.png`` in a run directory shows its path weights over training (:func:`plot_weights`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a kdtune run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: What a search writes in its run directory (Auto-KD, the weight search); with ``final: false`` a
#: search trains no run of its own, so the directory has no ``metrics.jsonl``.
SEARCH_FILES = ("autokd.json", "search.json")


def is_search_only(run_dir: str | Path) -> bool:
    """A search's directory without a final training run (``autokd.final`` / ``search.final`` false)."""
    run_dir = Path(run_dir)
    return not (run_dir / "metrics.jsonl").exists() and any((run_dir / f).exists() for f in SEARCH_FILES)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a finished run, or a partial one built from its metrics (empty for a
    search without a final run)."""
    path = Path(run_dir) / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    if is_search_only(run_dir):
        return {"epochs": None, "test_acc": None, "agreement_error": None, "train_seconds": None,
                "search_only": True}
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    return {"epochs": len(rows), "test_acc": last.get("test_acc"), "agreement_error": last.get("agreement_error"),
            "train_seconds": sum(r.get("seconds", 0.0) for r in rows), "unfinished": True}


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss and accuracy per epoch of one run, as a PNG."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if history and "train_task" in history[0]:
        ax_loss.plot(epochs, [r["train_task"] for r in history], label="train CE")
    if any("test_loss" in r for r in history):
        tested = [r for r in history if "test_loss" in r]
        ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], "o-", label="test CE")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_acc"] for r in history], label="train acc")
    evaluated = [r for r in history if "test_acc" in r]  # train.eval_every may skip epochs
    if evaluated:
        ax_acc.plot([r["epoch"] for r in evaluated], [r["test_acc"] for r in evaluated], "o-", label="test acc")
    if evaluated and "agreement_error" in evaluated[0]:
        ax_acc.plot([r["epoch"] for r in evaluated], [1 - r["agreement_error"] for r in evaluated],
                    "o-", label="agreement with teacher")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for d in run_dirs:
        s = read_summary(d)
        rows.append({"run": Path(d).name, "epochs": s.get("epochs"), "test_acc": s.get("test_acc"),
                     "agreement_error": s.get("agreement_error"), "seconds": s.get("train_seconds"),
                     "unfinished": s.get("unfinished", False), "search_only": s.get("search_only", False)})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of run rows (readable in a terminal and pasteable into RESULTS.md)."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}"

    lines = ["| run | epochs | test acc % | agreement err % | time s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (unfinished)" if r.get("unfinished") else " (search only)" if r.get("search_only") else ""
        secs = "—" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        epochs = "—" if r.get("epochs") is None else r["epochs"]
        lines.append(f"| {r['run']}{mark} | {epochs} | {pct(r['test_acc'])} | "
                     f"{pct(r['agreement_error'])} | {secs} |")
    return "\n".join(lines)


def plot_comparison(run_dirs: Sequence[str | Path], path: str | Path) -> Path | None:
    """Test accuracy per epoch of several runs in one PNG; None (no file) when no run has a test curve."""
    curves = {Path(d).name: [r for r in read_metrics(d) if "test_acc" in r]
              for d in run_dirs if not is_search_only(d)}  # a search-only directory has no curve of its own
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["epoch"] for r in rows], [r["test_acc"] for r in rows], "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def read_steps(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step rows of a run's ``steps.jsonl`` (empty if the run logged none)."""
    path = Path(run_dir) / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weight_series(rows: list[dict[str, Any]], keys: list[str], max_labelled: int = 8) -> list[dict[str, Any]]:
    """The lines of the path-weight plot, from ``steps.jsonl`` rows and their ``w/<term>`` keys.

    Terms whose weights are identical at every step (the terms of one path) make one line, labelled by
    the path. With more than ``max_labelled`` lines (DistPro's 27 pathways) only the ``max_labelled``
    with the highest peak weight keep a label, first; the others get ``label=None`` and an
    ``others_label`` ("other N paths") on the first of them, so the legend stays readable.

    Returns:
        ``[{"label", "steps", "values", "others_label"}]``, labelled lines first.
    """
    series: dict[tuple[float | None, ...], list[str]] = {}
    for k in keys:
        series.setdefault(tuple(r.get(k) for r in rows), []).append(k[2:])
    lines = []
    for ys, terms in series.items():
        prefixes = {t.split(":", 1)[0] for t in terms}
        label = terms[0] if len(terms) == 1 else (f"{prefixes.pop()} ({len(terms)} terms)" if len(prefixes) == 1
                                                  else ", ".join(terms))
        pts = [(r["step"], y) for r, y in zip(rows, ys, strict=True) if y is not None]
        lines.append({"label": label, "steps": [s for s, _ in pts], "values": [y for _, y in pts],
                      "others_label": None})
    if len(lines) > max_labelled:
        lines.sort(key=lambda line: max(line["values"], default=0.0), reverse=True)
        others = lines[max_labelled:]
        for line in others:
            line["label"] = None
        others[0]["others_label"] = f"other {len(others)} paths"
    return lines


def plot_weights(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Weight of every distillation path over training, from ``steps.jsonl`` (Adaptive Distillation Fig. 4).

    Left: ``w/<term>`` per logged step (log scale when the weights span more than two decades, as
    learned ``exp(-z)`` weights do). Terms that share one weight (a path summed over layers) are
    drawn once, labelled by their path. Right, when logged (``mgda``, or ``adaptive`` with
    ``grad_cosine``): cosine similarity between path gradients (Fig. 4c).

    Returns:
        The PNG path (default ``<run_dir>/weights.png``), or None when no weight was logged.
    """
    rows = read_steps(run_dir)
    keys = sorted({k for r in rows for k in r if k.startswith("w/")})
    if not keys:
        return None
    cos_keys = sorted({k for r in rows for k in r if k.startswith("cos/") and k != "cos/mean"})
    fig, axes = plt.subplots(1, 2 if cos_keys else 1, figsize=(11 if cos_keys else 6, 4), squeeze=False)
    ax = axes[0, 0]
    values: list[float] = []
    for i, line in enumerate(weight_series(rows, keys)):
        steps, ys = line["steps"], line["values"]
        if line["label"] is None:  # beyond the labelled few: thin grey, one legend entry for all of them
            ax.plot(steps, ys, color="0.7", linewidth=0.6, label=line["others_label"])
        else:
            ax.plot(steps, ys, label=line["label"], color=f"C{i % 10}")
        values += ys
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("path weights")
    ax.legend(fontsize=8)
    if cos_keys:
        ax = axes[0, 1]
        for k in cos_keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([s for s, _ in pts], [y for _, y in pts], label=k[4:])
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("step")
        ax.set_title("cosine similarity of path gradients")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path) if path is not None else Path(run_dir) / "weights.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
