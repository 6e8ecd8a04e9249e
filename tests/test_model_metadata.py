"""The kohya `ss_*` and `modelspec.*` metadata of our LoRAs and single-file checkpoints, read back, and
how A1111's Lora tab labels and filters them (its own rules, re-implemented below)."""

from __future__ import annotations

import json

import pytest
import torch

from duge import io
from duge.layouts import random_pipeline
from duge.model_metadata import BaseModel, base_model_of_pipeline
from duge.world.model import BUILTIN_MODEL_DIR

MANIFEST = io.make_manifest("duge", [{"target": "Van Gogh", "anchor": "painting", "preserve": ["Monet"]},
                                     {"target": "golf ball"}], None, "test")


# ---------------------------------------------------------------- A1111, re-implemented
# AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/network.py (commit 0a0efa3f),
# NetworkOnDisk.detect_version:
#     if str(self.metadata.get('ss_base_model_version', "")).startswith("sdxl_"): return SdVersion.SDXL
#     elif str(self.metadata.get('ss_v2', "")) == "True": return SdVersion.SD2
#     elif len(self.metadata): return SdVersion.SD1
#     return SdVersion.Unknown
# and NetworkOnDisk.alias = metadata.get('ss_output_name', name). extensions-builtin/Lora/
# ui_extra_networks_lora.py (commit 01a40c62), ExtraNetworksPageLora.create_item, with the default
# settings (lora_show_all off): a LoRA whose version is known and differs from the loaded
# checkpoint's (is_sdxl / is_sd2 / is_sd1) is not listed.

def a1111_sd_version(metadata: dict[str, str]) -> str:
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    if len(metadata):
        return "SD1"
    return "Unknown"


def a1111_lists_lora(metadata: dict[str, str], loaded_checkpoint: str) -> bool:
    version = a1111_sd_version(metadata)
    return version == "Unknown" or version == loaded_checkpoint


def test_a1111_reimplementation_reproduces_the_bug_report():
    # what the issue reported: metadata without the version keys reads as SD 1, hidden with SD 2 / SDXL
    old_style = {"duge_manifest": "{}", "ss_network_module": "networks.lora"}
    assert a1111_sd_version(old_style) == "SD1"
    assert not a1111_lists_lora(old_style, "SDXL") and not a1111_lists_lora(old_style, "SD2")
    assert a1111_sd_version({}) == "Unknown"


# ---------------------------------------------------------------- our files

def _one_module_lora(pipe) -> dict[str, io.LoraFactors]:
    """A rank-1 edit of the first cross-attention to_k (real shapes, a few KB)."""
    name, module = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    out_features, in_features = module.weight.shape
    generator = torch.Generator().manual_seed(0)
    return {name: io.LoraFactors(torch.randn(out_features, 1, generator=generator),
                                 torch.randn(1, in_features, generator=generator))}


@pytest.fixture(scope="module")
def meta_pipes():
    """SD 1.5, SD 2.1 and SDXL pipelines of their reference configs on the meta device (shapes only)."""
    return {name: random_pipeline(name, BUILTIN_MODEL_DIR / "tokenizer", meta=True) for name in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("layout, version, kohya, architecture, resolution", [
    ("sd1", "SD1", "sd_v1", "stable-diffusion-v1/lora", "512x512"),
    ("sd2", "SD2", "sd_v2", "stable-diffusion-v2-768-v/lora", "768x768"),
    ("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024"),
])
def test_lora_is_labelled_with_its_base_model_for_a1111_kohya_and_modelspec(meta_pipes, tmp_path, layout, version,
                                                                            kohya, architecture, resolution):
    pipe = meta_pipes[layout]
    base = base_model_of_pipeline(pipe)  # SD 2.1's reference config predicts v at 768 px
    path = io.save_lora(_one_module_lora(pipe), tmp_path / f"erase_{layout}.safetensors", MANIFEST, base_model=base)
    metadata = io.read_safetensors_metadata(path)
    assert metadata["ss_base_model_version"] == kohya
    assert metadata["ss_v2"] == str(layout == "sd2")
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("1", "1")
    assert metadata["ss_output_name"] == f"erase_{layout}" == metadata["modelspec.title"]
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.prediction_type"] == ("v" if layout == "sd2" else "epsilon")
    assert "'Van Gogh' (towards 'painting')" in metadata["modelspec.description"]
    assert "'golf ball'" in metadata["modelspec.description"]
    assert metadata["modelspec.date"] == MANIFEST["created"]
    assert json.loads(metadata["duge_manifest"]) == MANIFEST  # the manifest is still beside them
    assert a1111_sd_version(metadata) == version
    assert a1111_lists_lora(metadata, version)
    assert not any(a1111_lists_lora(metadata, other) for other in {"SD1", "SD2", "SDXL"} - {version})


@pytest.mark.parametrize("layout, kohya", [("sd1", "sd_v1"), ("sd2", "sd_v2"), ("sdxl", "sdxl_base_v1-0")])
def test_lora_family_is_read_from_the_cross_attention_width_when_not_given(meta_pipes, tmp_path, layout, kohya):
    path = io.save_lora(_one_module_lora(meta_pipes[layout]), tmp_path / "edit.safetensors", None)
    metadata = io.read_safetensors_metadata(path)
    assert metadata["ss_base_model_version"] == kohya
    assert a1111_sd_version(metadata) == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[layout]


def test_builtin_model_lora_gets_no_public_architecture(builtin_pipe, tmp_path):
    path = io.save_lora(_one_module_lora(builtin_pipe), tmp_path / "demo.safetensors", MANIFEST,
                        base_model=base_model_of_pipeline(builtin_pipe))
    metadata = io.read_safetensors_metadata(path)
    assert base_model_of_pipeline(builtin_pipe) == BaseModel(None, False, 32)  # 8 latent pixels x 4
    assert "ss_base_model_version" not in metadata and "modelspec.architecture" not in metadata
    assert metadata["ss_output_name"] == "demo" and metadata["ss_network_dim"] == "1"
    assert "'Van Gogh'" in metadata["modelspec.description"]


def test_single_file_checkpoint_carries_the_modelspec_keys(builtin_pipe, tmp_path, monkeypatch):
    path = io.save_single_file(builtin_pipe, tmp_path / "erased.safetensors", MANIFEST)
    metadata = io.read_safetensors_metadata(path)
    assert metadata["modelspec.title"] == "erased"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert "'Van Gogh'" in metadata["modelspec.description"]
    assert "modelspec.architecture" not in metadata  # the built-in model is no public architecture
    # an SD 2.1 (v, 768) pipeline: its architecture and resolution, without the /lora suffix
    from duge.model_metadata import checkpoint_metadata

    sd21 = checkpoint_metadata(tmp_path / "sd21.safetensors", MANIFEST, BaseModel("sd2", v_prediction=True))
    assert (sd21["modelspec.architecture"], sd21["modelspec.resolution"]) == ("stable-diffusion-v2-768-v", "768x768")


def test_base_model_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="sd3"):
        BaseModel("sd3")
