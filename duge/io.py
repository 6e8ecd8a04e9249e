"""Saving and loading what the project produces: checkpoints, LoRAs and their manifests.

Formats (see ../shared/design/DUGE.md §5):

- **diffusers folder** (`save_diffusers_folder`): `pipe.save_pretrained` output plus
  `duge_manifest.json`; every `.safetensors` inside also carries the manifest in its metadata.
- **single file** (`save_single_file`; loaded by `duge.models.load_single_file_pipeline`): one safetensors in the
  original SD layout (`model.diffusion_model.`, `first_stage_model.`,
  `cond_stage_model.transformer.text_model.`; names from `duge.keys`) — the layout A1111 and
  ComfyUI read. Metadata: `format`, `duge_manifest` and `duge_config`, the diffusers config
  folder of the model (configs and tokenizer files, `{relative path: text}`) so that the file
  can be loaded again without the base model.
- **LoRA** (`save_lora`, `load_lora`): kohya names (`lora_unet_<module path with _>`,
  `.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank], `.alpha`: one value for the
  file, so that strength 1.0 applies ΔW exactly), read by ComfyUI's LoraLoader, A1111 and
  diffusers' `load_lora_weights` (see `duge.keys` for what was verified).

Manifest: a JSON object (`make_manifest`) stored as the string under metadata key
`duge_manifest`; `read_manifest` reads it from a file's header or a folder's
`duge_manifest.json` without loading any tensor.

Safety: weights are read through `duge.safe_weights` — safetensors with the header checked against
the file and NaN/inf refused; pickled `.ckpt/.pt/.pth/.bin` raise ModelLoadError unless the caller
passes `allow_pickle=True` (then `torch.load(weights_only=True)`); every write goes through
`duge.paths.atomic_write` (a temporary file or folder beside the target, then a rename) and
refuses to replace an existing output unless `overwrite=True`. Nothing here contacts the Hugging
Face hub.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from . import __version__, keys
from .errors import DugeError, ModelLoadError
from .layouts import pipeline_layout
from .model_metadata import BaseModel, base_model_of_pipeline, checkpoint_metadata, lora_metadata
from .paths import atomic_write, check_writable, contained_path, temporary_folder
from .safe_weights import (  # noqa: F401 - PICKLE_SUFFIXES and require_safetensors are part of this module's API
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    is_pickle_path,
    load_tensors,
    read_header,
    require_safetensors,
)

MANIFEST_KEY = "duge_manifest"
CONFIG_KEY = "duge_config"
MANIFEST_FILE = "duge_manifest.json"
MANIFEST_FORMAT = "duge-manifest"
REQUEST_FIELDS = ("target", "anchor", "preserve", "settings", "metrics")
# Tokenizer files larger than this are not embedded in a single file's `duge_config`
# (SD 1.5's CLIP tokenizer is ~2 MB); loading such a file then needs a config folder.
MAX_EMBEDDED_TOKENIZER_BYTES = 1 << 20
CONFIG_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# --- paths ---------------------------------------------------------------------------------------


def _output_file(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise DugeError(f"output '{path}' must end in .safetensors (only safetensors are written)")
    return path


# --- manifest ------------------------------------------------------------------------------------


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # torch / numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _plain_json(value, what: str):
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as err:
        raise DugeError(f"{what} cannot be stored in a manifest: {err}") from err


def make_manifest(
    method: str,
    requests: list[Mapping],
    base_model_hash: str | None,
    base_model: str | Path,
    extra: Mapping | None = None,
) -> dict:
    """The manifest of an edited model: what was removed from it, how, and from which model.

    `requests` are dicts with `target` (required), `anchor`, `preserve` (list), `settings` and
    `metrics` (dicts), in the order they were applied; the five are always present in the result
    (None / empty when not given), and any further fields a caller adds (e.g. `steps`) are kept
    after them. Values are converted to plain JSON (tensor scalars become numbers); anything
    else raises DugeError.
    """
    normalised = []
    for i, request in enumerate(requests):
        if not request.get("target"):
            raise DugeError(f"manifest request {i}: 'target' is missing or empty")
        normalised.append(
            {
                "target": request["target"],
                "anchor": request.get("anchor"),
                "preserve": list(request.get("preserve") or []),
                "settings": dict(request.get("settings") or {}),
                "metrics": dict(request.get("metrics") or {}),
                **{k: v for k, v in request.items() if k not in REQUEST_FIELDS},
            }
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": __version__,
        "method": method,
        "base_model": str(base_model),
        "base_model_hash": base_model_hash,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "requests": normalised,
        "extra": dict(extra or {}),
    }
    return _plain_json(manifest, "the manifest")


def manifest_metadata(manifest: Mapping | None) -> dict[str, str]:
    """Safetensors metadata (str -> str) carrying `manifest`."""
    metadata = {"format": "pt"}
    if manifest is not None:
        metadata[MANIFEST_KEY] = json.dumps(_plain_json(dict(manifest), "the manifest"), ensure_ascii=False)
    return metadata


def parse_manifest(text: str, where: Path) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"the DUGE manifest in '{where}' is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"the DUGE manifest in '{where}' is not a JSON object")
    return manifest


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (its checked header only; no tensor is read)."""
    return read_header(path).metadata


def read_manifest(path: str | Path) -> dict | None:
    """The DUGE manifest of a .safetensors file or a diffusers folder; None if it has none."""
    path = Path(path)
    if path.is_dir():
        manifest_path = contained_path(path, MANIFEST_FILE)
        if not manifest_path.exists():
            return None
        return parse_manifest(manifest_path.read_text(encoding="utf-8"), manifest_path)
    text = read_safetensors_metadata(path).get(MANIFEST_KEY)
    return None if text is None else parse_manifest(text, path)


# --- hashing -------------------------------------------------------------------------------------


def _is_pipeline(model) -> bool:
    return all(hasattr(model, name) for name in ("unet", "vae", "text_encoder"))


def model_hash(model) -> str:
    """SHA-256 (hex) of a model's tensors: a state dict, an `nn.Module` or a pipeline.

    Tensors are visited in sorted key order; each contributes its key, dtype and shape, then its
    raw bytes (streamed one tensor at a time, so no copy of the model is made). A pipeline is
    hashed in its single-file layout (`pipeline_to_ldm_state_dict`), so it hashes the same as the
    tensors of the file `save_single_file` writes for it (same dtype). The hash changes with the
    dtype: an fp16 copy is a different model. SD 1.5 in fp32 (4.3 GB) takes a few seconds on CPU.
    """
    if isinstance(model, Mapping):
        state = model
    elif _is_pipeline(model):
        state = pipeline_to_ldm_state_dict(model)
    elif isinstance(model, torch.nn.Module):
        state = model.state_dict()
    else:
        raise TypeError(f"model_hash expects a state dict, an nn.Module or a pipeline, not {type(model).__name__}")
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.device.type == "meta":
            raise DugeError(f"cannot hash '{key}': it has no data (meta tensor)")
        header = f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0"
        digest.update(header.encode("utf-8"))
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


# --- diffusers folder ----------------------------------------------------------------------------


def _rewrite_with_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """Re-write a safetensors file with `extra` added to its metadata (tensors unchanged)."""
    metadata = read_safetensors_metadata(path)
    metadata.update(extra)
    tensors = load_tensors(path, finite=False)  # our own file, just written: rewritten as it is
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=True)


def save_diffusers_folder(pipe, out_dir: str | Path, manifest: Mapping | None, overwrite: bool = False) -> Path:
    """Save `pipe` as a diffusers folder with its manifest; the folder appears complete or not at all.

    The pipeline is saved into a temporary folder beside `out_dir`, which is renamed into place.
    With `overwrite=True` an existing `out_dir` is moved aside first and deleted after the
    rename (if the process dies between the two renames, the old folder survives under a
    hidden `.<name>.*.old` name).
    """
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)
    if out_dir.exists() and not out_dir.is_dir():
        raise DugeError(f"'{out_dir}' exists and is not a folder; expected a folder for a diffusers model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out_dir)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if manifest is not None:
            text = json.dumps(_plain_json(dict(manifest), "the manifest"), indent=2, ensure_ascii=False)
            atomic_write(contained_path(tmp, MANIFEST_FILE), lambda p: p.write_text(text + "\n", encoding="utf-8"))
            extra = {MANIFEST_KEY: manifest_metadata(manifest)[MANIFEST_KEY]}
            for weights in sorted(tmp.rglob(f"*{SAFETENSORS_SUFFIX}")):
                _rewrite_with_metadata(weights, extra)
        old = None
        if out_dir.exists():
            old = temporary_folder(out_dir, suffix=".old")
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- single file ---------------------------------------------------------------------------------


def pipeline_to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) under single-file names (tensors shared, not copied).

    Text encoders: SD 1.x `cond_stage_model.transformer.text_model.*`; SD 2.x OpenCLIP
    `cond_stage_model.model.*` (diffusers' 23 layers: the unused 24th layer of the original
    checkpoint is not part of a diffusers model and is not written); SDXL
    `conditioner.embedders.0.transformer.text_model.*` and OpenCLIP `conditioner.embedders.1.model.*`.
    """
    layout = pipeline_layout(pipe).name
    state = {}
    state.update(keys.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(keys.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if layout == "sd1":
        state.update(keys.text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    elif layout == "sd2":
        state.update(keys.open_clip_text_encoder_to_ldm(pipe.text_encoder.state_dict(), keys.LDM_OPEN_CLIP_PREFIX))
    else:
        state.update(keys.text_encoder_to_ldm(pipe.text_encoder.state_dict(), keys.LDM_SDXL_CLIP_L_PREFIX))
        state.update(keys.open_clip_text_encoder_to_ldm(pipe.text_encoder_2.state_dict(), keys.LDM_SDXL_OPEN_CLIP_PREFIX))
    return state


def pipeline_config_files(pipe, max_tokenizer_bytes: int = MAX_EMBEDDED_TOKENIZER_BYTES) -> dict[str, str]:
    """The pipeline's diffusers config folder without weights, as {relative path: text}.

    The tokenizer's files are left out if together they exceed `max_tokenizer_bytes`.
    """
    with tempfile.TemporaryDirectory(prefix="duge-config-") as folder:
        root = Path(folder)
        pipe.save_config(root)  # model_index.json
        pipe.unet.save_config(root / "unet")
        pipe.vae.save_config(root / "vae")
        pipe.scheduler.save_config(root / "scheduler")
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).config.save_pretrained(root / name)
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).save_pretrained(root / name)
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        is_tokenizer = lambda name: name.split("/")[0] in ("tokenizer", "tokenizer_2")  # noqa: E731
        tokenizer_bytes = sum(p.stat().st_size for name, p in files.items() if is_tokenizer(name))
        return {
            name: p.read_text(encoding="utf-8")
            for name, p in files.items()
            if not (is_tokenizer(name) and tokenizer_bytes > max_tokenizer_bytes)
        }


def save_single_file(
    pipe,
    path: str | Path,
    manifest: Mapping | None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save `pipe` as one safetensors checkpoint in the original SD layout (A1111 / ComfyUI).

    `dtype` casts floating-point tensors (e.g. torch.float16 halves the file); None keeps them.
    The metadata holds the manifest (`duge_manifest`), the config folder (`duge_config`) and the
    modelspec.* keys (`duge.model_metadata`).
    """
    path = _output_file(path)
    check_writable(path, overwrite)
    state = {}
    for key, tensor in pipeline_to_ldm_state_dict(pipe).items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    metadata = manifest_metadata(manifest)
    metadata[CONFIG_KEY] = json.dumps(pipeline_config_files(pipe), ensure_ascii=False)
    metadata.update(checkpoint_metadata(path, manifest, base_model_of_pipeline(pipe)))
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), overwrite=overwrite)


# --- LoRA ----------------------------------------------------------------------------------------


@dataclass
class LoraFactors:
    """A low-rank weight change ΔW = (alpha / rank) · up @ down.

    up: [out, rank] (or [out, rank, 1, 1] for a 1x1 conv); down: [rank, in] (or [rank, in, 1, 1]).
    alpha None means alpha = rank (scale 1).
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW in the weight's shape (float32)."""
        up = self.up.float().flatten(1)  # [out, rank]
        down = self.down.float().flatten(1)  # [rank, in]
        return (self.scale * (up @ down)).reshape(self.up.shape[0], *self.down.shape[1:])


def _matrix(delta: torch.Tensor, module: str) -> torch.Tensor:
    if delta.ndim == 2:
        return delta
    if delta.ndim == 4 and delta.shape[2:] == (1, 1):
        return delta[:, :, 0, 0]
    raise DugeError(
        f"ΔW of '{module}' has shape {list(delta.shape)}; expected [out, in] (Linear) or [out, in, 1, 1] (1x1 conv)"
    )


def factorize_delta(delta: torch.Tensor, rank: int | None = None, module: str = "ΔW") -> LoraFactors:
    """Low-rank factors of ΔW by SVD (in float64), split evenly: up = U·√S, down = √S·Vᵀ.

    `rank=None` keeps the numerical rank of ΔW (singular values above S_max · eps
    of ΔW's dtype), so that up @ down reproduces ΔW to rounding; an integer keeps at most that
    many (the best approximation of that rank). A zero ΔW gives rank-1 zero factors.
    """
    matrix = _matrix(delta.detach(), module)
    if rank is not None and rank < 1:
        raise DugeError(f"LoRA rank for '{module}' must be at least 1, got {rank}")
    u, s, vh = torch.linalg.svd(matrix.double().cpu(), full_matrices=False)
    eps = torch.finfo(delta.dtype).eps if delta.is_floating_point() else torch.finfo(torch.float32).eps
    # Not numpy's matrix_rank tolerance (S_max · max(out, in) · eps): a trained ΔW can hold hundreds
    # of singular values just below it whose sum is visible (SD 2.1 K/V after two steps: 0.24 % of the
    # largest entry); below S_max · eps they are under ΔW's own float rounding.
    numerical = int((s > s[0] * eps).sum()) if s.numel() and s[0] > 0 else 0
    keep = max(1, min(numerical, rank) if rank is not None else numerical)
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).float()  # [out, keep]
    down = (root[:, None] * vh[:keep]).float()  # [keep, in]
    if delta.ndim == 4:
        up, down = up[:, :, None, None], down[:, :, None, None]
    return LoraFactors(up.contiguous(), down.contiguous(), alpha=None)


def lora_factors_from_peft(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """The LoRA factors of a peft adapter on a UNet, by diffusers module path (scale folded into up)."""
    factors = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if lora_a is None or lora_b is None or adapter_name not in lora_a:
            continue
        name = name.removeprefix("base_model.model.")  # a PeftModel wrapping the UNet
        scale = float(module.scaling[adapter_name])
        up = lora_b[adapter_name].weight.detach().float() * scale  # [out, r]
        down = lora_a[adapter_name].weight.detach().float()  # [r, in]
        factors[name] = LoraFactors(up.clone(), down.clone(), alpha=None)
    if not factors:
        raise DugeError(f"the model has no LoRA layers of adapter '{adapter_name}'")
    return factors


def save_lora(
    deltas: Mapping[str, torch.Tensor | LoraFactors],
    path: str | Path,
    manifest: Mapping | None,
    rank: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    base_model: BaseModel | None = None,
) -> Path:
    """Save UNet weight changes as a kohya-style LoRA safetensors file.

    `deltas` maps diffusers UNet module paths (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`)
    to ΔW [out, in] (factorised by `factorize_delta` with `rank`) or to `LoraFactors` (kept, or
    re-factorised when `rank` is smaller than theirs). `.alpha` is the rank (the most common rank
    when they differ; see below), so the file applies ΔW at strength 1.0 in every reader.
    The metadata has the manifest and the kohya / modelspec keys of `duge.model_metadata` (for
    `base_model`, or the family the tensors show when None).
    """
    path = _output_file(path)
    check_writable(path, overwrite)
    if not deltas:
        raise DugeError("no weight changes to save as a LoRA")
    factors_by_module: dict[str, LoraFactors] = {}
    for module, change in deltas.items():
        if isinstance(change, LoraFactors):
            factors = change
            if rank is not None and rank < factors.rank:
                factors = factorize_delta(factors.delta(), rank, module)
            elif factors.alpha is not None:  # fold the scale into up: scale 1
                factors = LoraFactors(factors.up.float() * factors.scale, factors.down.float())
        else:
            factors = factorize_delta(change, rank, module)
        factors_by_module[module] = factors
    # One alpha for the whole file: diffusers' kohya loader maps a per-module alpha that differs
    # from the most common one to a peft `alpha_pattern` key that matches no module (diffusers
    # 0.42), which silently scales that module wrong. So alpha = the most common rank, and a
    # module of another rank r carries r / alpha in its up factor (alpha / r · up · down = ΔW).
    ranks = [f.rank for f in factors_by_module.values()]
    alpha = max(set(ranks), key=lambda r: (ranks.count(r), r))
    tensors: dict[str, torch.Tensor] = {}
    for module, factors in factors_by_module.items():
        name = keys.lora_name(module)
        up = factors.up.float() * (factors.rank / alpha)
        tensors[f"{name}.lora_up.weight"] = up.detach().to(dtype).contiguous()
        tensors[f"{name}.lora_down.weight"] = factors.down.detach().to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    metadata = manifest_metadata(manifest)
    metadata.update(lora_metadata(path, tensors, alpha if len(set(ranks)) == 1 else None, alpha, manifest, base_model))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def load_lora(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The UNet weight changes ΔW (float32, by diffusers module path) of a kohya LoRA file, and its manifest.

    Reads `lora_unet_*` names written by `save_lora` (`.lora_up/.lora_down/.alpha`, or `.diff`
    for a full ΔW); other tensors (text-encoder LoRAs, LyCORIS types) raise ModelLoadError, and
    so do NaN/inf values and a broken file (`duge.safe_weights`). A pickled LoRA is refused
    unless `allow_pickle` (then read with `torch.load(weights_only=True)`; it has no manifest).
    """
    path = Path(path)
    if allow_pickle and is_pickle_path(path):
        manifest = None
    else:
        manifest = read_manifest(require_safetensors(path))
    tensors = load_tensors(path, allow_pickle=allow_pickle)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor
    deltas = {}
    for name, group in groups.items():
        try:
            module = keys.module_path_from_lora_name(name)
        except keys.KeyLayoutError as err:
            raise ModelLoadError(f"'{path}': {err}") from err
        if set(group) == {"diff"}:
            deltas[module] = group["diff"].float()
            continue
        factor_names = {"lora_up.weight", "lora_down.weight"}
        if not factor_names <= set(group) or set(group) - factor_names - {"alpha"}:
            raise ModelLoadError(
                f"'{path}': LoRA '{name}' has tensors {sorted(group)}; "
                "expected lora_up.weight, lora_down.weight and alpha, or diff"
            )
        alpha = float(group["alpha"].item()) if "alpha" in group else None
        deltas[module] = LoraFactors(group["lora_up.weight"], group["lora_down.weight"], alpha).delta()
    return deltas, manifest


def _changed_weights(unet: torch.nn.Module, deltas: Mapping[str, torch.Tensor], strength: float):
    """(parameter, its new value) for every module in `deltas`, checked against the UNet."""
    params = dict(unet.named_parameters())
    for module, delta in deltas.items():
        key = f"{module}.weight"
        if key not in params:
            raise ModelLoadError(f"the LoRA changes '{module}', which the UNet does not have")
        param = params[key]
        if delta.shape != param.shape:
            raise ModelLoadError(
                f"the LoRA's ΔW of '{module}' has shape {list(delta.shape)}; the UNet's weight is {list(param.shape)}"
            )
        new = param.detach().float() + strength * delta.to(param.device, torch.float32)
        yield key, param, new.to(param.dtype)


def apply_lora_deltas(
    unet: torch.nn.Module, deltas: Mapping[str, torch.Tensor], strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """The UNet's state dict with `strength · ΔW` added to the changed weights; `unet` is untouched.

    Changed weights are new tensors; the others are the UNet's own (shared, not copied).
    """
    state = unet.state_dict()
    for key, _, new in _changed_weights(unet, deltas, strength):
        state[key] = new
    return state


@torch.no_grad()
def apply_lora_deltas_(unet: torch.nn.Module, deltas: Mapping[str, torch.Tensor], strength: float = 1.0) -> None:
    """Add `strength · ΔW` to the UNet's weights in place (all checked before any is changed)."""
    for _, param, new in list(_changed_weights(unet, deltas, strength)):
        param.copy_(new)
