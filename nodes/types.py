"""Wire types of the DUGE nodes (besides ComfyUI's own MODEL, CLIP, VAE, IMAGE, STRING)."""

from comfy_api.latest import io

ConceptSetType = io.Custom("DUGE_CONCEPT_SET")  # a duge.concepts.ConceptSet
UnlearningLoraType = io.Custom("DUGE_LORA")  # a duge.backends.comfy_run.UnlearningLora

CATEGORY = "DUGE unlearning"
