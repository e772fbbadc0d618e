import pytest
import torch

from clip_continual.model.weights import StateDictMismatchError, interpolate_into, interpolate_state_dicts


def test_interpolation_is_exact_per_tensor_and_leaves_inputs_alone():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    b = {"w": torch.tensor([5.0, -2.0]), "steps": torch.tensor([7])}
    merged = interpolate_state_dicts(a, b, 0.25)
    assert merged["w"].tolist() == [4.0, -1.0]  # 0.25 * a + 0.75 * b, by hand
    assert merged["steps"].tolist() == [3]  # integer buffers are taken from the first
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [5.0, -2.0]
    assert interpolate_state_dicts(a, b, 1.0)["w"].tolist() == [1.0, 2.0]
    assert interpolate_state_dicts(a, b, 0.0)["w"].tolist() == [5.0, -2.0]


def test_interpolation_refuses_other_architectures_and_bad_weights():
    a = {"w": torch.zeros(2)}
    with pytest.raises(StateDictMismatchError, match="different keys"):
        interpolate_state_dicts(a, {"v": torch.zeros(2)}, 0.5)
    with pytest.raises(StateDictMismatchError, match="shape"):
        interpolate_state_dicts(a, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_state_dicts(a, a, 1.5)


def test_interpolate_into_a_model(float64):
    torch.manual_seed(0)
    model, anchor = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.7 * model.weight.detach() + 0.3 * anchor.weight.detach()
    interpolate_into(model, anchor, 0.7)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-12)
