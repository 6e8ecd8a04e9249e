"""The metadata other tools read from our files: kohya's `ss_*` keys and Stability AI's `modelspec.*`.

A1111 and Forge decide which checkpoints a LoRA is shown with from `ss_base_model_version` and
`ss_v2` (extensions-builtin/Lora/network.py, `NetworkOnDisk.detect_version`: SDXL when
`ss_base_model_version` starts with `sdxl_`, SD 2 when `ss_v2 == "True"`, otherwise SD 1 as soon as
the file has any metadata) and show `ss_output_name` as its name. Model sites and managers read
the `modelspec.*` keys of ModelSpec 1.0.1 (https://github.com/Stability-AI/ModelSpec), written as
kohya's sd-scripts write them (library/sai_model_spec.py): `modelspec.architecture` names the
original model (`stable-diffusion-v1`, `stable-diffusion-v2-512`, `stable-diffusion-v2-768-v`,
`stable-diffusion-xl-v1-base`) with `/lora` for a LoRA, `modelspec.resolution` is `WxH`.

`BaseModel` says what a file was made from; `lora_metadata` and `checkpoint_metadata` give the
str -> str entries `duge.io`'s savers add to the manifest. A model of none of the three public
architectures (the built-in demo model) gets the keys that do not depend on the architecture
only: no tool could load it with a public checkpoint, so no label would be true.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import __version__

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_DIFFUSERS = "diffusers"  # kohya's value for LoRAs with diffusers module names
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"  # kohya's value for SD checkpoints
# Text-embedding width the UNet's cross-attention reads: the one architecture detail a LoRA of
# cross-attention weights carries (`attn2.to_k` [out, context_dim]).
FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
KOHYA_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
CROSS_ATTENTION_KEY_SUFFIX = "attn2_to_k.lora_down.weight"  # kohya name of attn2.to_k's down factor [rank, context_dim]


@dataclass(frozen=True)
class BaseModel:
    """What a model or LoRA was made from: `family` "sd1" | "sd2" | "sdxl" (None: another model,
    e.g. the built-in demo), whether it predicts v, and its native resolution in pixels."""

    family: str | None
    v_prediction: bool = False
    resolution: int | None = None  # None: the family's (512; 768 for SD 2.x v; 1024 for SDXL)

    def __post_init__(self):
        if self.family is not None and self.family not in KOHYA_BASE_MODEL_VERSION:
            raise ValueError(f"BaseModel.family {self.family!r}: expected one of {sorted(KOHYA_BASE_MODEL_VERSION)} "
                             "or None")

    @property
    def pixels(self) -> int:
        if self.resolution:
            return int(self.resolution)
        if self.family == "sdxl":
            return 1024
        return 768 if self.family == "sd2" and self.v_prediction else 512

    @property
    def architecture(self) -> str | None:
        """The ModelSpec architecture id of the original model, or None for a non-public model."""
        if self.family == "sdxl":
            return "stable-diffusion-xl-v1-base"
        if self.family == "sd2":
            return "stable-diffusion-v2-768-v" if self.v_prediction else "stable-diffusion-v2-512"
        if self.family == "sd1":
            return "stable-diffusion-v1"
        return None


def base_model_from_context_dim(context_dim: int | None, v_prediction: bool = False,
                                resolution: int | None = None) -> BaseModel:
    """The family of a UNet whose cross-attention reads `context_dim`-wide text embeddings."""
    return BaseModel(FAMILY_BY_CONTEXT_DIM.get(int(context_dim)) if context_dim else None, v_prediction, resolution)


def base_model_of_pipeline(pipe) -> BaseModel:
    """The BaseModel of a diffusers pipeline (its UNet config and scheduler)."""
    config = pipe.unet.config
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if getattr(pipe, "vae", None) else 8
    return base_model_from_context_dim(config.cross_attention_dim,
                                       pipe.scheduler.config.get("prediction_type") == "v_prediction",
                                       int(config.sample_size) * vae_scale)


def base_model_of_lora(tensors: Mapping[str, object]) -> BaseModel:
    """The family a kohya LoRA of cross-attention weights was made for, from `attn2.to_k`'s input width.
    SD 2.x's two variants cannot be told apart this way (512 ε assumed); callers that know pass a BaseModel."""
    for name, tensor in tensors.items():
        if name.endswith(CROSS_ATTENTION_KEY_SUFFIX):
            return base_model_from_context_dim(int(tensor.shape[1]))
    return BaseModel(None)


def erased_description(manifest: Mapping | None) -> str:
    """One sentence naming what was erased (targets in order, with their anchors), from the manifest."""
    requests = (manifest or {}).get("requests") or []
    if not requests:
        return f"Made with DUGE {__version__} (continual concept unlearning)."
    erased = []
    for request in requests:
        anchor = request.get("anchor")
        erased.append(f"'{request['target']}'" + (f" (towards '{anchor}')" if anchor else ""))
    method = (manifest or {}).get("method") or "duge"
    return (f"Concept unlearning ({method}, DUGE {__version__}): erases " + ", ".join(erased)
            + "; the duge_manifest key has the full record.")


def _date(manifest: Mapping | None) -> str:
    created = (manifest or {}).get("created")
    return str(created) if created else _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def modelspec_metadata(base: BaseModel, title: str, manifest: Mapping | None, lora: bool) -> dict[str, str]:
    """The modelspec.* keys (ModelSpec 1.0.1) of a LoRA (`lora`) or a single-file checkpoint."""
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.implementation": IMPLEMENTATION_DIFFUSERS if lora else IMPLEMENTATION_SGM,
        "modelspec.implementation_version": f"duge/{__version__}",
        "modelspec.title": title,
        "modelspec.description": erased_description(manifest),
        "modelspec.date": _date(manifest),
    }
    if base.architecture is not None:
        metadata["modelspec.architecture"] = base.architecture + ("/lora" if lora else "")
        metadata["modelspec.resolution"] = f"{base.pixels}x{base.pixels}"
        metadata["modelspec.prediction_type"] = "v" if base.v_prediction else "epsilon"
    return metadata


def lora_metadata(path: str | Path, tensors: Mapping[str, object], dim: int | None, alpha: float,
                  manifest: Mapping | None, base: BaseModel | None = None) -> dict[str, str]:
    """kohya's ss_* keys and the modelspec.* keys of a LoRA file at `path`. `dim`: the rank when every
    module has the same one (None otherwise); `base`: None infers the family from the tensors."""
    base = base or base_model_of_lora(tensors)
    name = Path(path).stem
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_alpha": f"{alpha:g}",
        "ss_output_name": name,
    }
    if dim is not None:
        metadata["ss_network_dim"] = str(int(dim))
    if base.family is not None:
        metadata["ss_base_model_version"] = KOHYA_BASE_MODEL_VERSION[base.family]
        metadata["ss_v2"] = str(base.family == "sd2")
        metadata["ss_v_parameterization"] = str(base.v_prediction)
        metadata["ss_resolution"] = f"({base.pixels}, {base.pixels})"
    metadata.update(modelspec_metadata(base, name, manifest, lora=True))
    return metadata


def checkpoint_metadata(path: str | Path, manifest: Mapping | None, base: BaseModel) -> dict[str, str]:
    """The modelspec.* keys of a single-file checkpoint at `path`."""
    return modelspec_metadata(base, Path(path).stem, manifest, lora=False)
