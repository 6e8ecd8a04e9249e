"""Attention Probe: where the prompt's words look in the generated image (before/after with two models)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .types import CATEGORY

UI_KEY = "duge_probe"  # read by web/duge.js: the panel as a temp image and where each word's heatmap is in it


class AttentionProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DugeAttentionProbe",
            display_name="Attention Probe",
            category=CATEGORY,
            description="Generates the prompt's image and shows, per word, where its cross-attention looks "
                        "(averaged over layers, heads and a few noise levels). With model_2, one row per model.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("prompt", multiline=True, default="a red circle"),
                io.String.Input("words", default="circle", tooltip="Words or phrases to probe, comma-separated."),
                io.Int.Input("seed", default=0, min=0, max=2**32 - 1, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1),
                io.Model.Input("model_2", optional=True, tooltip="A second model (e.g. after DUGE Unlearn) for a before/after row."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompt, words, seed, steps, cfg, model_2=None) -> io.NodeOutput:
        from duge.backends.comfy_run import probe  # deferred: torch, loaded when the node runs
        from duge.probe import parse_words, pil_to_image_batch

        panel, layout = probe(model, clip, vae, prompt.strip(), parse_words(words), seed, steps, cfg,
                              model_after=model_2)
        image = pil_to_image_batch(panel)
        # The panel goes to the temp folder for the node's clickable heatmaps (web/duge.js); not under
        # "images", so the frontend does not also draw it on the node.
        (saved,) = ui.ImageSaveHelper.save_images(image, "duge_probe", io.FolderType.temp, cls=None, compress_level=1)
        return io.NodeOutput(image, ui={UI_KEY: [{"image": dict(saved), "prompt": prompt.strip(), **layout.as_dict()}]})
