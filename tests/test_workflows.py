"""The example workflows and the web extension, checked without ComfyUI (CI).

The UI-form workflows in example_workflows/ are what ComfyUI's template browser offers; their API
twins in workflows/api/ are what scripts POST to /prompt. Both are checked against
tests/data/comfyui_node_defs.json, the /object_info of every node type they use, written by
tools/build_workflows.py from a real ComfyUI (tests/test_comfyui_workflows.py checks that snapshot
against a running one, and runs the demo).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests

from workflow_format import (  # noqa: E402
    FRONTEND_ONLY_TYPES,
    check_api,
    check_ui,
    is_api_form,
    ui_to_api,
    widget_value_count,
)

TEMPLATES_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
NODE_DEFS = json.loads((REPO / "tests" / "data" / "comfyui_node_defs.json").read_text())
DUGE_NODE_IDS = {"DugeLoadDemoModel", "DugeLoadConceptSet", "DugeUnlearn", "DugeAttentionProbe", "DugeCompareOutputs",
                 "DugeSaveUnlearnedCheckpoint", "DugeSaveUnlearningLora"}
# app/custom_node_manager.py lists <pack>/<folder>/*.json of each of these folders as templates
TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]
WORKFLOW_NAMES = ["duge_demo", "duge_sd15_checkpoint"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def _widget(workflow: dict, node: dict, name: str):
    """The value of widget `name` of a UI-form node, read through the API conversion."""
    return ui_to_api({**workflow, "nodes": [node], "links": []}, NODE_DEFS)[str(node["id"])]["inputs"][name]


def test_the_pack_ships_the_demo_and_a_checkpoint_workflow_in_both_forms():
    assert sorted(p.stem for p in TEMPLATES_DIR.glob("*.json")) == WORKFLOW_NAMES
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == [f"{name}_api" for name in WORKFLOW_NAMES]
    missing = [name for name in WORKFLOW_NAMES if not (TEMPLATES_DIR / f"{name}.jpg").is_file()]
    assert not missing, f"the template browser shows <name>.jpg as the thumbnail: {missing}"


def test_the_template_browser_finds_only_ui_workflows_each_once():
    listed = []
    for folder in TEMPLATE_FOLDERS:
        for path in sorted((REPO / folder).glob("*.json")):
            data = _load(path)
            assert not is_api_form(data) and "nodes" in data, f"{path.relative_to(REPO)} would be offered as a template"
            listed.append(path.stem)
    assert sorted(listed) == sorted(set(listed)), f"a workflow is listed twice: {listed}"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_is_consistent_with_the_node_definitions(name):
    workflow = _load(TEMPLATES_DIR / f"{name}.json")
    assert workflow["version"] == 0.4
    assert check_ui(workflow, NODE_DEFS) == []


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_node_is_a_stock_comfyui_node_or_one_of_ours(name):
    for node in _load(TEMPLATES_DIR / f"{name}.json")["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES or node["type"] in DUGE_NODE_IDS:
            continue
        module = NODE_DEFS[node["type"]]["python_module"]
        assert module == "nodes" or module.startswith("comfy_extras."), f"{node['type']} comes from {module}"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_twin_is_the_frontends_conversion_of_the_ui_workflow(name):
    assert ui_to_api(_load(TEMPLATES_DIR / f"{name}.json"), NODE_DEFS) == _load(API_DIR / f"{name}_api.json")


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_twin_references_existing_nodes_with_correct_inputs(name):
    prompt = _load(API_DIR / f"{name}_api.json")
    assert is_api_form(prompt)
    assert check_api(prompt, NODE_DEFS) == []


def test_demo_uses_every_duge_node_on_the_builtin_model_at_its_size():
    demo = _load(TEMPLATES_DIR / "duge_demo.json")
    assert DUGE_NODE_IDS <= {n["type"] for n in demo["nodes"]}
    (latent,) = _nodes_of(demo, "EmptyLatentImage")
    assert (_widget(demo, latent, "width"), _widget(demo, latent, "height")) == (128, 128)  # 16x16 latents
    (unlearn,) = _nodes_of(demo, "DugeUnlearn")
    assert _widget(demo, unlearn, "steps") <= 200, "the demo must finish in a minute or two on a CPU"
    (concepts,) = _nodes_of(demo, "DugeLoadConceptSet")
    from duge.concepts import parse_concept_set

    assert _widget(demo, concepts, "file") == "(typed text below)"
    assert [r.target for r in parse_concept_set(_widget(demo, concepts, "text")).requests] == ["circle"]
    prompt = _load(API_DIR / "duge_demo_api.json")
    (sampler,) = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert prompt[sampler["inputs"]["model"][0]]["class_type"] == "DugeUnlearn", "the stock KSampler samples the edit"


def test_checkpoint_workflow_reads_a_concept_set_the_pack_ships_and_samples_before_and_after():
    workflow = _load(TEMPLATES_DIR / "duge_sd15_checkpoint.json")
    (concepts,) = _nodes_of(workflow, "DugeLoadConceptSet")
    assert (REPO / "duge" / "concept_sets" / _widget(workflow, concepts, "file")).is_file()
    prompt = _load(API_DIR / "duge_sd15_checkpoint_api.json")
    models = sorted(prompt[n["inputs"]["model"][0]]["class_type"] for n in prompt.values()
                    if n["class_type"] == "KSampler")
    assert models == ["CheckpointLoaderSimple", "DugeUnlearn"]
    assert any(n["class_type"] == "DugeSaveUnlearningLora" for n in prompt.values())


def test_workflow_files_are_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "tools" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for name, build in builder.WORKFLOWS.items():
        assert build(NODE_DEFS) == _load(TEMPLATES_DIR / f"{name}.json"), \
            f"{name}.json was edited by hand: change tools/build_workflows.py and run it"


# ---------------------------------------------------------------- the format helpers themselves

MINI_DEFS = {
    "Sampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "mode": [["a", "b"]], "steps": ["INT", {"default": 20, "min": 1}]},
                          "optional": {"label": ["STRING", {"default": ""}], "extra": ["MODEL"]}},
                "input_order": {"required": ["model", "seed", "mode", "steps"], "optional": ["label", "extra"]},
                "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler"},
    "Loader": {"input": {"required": {}}, "input_order": {"required": []}, "output": ["MODEL"], "output_name": ["MODEL"],
               "display_name": "Loader"},
}


def _mini_workflow(mode: int = 0) -> dict:
    return {
        "last_node_id": 3, "last_link_id": 1, "version": 0.4, "groups": [],
        "nodes": [
            {"id": 1, "type": "Loader", "pos": [0, 0], "size": [100, 50], "mode": mode, "inputs": [],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}], "widgets_values": []},
            {"id": 2, "type": "Sampler", "pos": [200, 0], "size": [100, 50], "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "extra", "type": "MODEL", "link": None}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
             "widgets_values": [7, "randomize", "b", 3, "hello"]},
            {"id": 3, "type": "Note", "pos": [0, 100], "size": [100, 50], "mode": 0, "widgets_values": ["a note"]},
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"]],
    }


def test_conversion_maps_widgets_in_definition_order_and_drops_seed_controls_and_notes():
    assert widget_value_count(MINI_DEFS["Sampler"]) == 5
    prompt = ui_to_api(_mini_workflow(), MINI_DEFS)
    assert prompt == {
        "1": {"inputs": {}, "class_type": "Loader", "_meta": {"title": "Loader"}},
        "2": {"inputs": {"seed": 7, "mode": "b", "steps": 3, "label": "hello", "model": ["1", 0]},
              "class_type": "Sampler", "_meta": {"title": "Sampler"}},
    }
    assert check_ui(_mini_workflow(), MINI_DEFS) == [] and check_api(prompt, MINI_DEFS) == []


def test_conversion_leaves_out_muted_nodes_and_their_links():
    prompt = ui_to_api(_mini_workflow(mode=2), MINI_DEFS)
    assert set(prompt) == {"2"} and "model" not in prompt["2"]["inputs"]
    assert any("required input 'model' missing" in e for e in check_api(prompt, MINI_DEFS))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda w: w["nodes"][1]["widgets_values"].pop(1), "4 widget values, the node has 5"),
        (lambda w: w["nodes"][1]["widgets_values"].__setitem__(2, "c"), "'c' is not one of"),
        (lambda w: w["nodes"][1]["widgets_values"].__setitem__(3, 0), "below the minimum"),
        (lambda w: w["nodes"][1]["widgets_values"].__setitem__(1, "sometimes"), "control value"),
        (lambda w: w["links"][0].__setitem__(3, 9), "node 9 does not exist"),
        (lambda w: w["nodes"][1]["inputs"][0].__setitem__("link", None), "names link None"),
        (lambda w: w["nodes"][0].__setitem__("type", "Unknown"), "unknown node type"),
        (lambda w: w.__setitem__("last_link_id", 0), "last_link_id"),
    ],
)
def test_check_ui_names_what_is_wrong(change, expected):
    workflow = copy.deepcopy(_mini_workflow())
    change(workflow)
    errors = check_ui(workflow, MINI_DEFS)
    assert any(expected in e for e in errors), errors


# ---------------------------------------------------------------- the web extension


def test_web_extension_registers_through_the_frontends_app_module():
    source = (REPO / "web" / "duge.js").read_text()
    assert 'from "../../scripts/app.js"' in source
    assert 'const EXTENSION = "duge.unlearning"' in source and "app.registerExtension({\n  name: EXTENSION" in source
    for node_id in ("DugeUnlearn", "DugeLoadConceptSet", "DugeAttentionProbe"):
        assert f'nodeData.name === "{node_id}"' in source
    assert sorted(p.name for p in (REPO / "web").glob("**/*.js")) == ["duge.js"]  # every .js there is loaded
