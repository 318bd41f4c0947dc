"""DistPro process files (kdtune.weighting.process): interpolation, replay, baselines, transfer errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TinyNet
from kdtune.distiller import Distiller
from kdtune.models import create_model
from kdtune.search.distpro import ProcessReplay, pathways_from_process, search_space
from kdtune.weighting.process import (
    PathwayInfo,
    Process,
    ProcessMismatchError,
    ProcessWeighting,
    movement_by_quarter,
    normalize,
)

SHAPE = (1, 8, 8)


def toy_process(steps=(0, 1, 2), tau=0.5) -> Process:
    infos = [PathwayInfo("t0-s0:conv1x1", "blocks.0", "blocks.0", 0, 0, "conv1x1", "hcl"),
             PathwayInfo("t1-s1:conv1x1", "blocks", "blocks", 1, 1, "conv1x1", "hcl")]
    tilde = torch.tensor([[1.0, 1.0], [0.0, 2.0], [0.4, 3.0]])[: len(steps)]
    return Process(infos, list(steps), normalize(tilde), tilde, tau=tau, kept=[1.0] * len(steps))


def test_stretch_is_linear_with_exact_endpoints():
    p = toy_process()
    alpha, tilde = p.stretch(5)  # grid 0,1,2 -> positions 0, 0.5, 1, 1.5, 2
    assert torch.allclose(tilde[:, 1], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert torch.allclose(tilde[:, 0], torch.tensor([1.0, 0.5, 0.0, 0.2, 0.4]))
    assert torch.allclose(alpha[0], p.alpha[0]) and torch.allclose(alpha[-1], p.alpha[-1])
    assert torch.allclose(alpha[1], (p.alpha[0] + p.alpha[1]) / 2)  # α interpolated (Alg. 1 line 8)
    short_alpha, _ = p.stretch(2)
    assert torch.allclose(short_alpha, p.alpha[[0, -1]])
    assert p.stretch(1)[0].shape == (1, 2)
    one = toy_process(steps=(0,))
    assert torch.allclose(one.stretch(4)[1], one.alpha_tilde.expand(4, -1))


def test_save_load_roundtrip_is_inspectable_json(tmp_path):
    p = toy_process()
    p.meta["teacher"] = "resnet56"
    path = p.save(tmp_path / "process.json")
    raw = json.loads(path.read_text())
    assert raw["pathways"][1]["name"] == "t1-s1:conv1x1" and raw["steps"] == [0, 1, 2]
    assert len(raw["alpha"]) == 3 and len(raw["alpha"][0]) == 2
    q = Process.load(path)
    assert q.names == p.names and q.steps == p.steps and q.meta["teacher"] == "resnet56"
    assert torch.allclose(q.alpha, p.alpha, atol=1e-6) and torch.allclose(q.alpha_tilde, p.alpha_tilde)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a kdtune process"):
        Process.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="process.json"):
        Process.load(tmp_path / "missing.json")


def test_replay_modes_and_dropping():
    p = toy_process()
    names = ["kd", *p.names]
    w = ProcessWeighting(names, {"kd": 0.5}, process=p, mode="process")
    with pytest.raises(RuntimeError, match="set_total_steps"):
        w.weights_for(0)
    w.set_total_steps(5)
    assert w.weights_for(0)["kd"] == 0.5  # terms outside the process keep their weight
    assert w.weights_for(4)["t1-s1:conv1x1"] == pytest.approx(float(p.alpha[-1, 1]))
    assert w.active(0) == set(names)
    assert w.active(2) == {"kd", "t1-s1:conv1x1"}  # α̃ = 0.0 <= 0.5: dropped
    assert w.diagnostics["pathways_kept"] == 0.5
    assert w.active(99) == {"kd", "t1-s1:conv1x1"}  # past the end: the last row
    final = ProcessWeighting(names, {}, process=p, mode="final")
    assert final.weights_for(0)["t0-s0:conv1x1"] == pytest.approx(float(p.alpha[-1, 0]))
    assert final.active(0) == {"kd", "t1-s1:conv1x1"}  # α̃_T = 0.4 <= 0.5
    equal = ProcessWeighting(names, {}, process=p, mode="equal")
    assert equal.weights_for(3)["t0-s0:conv1x1"] == 0.5 and equal.active(3) is None
    no_drop = ProcessWeighting(names, {}, process=p, tau=None, total_steps=5)
    assert no_drop.active(2) is None


def test_process_names_must_be_terms_of_the_distiller():
    with pytest.raises(ValueError, match="its terms"):
        ProcessWeighting(["kd", "other"], {}, process=toy_process())


def test_transfer_match_by_stage_and_mismatch_lists_both_sets():
    p = toy_process()
    renamed = [PathwayInfo("a", "layer1", "layer1", 0, 0, "conv1x1", "hcl"),
               PathwayInfo("b", "layer3", "layer3", 1, 1, "conv1x1", "hcl")]
    assert p.match(renamed[::-1]) == [1, 0]
    q = p.reordered(p.match(renamed), renamed)
    assert q.names == ["a", "b"] and torch.equal(q.alpha, p.alpha)
    other = [PathwayInfo("c", "layer1", "layer2", 0, 1, "conv1x1", "hcl"), renamed[1]]
    with pytest.raises(ProcessMismatchError) as err:
        p.match(other)
    assert "t0-s0:conv1x1" in str(err.value) and "c [t0-s1" in str(err.value)


def test_pathways_from_process_transfers_by_stage_index():
    torch.manual_seed(0)
    teacher, student = TinyNet(6), TinyNet(4)
    _, infos = search_space(teacher, student, SHAPE, "all", ("conv1x1",))
    tilde = torch.ones(3, len(infos))
    process = Process(infos, [0, 1, 2], normalize(tilde), tilde)
    # Another pair with the same number of stages: pathways rebuilt by stage index.
    t2, s2 = TinyNet(8), TinyNet(3)
    paths = pathways_from_process(process, t2, s2, SHAPE)
    assert [p.teacher for p in paths][:2] == ["stage:0:pre", "stage:0:pre"] and paths[0].name == "t0-s0:conv1x1"
    d = Distiller(s2, t2, paths, weighting="process", weighting_kwargs={"process": process}, input_shape=SHAPE)
    assert d.weighting.learned == process.names
    # A pair with fewer stages cannot take a pathway from teacher stage 2: both sets are listed.
    _, deep_infos = search_space(create_model("resnet8", in_channels=1, num_classes=10),
                                 create_model("resnet8", in_channels=1, num_classes=10), (1, 28, 28), "all",
                                 ("conv1x1",))
    deep = Process(deep_infos, [0], torch.ones(1, 9) / 10, torch.ones(1, 9))
    with pytest.raises(ProcessMismatchError) as err:
        pathways_from_process(deep, t2, s2, SHAPE)
    msg = str(err.value)
    assert "t2-s2:conv1x1" in msg and "this pair can have: t0-s0:conv1x1" in msg


def test_transform_kwargs_are_recorded_in_the_process_and_rebuilt(tmp_path):
    """A search with ``pool_first`` adapters writes it in the process; retraining rebuilds them so."""
    torch.manual_seed(0)
    teacher, student = TinyNet(6), TinyNet(4)
    kwargs = {"conv3x3": {"pool_first": True}}
    paths, infos = search_space(teacher, student, SHAPE, "same", ("conv1x1", "conv3x3"), transform_kwargs=kwargs)
    assert [p.transform_kwargs for p in paths] == [{}, {"pool_first": True}] * 2
    tilde = torch.ones(1, len(infos))
    Process(infos, [0], normalize(tilde), tilde).save(tmp_path / "p.json")
    loaded = Process.load(tmp_path / "p.json")
    assert [p.transform_kwargs for p in loaded.pathways] == [{}, {"pool_first": True}] * 2
    rebuilt = pathways_from_process(loaded, TinyNet(6), TinyNet(4), SHAPE)
    d = Distiller(TinyNet(4), TinyNet(6), rebuilt, weighting="process", weighting_kwargs={"process": loaded},
                  input_shape=SHAPE)
    assert [getattr(p.transform, "pool_first", None) for p in d.pathways] == [None, True, None, True]
    # The arguments are part of a pathway's identity when processes are matched by stage.
    plain = PathwayInfo("x", "a", "b", 0, 0, "conv3x3", "hcl")
    assert plain.key != PathwayInfo("x", "a", "b", 0, 0, "conv3x3", "hcl", {"pool_first": True}).key
    # A process file written before transform_kwargs existed still loads (no arguments).
    data = json.loads((tmp_path / "p.json").read_text())
    for p in data["pathways"]:
        del p["transform_kwargs"]
    assert all(p.transform_kwargs == {} for p in Process.from_dict(data).pathways)
    with pytest.raises(ValueError, match=r"transform_kwargs for \['distpro'\]"):
        search_space(teacher, student, SHAPE, "same", ("conv1x1",), transform_kwargs={"distpro": {}})


@pytest.mark.parametrize("callbacks", [[], [ProcessReplay()]], ids=["trainer", "ProcessReplay"])
def test_replay_in_trainer_stretches_to_run_length(tmp_path, tiny_data, callbacks):
    from kdtune.config import TrainConfig
    from kdtune.data import BatchLoader
    from kdtune.trainer import Trainer

    torch.manual_seed(0)
    teacher, student = TinyNet(6), TinyNet(4)
    _, infos = search_space(teacher, student, SHAPE, "all", ("conv1x1",))
    tilde = torch.tensor([[1.0] * 4, [0.0, 1.0, 1.0, 1.0]])  # the first pathway is dropped by the end
    process = Process(infos, [0, 1], normalize(tilde), tilde)
    d = Distiller(student, teacher, pathways_from_process(process), weighting="process",
                  weighting_kwargs={"process": process}, input_shape=SHAPE)
    cfg = TrainConfig(epochs=2, progress=False, log_every=1, channels_last=False)
    trainer = Trainer(d, BatchLoader(tiny_data, 8, seed=0), None, cfg, run_dir=tmp_path, callbacks=callbacks)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(trainer.train_loader)  # a row per step: the first and the last are logged
    for row, alpha in ((rows[0], process.alpha[0]), (rows[-1], process.alpha[-1])):  # exact endpoints
        logged = {n: a for n, a in zip(process.names, alpha.tolist(), strict=True) if f"w/{n}" in row}
        assert len(logged) >= 3 and {n: row[f"w/{n}"] for n in logged} == pytest.approx(logged, abs=1e-7)
    kept = [r["pathways_kept"] for r in rows]
    assert kept[0] == 1.0 and kept[-1] == 0.75  # α̃ of pathway 0 crosses 0.5 halfway through the run
    assert "t0-s0:conv1x1" not in rows[-1] and "t0-s0:conv1x1" in rows[0]


def test_pre_activation_taps_are_recorded_and_old_files_keep_post_and_sigmoid(tmp_path):
    """DistPro's HCL pathways read pre-activation stage values by default, recorded per pathway so the
    replay rebuilds the same taps; a file written before taps existed replays post-activation
    outputs and sigmoid-gated DistPro blocks, as it was searched."""
    torch.manual_seed(0)
    teacher, student = TinyNet(6), TinyNet(4)
    paths, infos = search_space(teacher, student, SHAPE, "same", ("distpro",))
    assert {p.tap for p in infos} == {"pre"} and paths[0].teacher.endswith(":pre")
    tilde = torch.ones(1, len(infos))
    Process(infos, [0], normalize(tilde), tilde).save(tmp_path / "p.json")
    loaded = Process.load(tmp_path / "p.json")
    d = Distiller(TinyNet(4), TinyNet(6), pathways_from_process(loaded, TinyNet(6), TinyNet(4), SHAPE),
                  weighting="process", weighting_kwargs={"process": loaded}, input_shape=SHAPE)
    assert all(p.endswith(".2:input") for p in d._student_capture.paths.values())  # the stages' ReLU inputs
    assert not any(p.transform.attention.sigmoid for p in d.pathways)
    data = json.loads((tmp_path / "p.json").read_text())
    for p in data["pathways"]:
        del p["tap"]
    old = Process.from_dict(data)
    assert {p.tap for p in old.pathways} == {"post"}
    d = Distiller(TinyNet(4), TinyNet(6), pathways_from_process(old, TinyNet(6), TinyNet(4), SHAPE),
                  weighting="process", weighting_kwargs={"process": old}, input_shape=SHAPE)
    assert not any(p.endswith(":input") for p in d._student_capture.paths.values())
    assert all(p.transform.attention.sigmoid for p in d.pathways)
    post, _ = search_space(teacher, student, SHAPE, "same", ("conv1x1",), tap="post")
    assert not post[0].teacher.endswith(":pre")


def test_movement_by_quarter_by_hand():
    """α̃ of one pathway over 9 steps, steps 0.8 (x2), 0.08 (x2), 0.008 (x2), 0.0008 (x2): each quarter's
    mean step is its own; Σα and g are read at each quarter's last step (2, 4, 6, 8)."""
    deltas = [0.8, 0.8, 0.08, 0.08, 0.008, 0.008, 0.0008, 0.0008]
    tilde = torch.tensor([1.0] + [1.0 - sum(deltas[:k + 1]) for k in range(8)]).reshape(9, 1)
    alpha = torch.arange(9, dtype=torch.float32).reshape(9, 1) / 10
    proc = Process([PathwayInfo("p", "t", "s")], list(range(9)), alpha, tilde, g_trace=[float(k) for k in range(9)])
    rows = movement_by_quarter(proc)
    assert [r["mean_step"] for r in rows] == pytest.approx([0.8, 0.08, 0.008, 0.0008], rel=1e-4)
    assert [r["alpha_sum"] for r in rows] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [r["g"] for r in rows] == [2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match="needs >= 5"):
        movement_by_quarter(Process([PathwayInfo("p", "t", "s")], [0, 1], alpha[:2], tilde[:2]))

