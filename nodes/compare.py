"""Compare Outputs: two models, the same prompts and seeds, one labelled grid (+ the evaluator's scores)."""

from __future__ import annotations

from comfy_api.latest import io

from .types import CATEGORY


class CompareOutputs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeCompareOutputs",
            display_name="Compare Outputs",
            category=CATEGORY,
            description="Samples both models on the same prompts and seeds and lays the images out in labelled "
                        "rows; on the built-in model also reports what its evaluator sees in them.",
            inputs=[
                io.Model.Input("model_a"),
                io.Model.Input("model_b"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("prompts", multiline=True, default="a red circle\na blue square",
                                tooltip="One prompt per line."),
                io.Int.Input("seed", default=0, min=0, max=2**32 - 1, control_after_generate=True),
                io.Int.Input("images_per_prompt", default=4, min=1, max=64),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1),
                io.String.Input("label_a", default="before", optional=True),
                io.String.Input("label_b", default="after", optional=True),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, model_a, model_b, clip, vae, prompts, seed, images_per_prompt, steps, cfg, label_a="before",
                label_b="after") -> io.NodeOutput:
        from duge.backends.comfy_run import compare  # deferred: torch, loaded when the node runs
        from duge.compare import parse_prompts
        from duge.probe import pil_to_image_batch

        grid, text = compare([(label_a or "A", model_a), (label_b or "B", model_b)], clip, vae, parse_prompts(prompts),
                             seed, images_per_prompt, steps, cfg)
        return io.NodeOutput(pil_to_image_batch(grid), text or "(the evaluator scores only the built-in model)")
