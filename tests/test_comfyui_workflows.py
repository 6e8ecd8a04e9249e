"""The example workflows inside a real ComfyUI (CPU): `COMFYUI_PATH=/path/to/ComfyUI pytest -m comfyui`.

One server (tests/comfyui_server.py) with the pack loaded from this checkout and --cache-none, so
every queued prompt really runs. The demo's API twin, which is the frontend's conversion of its UI
form, runs end to end on the built-in model with the UI form attached as the frontend sends it.
The SD checkpoint workflow passes ComfyUI's validation (a stand-in file takes the checkpoint's
name) and stops only where the checkpoint is loaded; marked slow, it also runs end to end, at
a small image size and few steps, on an SD 1.5-layout checkpoint with random weights
(tests/sd_checkpoint.py). The CI snapshot of the node definitions is compared with the live ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy").is_dir():
    pytest.skip("needs a ComfyUI checkout: set COMFYUI_PATH to its folder (and run with -m comfyui)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests

from comfyui_server import PACK_NAME, ComfyServer, status_messages  # noqa: E402
from workflow_format import interface, ui_to_api  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
NODE_DEFS = json.loads((REPO / "tests" / "data" / "comfyui_node_defs.json").read_text())
RUN_TIMEOUT = 3600  # seconds; the demo takes one to two minutes on an idle 2-core CPU


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _checkpoint_name() -> str:
    prompt = _load(API_DIR / "duge_sd15_checkpoint_api.json")
    return next(n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comfyui")
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / _checkpoint_name()).write_bytes(b"not a checkpoint")  # a stand-in, for validation
    with ComfyServer(COMFYUI_PATH, workdir, extra_model_paths={"checkpoints": "checkpoints"},
                     extra_args=["--cache-none"]) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _node_id(prompt: dict, class_type: str) -> str:
    (node_id,) = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return node_id


def _check_demo_outputs(server: ComfyServer, prompt: dict, entry: dict) -> None:
    from duge.io import read_manifest

    assert entry["status"]["status_str"] == "success", status_messages(entry) + server.log_tail()
    outputs = entry["outputs"]
    unlearn_ui = outputs[_node_id(prompt, "DugeUnlearn")]
    assert [r["target"] for r in unlearn_ui["duge_manifest"][0]["requests"]] == ["circle"]
    assert "erase 'circle'" in unlearn_ui["text"][0]
    for class_type in ("SaveImage", "PreviewImage"):
        for node_id, node in prompt.items():
            if node["class_type"] == class_type:
                images = outputs[node_id]["images"]
                folder = server.output_dir if images[0]["type"] == "output" else server.workdir / "temp" / "temp"
                assert all((folder / i["subfolder"] / i["filename"]).is_file() for i in images), images
    saved = outputs[_node_id(prompt, "SaveImage")]["images"]
    assert len(saved) == prompt[prompt[_node_id(prompt, "KSampler")]["inputs"]["latent_image"][0]]["inputs"]["batch_size"]
    lora_path = Path(outputs[_node_id(prompt, "DugeSaveUnlearningLora")]["text"][0].removeprefix("saved "))
    checkpoint_path = Path(outputs[_node_id(prompt, "DugeSaveUnlearnedCheckpoint")]["text"][0].removeprefix("saved "))
    for path, folder in ((lora_path, "loras"), (checkpoint_path, "checkpoints")):
        assert path.is_file() and path.parent == server.output_dir / folder, path
        assert read_manifest(path)["requests"][0]["target"] == "circle"
    assert "circle" in outputs[_node_id(prompt, "PreviewAny")]["text"][0]  # the evaluator's scores, as text


def test_node_definitions_match_the_snapshot_ci_checks_against(object_info):
    drifted = [t for t in NODE_DEFS if t not in object_info or interface(object_info[t]) != interface(NODE_DEFS[t])]
    assert not drifted, f"node definitions changed: {drifted}; run tools/build_workflows.py and review the diff"
    for node_type in (t for t in NODE_DEFS if t.startswith("Duge")):  # defaults, ranges and combo values too
        for group, specs in NODE_DEFS[node_type]["input"].items():
            for name, spec in specs.items():
                live = object_info[node_type]["input"][group][name]
                if spec[0] == "COMBO":  # the live list may hold more (the machine's models/concept_sets)
                    assert set(spec[1]["options"]) <= set(live[1]["options"]), (node_type, name)
                    spec, live = [spec[0], {**spec[1], "options": None}], [live[0], {**live[1], "options": None}]
                assert live == spec, (node_type, name)


def test_template_browser_lists_and_serves_the_packs_workflows(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed[PACK_NAME]) == ["duge_demo", "duge_sd15_checkpoint"]
    for name in listed[PACK_NAME]:
        assert server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json") == _load(TEMPLATES_DIR / f"{name}.json")


def test_demo_runs_end_to_end_as_api_twin_and_as_the_frontends_conversion_of_the_ui_form(server, object_info):
    """One run proves both: the API twin is exactly what the frontend makes of the UI form."""
    from PIL import Image

    workflow = _load(TEMPLATES_DIR / "duge_demo.json")
    prompt = _load(API_DIR / "duge_demo_api.json")
    assert prompt == ui_to_api(workflow, object_info)
    entry = server.wait(server.queue(prompt, workflow=workflow), timeout=RUN_TIMEOUT)
    _check_demo_outputs(server, prompt, entry)
    image = entry["outputs"][_node_id(prompt, "SaveImage")]["images"][0]
    embedded = json.loads(Image.open(server.output_dir / image["subfolder"] / image["filename"]).info["workflow"])
    assert embedded == workflow  # dragging the image into ComfyUI reopens the demo


def test_checkpoint_workflow_passes_validation_and_stops_only_at_the_checkpoint(server, object_info):
    workflow = _load(TEMPLATES_DIR / "duge_sd15_checkpoint.json")
    prompt = ui_to_api(workflow, object_info)
    assert prompt == _load(API_DIR / "duge_sd15_checkpoint_api.json")
    entry = server.wait(server.queue(prompt), timeout=600)  # queue() raises on any validation error
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert [e["node_type"] for e in errors] == ["CheckpointLoaderSimple"], status_messages(entry)


def _small_checkpoint_run(prompt: dict) -> dict:
    """The checkpoint workflow's API form at CPU size: 64x64 images (8x8 latents) from the KSamplers,
    2 sampler and 2 training steps, one anchor image; the Van Gogh set typed in with steps: 2 (its
    file asks 400). DUGE Unlearn trains at the model's own 512 px within a 4 GiB budget (micro-batches
    of two rows), leaving room on a 24 GiB machine for ComfyUI's copy of the model and the test."""
    prompt = json.loads(json.dumps(prompt))
    concept_set = prompt[_node_id(prompt, "DugeLoadConceptSet")]["inputs"]
    text = (REPO / "duge" / "concept_sets" / concept_set["file"]).read_text()
    assert "steps: 400" in text
    concept_set.update(file="(typed text below)", text=text.replace("steps: 400", "steps: 2"))
    prompt[_node_id(prompt, "DugeUnlearn")]["inputs"].update(steps=2, anchor_images=1, sampler_steps=2,
                                                             memory_budget_gb=4.0)
    prompt[_node_id(prompt, "EmptyLatentImage")]["inputs"].update(width=64, height=64, batch_size=1)
    prompt[_node_id(prompt, "DugeAttentionProbe")]["inputs"].update(steps=2)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    return prompt


@pytest.mark.slow
def test_checkpoint_workflow_runs_on_an_sd15_layout_checkpoint(tmp_path):
    """The SD 1.5 workflow end to end on a real-size SD 1.5 single file with random weights, loaded
    by the stock CheckpointLoaderSimple from a checkpoints folder of the test's own. Writing the
    2.1 GB file takes about a minute; the run is SD 1.5 training at 512 px on the CPU (ComfyUI's process
    about 15 GB)."""
    import time

    from sd_checkpoint import write_sd15_checkpoint

    from duge.io import read_manifest

    write_sd15_checkpoint(tmp_path / "checkpoints" / _checkpoint_name())
    prompt = _small_checkpoint_run(_load(API_DIR / "duge_sd15_checkpoint_api.json"))
    with ComfyServer(COMFYUI_PATH, tmp_path, extra_model_paths={"checkpoints": "checkpoints"}) as server:
        started = time.monotonic()
        entry = server.wait(server.queue(prompt), timeout=RUN_TIMEOUT)
        seconds = time.monotonic() - started
        log = server.log_tail()
    assert entry["status"]["status_str"] == "success", status_messages(entry) + log
    assert "model_type EPS" in log  # ComfyUI detected the file as an SD 1.x checkpoint
    outputs = entry["outputs"]
    lora_path = Path(outputs[_node_id(prompt, "DugeSaveUnlearningLora")]["text"][0].removeprefix("saved "))
    manifest = read_manifest(lora_path)
    assert manifest["base_model"] == "SD15" and [r["target"] for r in manifest["requests"]] == ["Van Gogh"]
    saved = [outputs[k]["images"][0] for k, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert len(saved) == 2 and all((server.output_dir / i["subfolder"] / i["filename"]).is_file() for i in saved)
    probe = outputs[_node_id(prompt, "DugeAttentionProbe")]["duge_probe"][0]
    assert probe["columns"] == ["image", "Van Gogh", "village"] and probe["rows"] == ["model", "model 2"]
    print(f"SD 1.5 checkpoint workflow: {seconds:.0f} s from queueing to the end")
