"""What the ComfyUI nodes call, tested without ComfyUI: concept-set errors, probe heatmaps, comparison
grids, reports, and the pack's entry point on a ComfyUI too old for the V3 schema.

The node classes themselves need ComfyUI (`comfy_api`); tests/test_comfyui.py runs them inside it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from duge.compare import Comparison, comparison_grid, parse_prompts, prompt_concepts, unlearn_report, world_scores
from duge.concepts import ConceptSetError, parse_concept_set
from duge.errors import DugeError
from duge.probe import ProbeResult, heatmap_panel, overlay, panel_layout, parse_words, pil_to_image_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nrequests:\n  - target: ''\n", "requests[0].target"),
        ("name: x\nrequests:\n  - target: circle\n    preserve: [circle]\n", "requests[0]"),
        ("name: x\nrequests:\n  - target: circle\n    templates: ['no slot']\n", "requests[0].templates[0]"),
        ("name: x\nrequests:\n  - target: circle\n    colour: red\n", "colour"),
        ("{name: x, requests: [", "<typed text>"),
    ],
)
def test_typed_concept_set_errors_name_the_field(text, field):
    with pytest.raises(ConceptSetError) as error:
        parse_concept_set(text, source="<typed text>")
    assert field in str(error.value) and "<typed text>" in str(error.value)


def test_typed_concept_set_reads_yaml_and_json():
    assert parse_concept_set("name: x\nrequests:\n  - target: circle\n").requests[0].target == "circle"
    assert parse_concept_set('{"name": "x", "requests": [{"target": "red"}]}').requests[0].target == "red"


def test_probe_words_are_comma_separated_phrases():
    assert parse_words(" circle, Van Gogh ,, red") == ["circle", "Van Gogh", "red"]
    with pytest.raises(DugeError, match="at least one word"):
        parse_words(" , ")


def test_overlay_keeps_the_image_size_and_marks_the_hot_spot():
    image = torch.zeros(3, 32, 32)
    heat = torch.zeros(16, 16)
    heat[:4, :4] = 1.0
    out = overlay(image, heat)
    assert out.shape == (3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert float(out[:, :6, :6].sum()) > float(out[:, -6:, -6:].sum())


def test_heatmap_panel_has_an_image_column_and_one_per_word():
    result = ProbeResult("a red circle", torch.rand(3, 32, 32), torch.rand(2, 16, 16), ["red", "moon"], [True, False])
    panel = heatmap_panel([result, result], ["before", "after"], cell=64)
    assert panel.size == (110 + 3 * 64, 16 + 2 * 64)
    batch = pil_to_image_batch(panel)
    assert batch.shape == (1, panel.size[1], panel.size[0], 3) and batch.dtype == torch.float32
    assert 0 <= float(batch.min()) and float(batch.max()) <= 1


def test_panel_layout_locates_each_words_heatmap_in_the_panel():
    image = torch.zeros(3, 32, 32)
    heat = torch.zeros(2, 16, 16)
    heat[1, 8:, 8:] = 1.0  # "moon" hot in the bottom-right quarter, "red" cold everywhere
    result = ProbeResult("a red moon", image, heat, ["red", "moon"], [True, True])
    layout = panel_layout([result, result], ["before", "after"], cell=64)
    panel = heatmap_panel([result, result], ["before", "after"], cell=64)
    assert panel.size == layout.size and layout.as_dict()["columns"] == ["image", "red", "moon"]
    x, y, w, h = layout.tile(1, 2)  # "after" row, "moon" column
    tile = np.asarray(panel.crop((x, y, x + w, y + h)), dtype=float)
    assert tile[40:, 40:].mean() > tile[:24, :24].mean() + 50  # the hot quarter is where the layout says
    with pytest.raises(DugeError, match="row labels"):
        panel_layout([result], ["before", "after"])


def test_comparison_grid_has_one_row_per_model_and_prompt():
    images = [[torch.rand(2, 3, 32, 32) for _ in range(3)] for _ in range(2)]
    comparison = Comparison(["before", "after"], ["a", "b", "c"], 5, images)
    grid = comparison_grid(comparison, cell=32)
    label_column = grid.width - 2 * 32  # as wide as the longest label ("before · a"), no wider
    assert 60 < label_column < 140 and 6 * 32 < grid.height < 6 * 64
    assert parse_prompts("a red circle\n\n  a blue square  \n") == ["a red circle", "a blue square"]
    with pytest.raises(DugeError):
        parse_prompts("\n \n")


def test_world_scores_count_images_read_as_each_named_concept():
    class Evaluator:
        def predict(self, images):
            n = len(images)
            return {"object": ["circle"] * (n - 1) + ["square"], "colour": ["red"] * n, "style": ["plain"] * n}

    comparison = Comparison(["before"], ["a red disc"], 0, [[torch.rand(4, 3, 32, 32)]])
    scores, text = world_scores(comparison, Evaluator())
    assert [c.name for c in prompt_concepts("a red disc")] == ["red", "circle"]
    assert scores["before"]["a red disc"] == {"red": 1.0, "circle": 0.75}
    assert "before · a red disc: red 100%, circle 75%" in text


def test_unlearn_report_lists_each_request():
    from duge.config import UnlearnConfig
    from duge.results import RequestResult, UnlearnResult

    result = UnlearnResult(UnlearnConfig(), [RequestResult("circle", {}, 1.5, 10, {"total": 0.25}, {"UA": 0.9})], {})
    report = unlearn_report(result, "demo", True, ["a note"])
    assert "erase 'circle': 10 steps in 1.5 s" in report and "UA 0.90" in report and report.endswith("a note")


def test_attention_probe_on_the_builtin_model(builtin_pipe):
    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.probe import probe_attention

    backend = DiffusersBackend(builtin_pipe, device="cpu")
    result = probe_attention(backend, "a red circle", ["circle", "moon"], seed=0, steps=3, timesteps=(300, 700))
    assert result.image.shape == (3, 32, 32)
    assert result.heatmaps.shape == (2, 16, 16)
    assert result.found == [True, False]
    assert float(result.heatmaps[0].max()) == pytest.approx(1.0) and float(result.heatmaps[1].abs().max()) == 0


def test_pack_on_a_comfyui_without_v3_registers_nothing_and_says_what_it_needs():
    script = textwrap.dedent(f"""
        import importlib.util, logging, sys
        sys.modules["comfy_api"] = None  # a ComfyUI from before the V3 schema
        records = []
        logging.getLogger().addHandler(type("H", (logging.Handler,), {{"emit": lambda self, r: records.append(r.getMessage())}})())
        spec = importlib.util.spec_from_file_location("duge_pack", {str(REPO / "__init__.py")!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["duge_pack"] = module
        spec.loader.exec_module(module)
        assert module.NODE_CLASS_MAPPINGS == {{}} and not hasattr(module, "comfy_entrypoint")
        assert any("0.3.60" in r for r in records), records
        assert "torch" not in sys.modules, "importing the pack must stay cheap"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_node_schemas_have_unique_ids_when_comfyui_is_present():
    pytest.importorskip("comfy_api.latest", reason="the node classes need ComfyUI's comfy_api (tests/test_comfyui.py)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("duge_pack_schemas", REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ids = [cls.GET_SCHEMA().node_id for cls in sys.modules["duge_pack_schemas.nodes"].NODES]
    assert len(ids) == len(set(ids)) == 7
