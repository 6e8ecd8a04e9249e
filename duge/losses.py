"""The three DUGE losses (design §2), as pure functions of tensors.

Each takes what the trainer computed and returns a scalar tensor. Reference values (the frozen
model's predictions and attention maps, θ₀, the Fisher estimate) are constants here: they are
detached inside, so no gradient reaches them whatever the caller passes. Losses are computed in
at least float32, whatever the dtype of the predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_attention_loss", "prior_preservation_loss", "regularization_loss"]


def cross_attention_loss(
    noise_pred_target: Tensor,
    noise_pred_anchor_ref: Tensor,
    target_attention: list[Tensor],
    anchor_attention_ref: list[Tensor],
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`L_xattn = L_out + beta · L_attn`, steering the target concept towards its anchor.

    - `L_out = mean((ε_θ(z_t, t, E(T(c))) − sg[ε_φ(z_t, t, E(T(a)))])²)` over every element:
      `noise_pred_target` and `noise_pred_anchor_ref` are [B, C, H, W] (any equal shapes).
    - `L_attn = (1/L) Σ_ℓ mean((A^ℓ_θ[target tokens] − sg[A^ℓ_φ[anchor tokens]])²)`: the two lists
      hold one map per captured layer ℓ, [B, heads, HW_ℓ] each (already reduced over the token
      columns, see `duge.attention.reduce_token_maps`); layers may differ in HW_ℓ, but the two maps
      of one layer must have equal shapes.

    When `beta` is 0 or the lists are empty, `L_attn` is not computed and is a zero tensor.
    Returns the total and its unweighted parts `{"output": L_out, "attention": L_attn}`.
    """
    if len(target_attention) != len(anchor_attention_ref):
        raise ValueError(
            f"cross_attention_loss: {len(target_attention)} target attention maps but "
            f"{len(anchor_attention_ref)} anchor maps; expected one of each per captured layer"
        )
    output_loss = _mse_to_constant(noise_pred_target, noise_pred_anchor_ref, "noise predictions")
    attention_loss = output_loss.new_zeros(())
    if beta != 0 and target_attention:
        per_layer = [
            _mse_to_constant(target, anchor, f"attention maps of layer {index}")
            for index, (target, anchor) in enumerate(zip(target_attention, anchor_attention_ref))
        ]
        attention_loss = torch.stack(per_layer).mean()
    total = output_loss + beta * attention_loss
    return total, {"output": output_loss, "attention": attention_loss}


def prior_preservation_loss(noise_pred: Tensor, noise_pred_ref: Tensor) -> Tensor:
    """`L_prior = mean((ε_θ(z_t, t, E(T(r))) − sg[ε_φ(z_t, t, E(T(r)))])²)` over every element.

    `noise_pred` and `noise_pred_ref` have equal shapes ([B, C, H, W] for a UNet).
    """
    return _mse_to_constant(noise_pred, noise_pred_ref, "noise predictions")


def regularization_loss(
    params: dict[str, Tensor],
    theta0: dict[str, Tensor],
    fisher: dict[str, Tensor] | None = None,
) -> Tensor:
    """`L_reg = Σ_i F_i (θ_i − θ₀,i)²`, a **sum** over every element of every parameter.

    - `params`: name → trainable tensor θ (any shapes).
    - `theta0`: name → its value θ₀ at the start of the session, a constant; it may live on another
      device or in another dtype (it is moved to the parameter's device). Every name of `params`
      must be present; a 0-dim entry broadcasts, so LoRA-style deltas regularise towards zero with
      `theta0 = {name: torch.zeros(())}` or zeros of the delta's shape.
    - `fisher`: name → diagonal Fisher estimate F (constant, same rules as `theta0`); None means
      F = 1 (L2-SP). With it the loss is EWC-style.

    The sum (not the mean) keeps the formula's scale: it grows with the number of trainable
    elements, and the trainer's `λ_reg` is chosen for the parameter set it trains.
    An empty `params` gives a zero tensor.
    """
    total = torch.zeros(())
    for name, param in params.items():
        reference = _constant_like(theta0, name, param, "theta0")
        squared = (_at_least_float32(param) - reference).square()
        if fisher is not None:
            squared = _constant_like(fisher, name, param, "fisher") * squared
        total = total.to(squared.device) + squared.sum()
    return total


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _mse_to_constant(prediction: Tensor, reference: Tensor, what: str) -> Tensor:
    """Mean squared error against `sg[reference]`, in at least float32."""
    if prediction.shape != reference.shape:
        raise ValueError(
            f"{what}: shapes {tuple(prediction.shape)} and {tuple(reference.shape)} differ; expected equal shapes"
        )
    prediction = _at_least_float32(prediction)
    return F.mse_loss(prediction, reference.detach().to(prediction.dtype))


def _constant_like(values: dict[str, Tensor], name: str, param: Tensor, what: str) -> Tensor:
    """`values[name]` detached, on `param`'s device, in float32 or wider; checked against its shape."""
    if name not in values:
        raise KeyError(f"regularization_loss: parameter '{name}' has no entry in {what}; expected one per parameter")
    value = values[name].detach()
    if value.dim() != 0 and value.shape != param.shape:
        raise ValueError(
            f"regularization_loss: {what}['{name}'] has shape {tuple(value.shape)}, "
            f"the parameter {tuple(param.shape)}; expected equal shapes or a 0-dim tensor"
        )
    return value.to(device=param.device, dtype=torch.promote_types(param.dtype, torch.float32))
