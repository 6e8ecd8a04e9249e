"""SD 1.5, SD 2.1 and SDXL layouts (reference configs, random weights, UNet and VAE channels ÷ 10, one
text-encoder layer): DUGE trains through the diffusers backend, and the single file and LoRA it writes
load back in diffusers (and ComfyUI, with COMFYUI_PATH) with no unmatched, missing or differing tensor.
The full-size run is benchmarks/real_layouts.py (results in benchmarks/results/real_layouts*.json)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "real_layouts.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_layouts_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_reduced_layout_trains_and_round_trips_through_diffusers(bench, layout, prediction, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)  # ComfyUI's check: test below
    row = bench.run_layout(layout, width_divisor=10, text_layers=1, latent=8, steps=1, workdir=tmp_path, tflops=0.05)
    assert row["prediction_type"] == prediction
    assert row["trainable_parameters"] == row["expected_kv_parameters"] > 0
    assert row["delta_norm"] > 0
    single_file, lora = row["diffusers_single_file"], row["diffusers_lora"]
    assert (single_file["unmatched"], single_file["missing"], single_file["differing"]) == (0, 0, 0), single_file
    assert (lora["unmatched"], lora["missing"]) == (0, 0) and lora["modules"] > 0, lora
    assert lora["max_abs_weight_error"] < 1e-5
    assert row["plan"]["total_gib"] > 0 and row["measured"]["peak_mib"] > 0


@pytest.mark.comfyui
@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_reduced_layout_files_load_in_comfyui(bench, layout, tmp_path):
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("needs a ComfyUI checkout: set COMFYUI_PATH (its .venv's python runs the check)")
    row = bench.run_layout(layout, width_divisor=10, text_layers=1, latent=8, steps=1, workdir=tmp_path, tflops=0.05)
    comfy = row["comfyui"]
    assert "error" not in comfy, comfy
    assert (comfy["unet_missing"], comfy["unet_unexpected"], comfy["lora_not_loaded"]) == (0, 0, 0), comfy
    assert comfy["patches"] == comfy["lora_modules"] == row["diffusers_lora"]["modules"]
