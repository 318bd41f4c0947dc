"""The examples/ scripts run end to end (on tiny subsets)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_model_and_data"


@pytest.mark.slow
def test_own_model_and_data_example_runs_teacher_student_kd_and_report(tmp_path):
    proc = subprocess.run([sys.executable, "run_example.py", "--per-class", "3", "--test-images", "10", "--epochs", "1",
                           "--out", str(tmp_path)], cwd=EXAMPLE, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list((tmp_path / "fmnist_png" / "train").rglob("*.png"))) == 30
    assert (tmp_path / "fmnist_png" / "test" / "ankle-boot").is_dir()
    out = proc.stdout
    assert "$ kdtune run --plugin my_models distill.yaml" in out and "| run | epochs | test acc %" in out
    kd_run = next(p for p in tmp_path.iterdir() if p.name.startswith("own_kd-"))
    assert (kd_run / "summary.json").exists() and "plugins:\n- my_models" in (kd_run / "config.yaml").read_text()
