"""What the ComfyUI nodes do, on ComfyUI objects: unlearn, probe, compare and save.

The node classes in `nodes/` only declare inputs and outputs and call these functions.

Continual unlearning across nodes: the MODEL that `run_unlearn` returns carries an attachment
(`DUGE_ATTACHMENT`) with the MODEL it started from (θ0), the total delta so far and the manifest.
When that MODEL goes into another "DUGE Unlearn" node unchanged (same weight patches), the new
requests continue from θ0 with the earlier deltas — so L_reg keeps anchoring to θ0 and erosion does
not accumulate — and the manifest lists every request. A MODEL changed in between (a LoRA loaded
on it, a merge) starts a new session with itself as θ0; the report says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..compare import compare_models, comparison_grid, unlearn_report, world_scores
from ..concepts import render_prompt, resolve_concept_set
from ..config import EVALUATION_SEED_OFFSET
from ..errors import DugeError, UnsafePathError
from ..grids import to_pil
from ..io import MANIFEST_KEY, make_manifest, save_lora
from ..model_metadata import BaseModel, base_model_from_context_dim, checkpoint_metadata
from ..paths import atomic_write, contained_path
from ..phases import Phases
from ..probe import heatmap_panel, panel_layout, probe_attention
from ..results import erased_in_manifest, manifest_rows
from ..trainer import unlearn
from ..world.callbacks import anchor_filter, builtin_evaluator, world_evaluate
from .comfy_backend import ComfyBackend, prediction_type_of, training_mode
from .comfy_models import is_demo_model

logger = logging.getLogger(__name__)

DUGE_ATTACHMENT = "duge"
METHOD = "duge"
PREVIEW_SAMPLER_STEPS = 8


@dataclass
class UnlearningLora:
    """The weight changes of a run (the DUGE_LORA wire type): per request and in total, by diffusers
    module path, with the manifest the saved files carry."""
    requests: list[tuple[str, dict[str, torch.Tensor]]]
    total: dict[str, torch.Tensor]
    manifest: dict
    extra: dict = field(default_factory=dict)


@dataclass
class UnlearnOutput:
    model: object
    lora: UnlearningLora
    report: str
    result: object


def _continuation(model):
    """(θ0 MODEL, earlier total delta, earlier manifest) if `model` is an unchanged DUGE result, else None."""
    state = model.get_attachment(DUGE_ATTACHMENT) if hasattr(model, "get_attachment") else None
    if not state or state.get("patches_uuid") != model.patches_uuid:
        return None
    return state["base"], state["total_delta"], state["manifest"]


def _base_model_name(model) -> str:
    return "builtin" if is_demo_model(model) else type(model.model.model_config).__name__


def base_model_of(model):
    """The `duge.model_metadata.BaseModel` of a ComfyUI MODEL (SD 1.x/2.x/XL from its cross-attention width)."""
    if is_demo_model(model):
        return BaseModel(None)
    context_dim = model.model.model_config.unet_config.get("context_dim")
    v_prediction = prediction_type_of(model.get_model_object("model_sampling")) == "v_prediction"
    return base_model_from_context_dim(context_dim, v_prediction)


def _latent_image(backend: ComfyBackend, latents: torch.Tensor):
    """An image [3, H, W] in [0, 1] of latents [1, C, h, w]: decoded with the VAE, else ComfyUI's latent2rgb
    projection (as its own previews do without TAESD); None if neither is available."""
    if backend.vae is not None:
        return backend.decode(latents)[0]
    factors = getattr(backend.latent_format, "latent_rgb_factors", None)
    if factors is None:
        return None
    raw = backend.patcher.model.process_latent_out(latents[0].float()).cpu()
    rgb = torch.einsum("chw,cr->rhw", raw, torch.tensor(factors, dtype=raw.dtype))
    return ((rgb + 1) / 2).clamp(0, 1)


def _preview(image):
    """ComfyUI's preview tuple for an image [3, H, W] in [0, 1], enlarged to at least 128 px."""
    picture = to_pil(image)
    size = max(128, picture.width)
    picture = picture.resize((size, size * picture.height // picture.width), Image.NEAREST)
    return ("JPEG", picture, size)


class ComfyPhases(Phases):
    """DUGE Unlearn's progress bar in ComfyUI: restarted at each phase (each request's images, its
    training, each measurement), counting its work as it is done, with previews — the images just
    generated or measured, and during training a small sample of the request's target from the model
    as it is now, every quarter of the steps."""

    SCALE = 100  # ComfyUI's bar takes whole numbers; image counts advance by fractions (sampler steps)

    def __init__(self, backend: ComfyBackend, resolved, config, node_id=None):
        super().__init__()
        self.backend, self.config = backend, config
        self.prompts = {r.target: render_prompt(r.templates[0], r.target) for r in resolved}
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.total, self.done, self.next_preview = 1, 0.0, 0.0

    def started(self, name, total, unit, kind):
        logger.info("DUGE Unlearn: %s (%g %s)", name, total, unit)
        self.total, self.done = max(total, 1e-9), 0.0
        # training steps (not the teachers' rows) preview the target every quarter of the phase
        self.next_preview = self.total / 4 if kind == "training" and unit == "step" else float("inf")
        self.bar.update_absolute(0, self._scaled(self.total))

    def advanced(self, n, latents, image):
        self.done += n
        preview = None
        try:
            if image is None and latents is not None:
                image = _latent_image(self.backend, latents)
            elif image is None and self.kind == "training" and self.done >= self.next_preview:
                self.next_preview += self.total / 4
                image = self._target_sample()
            preview = _preview(image) if image is not None else None
        except mm.InterruptProcessingException:
            raise
        except Exception as err:  # a preview must never stop the run
            logger.debug("DUGE preview failed: %s", err)
        self.bar.update_absolute(self._scaled(self.done), self._scaled(self.total), preview)

    def _target_sample(self):
        prompt = self.prompts.get(self.info.get("target"))
        if prompt is None:
            return None
        latents = self.backend.sample_latents([prompt], self.config.seed, PREVIEW_SAMPLER_STEPS,
                                              self.config.sampler_guidance)
        return _latent_image(self.backend, latents)

    def _scaled(self, value: float) -> int:
        return int(round(value * self.SCALE))


def run_unlearn(model, clip, concept_set, config, vae=None, evaluate: bool = False, node_id=None) -> UnlearnOutput:
    """Unlearn `concept_set` from `model` (a ComfyUI MODEL); returns the edited MODEL, the LoRA and a report.

    The incoming MODEL is never changed. Progress with previews (`ComfyPhases`: each request's
    images, its training and each measurement) and Cancel go through `comfy.utils.ProgressBar` and
    `throw_exception_if_processing_interrupted`: a Cancel raises `InterruptProcessingException` from
    inside the step or the sampler and nothing is returned.
    """
    builtin_world = is_demo_model(model)
    notes = []
    continued = _continuation(model)
    start_deltas, earlier_manifest = None, None
    if continued is not None:
        model, start_deltas, earlier_manifest = continued
        notes.append(f"Continued the session of the incoming MODEL: {len(earlier_manifest.get('requests', []))} "
                     "earlier request(s) kept, regularised towards the model before the first one.")
    elif model.get_attachment(DUGE_ATTACHMENT) if hasattr(model, "get_attachment") else None:
        notes.append("The incoming MODEL was changed after an earlier DUGE run (e.g. a LoRA was loaded on it); "
                     "this run treats it as the new starting point.")

    erased_before = erased_in_manifest(earlier_manifest, "the incoming MODEL") if earlier_manifest else ()
    resolved = resolve_concept_set(concept_set, builtin_world, config.setting, erased_before=erased_before,
                                   erased_before_by="the earlier DUGE run on the incoming MODEL", notes=notes)
    backend = ComfyBackend(model, clip, vae, dtype=config.dtype)
    phases = ComfyPhases(backend, resolved, config, node_id)
    evaluator = None
    if builtin_world and vae is not None:

        evaluator = builtin_evaluator()

    def cancel() -> bool:
        mm.throw_exception_if_processing_interrupted()
        return False

    kwargs = {}
    if evaluator is not None:
        kwargs["image_filter"] = anchor_filter(backend, evaluator)
        if evaluate:
            kwargs["evaluate"] = world_evaluate(backend, evaluator, config.seed + EVALUATION_SEED_OFFSET, config.eval_steps,
                                                 phases=phases)
    with training_mode():
        result = unlearn(backend, resolved, config, concept_set.general_prompts, phases=phases,
                         cancel=cancel, start_deltas=start_deltas, erased_before=erased_before, **kwargs)
        total = {name: delta.detach().float().cpu() for name, delta in result.total_delta.items()}
        edited = backend.edited_model(total)


    requests = list(earlier_manifest.get("requests", [])) if earlier_manifest else []
    requests += manifest_rows(result, resolved)
    manifest = make_manifest(METHOD if getattr(config, "method", "duge") == "duge" else config.method, requests,
                             base_model_hash=None, base_model=_base_model_name(model),
                             extra={"concept_set": concept_set.name, "host": "ComfyUI"})
    edited.set_attachments(DUGE_ATTACHMENT, {"base": model, "total_delta": total, "manifest": manifest,
                                             "patches_uuid": edited.patches_uuid})
    lora = UnlearningLora([(r.target, {k: v.detach().float().cpu() for k, v in r.delta.items()}) for r in result.requests],
                          total, manifest, extra={"base_model": base_model_of(model)})
    report = unlearn_report(result, concept_set.name, builtin_world, notes)
    return UnlearnOutput(edited, lora, report, result)


# ---------------------------------------------------------------- probe and compare


def probe(model, clip, vae, prompt: str, words: list[str], seed: int, steps: int, guidance: float,
          model_after=None, latent_size=None):
    """(panel PIL, its `PanelLayout`): the heatmaps of `words` in `prompt`, one row per model, each
    over its own image generated from the same seed (before/after when `model_after` is given)."""
    if vae is None:
        raise DugeError("Attention Probe needs a VAE to show the generated image; connect the model's VAE")
    before = ComfyBackend(model, clip, vae, latent_size=latent_size)
    with training_mode(), torch.no_grad():
        latents = before.sample_latents([prompt], seed, steps, guidance)
        results = [probe_attention(before, prompt, words, seed, latents=latents)]
        labels = None
        if model_after is not None:
            after = ComfyBackend(model_after, clip, vae, latent_size=latent_size)
            after_latents = after.sample_latents([prompt], seed, steps, guidance)
            results.append(probe_attention(after, prompt, words, seed, latents=after_latents))
            labels = ["model", "model 2"]
    return heatmap_panel(results, labels), panel_layout(results, labels)


def compare(models: list[tuple[str, object]], clip, vae, prompts: list[str], seed: int, images_per_prompt: int,
            steps: int, guidance: float, latent_size=None):
    """(grid PIL, evaluator text or '') for the models on the same prompts and seeds."""
    if vae is None:
        raise DugeError("Compare Outputs needs the model's VAE to decode images")
    generators = []
    for label, model in models:
        backend = ComfyBackend(model, clip, vae, latent_size=latent_size)
        generators.append((label, lambda p, s, b=backend: b.generate(p, s, steps, guidance)))
    with training_mode(), torch.no_grad():
        comparison = compare_models(generators, prompts, images_per_prompt, seed)
    text = ""
    if all(is_demo_model(model) for _, model in models):

        _, text = world_scores(comparison, builtin_evaluator())
    return comparison_grid(comparison), text


# ---------------------------------------------------------------- saving


def output_file(filename_prefix: str, suffix: str = ".safetensors") -> Path:
    """A new file in ComfyUI's output folder for `filename_prefix` (sub-folders allowed, nothing outside)."""
    import folder_paths  # deferred: ComfyUI's own module (importable only inside ComfyUI, like comfy.* above)

    output_dir = folder_paths.get_output_directory()
    prefix = str(filename_prefix).strip()
    if not prefix or os.path.isabs(prefix) or ".." in Path(prefix).parts:
        raise UnsafePathError(f"filename_prefix '{filename_prefix}': expected a name inside ComfyUI's output "
                              "folder, e.g. 'loras/duge' (no absolute path, no '..')")
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, output_dir)
    except Exception as err:
        raise UnsafePathError(f"filename_prefix '{filename_prefix}' leaves ComfyUI's output folder") from err

    target = contained_path(output_dir, os.path.relpath(os.path.join(folder, f"{filename}_{counter:05}_{suffix}"), output_dir))
    return target


def save_lora_files(lora: UnlearningLora, filename_prefix: str, rank: int | None, per_request: bool) -> list[Path]:
    """Save the run's LoRA (kohya names, manifest in the metadata) into the output folder; returns the paths."""
    paths = []
    base_model = lora.extra.get("base_model")  # None: the family the tensors show
    if per_request:
        for k, (target, deltas) in enumerate(lora.requests, start=1):
            earlier = len(lora.manifest["requests"]) - len(lora.requests)  # rows of a continued session's earlier runs
            manifest = dict(lora.manifest, request_index=earlier + k, request_target=target)
            paths.append(save_lora(deltas, output_file(filename_prefix), manifest, rank=rank, base_model=base_model))
    else:
        paths.append(save_lora(lora.total, output_file(filename_prefix), lora.manifest, rank=rank, base_model=base_model))
    return paths


def save_checkpoint_file(model, clip, vae, filename_prefix: str, manifest: dict | None = None) -> Path:
    """Save MODEL (+CLIP, VAE) as a single-file checkpoint with ComfyUI's saver, manifest in the metadata."""
    if manifest is None:
        state = model.get_attachment(DUGE_ATTACHMENT) if hasattr(model, "get_attachment") else None
        manifest = state["manifest"] if state else None

    path = output_file(filename_prefix)
    metadata = {"format": "pt"}
    if manifest is not None:
        metadata[MANIFEST_KEY] = json.dumps(manifest, ensure_ascii=False)
    metadata.update(checkpoint_metadata(path, manifest, base_model_of(model)))
    # ComfyUI's saver writes safetensors whatever the name; atomic_write renames it into place.
    return atomic_write(path, lambda tmp: comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata=metadata))
