"""`duge plan`: parameter counts from the real configs, the activation formula against the tensors
autograd really keeps, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from duge.memory import choose_memory_settings, saved_activation_bytes
from duge.plan import (meta_pipeline, model_sizes, plan_run,
                       unet_activation_elements)
from duge.config import UnlearnConfig


@pytest.mark.parametrize("name, unet_m, text_m, kv_m", [
    ("sd15", 859.52, 123.06, 19.17),
    ("sd21", 865.91, 340.39, 25.56),
    ("sdxl", 2567.46, 817.72, 340.79),
])
def test_reference_layouts_have_their_published_parameter_counts(name, unet_m, text_m, kv_m):
    pipe = meta_pipeline(name)
    assert all(p.device.type == "meta" for p in pipe.unet.parameters())  # nothing allocated
    plan = plan_run(pipe, UnlearnConfig(), name, device="cuda", tflops=100.0)
    assert plan.parameters["unet"] / 1e6 == pytest.approx(unet_m, abs=0.01)
    assert plan.parameters["text_encoders"] / 1e6 == pytest.approx(text_m, abs=0.01)
    assert plan.parameters["edited"] / 1e6 == pytest.approx(kv_m, abs=0.01)  # SD 1.5: the 19.2 M of the paper
    assert plan.storage_bytes == 2 and plan.latent == {"sd15": (64, 64), "sd21": (96, 96), "sdxl": (128, 128)}[name]
    assert plan.memory_gib["weights"] * 2**30 == 2 * (plan.parameters["unet"] + plan.parameters["text_encoders"]
                                                      + plan.parameters["vae"])


def test_gradient_checkpointing_and_lora_lower_the_plan():
    pipe = meta_pipeline("sd15")
    base = plan_run(pipe, UnlearnConfig(), device="cuda", tflops=100.0)
    checkpointed = plan_run(pipe, UnlearnConfig(gradient_checkpointing=True), device="cuda", tflops=100.0)
    lora = plan_run(pipe, UnlearnConfig(trainable_mode="lora"), device="cuda", tflops=100.0)
    assert checkpointed.memory_gib["activations"] < base.memory_gib["activations"] / 3
    assert checkpointed.activation_gib_other_setting == pytest.approx(base.memory_gib["activations"])
    assert checkpointed.seconds_per_step > base.seconds_per_step  # the recomputation
    assert lora.memory_gib["edits"] < base.memory_gib["edits"]
    layers = model_sizes(pipe).edited_layers  # 32 layers: to_k and to_v of 16 attn2
    assert len(layers) == 32 and lora.parameters["trainable"] == sum(4 * (o + i) for o, i in layers)


def test_activation_formula_is_within_a_factor_of_two_of_what_autograd_keeps(builtin_pipe):
    """Bytes of the distinct tensors autograd saves in a UNet forward with trainable K/V deltas, vs the formula."""
    from duge.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(builtin_pipe, device="cpu")
    batch, latent = 2, (16, 16)
    z = torch.randn(batch, 4, *latent)
    ctx = backend.encode_prompts(["a red circle"] * batch)
    with backend.edits(r"attn2\.to_[kv]$") as edits:
        edits.start_request(0)
        measured = saved_activation_bytes(lambda: backend.predict_noise(z, torch.tensor([10, 500]), ctx))
    formula = unet_activation_elements(dict(builtin_pipe.unet.config), latent, ctx.shape[1]).full * batch * 4
    assert 0.5 < formula / measured < 2.0, (formula, measured)


def test_plan_command_prints_and_writes_json(tmp_path, capsys):
    from duge.cli import main

    concepts = tmp_path / "set.yaml"
    concepts.write_text("name: t\nrequests:\n  - target: Van Gogh\n    anchor: painting\n    preserve: [Monet]\n"
                        "    steps: 40\n")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "sdxl", "--concepts", str(concepts), "--device", "cuda", "--tflops", "100",
                 "--gradient-checkpointing", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "request 'Van Gogh'" in text and "peak memory" in text and "gradient checkpointing on" in text
    plan = json.loads(out.read_text())
    assert plan["layout"] == "sdxl" and plan["resolution"] == 1024 and plan["steps"] == 40
    assert plan["related_batch"] == plan["batch_size"] == 8


def test_memory_choice_prefers_micro_batches_and_checkpoints_only_when_one_row_does_not_fit():
    gib = 2**30
    whole = choose_memory_settings(12, 1 * gib, 0.25 * gib, budget_bytes=20 * gib)
    assert (whole.gradient_checkpointing, whole.micro_batch_size) == (False, 0)
    micro = choose_memory_settings(12, 1 * gib, 0.25 * gib, budget_bytes=4.7 * gib)  # 4 rows at 1.15 GiB each
    assert (micro.gradient_checkpointing, micro.micro_batch_size) == (False, 4)
    checkpointed = choose_memory_settings(12, 1 * gib, 0.25 * gib, budget_bytes=0.6 * gib)
    assert (checkpointed.gradient_checkpointing, checkpointed.micro_batch_size) == (True, 2)
    cannot = choose_memory_settings(12, 1 * gib, None, budget_bytes=0.6 * gib)  # a backend that cannot checkpoint
    assert (cannot.gradient_checkpointing, cannot.micro_batch_size) == (False, 1) and "cannot checkpoint" in cannot.reason
    given = choose_memory_settings(12, 1 * gib, 0.25 * gib, budget_bytes=0.6 * gib, gradient_checkpointing=False,
                                   micro_batch_size=3)
    assert (given.gradient_checkpointing, given.micro_batch_size) == (False, 3)
    unknown = choose_memory_settings(12, 1 * gib, 0.25 * gib, budget_bytes=None)
    assert (unknown.gradient_checkpointing, unknown.micro_batch_size) == (False, 0)


def test_default_settings_fit_the_paper_targets():
    """The README's targets: SD 1.5 at 512 px within 8 GB and SDXL at 1024 px within 16 GB, default settings."""
    sd15 = plan_run(meta_pipeline("sd15"), UnlearnConfig(), device="cuda", tflops=70.0, vram_gib=8)
    assert sd15.memory_gib["total"] <= 8 and sd15.micro_batch_size and not sd15.gradient_checkpointing
    sdxl = plan_run(meta_pipeline("sdxl"), UnlearnConfig(), device="cuda", tflops=70.0, vram_gib=16)
    assert sdxl.memory_gib["total"] <= 16 and sdxl.gradient_checkpointing and sdxl.micro_batch_size
    unlimited = plan_run(meta_pipeline("sd15"), UnlearnConfig(), device="cuda", tflops=70.0)
    assert unlimited.micro_batch_size == 0 and unlimited.memory_gib["total"] > 8
