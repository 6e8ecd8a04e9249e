"""DUGE Unlearn: erase a concept set from the loaded MODEL; returns the edited MODEL, its LoRA and a report."""

from __future__ import annotations

from comfy_api.latest import io

from duge.config import METHODS, SETTINGS, TRAINABLE, UnlearnConfig, node_tooltip
from duge.methods import get_method

from .types import CATEGORY, ConceptSetType, UnlearningLoraType

DEFAULTS = UnlearnConfig()  # every default below is the config's (tests/test_settings.py checks the node's)
# UCE's closed forms (uce, uce-resolve) are not offered in ComfyUI (untested there)
NODE_METHODS = [m for m in METHODS if get_method(m).objective != "closed_form"]


class DugeUnlearn(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeUnlearn",
            display_name="DUGE Unlearn",
            category=CATEGORY,
            description="Erase the concept set's targets from the model, one request after another, keeping the "
                        "related concepts and everything else. The incoming MODEL is not changed; the edited MODEL "
                        "carries the edit as weight patches (use it with the stock KSampler).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                ConceptSetType.Input("concept_set"),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=100000, tooltip=node_tooltip("steps")),
                io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=1e-7, max=1.0, step=1e-4, round=1e-7,
                               tooltip=node_tooltip("learning_rate")),
                io.Float.Input("beta", default=DEFAULTS.beta, min=0.0, max=1e4, step=1.0, tooltip=node_tooltip("beta")),
                io.Float.Input("lambda_prior", default=DEFAULTS.lambda_prior, min=0.0, max=1e4, step=0.1,
                               tooltip=node_tooltip("lambda_prior")),
                io.Float.Input("lambda_reg", default=DEFAULTS.lambda_reg, min=0.0, max=1e4, step=1e-6, round=1e-9,
                               tooltip=node_tooltip("lambda_reg")),
                io.Float.Input("anchor_guidance", default=DEFAULTS.anchor_guidance, min=0.0, max=10.0, step=0.1,
                               optional=True, tooltip=node_tooltip("anchor_guidance")),
                io.Combo.Input("setting", options=list(SETTINGS), default=DEFAULTS.setting,
                               tooltip=node_tooltip("setting")),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=2**32 - 1, control_after_generate=True,
                             tooltip=node_tooltip("seed")),
                io.Combo.Input("trainable", options=list(TRAINABLE), default=DEFAULTS.trainable,
                               tooltip=node_tooltip("trainable")),
                io.Combo.Input("method", options=NODE_METHODS, default=DEFAULTS.method, optional=True,
                               tooltip=node_tooltip("method")),
                io.Int.Input("anchor_images", default=DEFAULTS.anchor_images, min=1, max=1024, optional=True,
                             tooltip=node_tooltip("anchor_images")),
                io.Int.Input("sampler_steps", default=DEFAULTS.sampler_steps, min=1, max=1000, optional=True,
                             tooltip=node_tooltip("sampler_steps")),
                io.Vae.Input("vae", optional=True,
                             tooltip="For progress previews and, on the built-in model, the evaluator's checks."),
                io.Boolean.Input("evaluate", default=False, optional=True,
                                 tooltip="Built-in model with VAE only: measure UA/IRA/CRA after each request (slower)."),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
                               tooltip=node_tooltip("memory_budget_gb") + " 0: unset. The batch goes through the UNet "
                                       "in micro-batches that fit it."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), UnlearningLoraType.Output(display_name="lora"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, concept_set, steps, learning_rate, beta, lambda_prior, lambda_reg, setting, seed,
                trainable, method=DEFAULTS.method, anchor_images=DEFAULTS.anchor_images,
                sampler_steps=DEFAULTS.sampler_steps, vae=None, evaluate=False, memory_budget_gb=0.0,
                anchor_guidance=DEFAULTS.anchor_guidance) -> io.NodeOutput:
        from duge.backends.comfy_run import run_unlearn  # deferred: torch and ComfyUI's model code, to the first run

        config = UnlearnConfig(method=method, setting=setting, steps=steps, learning_rate=learning_rate, beta=beta,
                               lambda_prior=lambda_prior, lambda_reg=lambda_reg, trainable=trainable, seed=seed,
                               anchor_images=anchor_images, sampler_steps=sampler_steps,
                               memory_budget_gb=memory_budget_gb or None, anchor_guidance=anchor_guidance)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        out = run_unlearn(model, clip, concept_set, config, vae=vae, evaluate=evaluate, node_id=node_id)
        # ui: shown on the node by web/duge.js (what the model has had erased, and how the run went)
        return io.NodeOutput(out.model, out.lora, out.report,
                             ui={"duge_manifest": [out.lora.manifest], "text": [out.report]})
