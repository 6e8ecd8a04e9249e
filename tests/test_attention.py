"""Capture of cross-attention probabilities on the tiny SD-architecture UNet at random init."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel

from duge.attention import (
    CapturingCrossAttnProcessor,
    attention_heatmaps,
    capture_cross_attention,
    list_cross_attention_layers,
    reduce_token_maps,
    token_indices_for,
)
from duge.world.architecture import unet_config
from duge.world.tokenizer import write_tokenizer

TEXT_TOKENS = 32


@pytest.fixture(scope="module")
def unet():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config()).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, TEXT_TOKENS, 128, generator=generator)  # [batch, text tokens, width]
    return latents, torch.tensor([10, 600]), context


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def predict(unet, inputs, **kwargs):
    latents, timesteps, context = inputs
    return unet(latents, timesteps, encoder_hidden_states=context, **kwargs).sample


def test_cross_attention_layers_are_listed_in_forward_order(unet, inputs):
    called = []
    modules = {name: module for name, module in unet.named_modules() if name.endswith("attn2")}
    handles = [m.register_forward_hook(lambda m, a, o, name=n: called.append(name)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            predict(unet, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert list_cross_attention_layers(unet) == called
    assert len(called) == 7


def test_capture_leaves_the_noise_prediction_unchanged(unet, inputs):
    with torch.no_grad():
        plain = predict(unet, inputs)
        with capture_cross_attention(unet, None, torch.tensor([[1, 2], [3, 4]])) as store:
            captured = predict(unet, inputs)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=0)
    assert list(store.maps) == list_cross_attention_layers(unet)


def test_captured_maps_equal_an_explicit_softmax_of_the_layer_inputs(unet, inputs):
    token_indices = torch.tensor([[1, 5, 31], [0, 7, 7]])
    layer_inputs = {}

    def remember(name):
        def hook(module, args, kwargs, output):
            layer_inputs[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        return hook

    layers = list_cross_attention_layers(unet)
    modules = dict(unet.named_modules())
    handles = [modules[name].register_forward_hook(remember(name), with_kwargs=True) for name in layers]
    try:
        with torch.no_grad(), capture_cross_attention(unet, None, token_indices) as store:
            predict(unet, inputs)
    finally:
        for handle in handles:
            handle.remove()

    for name in layers:
        attn = modules[name]
        hidden_states, context = layer_inputs[name]
        head_dim = attn.to_q.out_features // attn.heads
        with torch.no_grad():
            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
            key = attn.to_k(context).unflatten(-1, (attn.heads, head_dim)).transpose(1, 2)
            probabilities = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        expected = torch.stack([probabilities[b][..., token_indices[b]] for b in range(2)])
        assert store.maps[name].shape == (2, attn.heads, hidden_states.shape[1], 3)
        torch.testing.assert_close(store.maps[name], expected, atol=1e-6, rtol=1e-5)


def test_maps_sum_to_one_over_all_columns_and_less_over_some(unet, inputs):
    every_column = torch.arange(TEXT_TOKENS).expand(2, TEXT_TOKENS)
    with torch.no_grad(), capture_cross_attention(unet, None, every_column) as store:
        predict(unet, inputs)
        all_maps = dict(store.maps)
        store.set_tokens(torch.tensor([[2, 3, 4, 5]]))  # one row: the same columns for both prompts
        predict(unet, inputs)
    for name, maps in all_maps.items():
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
        some = store.maps[name]
        assert some.shape[-1] == 4
        assert (some.sum(-1) <= 1 + 1e-6).all()
        torch.testing.assert_close(some, maps[..., 2:6])


def test_masked_text_tokens_get_no_attention(unet, inputs):
    text_mask = torch.ones(2, TEXT_TOKENS)
    text_mask[:, 20:] = 0
    every_column = torch.arange(TEXT_TOKENS).expand(2, TEXT_TOKENS)
    with torch.no_grad(), capture_cross_attention(unet, None, every_column) as store:
        predict(unet, inputs, encoder_attention_mask=text_mask)
    for maps in store.maps.values():
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
        assert maps[..., 20:].max() < 1e-12


def test_only_the_chosen_layers_change_processor(unet, inputs):
    before = unet.attn_processors
    chosen = list_cross_attention_layers(unet)[2]
    with capture_cross_attention(unet, [chosen], torch.tensor([[1]])) as store:
        during = unet.attn_processors
        with torch.no_grad():
            predict(unet, inputs)
    for key, processor in during.items():
        if key == chosen + ".processor":
            assert isinstance(processor, CapturingCrossAttnProcessor)
        else:
            assert processor is before[key]
    assert list(store.maps) == [chosen]


def test_processors_are_restored_after_the_context(unet, inputs):
    before = unet.attn_processors
    with torch.no_grad(), capture_cross_attention(unet, None, torch.tensor([[1], [2]])):
        predict(unet, inputs)
    after = unet.attn_processors
    assert all(after[key] is processor for key, processor in before.items())


def test_processors_are_restored_after_an_error_inside_the_context(unet, inputs):
    before = unet.attn_processors
    with pytest.raises(ValueError, match="batch of 2 but token_indices has 3 rows"):
        with torch.no_grad(), capture_cross_attention(unet, None, torch.zeros(3, 1, dtype=torch.long)):
            predict(unet, inputs)
    after = unet.attn_processors
    assert all(after[key] is processor for key, processor in before.items())


def test_unknown_layer_names_are_rejected(unet):
    self_attention = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    with pytest.raises(ValueError, match="not cross-attention layers"):
        with capture_cross_attention(unet, [self_attention], torch.tensor([[1]])):
            pass


def test_gradients_flow_from_the_maps_to_the_key_projection(unet, inputs):
    layers = list_cross_attention_layers(unet)[:2]
    modules = dict(unet.named_modules())
    unet.zero_grad(set_to_none=True)
    with capture_cross_attention(unet, layers, torch.tensor([[1, 2], [3, 4]])) as store:
        predict(unet, inputs)
    loss = sum(maps.square().mean() for maps in store.maps.values())
    loss.backward()
    for name in layers:
        assert modules[name].to_k.weight.grad is not None
        assert modules[name].to_k.weight.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)


def test_token_indices_for_finds_words_after_the_bos_token(tokenizer):
    prompts = ["a striped red circle", "an image of a red square", "red circle and red circle"]

    indices, mask = token_indices_for(tokenizer, prompts, "red circle")

    assert indices.tolist() == [[3, 4, 0, 0], [0, 0, 0, 0], [1, 2, 4, 5]]
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert indices.dtype == torch.long and mask.dtype == torch.bool


def test_token_indices_for_takes_each_prompts_own_words(tokenizer):
    prompts = ["a red circle", "a blue square", "a red star with a blue circle"]

    indices, mask = token_indices_for(tokenizer, prompts, ["circle", ["square", "blue"], ["red", "star"]])

    assert indices.tolist() == [[3, 0], [2, 3], [2, 3]]
    assert mask.tolist() == [[True, False], [True, True], [True, True]]
    with pytest.raises(ValueError, match="2 entries of words for 3 prompts"):
        token_indices_for(tokenizer, prompts, ["circle", "square"])


def test_token_indices_for_falls_back_to_the_eos_token(tokenizer):
    prompts = ["", "a blue star", "a red circle", "a red circle"]

    indices, mask = token_indices_for(tokenizer, prompts, ["", "circle", "circle", ""], eos_fallback=True)

    assert indices.tolist() == [[1], [4], [3], [4]] and mask.all()
    assert tokenizer("a blue star")["input_ids"][4] == tokenizer.eos_token_id


def test_reduce_token_maps_averages_the_valid_columns():
    maps = torch.tensor([[0.2, 0.4, 0.9], [0.1, 0.3, 0.5]]).view(2, 1, 1, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(reduce_token_maps(maps, mask), torch.tensor([0.3, 0.0]).view(2, 1, 1))


def test_attention_heatmaps_resize_and_average_layers():
    fine = torch.full((1, 2, 16, 3), 0.2)  # 4x4 grid of an 8x8 latent
    coarse = torch.full((1, 2, 4, 3), 0.4)  # 2x2 grid
    heatmaps = attention_heatmaps({"fine": fine, "coarse": coarse}, (8, 8))
    assert heatmaps.shape == (1, 3, 8, 8)
    torch.testing.assert_close(heatmaps, torch.full((1, 3, 8, 8), 0.3))
    with pytest.raises(ValueError, match="does not fit latents of 8x8"):
        attention_heatmaps([torch.zeros(1, 2, 15, 3)], (8, 8))
