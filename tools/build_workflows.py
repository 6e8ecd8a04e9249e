"""Writes the pack's example workflows from the node definitions of a real ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py            # starts a server itself
    python tools/build_workflows.py --url http://127.0.0.1:8188              # or reads a running one
    python tools/build_workflows.py --object-info tests/data/comfyui_node_defs.json   # offline, from the snapshot

Writes, for each workflow below:
- example_workflows/<name>.json — the UI form (what the frontend saves; ComfyUI lists this folder in
  its template browser),
- workflows/api/<name>_api.json — the API form (what POST /prompt takes), converted the way the
  frontend's graphToPrompt converts,
- tests/data/comfyui_node_defs.json — the definitions of every node type used, so the CI tests
  check the files without ComfyUI (and the ComfyUI tests notice when a definition drifts).

Widget values are placed by name through /object_info, so their order always follows the nodes'
definitions; edit the workflows here, not in the JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from workflow_format import Workflow, check_api, check_ui, snapshot, ui_to_api  # noqa: E402

TEMPLATES_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
NODE_DEFS = REPO / "tests" / "data" / "comfyui_node_defs.json"
TYPED_TEXT = "(typed text below)"
COMPARE_PROMPTS = ["a red circle", "a blue circle with dots", "a green square", "a yellow heart"]  # erased, kept

DEMO_CONCEPT_SET = """\
name: erase circle
requests:
  - target: circle
    preserve: [square, heart, crescent, diamond]
"""

DEMO_NOTE = """\
## DUGE demo — erase "circle" from the built-in model

Runs on a CPU in about a minute (longer on a busy machine): no download, no GPU.

1. **Load DUGE Demo Model** gives the built-in tiny Stable-Diffusion-architecture model
   (shapes, colours, textures). Its images are 32×32, so latents are 128×128 in Empty Latent Image.
2. **Load Concept Set** reads the typed YAML: erase `circle`, keep `square`, `heart`, `crescent`,
   `diamond`. Pick `demo.yaml` for three requests in a row (object, colour, style).
3. **DUGE Unlearn** edits the model's cross-attention; the incoming model is never changed. After a
   run the node lists what was erased, with the run's metrics.
4. **Compare Outputs** and **Attention Probe** show before / after on the same seeds.
5. The edited MODEL goes into the stock KSampler; **Save Unlearning LoRA** and
   **Save Unlearned Checkpoint** write the edit to the output folder with its manifest.
"""

SD_NOTE = """\
## DUGE on your own SD 1.5 / SDXL checkpoint

1. Choose your checkpoint in **Load Checkpoint** (SD 1.x, SD 2.x or SDXL). For SDXL set
   Empty Latent Image to 1024×1024.
2. **Load Concept Set**: `van_gogh_example.yaml` erases Van Gogh (anchor: a generic painting) and
   keeps Monet and Picasso; its request sets 400 steps at learning rate 1e-5. Put your own sets
   in `models/concept_sets/`, or choose `(typed text below)` and type one.
3. **DUGE Unlearn** needs a GPU for real models: a few minutes on SD 1.5.
4. The two KSamplers share seed and prompt: before (original model) and after (edited model).
5. **Save Unlearning LoRA** writes `output/loras/duge_van_gogh_*.safetensors`; load it with the
   stock Load LoRA node at strength 1.0 on the same checkpoint to reproduce the edit.
"""


def demo_workflow(object_info: dict) -> dict:
    """The built-in model, end to end on a CPU: load, erase 'circle', compare, probe, sample, save."""
    w = Workflow(object_info)
    note = w.node("MarkdownNote", (0, 0), size=(360, 500), text=DEMO_NOTE, title="Read me")
    demo = w.node("DugeLoadDemoModel", (0, 560), size=(360, 100))
    concepts = w.node("DugeLoadConceptSet", (0, 720), size=(360, 240), file=TYPED_TEXT, text=DEMO_CONCEPT_SET)
    model, clip, vae = demo.out("MODEL"), demo.out("CLIP"), demo.out("VAE")

    # the node's own defaults (75 steps, 16 anchor images): half a minute on an idle 2-core CPU.
    # Tall and wide: web/duge.js shows the run's summary under the widgets, the progress preview below it.
    unlearn = w.node("DugeUnlearn", (440, 0), size=(480, 960), model=model, clip=clip,
                     concept_set=concepts.out("concept_set"), vae=vae, seed=0, evaluate=False)
    edited = unlearn.out("MODEL")

    compare = w.node("DugeCompareOutputs", (1000, 0), size=(340, 420), model_a=model, model_b=edited, clip=clip,
                     vae=vae, prompts="\n".join(COMPARE_PROMPTS), seed=0, images_per_prompt=4, steps=12, cfg=7.5)
    compare_view = w.node("PreviewImage", (1380, 0), size=(440, 640), title="Before / after",
                          images=compare.out("IMAGE"))
    scores = w.node("PreviewAny", (1000, 480), size=(340, 220), title="Evaluator scores", source=compare.out("scores"))
    # tall enough for the clickable heatmaps web/duge.js shows under the widgets after a run; 400 wide, the
    # width the frontend gives it on load (its multiline prompt's minimum), so the preview beside it stays clear
    probe = w.node("DugeAttentionProbe", (1000, 760), size=(400, 640), model=model, clip=clip, vae=vae,
                   prompt="a red circle", words="circle, red", seed=0, steps=12, cfg=7.5, model_2=edited)
    probe_view = w.node("PreviewImage", (1440, 700), size=(380, 450), title="Where 'circle' and 'red' look",
                        images=probe.out("IMAGE"))

    save_lora = w.node("DugeSaveUnlearningLora", (1900, 0), size=(340, 150), lora=unlearn.out("lora"),
                       filename_prefix="loras/duge_demo", rank=0, one_file_per_request=False)
    save_checkpoint = w.node("DugeSaveUnlearnedCheckpoint", (1900, 220), size=(340, 130), model=edited, clip=clip,
                             vae=vae, filename_prefix="checkpoints/duge_demo")

    y = 1540
    positive = w.node("CLIPTextEncode", (0, y), size=(360, 150), clip=clip, text="a red circle with dots")
    negative = w.node("CLIPTextEncode", (0, y + 210), size=(360, 150), clip=clip, text="")
    latent = w.node("EmptyLatentImage", (440, y), size=(300, 110), width=128, height=128, batch_size=4)
    sampler = w.node("KSampler", (440, y + 170), size=(300, 270), model=edited, positive=positive.out(0),
                     negative=negative.out(0), latent_image=latent.out(0), seed=0, steps=12, cfg=7.5,
                     sampler_name="euler", scheduler="normal", denoise=1.0)
    decoded = w.node("VAEDecode", (800, y), size=(200, 50), samples=sampler.out(0), vae=vae)
    saved = w.node("SaveImage", (1040, y), size=(400, 410), images=decoded.out(0), filename_prefix="duge_demo/after")

    w.group("1 · Model and concepts to erase", [note, demo, concepts], color="#3f789e")
    w.group("2 · Erase", [unlearn], color="#a1309b")
    w.group("3 · Before / after and attention", [compare, compare_view, scores, probe, probe_view], color="#8A8")
    w.group("4 · Save the edit", [save_lora, save_checkpoint], color="#b06634")
    w.group("5 · Sample the edited model with the stock nodes", [positive, negative, latent, sampler, decoded, saved],
            color="#b58b2a")
    return w.to_json()


def sd_checkpoint_workflow(object_info: dict) -> dict:
    """A user's SD 1.5 / SDXL checkpoint: erase Van Gogh, sample before and after, probe, save a LoRA."""
    w = Workflow(object_info)
    note = w.node("MarkdownNote", (0, 0), size=(360, 440), text=SD_NOTE, title="Read me")
    checkpoint = w.node("CheckpointLoaderSimple", (0, 500), size=(360, 100),
                        ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    concepts = w.node("DugeLoadConceptSet", (0, 660), size=(360, 200), file="van_gogh_example.yaml", text="")
    model, clip, vae = checkpoint.out("MODEL"), checkpoint.out("CLIP"), checkpoint.out("VAE")

    unlearn = w.node("DugeUnlearn", (440, 0), size=(400, 860), model=model, clip=clip,
                     concept_set=concepts.out("concept_set"), vae=vae, steps=400, learning_rate=1e-5, seed=0,
                     anchor_images=16, sampler_steps=20, evaluate=False)
    edited = unlearn.out("MODEL")
    save_lora = w.node("DugeSaveUnlearningLora", (440, 920), size=(400, 150), lora=unlearn.out("lora"),
                       filename_prefix="loras/duge_van_gogh", rank=0, one_file_per_request=False)

    prompt = "a starry night over a village in the style of Van Gogh"
    positive = w.node("CLIPTextEncode", (920, 0), size=(360, 150), clip=clip, text=prompt)
    negative = w.node("CLIPTextEncode", (920, 210), size=(360, 150), clip=clip, text="blurry, low quality")
    latent = w.node("EmptyLatentImage", (920, 420), size=(360, 110), width=512, height=512, batch_size=1)
    sampling = [positive, negative, latent]
    for row, (label, which) in enumerate((("before", model), ("after", edited))):
        y = row * 560
        sampler = w.node("KSampler", (1340, y), size=(300, 270), title=f"KSampler ({label})", model=which,
                         positive=positive.out(0), negative=negative.out(0), latent_image=latent.out(0), seed=42,
                         steps=25, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        decoded = w.node("VAEDecode", (1340, y + 330), size=(300, 50), samples=sampler.out(0), vae=vae)
        saved = w.node("SaveImage", (1680, y), size=(400, 500), title=f"Save Image ({label})", images=decoded.out(0),
                       filename_prefix=f"duge_sd/{label}")
        sampling += [sampler, decoded, saved]
    probe = w.node("DugeAttentionProbe", (920, 590), size=(360, 650), model=model, clip=clip, vae=vae,
                   prompt=prompt, words="Van Gogh, village", seed=42, steps=25, cfg=7.0, model_2=edited)
    probe_view = w.node("PreviewImage", (920, 1300), size=(1160, 360), title="Where 'Van Gogh' and 'village' look",
                        images=probe.out("IMAGE"))

    w.group("1 · Checkpoint and concepts", [note, checkpoint, concepts], color="#3f789e")
    w.group("2 · Erase, save as LoRA", [unlearn, save_lora], color="#a1309b")
    w.group("3 · Same seed before / after, and attention", sampling + [probe, probe_view], color="#8A8")
    return w.to_json()


WORKFLOWS = {"duge_demo": demo_workflow, "duge_sd15_checkpoint": sd_checkpoint_workflow}


def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as response:
        return json.load(response)


def object_info_from_new_server(comfyui_path: str) -> dict:
    from comfyui_server import ComfyServer

    python = Path(comfyui_path) / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory() as workdir:
        with ComfyServer(comfyui_path, workdir, python=str(python) if python.exists() else sys.executable) as server:
            return server.get("/object_info")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="a running ComfyUI with the DUGE pack loaded")
    source.add_argument("--object-info", type=Path, help="a saved /object_info (or the tests' snapshot)")
    args = parser.parse_args(argv)

    if args.url:
        object_info = fetch_object_info(args.url)
    elif args.object_info:
        object_info = json.loads(args.object_info.read_text())
    elif os.environ.get("COMFYUI_PATH"):
        object_info = object_info_from_new_server(os.environ["COMFYUI_PATH"])
    else:
        parser.error("give --url or --object-info, or set COMFYUI_PATH")

    used_types = set()
    for name, build in WORKFLOWS.items():
        workflow = build(object_info)
        prompt = ui_to_api(workflow, object_info)
        problems = check_ui(workflow, object_info, check_combo_values=False) + check_api(
            prompt, object_info, check_combo_values=False)
        if problems:
            print(f"{name}:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        write_json(TEMPLATES_DIR / f"{name}.json", workflow)
        write_json(API_DIR / f"{name}_api.json", prompt)
        used_types |= {node["class_type"] for node in prompt.values()}
        print(f"wrote {name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")
    write_json(NODE_DEFS, snapshot(object_info, used_types))
    print(f"wrote {NODE_DEFS.relative_to(REPO)}: {len(used_types)} node types")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
