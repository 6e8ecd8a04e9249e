"""The node pack inside a real ComfyUI (CPU): run with `COMFYUI_PATH=/path/to/ComfyUI pytest -m comfyui`.

In-process tests import ComfyUI from COMFYUI_PATH (CPU selected before `comfy` is imported), load
the pack the way ComfyUI does (`spec_from_file_location` on the checkout's `__init__.py`) and call
the nodes' `execute` under `torch.inference_mode()`, as ComfyUI's executor does. The server test
starts `main.py --cpu` with the pack loaded from this checkout through --extra-model-paths-config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfyui

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy").is_dir():
    pytest.skip("needs a ComfyUI checkout: set COMFYUI_PATH to its folder (and run with -m comfyui)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
NODE_IDS = ["DugeLoadDemoModel", "DugeLoadConceptSet", "DugeUnlearn", "DugeAttentionProbe", "DugeCompareOutputs",
            "DugeSaveUnlearnedCheckpoint", "DugeSaveUnlearningLora"]
TINY_SET = "name: test\nrequests:\n  - target: circle\n    preserve: [square]\n"
UNLEARN_ARGS = dict(steps=3, learning_rate=5e-2, beta=50.0, lambda_prior=1.0, lambda_reg=1.0, setting="sequential",
                    seed=0, trainable="kv", anchor_images=2, sampler_steps=3)

sys.path.insert(0, COMFYUI_PATH)
sys.path.insert(0, str(REPO / "tests"))  # helper modules beside the tests
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from comfyui_server import ComfyServer, status_messages  # noqa: E402
from duge.backends.comfy_run import ComfyPhases  # noqa: E402
from duge.config import UnlearnConfig  # noqa: E402
from duge.image_cache import BUILTIN_SAMPLE_BATCH_SIZE  # noqa: E402

torch.set_num_threads(1)
SCALE = ComfyPhases.SCALE  # ComfyUI's bar counts hundredths of an image or step


@pytest.fixture(scope="module")
def pack():
    """The pack module, loaded from the checkout as ComfyUI's `load_custom_node` loads it."""
    spec = importlib.util.spec_from_file_location("duge_pack_under_test", REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nodes(pack):
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


@pytest.fixture()
def output_dir(tmp_path):
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "output").mkdir()
    yield tmp_path / "output"
    folder_paths.set_output_directory(previous)


@pytest.fixture(scope="module")
def demo(nodes):
    with torch.inference_mode():
        return nodes["DugeLoadDemoModel"].execute().args


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _parameter_objects(model) -> dict[str, int]:
    return {k: id(p) for k, p in model.model.named_parameters()}


def _assert_untouched(model, before):
    after = model.model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"incoming weights changed: {changed[:5]}"
    leftover = [n for n, m in model.model.named_modules() if getattr(m, "weight_function", None)]
    assert not leftover, f"weight wrappers left on {leftover[:5]}"
    assert not model.patches


def _run_unlearn(nodes, model, clip, vae=None, **overrides):
    concept_set = nodes["DugeLoadConceptSet"].execute("(typed text below)", TINY_SET).args[0]
    with torch.inference_mode():
        return nodes["DugeUnlearn"].execute(model, clip, concept_set, vae=vae, **dict(UNLEARN_ARGS, **overrides)).args


def test_pack_exports_only_the_v3_entry_point(pack, nodes):
    assert hasattr(pack, "comfy_entrypoint") and pack.WEB_DIRECTORY == "./web"
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "NODE_CLASS_MAPPINGS would make ComfyUI ignore comfy_entrypoint"
    assert sorted(nodes) == sorted(NODE_IDS)


def test_comfyuis_own_parser_reads_the_registry_metadata(pack):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "duge" and config.tool_comfy.publisher_id == "duge"
    assert config.tool_comfy.display_name.startswith("DUGE")
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_comfyui_version == ">=" + pack.REQUIRED_COMFYUI.split()[0]
    assert config.tool_comfy.web is None  # WEB_DIRECTORY serves web/; a second entry would load duge.js twice


def test_demo_model_matches_the_diffusers_pipeline(demo):
    from duge.models import load_pipeline

    model, clip, vae = demo
    pipe = load_pipeline("builtin")
    prompt = "a red circle with dots"
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize(prompt))
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        reference = pipe.text_encoder(ids)[0]
        assert torch.allclose(cond, reference, atol=1e-4)
        mm.load_models_gpu([model])
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10.0, 600.0])
        out = model.model.diffusion_model(x, t, context=reference.repeat(2, 1, 1))
        assert torch.allclose(out, pipe.unet(x, t, encoder_hidden_states=reference.repeat(2, 1, 1)).sample, atol=1e-4)
        image = vae.decode(x[:1])[0].permute(2, 0, 1)
        assert torch.allclose(image, ((pipe.vae.decode(x[:1]).sample[0] + 1) / 2).clamp(0, 1), atol=1e-4)
    assert vae.downscale_ratio == vae.upscale_ratio == 2


def test_training_differentiates_through_comfyuis_cpu_attention(nodes, demo, monkeypatch):
    """ComfyUI on the CPU attends with sub-quadratic attention, whose chunked path exponentiates in
    place and cannot be differentiated (a real SD 1.5 checkpoint hit it); training goes through
    ComfyUI's SDPA attention via the `optimized_attention_override` hook instead."""
    import comfy.ldm.modules.attention as attention

    model, clip, vae = demo
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_sub_quad)
    monkeypatch.setattr(attention.model_management, "get_free_memory",  # little free memory: kv chunks
                        lambda dev=None, torch_free_too=False: (1, 1) if torch_free_too else 1)
    q = torch.randn(1, 16, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="automatic differentiation"):  # what training met without the hook
        attention.attention_sub_quad(q, q, q, 1).sum().backward()
    edited, lora, report = _run_unlearn(nodes, model, clip, vae, steps=2)
    assert "erase 'circle'" in report


def test_unlearn_returns_an_edit_and_leaves_the_incoming_model_bit_identical(nodes, demo):
    model, clip, vae = demo
    before = _weights(model)
    edited, lora, report = _run_unlearn(nodes, model, clip, vae)
    _assert_untouched(model, before)
    assert "erase 'circle'" in report
    assert len(edited.patches) == len(lora.total) == len(lora.requests[0][1]) == 14  # to_k, to_v of 7 attn2
    assert any(float(d.abs().max()) > 0 for d in lora.total.values())
    mm.load_models_gpu([edited], force_patch_weights=True)
    edited_weights = edited.model_state_dict()
    mm.load_models_gpu([model], force_patch_weights=True)
    _assert_untouched(model, before)
    assert any(not torch.equal(edited_weights[k], before[k]) for k in edited.patches)


def _stock_nodes():
    """ComfyUI's own nodes.py (CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode), not the pack's `nodes/`."""
    stock = importlib.import_module("nodes")
    assert Path(stock.__file__).parent == Path(COMFYUI_PATH), stock.__file__
    return stock


def _share_read_as(evaluator, model, clip, vae, prompt: str, concept: str, images: int = 8, seed: int = 1234) -> float:
    """The share of `images` samples of `prompt` from the stock KSampler (euler, 12 steps, cfg 7.5,
    seeds from `seed`) that the built-in evaluator reads as the object `concept`."""
    stock = _stock_nodes()
    with torch.inference_mode():
        positive = stock.CLIPTextEncode().encode(clip, prompt)[0]
        negative = stock.CLIPTextEncode().encode(clip, "")[0]
        latent = stock.EmptyLatentImage().generate(128, 128, images)[0]  # the demo model's 16x16 latents
        samples = stock.KSampler().sample(model, seed, 12, 7.5, "euler", "normal", positive, negative, latent)[0]
        decoded = stock.VAEDecode().decode(vae, samples)[0]  # [images, 32, 32, 3]
    predicted = evaluator.predict(decoded.permute(0, 3, 1, 2))["object"]
    return sum(p == concept for p in predicted) / len(predicted)


# Settings that erase "circle" from the built-in model (measured with the stock KSampler below:
# circle read in 100 % of the images before, 0 % after; square and heart stay at 100 %). 50 steps
# at learning rate 4e-3 erased circle too, and heart with it.
ERASE_CIRCLE = "name: erase circle\nrequests:\n  - target: circle\n    preserve: [square, heart, crescent, diamond]\n"
ERASE_ARGS = dict(steps=150, learning_rate=2e-3, beta=50.0, lambda_prior=1.0, lambda_reg=1e-5, setting="sequential",
                  seed=0, trainable="kv", anchor_images=16, sampler_steps=20)


def test_edited_models_samples_no_longer_show_the_erased_concept_per_the_evaluator(nodes, demo):
    """DUGE Unlearn on the demo model, then the stock CLIPTextEncode → KSampler → VAEDecode on the
    same seeds before and after (seeds the training never used): the evaluator stops reading the
    erased circle and still reads the kept square."""
    from duge.world.callbacks import builtin_evaluator

    model, clip, vae = demo
    evaluator = builtin_evaluator()
    checks = [("a red circle", "circle"), ("a blue circle with dots", "circle"), ("a green square", "square"),
              ("a yellow heart", "heart")]  # the demo's prompts
    before = {prompt: _share_read_as(evaluator, model, clip, vae, prompt, concept) for prompt, concept in checks}
    concept_set = nodes["DugeLoadConceptSet"].execute("(typed text below)", ERASE_CIRCLE).args[0]
    with torch.inference_mode():
        edited, _, report = nodes["DugeUnlearn"].execute(model, clip, concept_set, vae=vae, **ERASE_ARGS).args
    after = {prompt: _share_read_as(evaluator, edited, clip, vae, prompt, concept) for prompt, concept in checks}
    scores = f"before {before}, after {after}\n{report}"
    assert all(share >= 0.8 for share in before.values()), scores
    assert after["a red circle"] <= 0.3 and after["a blue circle with dots"] <= 0.3, scores
    assert after["a green square"] >= 0.75 and after["a yellow heart"] >= 0.75, scores
    assert _share_read_as(evaluator, model, clip, vae, "a red circle", "circle") == before["a red circle"]  # input untouched


def test_cancel_mid_run_returns_nothing_and_leaves_the_model_unchanged(nodes, demo, output_dir):
    model, clip, _ = demo
    before = _weights(model)
    calls = []

    def hook(value, total, preview, node_id=None):  # what ComfyUI's server installs: it checks Cancel
        calls.append((value, total))
        if total == 10 * SCALE and value == 2 * SCALE:  # the second of the ten training steps
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run_unlearn(nodes, model, clip, steps=10)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert calls and max(v for v, t in calls if t == 10 * SCALE) <= 3 * SCALE, "the run went on after Cancel"
    _assert_untouched(model, before)
    assert not [m for m in mm.current_loaded_models if m.model is not None and m.model.weight_wrapper_patches]
    assert not list(output_dir.rglob("*"))


def _phases(updates):
    """The progress bar's updates split where it restarts (value 0): [(total, [values], previews)]."""
    phases = []
    for value, total, preview, _ in updates:
        if value == 0 or not phases:
            phases.append((total, [], 0))
        if value:
            phases[-1][1].append(value)
        phases[-1] = (total, phases[-1][1], phases[-1][2] + (preview is not None))
    return phases


def test_progress_bar_moves_through_images_training_and_measuring_with_previews(nodes, demo):
    from PIL import Image

    model, clip, vae = demo
    updates = []

    def hook(value, total, preview, node_id=None):  # the server's hook turns these into ws progress + preview
        updates.append((value, total, preview, node_id))

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        concept_set = nodes["DugeLoadConceptSet"].execute("(typed text below)", TINY_SET).args[0]
        from comfy_api.latest import io
        from comfy_api.latest._io import HiddenHolder

        # the node with its hidden unique_id set, as the executor's class clone has it (the clone's
        # own entry point, PREPARE_CLASS_CLONE, changed its argument between 0.3.64 and 0.8.0)
        hidden = HiddenHolder.from_dict({io.Hidden.unique_id: "7"})
        unlearn = type("DugeUnlearnRun", (nodes["DugeUnlearn"],), {"hidden": hidden})
        with torch.inference_mode():
            unlearn.execute(model, clip, concept_set, vae=vae, evaluate=True, **dict(UNLEARN_ARGS, steps=8))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert {n for _, _, _, n in updates} == {"7"}
    (images_total, images, images_previews), (teachers_total, teachers, teachers_previews), \
        (train_total, train, train_previews), (measure_total, measured, measure_previews) = _phases(updates)
    # 2 anchor + 4 related images, 3 sampler steps: the bar moves at every step, not only per batch
    assert images_total == 6 * SCALE and images[-1] == images_total and len(set(images)) == 3 and images_previews == 1
    # the teacher pool: 8 steps x batch 8 = 64 anchor rows and as many related rows, counted as they are done
    assert teachers_total == 128 * SCALE and teachers[-1] == teachers_total and teachers_previews == 0
    assert train_total == 8 * SCALE and sorted(set(train)) == [k * SCALE for k in range(1, 9)]
    assert train_previews == 4  # every quarter of the steps
    # after the request: UA of circle (3 paraphrases x 2 names x 4 images) and 8 images of each of 20 kept concepts
    assert measure_total == (24 + 20 * 8) * SCALE and measured[-1] == measure_total
    # the measurement's images are made in sampler calls of 64 across concepts (duge.measuring.PlannedImages):
    # the bar moves at each of a call's sampler steps (the config's eval_steps), and each call previews its first image
    calls = math.ceil((24 + 20 * 8) / BUILTIN_SAMPLE_BATCH_SIZE)
    assert len(set(measured)) == calls * UnlearnConfig().eval_steps and measure_previews == calls
    kind, image, size = next(p for _, _, p, _ in updates if p is not None)  # what latent_preview sends
    assert kind == "JPEG" and isinstance(image, Image.Image) and image.width >= 128 and size >= 128


def test_saved_lora_loads_with_the_stock_loader_and_reproduces_the_edit(nodes, demo, output_dir, caplog):
    from duge.io import read_manifest

    model, clip, vae = demo
    edited, lora, _ = _run_unlearn(nodes, model, clip, vae)
    with torch.inference_mode():
        path = Path(nodes["DugeSaveUnlearningLora"].execute(lora, "loras/duge_test", 0, False).args[0])
    assert path.parent == output_dir / "loras" and path.suffix == ".safetensors"
    assert read_manifest(path)["requests"][0]["target"] == "circle"
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lora_sd = comfy.utils.load_torch_file(str(path))
        loaded, _ = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)  # what LoraLoader runs
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert set(loaded.patches) == set(edited.patches)
    mm.load_models_gpu([loaded], force_patch_weights=True)
    via_lora = {k: v.clone() for k, v in loaded.model_state_dict().items()}
    mm.load_models_gpu([edited], force_patch_weights=True)
    direct = edited.model_state_dict()
    # rank 0 keeps ΔW's numerical rank (singular values above S_max·max(out, in)·eps are kept), so
    # the round trip is exact up to a small fraction of |ΔW|; a wrong alpha or key is off by ~|ΔW|
    largest_delta = max(float(d.abs().max()) for d in lora.total.values())
    assert max(float((via_lora[k] - direct[k]).abs().max()) for k in direct) < 1e-3 * largest_delta + 1e-6

    from duge.backends.comfy_backend import ComfyBackend

    with torch.inference_mode():
        a = ComfyBackend(loaded, clip, vae).generate(["a circle"], 3, 4, 7.5)
        b = ComfyBackend(edited, clip, vae).generate(["a circle"], 3, 4, 7.5)
    assert torch.allclose(a, b, atol=1e-3)


def test_checkpoint_is_saved_in_the_output_folder_with_the_manifest(nodes, demo, output_dir):
    from duge.io import read_manifest, read_safetensors_metadata

    model, clip, vae = demo
    edited, _, _ = _run_unlearn(nodes, model, clip, vae, steps=1)
    with torch.inference_mode():
        path = Path(nodes["DugeSaveUnlearnedCheckpoint"].execute(edited, clip, vae, "checkpoints/duge").args[0])
        with pytest.raises(Exception, match="output folder"):
            nodes["DugeSaveUnlearnedCheckpoint"].execute(edited, clip, vae, "../outside")
    assert path.parent == output_dir / "checkpoints"
    manifest = read_manifest(path)
    assert manifest["base_model"] == "builtin" and manifest["requests"][0]["target"] == "circle"
    metadata = read_safetensors_metadata(path)  # the modelspec keys beside the manifest (no architecture: demo model)
    assert metadata["modelspec.title"] == path.stem and "'circle'" in metadata["modelspec.description"]
    tensors = comfy.utils.load_torch_file(str(path))
    assert tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[0] < 1000
    assert any(k.startswith("model.diffusion_model.") for k in tensors)
    assert not list(output_dir.parent.glob("outside*"))


def test_probe_and_compare_make_images(nodes, demo):
    model, clip, vae = demo
    edited, _, _ = _run_unlearn(nodes, model, clip, vae, steps=1)
    with torch.inference_mode():
        probed = nodes["DugeAttentionProbe"].execute(model, clip, vae, "a red circle", "circle, red, moon", 0, 4, 7.5,
                                                     model_2=edited)
        grid, scores = nodes["DugeCompareOutputs"].execute(model, edited, clip, vae, "a red circle", 0, 2, 4, 7.5).args
    panel = probed.args[0]
    assert panel.ndim == 4 and panel.shape[-1] == 3 and panel.shape[2] > panel.shape[1]
    # what web/duge.js makes clickable: the panel as a temp image and where each word's tile is
    probe = probed.ui["duge_probe"][0]
    assert probe["columns"] == ["image", "circle", "red", "moon"] and probe["rows"] == ["model", "model 2"]
    assert probe["found"] == [[True, True, False]] * 2 and probe["prompt"] == "a red circle"
    assert (probe["width"], probe["height"]) == (panel.shape[2], panel.shape[1])
    saved = Path(folder_paths.get_temp_directory()) / probe["image"]["subfolder"] / probe["image"]["filename"]
    assert probe["image"]["type"] == "temp" and saved.is_file()
    from PIL import Image

    assert torch.equal(torch.from_numpy(np.asarray(Image.open(saved).convert("RGB"))), (panel[0] * 255).round().byte())
    json.dumps(probed.ui)  # the executor sends it to the browser as JSON
    assert grid.ndim == 4 and grid.shape[-1] == 3
    assert "before · a red circle" in scores and "circle" in scores


def test_concept_set_errors_name_the_field(nodes):
    error = nodes["DugeLoadConceptSet"].validate_inputs("(typed text below)", "name: x\nrequests:\n  - target: ''\n")
    assert isinstance(error, str) and "requests[0].target" in error
    assert nodes["DugeLoadConceptSet"].validate_inputs("demo.yaml", "") is True


def test_concept_sets_in_a_registered_models_folder_are_listed_and_loaded(nodes, tmp_path):
    """A user's file in a `concept_sets` folder (models/concept_sets, or one named in
    extra_model_paths.yaml) shows up in the node's file list; a broken one is refused naming its field."""
    (tmp_path / "mine.yaml").write_text("name: mine\nrequests:\n  - target: heart\n    preserve: [square]\n")
    (tmp_path / "broken.json").write_text('{"name": "b", "requests": [{"target": "circle", "preserve": "square"}]}')
    (tmp_path / "notes.txt").write_text("not a concept set")
    folder_paths.add_model_folder_path("concept_sets", str(tmp_path))  # what extra_model_paths.yaml does
    try:
        options = nodes["DugeLoadConceptSet"].GET_SCHEMA().inputs[0].options
        assert {"mine.yaml", "broken.json"} <= set(options) and "notes.txt" not in options
        concept_set, summary = nodes["DugeLoadConceptSet"].execute("mine.yaml", "").args
        assert [r.target for r in concept_set.requests] == ["heart"] and "erase 'heart', keep square" in summary
        error = nodes["DugeLoadConceptSet"].validate_inputs("broken.json", "")
        assert isinstance(error, str) and "broken.json" in error and "preserve" in error
    finally:
        paths, extensions = folder_paths.folder_names_and_paths["concept_sets"]
        folder_paths.folder_names_and_paths["concept_sets"] = ([p for p in paths if p != str(tmp_path)], extensions)


# ---------------------------------------------------------------- SD 1.5 and SDXL layouts


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds layers without initialising them: give every weight small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _comfy_unet_config(diffusers_config: dict) -> dict:
    """ComfyUI's own config for a UNet layout (`model_detection.unet_config_from_diffusers_unet`)."""
    import comfy.model_detection
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config)
    config = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
    assert config is not None
    return config


SD15_DIFFUSERS = dict(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8)
SDXL_DIFFUSERS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def _layout_model(kind: str):
    """(MODEL, CLIP) with ComfyUI's real SD 1.5 / SDXL UNet config. SD 1.5 at full size; SDXL with 64
    base channels (same keys and block structure, CPU-sized); CLIPs at full width, few layers."""
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    if kind == "sd15":
        config = comfy.supported_models.SD15(_comfy_unet_config(SD15_DIFFUSERS))
        target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        te_options = {"clip_l_model_config": {"num_hidden_layers": 2}}
    else:
        unet_config = dict(_comfy_unet_config(SDXL_DIFFUSERS), model_channels=64)
        config = comfy.supported_models.SDXL(unet_config)
        target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        te_options = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():  # as a checkpoint loader node builds it: inference tensors
        base = config.get_model({}, "")
        _randomize(base.diffusion_model, 0)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
        clip = comfy.sd.CLIP(target, model_options={**te_options, "dtype": torch.float32})
        _randomize(clip.cond_stage_model, 1)
    return model, clip


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sd_layouts_train_and_their_lora_loads_with_no_unmatched_key(kind, output_dir, caplog):
    from duge.backends.comfy_backend import ComfyBackend, training_mode
    from duge.backends.comfy_run import UnlearningLora, save_lora_files
    from duge.concepts import parse_concept_set, resolve_concept_set
    from duge.trainer import UnlearnConfig, unlearn

    from duge.io import model_hash

    model, clip = _layout_model(kind)
    before, objects = model_hash(model.model.state_dict()), _parameter_objects(model)  # a hash: no 3 GB copy
    concept_set = parse_concept_set("name: t\nrequests:\n  - target: Van Gogh\n    anchor: painting\n    preserve: [Monet]\n")
    config = UnlearnConfig(steps=1, batch_size=1, anchor_images=1, related_images=1, sampler_steps=1, learning_rate=1e-2)
    with torch.inference_mode():
        backend = ComfyBackend(model, clip, latent_size=(8, 8))
        assert len(backend.cross_attention_layers()) == (16 if kind == "sd15" else 70)
        with training_mode():
            result = unlearn(backend, resolve_concept_set(concept_set, False, config.setting), config)
        edited = backend.edited_model(result.total_delta)
    assert model_hash(model.model.state_dict()) == before
    assert not [n for n, m in model.model.named_modules() if getattr(m, "weight_function", None)]
    assert _parameter_objects(model) == objects, "the module's own parameter tensors were not put back"
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert len(edited.patches) == 2 * len(backend.cross_attention_layers())
    paths = save_lora_files(UnlearningLora([], result.total_delta, {"format": "test"}), f"loras/{kind}", None, False)
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(paths[0])), 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert set(loaded.patches) == set(edited.patches)
    from duge.backends.comfy_run import base_model_of
    from duge.io import read_safetensors_metadata

    kohya = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind]
    assert read_safetensors_metadata(paths[0])["ss_base_model_version"] == kohya  # from the LoRA's own shapes
    assert base_model_of(model).architecture == {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[kind]


# ---------------------------------------------------------------- the server


DEMO_PROMPT = {  # API form: demo model -> concept set -> DUGE Unlearn -> KSampler -> image, and the LoRA saved
    "1": {"class_type": "DugeLoadDemoModel", "inputs": {}},
    "2": {"class_type": "DugeLoadConceptSet", "inputs": {"file": "(typed text below)", "text": TINY_SET}},
    "3": {"class_type": "DugeUnlearn", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concept_set": ["2", 0],
                                                  "vae": ["1", 2], **dict(UNLEARN_ARGS, steps=2)}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a circle"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
    "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
    "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                               "latent_image": ["6", 0], "seed": 0, "steps": 3, "cfg": 7.5,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "duge_demo"}},
    "10": {"class_type": "DugeSaveUnlearningLora", "inputs": {"lora": ["3", 1], "filename_prefix": "loras/duge_demo",
                                                             "rank": 0, "one_file_per_request": False}},
}


def test_server_loads_the_pack_from_the_checkout_and_runs_the_demo_graph(tmp_path):
    with ComfyServer(COMFYUI_PATH, tmp_path) as server:
        info = server.get("/object_info")
        missing = [n for n in NODE_IDS if n not in info]
        assert not missing, f"not registered: {missing}\n" + server.log_tail()
        assert "demo.yaml" in info["DugeLoadConceptSet"]["input"]["required"]["file"][1]["options"]
        assert info["DugeUnlearn"]["output"] == ["MODEL", "DUGE_LORA", "STRING"]

        entry = server.wait(server.queue(DEMO_PROMPT), timeout=1800)  # a shared CPU can be slow
        assert entry["status"]["status_str"] == "success", status_messages(entry)
        image = entry["outputs"]["9"]["images"][0]
        assert (server.output_dir / image["subfolder"] / image["filename"]).exists()
        assert list((server.output_dir / "loras").glob("duge_demo_*.safetensors"))


@pytest.mark.parametrize("parametrisation", ["eps", "v_prediction"])
def test_noise_comes_from_the_models_own_sampling_and_matches_diffusers(demo, parametrisation):
    import comfy.model_sampling
    from diffusers import DDPMScheduler

    from duge.backends.comfy_backend import ComfyBackend

    model, clip, _ = demo
    if parametrisation == "v_prediction":  # what the stock ModelSamplingDiscrete node does
        class VSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
            pass

        model = model.clone()
        model.add_object_patch("model_sampling", VSampling(model.model.model_config))
    backend = ComfyBackend(model, clip)
    assert backend.prediction_type == ("v_prediction" if parametrisation == "v_prediction" else "epsilon")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 499, 999])
    assert torch.allclose(backend.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-4)


def test_a_second_unlearn_on_the_result_continues_the_session_from_theta0(nodes, demo):
    model, clip, vae = demo
    first, _, _ = _run_unlearn(nodes, model, clip, vae, steps=1)
    concept_set = nodes["DugeLoadConceptSet"].execute("(typed text below)", TINY_SET.replace("circle", "red")).args[0]
    with torch.inference_mode():
        second, lora, report = nodes["DugeUnlearn"].execute(first, clip, concept_set, vae=vae,
                                                             **dict(UNLEARN_ARGS, steps=1)).args
    assert "Continued the session" in report
    assert [r["target"] for r in lora.manifest["requests"]] == ["circle", "red"]
    assert [target for target, _ in lora.requests] == ["red"]
    assert all(len(patches) == 1 for patches in second.patches.values())  # θ0 + total delta, not stacked


@pytest.mark.parametrize("prefix, fragment", [
    ("../outside", "no absolute path, no '..'"),
    ("loras/../../outside", "no absolute path, no '..'"),
    ("/tmp/outside", "no absolute path, no '..'"),
    ("   ", "expected a name inside ComfyUI's output folder"),
    ("link_out/duge", "outside"),  # a symlinked sub-folder of the output folder pointing out of it
])
def test_save_nodes_refuse_filename_prefixes_that_leave_the_output_folder(nodes, output_dir, prefix, fragment):
    from duge.backends.comfy_run import UnlearningLora
    from duge.errors import UnsafePathError

    (output_dir / "link_out").symlink_to(output_dir.parent, target_is_directory=True)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    delta = torch.zeros(64, 128)
    delta[0, 0] = 1.0
    lora = UnlearningLora(requests=[("circle", {module: delta})], total={module: delta}, manifest={})
    before = sorted(p.name for p in output_dir.parent.iterdir())
    with pytest.raises(UnsafePathError, match=fragment):
        nodes["DugeSaveUnlearningLora"].execute(lora, prefix, 0, False)
    assert sorted(p.name for p in output_dir.parent.iterdir()) == before  # nothing written outside
    path = Path(nodes["DugeSaveUnlearningLora"].execute(lora, "loras/duge", 0, False).args[0])
    assert path.parent == output_dir / "loras"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left beside it
