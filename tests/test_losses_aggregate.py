import math

import pytest
import torch

from feddat.algorithms.losses import kd_loss, scores, task_loss
from feddat.errors import FedDATError
from feddat.federation.aggregate import update_bytes, validate_update, weighted_mean


def test_kd_at_temperature_3_matches_hand_computation():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0]])
    e = math.exp(1 / 3)
    q = [e / (e + 1), 1 / (e + 1)]          # softmax(teacher / 3)
    p = [0.5, 0.5]                          # softmax(student / 3)
    expected = 9 * sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert kd_loss(student, teacher, 3.0).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.1233, abs=1e-4)


def test_kd_is_a_batch_mean_and_zero_for_equal_logits():
    a = torch.randn(4, 5)
    assert kd_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    one = kd_loss(a[:1], a[1:2] * 2)
    two = kd_loss(torch.cat([a[:1], a[:1]]), torch.cat([a[1:2] * 2, a[1:2] * 2]))
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_task_loss_and_scores_for_hard_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    hard = torch.tensor([0, 2])
    assert task_loss(logits, hard).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, hard).item())
    assert scores(logits, hard).tolist() == [1.0, 0.0]
    assert scores(logits, torch.tensor([-1, 1])).tolist() == [0.0, 1.0]
    soft = torch.tensor([[0.3, 0.0, 1.0], [0.0, 0.6, 0.0]])
    assert scores(logits, soft).tolist() == pytest.approx([0.3, 0.6])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft) * 3
    assert task_loss(logits, soft).item() == pytest.approx(bce.item())


def test_weighted_mean_of_two_clients():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([5.0, 6.0]), "b": torch.tensor([4.0])}
    out = weighted_mean([a, b], [1, 3])
    assert out["w"].tolist() == [4.0, 5.0]
    assert out["b"].tolist() == [3.0]
    assert weighted_mean([a, b], [1, 1])["w"].tolist() == [3.0, 4.0]
    assert update_bytes(a) == 12


def test_weighted_mean_rejects_bad_weights():
    a = {"w": torch.ones(2)}
    with pytest.raises(FedDATError, match="positive sum"):
        weighted_mean([a, a], [0, 0])
    with pytest.raises(FedDATError, match="no client updates"):
        weighted_mean([], [])


@pytest.mark.parametrize("bad, message", [
    ({"w": torch.ones(2), "extra": torch.ones(1)}, "unexpected keys"),
    ({}, "lacks keys"),
    ({"w": torch.ones(3)}, "shape"),
    ({"w": torch.ones(2, dtype=torch.float64)}, "float64"),
    ({"w": torch.tensor([1.0, float("nan")])}, "NaN"),
    ({"w": torch.tensor([100.0, 0.0])}, "norm"),
])
def test_validate_update_names_client_and_problem(bad, message):
    with pytest.raises(FedDATError, match=message) as e:
        validate_update(bad, {"w": torch.zeros(2)}, "clipart", max_norm=10.0)
    assert "clipart" in str(e.value)
