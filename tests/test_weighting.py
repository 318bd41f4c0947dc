import pytest
import torch

from kdtune.weighting import WEIGHTINGS, EqualWeighting, FixedWeighting, build_weighting


def terms():
    return {"kd": torch.tensor(2.0), "fitnets": torch.tensor(3.0), "at": torch.tensor(5.0)}


def test_fixed_uses_configured_weights_times_alpha():
    w = build_weighting("fixed", ["kd", "fitnets", "at"], {"kd": 1.0, "fitnets": 0.5, "at": 10.0}, alpha=2.0)
    total, used = w(terms())
    assert total.item() == pytest.approx(2 * (1 * 2 + 0.5 * 3 + 10 * 5))
    assert used == {"kd": 2.0, "fitnets": 1.0, "at": 20.0}


def test_equal_ignores_configured_weights_and_can_normalise():
    base = {"kd": 1.0, "fitnets": 0.5, "at": 10.0}
    total, used = EqualWeighting(["kd", "fitnets", "at"], base)(terms())
    assert total.item() == pytest.approx(10.0) and set(used.values()) == {1.0}
    total, used = EqualWeighting(["kd", "fitnets", "at"], base, normalize=True)(terms())
    assert total.item() == pytest.approx(10.0 / 3) and used["at"] == pytest.approx(1 / 3)


def test_absent_terms_are_skipped():
    # A pathway that was not computed this step (DistPro's dropping) contributes nothing.
    w = FixedWeighting(["kd", "fitnets"], {"kd": 1.0, "fitnets": 2.0})
    total, used = w({"kd": torch.tensor(4.0)})
    assert total.item() == 4.0 and list(used) == ["kd"]


def test_gradient_flows_to_terms():
    x = torch.tensor(3.0, requires_grad=True)
    total, _ = FixedWeighting(["a"], {"a": 0.5})({"a": x * x})
    total.backward()
    assert x.grad.item() == pytest.approx(3.0)


def test_unknown_strategy_names_choices():
    with pytest.raises(KeyError, match="equal"):
        build_weighting("equl", ["a"], {})
    assert {"fixed", "equal"} <= set(WEIGHTINGS.names())


def test_bad_strategy_argument_names_strategy():
    with pytest.raises(TypeError, match="fixed"):
        build_weighting("fixed", ["a"], {}, alhpa=2)
