"""Save Unlearned Checkpoint and Save Unlearning LoRA: into ComfyUI's output folder, manifest in the metadata."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .types import CATEGORY, UnlearningLoraType


class SaveUnlearnedCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeSaveUnlearnedCheckpoint",
            display_name="Save Unlearned Checkpoint",
            category=CATEGORY,
            description="Saves the edited MODEL with its CLIP and VAE as one .safetensors checkpoint in the output "
                        "folder; the DUGE manifest (what was erased, how) goes into its metadata.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("filename_prefix", default="checkpoints/duge_unlearned"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix) -> io.NodeOutput:
        from duge.backends.comfy_run import save_checkpoint_file  # deferred: torch, loaded when the node runs

        path = save_checkpoint_file(model, clip, vae, filename_prefix)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))


class SaveUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeSaveUnlearningLora",
            display_name="Save Unlearning LoRA",
            category=CATEGORY,
            description="Saves the run's edit as a LoRA (kohya key names, read by LoraLoader, A1111 and diffusers) "
                        "in the output folder, with the DUGE manifest in its metadata.",
            inputs=[
                UnlearningLoraType.Input("lora"),
                io.String.Input("filename_prefix", default="loras/duge_unlearning"),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="0: exact (the edit's full rank); else the best approximation of that rank."),
                io.Boolean.Input("one_file_per_request", default=False),
            ],
            outputs=[io.String.Output(display_name="paths")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, rank, one_file_per_request) -> io.NodeOutput:
        from duge.backends.comfy_run import save_lora_files  # deferred: torch, loaded when the node runs

        paths = save_lora_files(lora, filename_prefix, rank or None, one_file_per_request)
        text = "\n".join(str(p) for p in paths)
        return io.NodeOutput(text, ui=ui.PreviewText(f"saved {text}"))
