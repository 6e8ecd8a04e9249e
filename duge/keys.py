"""Every key-layout conversion of the project, in one place.

Three layouts meet here:

- **diffusers**: `UNet2DConditionModel`, `AutoencoderKL`, transformers' `CLIPTextModel` state dicts
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`, …).
- **LDM / single file** (the original Stable Diffusion checkpoint, what A1111 and ComfyUI read and
  write): `model.diffusion_model.` + `input_blocks` / `middle_block` / `output_blocks`,
  `first_stage_model.` + `encoder.down.N.block.M` / `mid.attn_1`, and
  `cond_stage_model.transformer.text_model.` + the transformers key names.
- **kohya LoRA names**: `lora_unet_` + the diffusers module path with `.` replaced by `_`
  (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`), followed by
  `.lora_down.weight`, `.lora_up.weight`, `.alpha` (or `.diff` for a full delta).

The UNet and VAE mappings are derived from the model's config (block types, layers per block,
which blocks carry attention), not from a table of SD 1.5 names, so they hold for every SD 1.x /
2.x layout, the built-in tiny model and the SDXL UNet. They are the inverse of diffusers'
`loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`) and are built as a table of renamed *modules*, so one table
serves parameter keys and module paths in both directions and round-trips by construction.

What was verified, and how (tests/test_io.py unless said otherwise):

- UNet / VAE / CLIP: every key of the tiny pipeline and of the real SD 1.5 UNet (built on the meta
  device) maps, and the mapping round-trips; spot checks against known SD 1.5 LDM names.
- diffusers `StableDiffusionPipeline.from_single_file(file, config=<local folder>)` loads a file
  written with these names; its weights equal ours (test).
- diffusers' own `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` turn our LDM dicts
  back into exactly the original diffusers dicts (test; SD 1.5 UNet on meta, tiny UNet and VAE).
- ComfyUI: the UNet table equals ComfyUI's own `comfy/utils.py: unet_to_diffusers` (read in
  Comfy-Org/ComfyUI; its logic re-typed in a scratch script, not shipped, and compared key by
  key: all 686 SD 1.5 keys and all 326 tiny-model keys agree). ComfyUI itself was not run here. ComfyUI's `comfy/lora.py: model_lora_keys_unet`
  builds its kohya keys as `"lora_unet_" + diffusers_key[:-len(".weight")].replace(".", "_")` over
  the keys of `unet_to_diffusers`, which is exactly `lora_name` below.
- diffusers `pipe.load_lora_weights(file)` (kohya branch: `_convert_non_diffusers_lora_to_diffusers`,
  `_convert_unet_lora_key`) reads our LoRA files and `fuse_lora()` reproduces the edited weights
  (test: attn1/attn2 `to_q/to_k/to_v/to_out.0`, a 1x1-conv `proj_in`; `ff.net.*` checked once
  by hand). It needs one `.alpha` for the whole file: see `duge.io.save_lora`.
- SD 2.x and SDXL single files (`open_clip_text_encoder_to_ldm`, the SDXL `conditioner.embedders.*`
  prefixes, the SDXL UNet's `label_emb`): written from SD 2.1 / SDXL pipelines built from their real
  configs (reduced UNet width), loaded back by diffusers' `from_single_file(file, config=<local folder>)`
  with every tensor equal and none unmatched or missing, and their UNet keys by ComfyUI's own SD20 /
  SDXL model classes with no missing or unexpected key (tests/test_real_layouts.py,
  benchmarks/real_layouts.py). Their kohya LoRAs (`lora_unet_` + diffusers path, as for SD 1.x) load
  in diffusers' `load_lora_weights` and ComfyUI's LoraLoader path with no unmatched key.
- A1111 (`extensions-builtin/Lora/networks.py`, read, not run): `convert_diffusers_name_to_compvis`
  maps `lora_unet_down_blocks_{b}_attentions_{j}_…` to `input_blocks_{1 + 3b + j}_1_…`, i.e. it
  assumes two layers per block, as in SD 1.x / 2.x. Files for models with another
  `layers_per_block` (the built-in tiny model has 1) therefore load in ComfyUI and diffusers but
  not in A1111 — A1111 cannot load such a model anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .errors import DugeError

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
# Old SD 1.x checkpoints name the text encoder without `text_model.`; ComfyUI reads both.
LDM_TEXT_ENCODER_LEGACY_PREFIX = "cond_stage_model.transformer."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x's OpenCLIP text encoder
LDM_SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL's first text encoder
LDM_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second (OpenCLIP bigG)
HF_TEXT_MODEL_PREFIX = "text_model."  # transformers v4 CLIPTextModel keys; v5 keys have none
LORA_UNET_PREFIX = "lora_unet_"

# Tensors some LDM checkpoints carry that no diffusers model holds (noise schedule buffers, EMA
# copies, the CLIP position ids). Skipped when a checkpoint is read; never written.
LDM_IGNORED_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
LDM_IGNORED_PREFIXES = ("model_ema.",)
POSITION_IDS = "embeddings.position_ids"


class KeyLayoutError(DugeError, ValueError):
    """A key or module name with no counterpart in the other layout."""


# Children renamed inside a renamed module: (diffusers name, LDM name).
UNET_RESNET_CHILDREN = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_RESNET_CHILDREN = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION_CHILDREN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
# VAE attention projections: Linear [C, C] in diffusers, 1x1 conv [C, C, 1, 1] in LDM.
VAE_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")

UNET_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attentions
UNET_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
UNET_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


@dataclass(frozen=True)
class ModuleRename:
    """One module under two names; `children` renames direct descendants as well."""

    diffusers: str
    ldm: str
    children: tuple[tuple[str, str], ...] = ()


def _rename_child(rest: str, children: Iterable[tuple[str, str]]) -> str:
    for old, new in children:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _longest_prefix(table: Mapping[str, ModuleRename], name: str) -> tuple[ModuleRename, str] | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        rename = table.get(".".join(parts[:k]))
        if rename is not None:
            return rename, ".".join(parts[k:])
    return None


class KeyLayout:
    """Renames between the diffusers and LDM names of one model, for keys and module paths alike.

    A name maps through the longest renamed module that contains it; the rest of the name is
    kept, except for the renamed children of that module. Names outside every renamed module
    raise KeyLayoutError.
    """

    def __init__(self, renames: Iterable[ModuleRename], what: str):
        renames = list(renames)
        self.what = what
        self._by_diffusers = {r.diffusers: r for r in renames}
        self._by_ldm = {r.ldm: r for r in renames}
        if len(self._by_diffusers) != len(renames) or len(self._by_ldm) != len(renames):
            raise KeyLayoutError(f"{what}: the key layout maps two modules to one name")

    @property
    def renames(self) -> list[ModuleRename]:
        return list(self._by_diffusers.values())

    def to_ldm(self, name: str) -> str:
        """The LDM name (without the checkpoint prefix) of a diffusers key or module path."""
        found = _longest_prefix(self._by_diffusers, name)
        if found is None:
            raise KeyLayoutError(f"{self.what}: diffusers name '{name}' has no LDM counterpart")
        rename, rest = found
        rest = _rename_child(rest, rename.children)
        return f"{rename.ldm}.{rest}" if rest else rename.ldm

    def to_diffusers(self, name: str) -> str:
        """The diffusers name of an LDM key or module path (without the checkpoint prefix)."""
        found = _longest_prefix(self._by_ldm, name)
        if found is None:
            raise KeyLayoutError(f"{self.what}: LDM name '{name}' has no diffusers counterpart")
        rename, rest = found
        rest = _rename_child(rest, [(new, old) for old, new in rename.children])
        return f"{rename.diffusers}.{rest}" if rest else rename.diffusers


def _config_value(config, name, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _per_block(value, count: int) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise KeyLayoutError(f"layers_per_block {value} does not give one value per block ({count} blocks)")
    return value


def unet_layout(config) -> KeyLayout:
    """The diffusers ↔ LDM renames of a `UNet2DConditionModel` with this config (dict or `unet.config`).

    Input blocks count up from 1 (0 is `conv_in`): each down block contributes one entry per
    layer (resnet at `.0`, attention at `.1`) and one for its downsampler (`.0.op`), except the
    last block. Output blocks count from 0: each up block has one more layer than its down block;
    the last layer of every up block but the final one carries the upsampler, at `.1.conv`, or
    `.2.conv` after an attention.
    """
    down_types = list(_config_value(config, "down_block_types"))
    up_types = list(_config_value(config, "up_block_types"))
    mid_type = _config_value(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    for kind in down_types:
        if kind not in UNET_DOWN_BLOCKS:
            raise KeyLayoutError(
                f"UNet down block type '{kind}' has no LDM layout; expected one of {sorted(UNET_DOWN_BLOCKS)}"
            )
    for kind in up_types:
        if kind not in UNET_UP_BLOCKS:
            raise KeyLayoutError(f"UNet up block type '{kind}' has no LDM layout; expected one of {sorted(UNET_UP_BLOCKS)}")
    if mid_type not in UNET_MID_BLOCKS:
        raise KeyLayoutError(f"UNet mid block type '{mid_type}' has no LDM layout; expected {UNET_MID_BLOCKS[0]}")
    if len(up_types) != len(down_types):
        raise KeyLayoutError(f"UNet has {len(down_types)} down blocks but {len(up_types)} up blocks")
    layers = _per_block(_config_value(config, "layers_per_block"), len(down_types))
    last = len(down_types) - 1

    renames = [
        ModuleRename("conv_in", "input_blocks.0.0"),
        ModuleRename("time_embedding.linear_1", "time_embed.0"),
        ModuleRename("time_embedding.linear_2", "time_embed.2"),
        ModuleRename("conv_norm_out", "out.0"),
        ModuleRename("conv_out", "out.2"),
    ]
    if _config_value(config, "addition_embed_type") == "text_time":  # SDXL
        renames += [
            ModuleRename("add_embedding.linear_1", "label_emb.0.0"),
            ModuleRename("add_embedding.linear_2", "label_emb.0.2"),
        ]
    if _config_value(config, "class_embed_type") in ("timestep", "projection"):
        renames += [
            ModuleRename("class_embedding.linear_1", "label_emb.0.0"),
            ModuleRename("class_embedding.linear_2", "label_emb.0.2"),
        ]
    elif _config_value(config, "num_class_embeds") is not None:
        renames.append(ModuleRename("class_embedding", "label_emb"))

    index = 1
    for i, kind in enumerate(down_types):
        for j in range(layers[i]):
            renames.append(ModuleRename(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET_CHILDREN))
            if UNET_DOWN_BLOCKS[kind]:
                renames.append(ModuleRename(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if i < last:
            renames.append(ModuleRename(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1

    if mid_type is not None:
        renames += [
            ModuleRename("mid_block.resnets.0", "middle_block.0", UNET_RESNET_CHILDREN),
            ModuleRename("mid_block.attentions.0", "middle_block.1"),
            ModuleRename("mid_block.resnets.1", "middle_block.2", UNET_RESNET_CHILDREN),
        ]

    index = 0
    for i, (kind, down_layers) in enumerate(zip(up_types, reversed(layers))):
        attention = UNET_UP_BLOCKS[kind]
        count = down_layers + 1
        for j in range(count):
            renames.append(ModuleRename(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET_CHILDREN))
            if attention:
                renames.append(ModuleRename(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
            if j == count - 1 and i < last:
                slot = 2 if attention else 1
                renames.append(ModuleRename(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv"))
            index += 1
    return KeyLayout(renames, "UNet")


def vae_layout(config) -> KeyLayout:
    """The diffusers ↔ LDM renames of an `AutoencoderKL` with this config.

    The decoder's up blocks are numbered in reverse in LDM (`decoder.up.{n-1-i}`), and its
    attention projections change shape (see `VAE_ATTENTION_PROJECTIONS`).
    """
    n_down = len(_config_value(config, "down_block_types"))
    n_up = len(_config_value(config, "up_block_types"))
    layers = _config_value(config, "layers_per_block")
    if not isinstance(layers, int):
        raise KeyLayoutError(f"VAE layers_per_block {layers!r}: expected one number for every block")
    same = (
        "encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
        "quant_conv", "post_quant_conv",
    )  # fmt: skip
    renames = [ModuleRename(name, name) for name in same]
    for part in ("encoder", "decoder"):
        renames += [
            ModuleRename(f"{part}.conv_norm_out", f"{part}.norm_out"),
            ModuleRename(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET_CHILDREN),
            ModuleRename(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET_CHILDREN),
            ModuleRename(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION_CHILDREN),
        ]
    for i in range(n_down):
        for j in range(layers):
            renames.append(
                ModuleRename(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET_CHILDREN)
            )
        if i < n_down - 1:
            renames.append(ModuleRename(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    for i in range(n_up):
        ldm = n_up - 1 - i
        for j in range(layers + 1):
            renames.append(
                ModuleRename(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm}.block.{j}", VAE_RESNET_CHILDREN)
            )
        if i < n_up - 1:
            renames.append(ModuleRename(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm}.upsample.conv"))
    return KeyLayout(renames, "VAE")


# --- state dicts ---------------------------------------------------------------------------------


def _strip(checkpoint: Mapping[str, torch.Tensor], prefix: str, what: str) -> dict[str, torch.Tensor]:
    foreign = [k for k in checkpoint if not k.startswith(prefix)]
    if foreign:
        raise KeyLayoutError(f"{what}: keys outside '{prefix}', e.g. '{foreign[0]}' ({len(foreign)} keys)")
    return {k[len(prefix) :]: v for k, v in checkpoint.items()}


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under its single-file names (`model.diffusion_model.…`)."""
    layout = unet_layout(config)
    return {LDM_UNET_PREFIX + layout.to_ldm(k): v for k, v in state_dict.items()}


def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The diffusers state dict of the `model.diffusion_model.…` keys of a single file."""
    layout = unet_layout(config)
    return {layout.to_diffusers(k): v for k, v in _strip(checkpoint, LDM_UNET_PREFIX, "UNet").items()}


def _is_vae_projection_weight(ldm_key: str) -> bool:
    """`encoder.mid.attn_1.q.weight` and its kin (decoder; k, v, proj_out)."""
    parts = ldm_key.split(".")
    return parts[-1] == "weight" and parts[-2] in VAE_ATTENTION_PROJECTIONS and parts[-4:-2] == ["mid", "attn_1"]


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict under its single-file names (`first_stage_model.…`)."""
    layout = vae_layout(config)
    out = {}
    for key, value in state_dict.items():
        ldm = layout.to_ldm(key)
        if _is_vae_projection_weight(ldm) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[LDM_VAE_PREFIX + ldm] = value
    return out


def vae_from_ldm(checkpoint: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The diffusers state dict of the `first_stage_model.…` keys of a single file."""
    layout = vae_layout(config)
    out = {}
    for key, value in _strip(checkpoint, LDM_VAE_PREFIX, "VAE").items():
        if _is_vae_projection_weight(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        out[layout.to_diffusers(key)] = value
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = LDM_TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """A `CLIPTextModel` state dict (transformers v4 or v5 keys) under `prefix` + the transformers names:
    `cond_stage_model.transformer.text_model.…` (SD 1.x) or `conditioner.embedders.0.transformer.text_model.…`
    (SDXL's CLIP-L, `LDM_SDXL_CLIP_L_PREFIX`).

    The position ids buffer is left out (ComfyUI's own checkpoints leave it out too).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(HF_TEXT_MODEL_PREFIX):
            key = key[len(HF_TEXT_MODEL_PREFIX) :]
        if key == POSITION_IDS:
            continue
        out[prefix + key] = value
    return out


# OpenCLIP names (SD 2.x's `cond_stage_model.model.`, SDXL's `conditioner.embedders.1.model.`) of the
# transformers CLIP text model's tensors; the inverse of diffusers' `convert_open_clip_checkpoint`.
OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_CHILDREN = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
HF_TEXT_PROJECTION = "text_projection.weight"


def open_clip_text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModel`/`CLIPTextModelWithProjection` state dict in OpenCLIP's layout under `prefix`.

    The separate q/k/v projections [dim, dim] of layer i become one `transformer.resblocks.i.attn.in_proj_weight`
    [3·dim, dim] (q, k, v stacked, as OpenCLIP's `nn.MultiheadAttention` holds them); the projection
    `text_projection.weight` [proj, dim] becomes `text_projection` [dim, proj] (transposed).
    """
    out: dict[str, torch.Tensor] = {}
    attention: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> q/k/v
    for key, value in state_dict.items():
        name = key[len(HF_TEXT_MODEL_PREFIX) :] if key.startswith(HF_TEXT_MODEL_PREFIX) else key
        if name == POSITION_IDS or name.endswith("." + POSITION_IDS):
            continue
        if name == HF_TEXT_PROJECTION:
            out[prefix + "text_projection"] = value.T.contiguous()
        elif name in OPEN_CLIP_TOP_LEVEL:
            out[prefix + OPEN_CLIP_TOP_LEVEL[name]] = value
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers.") :].split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, kind = rest.split(".")
                attention.setdefault((int(index), kind), {})[projection[0]] = value
                continue
            renamed = _rename_child(rest, OPEN_CLIP_LAYER_CHILDREN)
            if renamed == rest:
                raise KeyLayoutError(f"text encoder: '{key}' has no OpenCLIP counterpart")
            out[f"{prefix}transformer.resblocks.{index}.{renamed}"] = value
        else:
            raise KeyLayoutError(f"text encoder: '{key}' has no OpenCLIP counterpart")
    for (index, kind), parts in attention.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyLayoutError(f"text encoder layer {index}: self-attention {kind} has only {sorted(parts)} of q, k, v")
        out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def text_encoder_from_ldm(
    checkpoint: Mapping[str, torch.Tensor], text_model_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """The `CLIPTextModel` state dict of the `cond_stage_model.transformer.…` keys of a single file.

    `text_model_prefix`: the target model's keys start with `text_model.` (transformers v4);
    transformers v5 keys do not. Old files without `text_model.` in their names are accepted,
    and the position ids buffer is dropped.
    """
    out = {}
    for key, value in checkpoint.items():
        if key.startswith(LDM_TEXT_ENCODER_PREFIX):
            key = key[len(LDM_TEXT_ENCODER_PREFIX) :]
        elif key.startswith(LDM_TEXT_ENCODER_LEGACY_PREFIX):
            key = key[len(LDM_TEXT_ENCODER_LEGACY_PREFIX) :]
        else:
            raise KeyLayoutError(f"text encoder: key '{key}' is outside '{LDM_TEXT_ENCODER_LEGACY_PREFIX}'")
        if key == POSITION_IDS:
            continue
        out[(HF_TEXT_MODEL_PREFIX if text_model_prefix else "") + key] = value
    return out


@dataclass
class LdmParts:
    """A single-file checkpoint split by model; keys keep their LDM prefixes."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    ignored: list[str]  # known extras no diffusers model holds (schedule buffers, EMA)
    unknown: list[str]  # keys of no known part


def split_ldm_checkpoint(checkpoint: Mapping[str, torch.Tensor]) -> LdmParts:
    """Split a single-file SD checkpoint into UNet, VAE and text-encoder keys."""
    parts = LdmParts({}, {}, {}, [], [])
    for key, value in checkpoint.items():
        if key.startswith(LDM_UNET_PREFIX):
            parts.unet[key] = value
        elif key.startswith(LDM_VAE_PREFIX):
            parts.vae[key] = value
        elif key.startswith(LDM_TEXT_ENCODER_LEGACY_PREFIX):
            parts.text_encoder[key] = value
        elif key in LDM_IGNORED_KEYS or key.startswith(LDM_IGNORED_PREFIXES):
            parts.ignored.append(key)
        else:
            parts.unknown.append(key)
    return parts


# --- module paths and LoRA names -----------------------------------------------------------------


def unet_module_to_ldm(module_path: str, config) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn2` -> `input_blocks.4.1.transformer_blocks.0.attn2` (SD 1.5)."""
    return unet_layout(config).to_ldm(module_path)


def unet_module_from_ldm(module_path: str, config) -> str:
    """The inverse of `unet_module_to_ldm`."""
    return unet_layout(config).to_diffusers(module_path)


# Module-name words of the diffusers UNet that themselves contain "_", longest first; used to
# undo the "." -> "_" of kohya names (as diffusers' `_convert_unet_lora_key` does by rules).
_UNET_COMPOUND_WORDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks",
        "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
        "time_embedding", "time_emb_proj", "linear_1", "linear_2",
        "add_embedding", "class_embedding",
        "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
    },  # fmt: skip
    key=lambda w: -w.count("_"),
)


def lora_name(module_path: str) -> str:
    """The kohya LoRA name of a UNet module: `lora_unet_` + the diffusers path with `.` -> `_`."""
    if not module_path or module_path.startswith(".") or module_path.endswith("."):
        raise KeyLayoutError(f"'{module_path}' is not a UNet module path")
    return LORA_UNET_PREFIX + module_path.replace(".", "_")


def module_path_from_lora_name(name: str) -> str:
    """The diffusers UNet module path of a kohya name written by `lora_name` (inverse of it)."""
    if not name.startswith(LORA_UNET_PREFIX):
        raise KeyLayoutError(f"LoRA name '{name}' does not start with '{LORA_UNET_PREFIX}' (only UNet LoRAs are read)")
    tokens = name[len(LORA_UNET_PREFIX) :].split("_")
    words = []
    i = 0
    while i < len(tokens):
        for compound in _UNET_COMPOUND_WORDS:
            size = compound.count("_") + 1
            if "_".join(tokens[i : i + size]) == compound:
                words.append(compound)
                i += size
                break
        else:
            words.append(tokens[i])
            i += 1
    if any(not w for w in words):
        raise KeyLayoutError(f"LoRA name '{name}' has an empty part")
    return ".".join(words)
