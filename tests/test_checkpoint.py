import random

import pytest
import torch
from torch import nn

from kdtune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    rng_state,
    save_atomic,
    set_rng_state,
)


def test_save_is_atomic_and_loads(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_atomic({"a": torch.arange(3), "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception, match="(?i)pickle"):
        save_atomic({"bad": lambda: 0}, path)  # cannot be pickled
    assert load_checkpoint(path)["epoch"] == 1


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_code_in_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_mismatched_state_names_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2)).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_state_strict(model, state, "student")
    msg = str(err.value)
    assert "unexpected keys [2.bias, 2.weight]" in msg
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in msg


def test_rng_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    state = rng_state()
    a, b = torch.rand(3), random.random()
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a) and random.random() == b


def test_model_state_finds_the_weights_in_usual_checkpoint_layouts():
    from kdtune.checkpoint import model_state

    w = {"fc.weight": torch.ones(2, 2)}
    assert model_state(w) is w
    for key in ("student", "state_dict", "model_state_dict", "model"):
        assert model_state({key: w, "epoch": 3}) is w
    assert model_state({"module.fc.weight": w["fc.weight"]}) == w  # saved from inside DDP
    trainer_ckpt = {"kdtune_checkpoint": 1, "distiller": {"student.fc.weight": w["fc.weight"],
                                                          "pathways.0.transform.w": torch.zeros(1)}}
    assert model_state(trainer_ckpt) == w
