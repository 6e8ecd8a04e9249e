"""Run-time choices of the diffusers backend (attention, autocast, gradient checkpointing) and the
on-disk image cache: the GPU-only branches fall back, and say so, when CUDA or xformers are absent."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from duge.backends import diffusers_backend
from duge.backends.diffusers_backend import DiffusersBackend, choose_attention_implementation, choose_dtype
from duge.concepts import parse_concept_set, resolve_concept_set, resolve_request
from duge.image_cache import cache_key
from duge.trainer import UnlearnConfig, unlearn

SET = "name: t\nrequests:\n  - target: circle\n    preserve: [square]\n"


def _requests():
    return resolve_concept_set(parse_concept_set(SET), builtin_world=True, setting="sequential")


class _RecordingUnet:
    def __init__(self):
        self.xformers = False

    def enable_xformers_memory_efficient_attention(self):
        self.xformers = True


def test_sdpa_is_chosen_and_logged_on_the_cpu(caplog):
    caplog.set_level(logging.INFO, logger="duge")
    unet = _RecordingUnet()
    assert choose_attention_implementation(unet, torch.device("cpu")) == "sdpa"
    assert not unet.xformers
    assert "PyTorch SDPA (device cpu" in caplog.text


def test_cuda_without_xformers_falls_back_to_sdpa_and_logs_why(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="duge")
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` raises ImportError
    unet = _RecordingUnet()
    assert choose_attention_implementation(unet, torch.device("cuda")) == "sdpa"
    assert not unet.xformers
    assert "xformers unavailable" in caplog.text and "using PyTorch SDPA" in caplog.text


def test_cuda_with_xformers_enables_it_and_logs(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="duge")
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    unet = _RecordingUnet()
    assert choose_attention_implementation(unet, torch.device("cuda")) == "xformers"
    assert unet.xformers and "xformers memory-efficient attention" in caplog.text


def test_half_precision_requested_without_cuda_computes_in_float32_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="duge")
    assert choose_dtype("float16", torch.device("cpu")) is torch.float32
    assert "falling back to float32" in caplog.text
    assert choose_dtype("auto", torch.device("cpu")) is torch.float32


def test_auto_dtype_on_cuda_picks_bf16_when_supported(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="duge")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", torch.device("cuda")) is torch.float16
    assert "autocast: float16 on CUDA" in caplog.text


def test_storage_dtype_is_float32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert diffusers_backend.storage_dtype("auto") is torch.float32


def _gradients(backend, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of the cross-attention loss (output + attention term) w.r.t. every K/V delta."""
    from duge.losses import cross_attention_loss
    from duge.targets import predict

    backend.unet.disable_gradient_checkpointing()
    if checkpointing:
        backend.unet.enable_gradient_checkpointing(diffusers_backend.checkpoint_keeping_processors)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([100, 700])
    prompts, words = ["a red circle", "a blue circle"], ["circle", "circle"]
    ctx = backend.encode_prompts(prompts)
    tokens, mask = backend.token_indices(prompts, words)
    config = UnlearnConfig()
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        params = edits.start_request(0)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 1e-3, generator=generator)
        with torch.no_grad(), edits.reference():
            ref, ref_maps = predict(backend, z, t, ctx, tokens, mask, config, True)
        pred, maps = predict(backend, z, t, ctx, tokens, mask, config, True)
        loss, _ = cross_attention_loss(pred, ref, maps, ref_maps, 50.0)
        loss.backward()
        grads = {name: d.delta.grad.clone() for name, d in edits.deltas.items()}
    backend.unet.disable_gradient_checkpointing()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients_with_attention_capture(builtin_pipe, caplog):
    caplog.set_level(logging.INFO, logger="duge")
    backend = DiffusersBackend(builtin_pipe, device="cpu", gradient_checkpointing=True)
    assert "gradient checkpointing: on" in caplog.text
    assert backend.unet.is_gradient_checkpointing
    plain, checkpointed = _gradients(backend, False), _gradients(backend, True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * len(backend.cross_attention_layers())
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7)


def test_cached_images_are_written_once_and_reused(builtin_pipe, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="duge")
    backend = DiffusersBackend(builtin_pipe, device="cpu")
    config = UnlearnConfig(steps=1, batch_size=1, anchor_images=1, related_images=1, sampler_steps=1,
                           image_cache_dir=str(tmp_path / "cache"))
    first = unlearn(backend, _requests(), config)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and "cached images written" in caplog.text
    caplog.clear()
    second = unlearn(backend, _requests(), config)
    assert "cached images read" in caplog.text
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == files
    for name, delta in first.total_delta.items():
        assert torch.equal(delta, second.total_delta[name]), name
    request = resolve_request(parse_concept_set(SET).requests[0], builtin_world=True)
    key = cache_key(backend, request, config, 0, False)
    assert cache_key(backend, request, UnlearnConfig(**{**config.__dict__, "anchor_images": 3}), 0, False) != key
    assert cache_key(backend, request, config, 1, False) != key
    with backend.edits(r"attn2\.to_[kv]$") as edits:  # the reference model changes with committed deltas
        edits.load_committed({n: torch.full_like(d.committed, 1e-3) for n, d in edits.deltas.items()})
        assert cache_key(backend, request, config, 0, False) != key


def test_auto_memory_settles_on_micro_batches_or_checkpointing_from_the_budget(builtin_pipe, caplog):
    """A budget smaller than the batch's activations: micro-batches, the same edit as the whole batch
    at once (up to float summation order); smaller than one row: gradient checkpointing as well,
    switched off again after the run. Each choice is logged."""
    caplog.set_level(logging.INFO, logger="duge")
    backend = DiffusersBackend(builtin_pipe, device="cpu")
    base = dict(steps=3, batch_size=4, anchor_images=2, related_images=1, sampler_steps=2)
    whole = unlearn(backend, _requests(), UnlearnConfig(**base, memory_budget_gb=64.0))
    assert "the whole batch in one pass" in caplog.text
    caplog.clear()
    per_row_gib = 2e7 / 2**30  # the built-in UNet keeps about 3.5 MB per row at 16x16 latents: a few rows fit
    micro = unlearn(backend, _requests(), UnlearnConfig(**base, memory_budget_gb=per_row_gib))
    assert "gradient checkpointing off, micro-batches of" in caplog.text
    for name, delta in whole.total_delta.items():
        torch.testing.assert_close(micro.total_delta[name], delta, rtol=1e-3, atol=1e-3 * float(delta.abs().max()))
    caplog.clear()
    unlearn(backend, _requests(), UnlearnConfig(**base, memory_budget_gb=1e-6))
    assert "gradient checkpointing on, micro-batches of 1 rows" in caplog.text
    assert not backend.gradient_checkpointing and not backend.unet.is_gradient_checkpointing


def test_free_memory_counts_the_allocators_unused_cache_on_cuda_and_memavailable_on_the_cpu(monkeypatch):
    from duge.memory import free_memory_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * 2**30)
    assert free_memory_bytes(torch.device("cuda", 0)) == 4 * 2**30
    cpu = free_memory_bytes(torch.device("cpu"))
    assert cpu is None or cpu > 0


def test_command_line_memory_and_loss_weight_options_reach_the_config():
    from duge.cli import _unlearn_config, build_parser

    parse = build_parser().parse_args
    defaults = _unlearn_config(parse(["unlearn", "--concepts", "x.yaml", "--out", "o"]))
    assert (defaults.gradient_checkpointing, defaults.micro_batch_size, defaults.memory_budget_gb) == ("auto", "auto", None)
    assert (defaults.beta, defaults.lambda_prior, defaults.lambda_reg) == (UnlearnConfig().beta, 1.0, UnlearnConfig().lambda_reg)
    config = _unlearn_config(parse(["unlearn", "--concepts", "x.yaml", "--out", "o", "--gradient-checkpointing",
                                    "--micro-batch-size", "2", "--memory-budget", "6.5", "--lambda-reg", "2e-6",
                                    "--beta", "5", "--lambda-prior", "0.5"]))
    assert (config.gradient_checkpointing, config.micro_batch_size, config.memory_budget_gb) == (True, 2, 6.5)
    assert (config.beta, config.lambda_prior, config.lambda_reg) == (5.0, 0.5, 2e-6)
    assert _unlearn_config(parse(["unlearn", "--concepts", "x", "--out", "o", "--gradient-checkpointing", "off"])) \
        .gradient_checkpointing is False
    with pytest.raises(SystemExit):
        parse(["unlearn", "--concepts", "x", "--out", "o", "--micro-batch-size", "-1"])
