"""The three DUGE losses on small tensors with hand-computed values."""

from __future__ import annotations

import inspect

import pytest
import torch

from duge import losses
from duge.losses import cross_attention_loss, prior_preservation_loss, regularization_loss


def test_losses_module_exposes_exactly_the_three_losses():
    public = {
        name
        for name, value in vars(losses).items()
        if not name.startswith("_") and inspect.isfunction(value) and value.__module__ == losses.__name__
    }
    assert public == {"cross_attention_loss", "prior_preservation_loss", "regularization_loss"}
    assert set(losses.__all__) == public


def test_cross_attention_loss_matches_hand_computed_value():
    noise_pred_target = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    noise_pred_anchor_ref = torch.zeros(1, 1, 2, 2)
    # layer 1: HW = 2, squared errors 0.25, 0.25 -> 0.25; layer 2: HW = 4, 1, 1, 0, 0 -> 0.5
    target_attention = [torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])]
    anchor_attention_ref = [torch.tensor([[[0.0, 1.0]]]), torch.zeros(1, 1, 4)]

    total, parts = cross_attention_loss(
        noise_pred_target, noise_pred_anchor_ref, target_attention, anchor_attention_ref, beta=2.0
    )

    assert parts["output"].item() == pytest.approx(7.5)  # (1 + 4 + 9 + 16) / 4
    assert parts["attention"].item() == pytest.approx(0.375)  # (0.25 + 0.5) / 2
    assert total.item() == pytest.approx(7.5 + 2.0 * 0.375)


@pytest.mark.parametrize("beta, with_maps", [(0.0, True), (1.0, False)])
def test_cross_attention_loss_attention_term_is_zero_without_beta_or_maps(beta, with_maps):
    target_maps = [torch.ones(1, 2, 3, requires_grad=True)] if with_maps else []
    anchor_maps = [torch.zeros(1, 2, 3)] if with_maps else []
    prediction = torch.tensor([[3.0, 1.0]])

    total, parts = cross_attention_loss(prediction, torch.zeros(1, 2), target_maps, anchor_maps, beta)

    assert isinstance(parts["attention"], torch.Tensor)
    assert parts["attention"].item() == 0.0
    assert total.item() == pytest.approx(5.0)


def test_cross_attention_loss_sends_no_gradient_into_the_references():
    noise_pred_target = torch.randn(2, 4, 3, 3, requires_grad=True)
    noise_pred_anchor_ref = torch.randn(2, 4, 3, 3, requires_grad=True)
    target_map = torch.rand(2, 4, 9, requires_grad=True)
    anchor_map_ref = torch.rand(2, 4, 9, requires_grad=True)

    total, _ = cross_attention_loss(noise_pred_target, noise_pred_anchor_ref, [target_map], [anchor_map_ref], 0.5)
    total.backward()

    assert noise_pred_anchor_ref.grad is None and anchor_map_ref.grad is None
    expected = 2 * (noise_pred_target - noise_pred_anchor_ref) / noise_pred_target.numel()
    torch.testing.assert_close(noise_pred_target.grad, expected.detach())
    torch.testing.assert_close(target_map.grad, 0.5 * 2 * (target_map - anchor_map_ref).detach() / target_map.numel())


def test_cross_attention_loss_rejects_mismatched_layers_and_shapes():
    prediction = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="one of each per captured layer"):
        cross_attention_loss(prediction, prediction, [torch.zeros(1, 1, 4)], [], 1.0)
    with pytest.raises(ValueError, match="layer 0"):
        cross_attention_loss(prediction, prediction, [torch.zeros(1, 1, 4)], [torch.zeros(1, 1, 2)], 1.0)


def test_prior_preservation_loss_matches_hand_computed_value_and_detaches_reference():
    noise_pred = torch.tensor([[1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    noise_pred_ref = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)

    loss = prior_preservation_loss(noise_pred, noise_pred_ref)
    loss.backward()

    assert loss.item() == pytest.approx((1 + 4 + 4 + 0) / 4)
    assert noise_pred_ref.grad is None
    torch.testing.assert_close(noise_pred.grad, torch.tensor([[0.5, -1.0], [1.0, 0.0]]))


def test_half_precision_predictions_give_a_float32_loss():
    loss = prior_preservation_loss(torch.full((2, 2), 300.0, dtype=torch.float16), torch.zeros(2, 2))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(90000.0)


def test_regularization_loss_is_the_sum_of_squared_distances_to_theta0():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    theta0 = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    assert regularization_loss(params, theta0).item() == pytest.approx(1 + 4 + 4)


def test_regularization_loss_weights_each_element_by_its_fisher_value():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    theta0 = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    fisher = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([[0.5]])}
    assert regularization_loss(params, theta0, fisher).item() == pytest.approx(2 * 1 + 3 * 4 + 0.5 * 4)


def test_regularization_loss_accepts_theta0_in_another_dtype():
    params = {"w": torch.tensor([1.5, -0.5], dtype=torch.float32)}
    theta0 = {"w": torch.tensor([0.5, 0.5], dtype=torch.float16)}
    fisher = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    loss = regularization_loss(params, theta0, fisher)
    assert loss.item() == pytest.approx(1 + 2)
    assert loss.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_regularization_loss_moves_theta0_to_the_parameter_device():
    params = {"w": torch.tensor([1.0, 2.0], device="cuda")}
    loss = regularization_loss(params, {"w": torch.zeros(2)}, {"w": torch.ones(2)})
    assert loss.device.type == "cuda" and loss.item() == pytest.approx(5.0)


def test_regularization_loss_pulls_lora_deltas_towards_zero():
    delta = torch.tensor([[0.5, -1.0]], requires_grad=True)
    for theta0 in ({"delta": torch.zeros(())}, {"delta": torch.zeros(1, 2)}):
        assert regularization_loss({"delta": delta}, theta0).item() == pytest.approx(1.25)


def test_regularization_loss_gradients_reach_only_trainable_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    theta0 = {name: (p.detach().clone() - 0.25).requires_grad_(True) for name, p in model.named_parameters()}
    fisher = {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()}

    loss = regularization_loss(dict(model.named_parameters()), theta0, fisher)
    loss.backward()

    assert loss.item() == pytest.approx(2.0 * 0.25**2 * sum(p.numel() for p in model.parameters()), rel=1e-5)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    torch.testing.assert_close(model[1].weight.grad, torch.full_like(model[1].weight, 2.0 * 2 * 0.25))
    assert all(value.grad is None for value in theta0.values())


def test_regularization_loss_of_no_parameters_is_zero():
    assert regularization_loss({}, {}).item() == 0.0


def test_regularization_loss_names_a_missing_or_misshapen_reference():
    name = "down.attn2.to_k.weight"
    params = {name: torch.zeros(2, 2)}
    with pytest.raises(KeyError, match=name):
        regularization_loss(params, {})
    with pytest.raises(ValueError, match=r"fisher\['down.attn2.to_k.weight'\]"):
        regularization_loss(params, {name: torch.zeros(2, 2)}, {name: torch.ones(3)})
