"""Capture of cross-attention probabilities for chosen tokens and layers of a diffusers UNet.

Capture goes through diffusers' attention-processor API: inside `capture_cross_attention` the
chosen cross-attention layers run `CapturingCrossAttnProcessor`, which computes the layer's output
with PyTorch's scaled-dot-product attention (the same output as diffusers' `AttnProcessor2_0`) and,
beside it, the softmax probabilities of the chosen token columns only. Every other layer keeps the
processor the model already had (xformers, SDPA, ...). Gradients flow through the captured maps.

    indices, mask = token_indices_for(tokenizer, prompts, "Van Gogh")
    with capture_cross_attention(unet, None, indices) as store:
        noise_pred = unet(latents, t, encoder_hidden_states=context).sample
    maps = [reduce_token_maps(store.maps[name], mask) for name in store.layers]  # [B, heads, HW] each
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# Where each top-level part of a UNet2DConditionModel runs in the forward pass; module
# registration order puts `up_blocks` before `mid_block`.
_FORWARD_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def list_cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Module names of the UNet's cross-attention `Attention` modules (`...attn2`), in forward order."""
    return list(_cross_attention_modules(unet))


def _cross_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention `Attention` modules by name, in forward order."""
    from diffusers.models.attention_processor import Attention  # deferred: diffusers takes seconds to import

    found = {name: module for name, module in unet.named_modules()
             if isinstance(module, Attention) and module.is_cross_attention}
    order = sorted(found, key=lambda name: _FORWARD_RANK.get(name.split(".", 1)[0], len(_FORWARD_RANK)))
    return {name: found[name] for name in order}


class CrossAttentionStore:
    """What one `capture_cross_attention` context records.

    - `layers`: the captured layer names, in forward order.
    - `token_indices`: LongTensor [B, K], the text-token columns captured for each prompt of the
      batch; a single row [1, K] applies to every prompt. Change it between forward passes with
      `set_tokens`.
    - `maps`: layer name → probabilities [B, heads, HW, K] from that layer's latest call. Each
      forward pass overwrites the entries (copy the dict to keep a pass's maps); the tensors keep
      their autograd graph.
    """

    def __init__(self, layers: list[str], token_indices: Tensor):
        self.layers = list(layers)
        self.maps: dict[str, Tensor] = {}
        self.set_tokens(token_indices)

    def set_tokens(self, token_indices: Tensor) -> None:
        """Capture these columns ([B, K] or [1, K] integer tensor) from the next forward pass on."""
        token_indices = torch.as_tensor(token_indices)
        if token_indices.dim() != 2 or token_indices.dtype.is_floating_point or token_indices.dtype == torch.bool:
            raise ValueError(
                f"token_indices must be an integer tensor [batch, tokens], got {token_indices.dtype} "
                f"of shape {tuple(token_indices.shape)}"
            )
        self.token_indices = token_indices.long()

    def clear(self) -> None:
        self.maps = {}


def selected_token_probabilities(
    query: Tensor, key: Tensor, token_indices: Tensor, scale: float, attention_bias: Tensor | None = None
) -> Tensor:
    """Softmax attention probabilities of the chosen key columns only.

    `p[b, h, i, j] = exp(q_i · k_{token_indices[b, j]} · scale + bias − logsumexp_m(q_i · k_m · scale + bias))`
    — the columns of `softmax(q kᵀ · scale + bias)` picked by `token_indices`, without the softmax
    over every column. `query` [B, heads, Q, d], `key` [B, heads, M, d], `token_indices` [B, K]
    (or [1, K]: the same columns for every batch row), `attention_bias` additive and broadcastable
    to [B, heads, Q, M], or boolean (True = attend). Returns [B, heads, Q, K].
    """
    batch, heads, queries, _ = query.shape
    columns = key.shape[-2]
    token_indices = token_indices.to(query.device)
    if token_indices.shape[0] not in (1, batch):
        raise ValueError(
            f"capture_cross_attention: the UNet ran a batch of {batch} but token_indices has "
            f"{token_indices.shape[0]} rows; expected {batch} rows (or 1 for every prompt). With "
            "classifier-free guidance the batch is doubled: pass indices for both halves"
        )
    if token_indices.numel() and not 0 <= int(token_indices.min()) <= int(token_indices.max()) < columns:
        raise ValueError(
            f"token_indices must lie in [0, {columns}) (the text length this layer sees), "
            f"got values from {int(token_indices.min())} to {int(token_indices.max())}"
        )
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, heads, Q, M]
    if attention_bias is not None:
        if attention_bias.dtype == torch.bool:
            attention_bias = torch.zeros_like(attention_bias, dtype=scores.dtype).masked_fill(
                ~attention_bias, float("-inf")
            )
        scores = scores + attention_bias
    log_normaliser = scores.logsumexp(dim=-1, keepdim=True)  # [B, heads, Q, 1]
    index = token_indices[:, None, None, :].expand(batch, heads, queries, token_indices.shape[-1])
    return (scores.gather(-1, index) - log_normaliser).exp()


class CapturingCrossAttnProcessor:
    """Attention processor of one captured layer: diffusers' `AttnProcessor2_0` output, plus the
    probabilities of the store's token columns, written to `store.maps[layer_name]`.

    The probabilities use the scale SDPA uses (1/√head_dim), so they are the ones behind the output.
    """

    def __init__(self, store: CrossAttentionStore, layer_name: str):
        self.store = store
        self.layer_name = layer_name

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # [batch, heads, tokens, head_dim]
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # [batch, heads, query_tokens, selected_text_tokens]
        self.store.maps[self.layer_name] = selected_token_probabilities(
            query, key, self.store.token_indices, 1 / math.sqrt(head_dim), attention_mask
        )

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(
    unet: torch.nn.Module, layers: list[str] | None, token_indices: Tensor
) -> Iterator[CrossAttentionStore]:
    """Record cross-attention probabilities of the chosen token columns while the context is open.

    `layers`: names from `list_cross_attention_layers` (None: all of them). `token_indices`:
    LongTensor [B, K] of text-token positions per prompt (see `token_indices_for`), or [1, K] for
    every prompt. The UNet's batch must have B rows: with classifier-free guidance the batch is
    doubled, so pass indices for both halves (or one row); any other batch raises a ValueError.

    Only the chosen layers change processor; the others keep theirs. On exit, also after an
    exception, every layer gets its original processor back. Yields the `CrossAttentionStore`.
    """
    modules = _cross_attention_modules(unet)
    available = list(modules)
    chosen = available if layers is None else list(layers)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(
            f"capture_cross_attention: {unknown} are not cross-attention layers of this UNet; "
            f"expected names among {available}"
        )
    original = {name: modules[name].processor for name in chosen}  # only the chosen layers change processor
    for name, processor in original.items():
        if isinstance(processor, torch.nn.Module):
            raise ValueError(
                f"capture_cross_attention: layer '{name}' runs {type(processor).__name__}, a processor with "
                "its own weights that capture would bypass; expected a plain attention processor"
            )
    store = CrossAttentionStore([name for name in available if name in chosen], token_indices)
    try:
        for name in chosen:
            modules[name].set_processor(CapturingCrossAttnProcessor(store, name))
        yield store
    finally:
        for name, processor in original.items():
            modules[name].set_processor(processor)


def token_indices_for(
    tokenizer,
    prompts: Sequence[str],
    words: str | Sequence[str | Sequence[str]],
    *,
    eos_fallback: bool = False,
) -> tuple[Tensor, Tensor]:
    """Positions of words in each tokenized prompt: (LongTensor [B, K], BoolTensor mask [B, K]).

    `words`: one phrase for every prompt (a str), or one entry per prompt, each a phrase or a list
    of phrases. A phrase is found only as its whole token sequence ("Van Gogh" where its tokens
    stand together); every occurrence counts. Positions index the tokenizer's full sequence, BOS
    included (the first word of a prompt is at 1): the column order of the text encoder's output.
    Rows are padded with index 0 and mask False; a prompt where no phrase occurs has an all-False
    row.

    `eos_fallback=True`: a prompt where no phrase occurs (an empty phrase included) gets the
    position of its first EOS token instead, mask True (the sentence-summary token; UCE takes the
    empty anchor's embedding there).
    """
    if isinstance(words, str):
        words = [words] * len(prompts)
    if len(words) != len(prompts):
        raise ValueError(
            f"token_indices_for: {len(words)} entries of words for {len(prompts)} prompts; "
            "expected one phrase for all prompts or one entry per prompt"
        )
    rows: list[list[int]] = []
    for prompt, phrases in zip(prompts, words):
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        phrase_ids = [tokenizer(phrase, add_special_tokens=False)["input_ids"] for phrase in phrases]
        ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        positions = sorted(
            {
                start + offset
                for phrase in phrase_ids
                if phrase
                for start in range(len(ids) - len(phrase) + 1)
                if ids[start : start + len(phrase)] == phrase
                for offset in range(len(phrase))
            }
        )
        if not positions and eos_fallback:
            positions = [ids.index(tokenizer.eos_token_id, 1)]
        rows.append(positions)
    width = max([1, *map(len, rows)])
    indices = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, positions in enumerate(rows):
        indices[row, : len(positions)] = torch.tensor(positions, dtype=torch.long)
        mask[row, : len(positions)] = True
    return indices, mask


def reduce_token_maps(maps: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid token columns: maps [B, heads, HW, K], mask [B, K] → [B, heads, HW].

    A row with no valid column gives zeros. `mask` may have one row for every batch row.
    """
    weights = mask.to(device=maps.device, dtype=maps.dtype)[:, None, None, :]  # [B, 1, 1, K]
    return (maps * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def attention_heatmaps(maps: Mapping[str, Tensor] | Sequence[Tensor], latent_hw: tuple[int, int]) -> Tensor:
    """Per-token heatmaps [B, K, H, W] at latent size: each layer's map [B, heads, HW_ℓ, K] averaged
    over heads, resized (bilinear) from its own grid to `latent_hw`, then averaged over layers.

    A layer's grid is the latent size halved (rounding up) as many times as its HW_ℓ requires.
    """
    layer_maps = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layer_maps:
        raise ValueError("attention_heatmaps: no attention maps; expected at least one captured layer")
    height, width = latent_hw
    resized = []
    for layer_map in layer_maps:
        batch, _, pixels, tokens = layer_map.shape
        grid = _grid_for(pixels, height, width)
        per_token = layer_map.mean(dim=1).transpose(1, 2).reshape(batch, tokens, *grid)  # [B, K, h, w]
        resized.append(F.interpolate(per_token, size=(height, width), mode="bilinear", align_corners=False))
    return torch.stack(resized).mean(dim=0)


def _grid_for(pixels: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of `pixels` query positions inside a UNet whose latents are height x width."""
    h, w = height, width
    while h * w > pixels and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != pixels:
        raise ValueError(
            f"attention_heatmaps: a map with {pixels} positions does not fit latents of {height}x{width}; "
            "expected the latent grid halved a whole number of times"
        )
    return h, w
