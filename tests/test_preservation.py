"""Input-space preservation (duge.preservation) on small linear layers with known answers."""

from __future__ import annotations

import pytest
import torch

from duge.concepts import ResolvedRequest
from duge.preservation import (
    layer_moments,
    null_space_projector,
    preservation_penalty,
    preservation_penalty_grad,
    preservation_second_moment,
    preserved_prompts,
    project_update,
    second_moment,
)


def _linear_with_preserved_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)  # [out, in]
    preserved = torch.randn(3, 8, generator=generator, dtype=torch.float64)  # three inputs whose outputs stay
    update = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    return weight, preserved, update


@pytest.mark.parametrize("mu", [0.0, 1e-9])
def test_update_projected_away_from_c_leaves_preserved_outputs_unchanged(mu):
    weight, preserved, update = _linear_with_preserved_inputs()
    moment = second_moment(preserved)  # rank 3 of 8
    projected = project_update(update, null_space_projector(moment, mu))

    before = preserved @ weight.T
    after = preserved @ (weight + projected).T
    assert (after - before).abs().max() < 1e-6
    # the update still acts on inputs outside C's span: a new input's output moves as the raw update moves it
    new_input = torch.linalg.svd(preserved, full_matrices=True).Vh[-1]  # orthogonal to every preserved input
    assert torch.allclose(projected @ new_input, update @ new_input, atol=1e-6)


def test_soft_projector_keeps_mu_over_lambda_plus_mu_of_each_eigen_direction():
    moment = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    projector = null_space_projector(moment, mu=1.0)
    assert torch.allclose(projector, torch.diag(torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)), atol=1e-12)
    # I − C (C + μI)⁻¹, as the issue writes it
    assert torch.allclose(projector, torch.eye(3, dtype=torch.float64)
                          - moment @ torch.linalg.inv(moment + torch.eye(3, dtype=torch.float64)), atol=1e-12)


def test_projector_refuses_negative_mu():
    with pytest.raises(ValueError, match="μ must be 0"):
        null_space_projector(torch.eye(2), -1.0)


def test_penalty_is_mean_squared_output_change_and_its_gradient_matches_autograd():
    _, preserved, update = _linear_with_preserved_inputs(1)
    moment = second_moment(preserved)
    delta = update.clone().requires_grad_(True)

    penalty = preservation_penalty(delta, moment)
    penalty.backward()

    assert penalty.item() == pytest.approx(float(((preserved @ update.T) ** 2).sum(1).mean()), rel=1e-10)
    assert torch.allclose(preservation_penalty_grad(update, moment), delta.grad, atol=1e-10)


def test_second_moment_covers_every_position_and_is_scaled_to_trace_d():
    # a fake text encoder: prompt i → states [tokens=4, d=3]; padding rows count like the others
    def encode(prompts):
        return torch.stack([torch.full((4, 3), float(len(p))) for p in prompts])

    prompts = preserved_prompts([ResolvedRequest("circle", "shape", ["disc"], ["square"], ["a {}"], "object")], [],
                                concepts=["circle", "square", "star"], vocabulary=["a"])
    moment = preservation_second_moment(encode, prompts)
    assert moment.shape == (3, 3)
    assert torch.trace(moment).item() == pytest.approx(3.0)
    assert torch.allclose(moment, moment.T)


def test_preserved_prompts_leave_out_erased_concepts_and_protect_earlier_targets():
    earlier = ResolvedRequest("circle", "shape", ["disc"], ["square"], ["a {}", "a red {}"], "object")
    request = ResolvedRequest("red", "", ["crimson"], ["orange"], ["a {} star", "a {} shape"], "colour")
    prompts = preserved_prompts([request], [earlier], concepts=["circle", "disc", "red", "orange", "blue", "star"],
                                vocabulary=["a", "red", "crimson", "disc", "blue"], general_prompts=["a red star", "a blue star"])

    assert prompts.templates == ["a star", "a shape"]  # anchor "" and no word render alike
    assert prompts.preserved == ["a orange star", "a orange shape"]
    assert prompts.never_erased == ["a blue star", "a star star", "a blue shape", "a star shape"]
    assert prompts.vocabulary == ["a", "blue", "a blue star"]
    assert prompts.erased == ["a circle", "a disc", "a red circle", "a red disc"]
    everything = [p for group in prompts.groups().values() for p in group if p not in prompts.erased]
    assert not any(word in p.split() for p in everything for word in ("red", "crimson", "circle", "disc"))


def test_preserved_prompts_keep_what_an_earlier_run_erased_edited():
    """A user's model on which an earlier run erased Monet (name key "monet"): its prompts, in this request's
    templates, stay edited like an earlier request's target, and no group keeps them as in θ0."""
    request = ResolvedRequest("Van Gogh", "", [], ["Monet", "Picasso"], ["{}", "a painting by {}"], None)
    prompts = preserved_prompts([request], [], concepts=["Monet", "Picasso", "Dali"], vocabulary=["a", "monet"],
                                general_prompts=["a painting by monet", "a painting"], erased_before={"monet"})

    assert prompts.erased == ["monet", "a painting by monet"]
    assert prompts.preserved == ["Picasso", "a painting by Picasso"]
    assert prompts.never_erased == ["Dali", "a painting by Dali"]
    assert prompts.vocabulary == ["a", "a painting"]


def test_layer_moments_only_for_text_key_value_projections_of_the_text_width():
    moment = torch.eye(4)
    layers = {"down.0.attn2.to_k": 4, "down.0.attn2.to_v": 4, "down.0.attn2.to_q": 4, "down.0.attn1.to_k": 4,
              "mid.attn2.to_k": 8}
    assert set(layer_moments(layers, moment)) == {"down.0.attn2.to_k", "down.0.attn2.to_v"}
