"""Load DUGE Demo Model: the built-in tiny model as MODEL, CLIP and VAE for the stock nodes."""

from __future__ import annotations

from comfy_api.latest import io

from .types import CATEGORY


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeLoadDemoModel",
            display_name="Load DUGE Demo Model",
            category=CATEGORY,
            description="The built-in tiny Stable-Diffusion-architecture model of DUGE's synthetic world "
                        "(shapes, colours, textures), runnable on a CPU. Its images are 32x32: in "
                        "EmptyLatentImage enter width = height = 128 (16x16 latents).",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from duge.backends.comfy_models import load_demo_model  # deferred: torch, loaded when the node runs

        model, clip, vae = load_demo_model()
        return io.NodeOutput(model, clip, vae)
