"""The built-in world: generator, tokenizer, model folder, evaluator, sampling command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from duge.cli import main as duge_main
from duge.world.scenes import IMAGE_SIZE, format_caption, render_dataset, render_scene
from duge.world.tokenizer import UNK, to_word_ids, world_words, write_tokenizer
from duge.world.vocabulary import COLOUR_RGB, CONCEPTS, CONCEPTS_BY_KIND, concept_by_name


def test_world_has_enough_concepts_each_with_two_names():
    assert len(CONCEPTS_BY_KIND["object"]) >= 8
    assert len(CONCEPTS_BY_KIND["colour"]) >= 8
    assert len(CONCEPTS_BY_KIND["style"]) >= 5
    all_names = [n for c in CONCEPTS for n in c.names]
    assert len(all_names) == len(set(all_names)), "a name belongs to two concepts"
    assert all(len(c.names) >= 2 for c in CONCEPTS)


def test_render_is_deterministic_per_seed():
    a, scenes_a = render_dataset(20, seed=5)
    b, scenes_b = render_dataset(20, seed=5)
    c, _ = render_dataset(20, seed=6)
    assert np.array_equal(a, b)
    assert [s.caption for s in scenes_a] == [s.caption for s in scenes_b]
    assert not np.array_equal(a, c)
    assert a.shape == (20, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8


def test_captions_name_the_labelled_concepts():
    _, scenes = render_dataset(300, seed=1)
    for s in scenes:
        words = s.caption.split()
        for kind in ("object", "colour", "style"):
            concept = concept_by_name(getattr(s, kind))
            named = [w for w in words if w in sum((c.names for c in CONCEPTS_BY_KIND[kind]), ())]
            # A caption names the right concept of a kind, or none of that kind.
            assert all(w in concept.names for w in named), (s.caption, kind)
    used = {w for s in scenes for w in s.caption.split()}
    for concept in CONCEPTS:
        assert len(set(concept.names) & used) >= 2, f"{concept.name}: captions use only one of its names"


def test_object_pixels_have_the_labelled_colour():
    rng = np.random.default_rng(0)
    for colour, rgb in COLOUR_RGB.items():
        image = render_scene("square", colour, "plain", rng).astype(float) / 255
        centre = image[13:19, 13:19].reshape(-1, 3).mean(0)
        assert np.allclose(centre, np.array(rgb) * centre.max() / max(rgb), atol=0.08), colour


def test_outlined_style_is_hollow_and_plain_is_filled():
    rng = np.random.default_rng(0)
    hollow = render_scene("square", "red", "outlined", rng).astype(float) / 255
    filled = render_scene("square", "red", "plain", np.random.default_rng(0)).astype(float) / 255
    saturation = lambda px: px.max() - px.min()  # noqa: E731
    assert saturation(filled[16, 16]) > 0.5
    assert saturation(hollow[16, 16]) < 0.2


def test_empty_slots_collapse_in_captions():
    assert format_caption("the {object} is {colour} and {style}", "star", "", "dotted") == "the star is dotted"
    assert format_caption("a {style} {colour} {object}", "shape", "", "") == "a shape"


def test_tokenizer_round_trip_and_unknown_words(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    vocab = tokenizer.get_vocab()
    for word in world_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tokenizer.decode(ids).strip() == word
    prompt = "a striped crimson pentagram"
    assert tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids).strip() == prompt
    ids = tokenizer("zebra giraffe #@! circle", add_special_tokens=False).input_ids  # never raises
    word_ids = to_word_ids(ids, vocab).tolist()
    assert word_ids[-1] == vocab["circle</w>"]
    assert set(word_ids[:-1]) <= {vocab[UNK], vocab["a</w>"]}


def test_builtin_model_loads_offline_with_stock_pipeline(monkeypatch):
    from diffusers import StableDiffusionPipeline

    from duge.world.model import BUILTIN_MODEL_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL_DIR, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert all(c % 32 == 0 for c in [*pipe.unet.config.block_out_channels, *pipe.vae.config.block_out_channels])


def test_shipped_weights_are_small():
    from duge.world.model import WEIGHTS_DIR

    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


def test_evaluator_accuracy_on_fresh_render(evaluator):
    images, scenes = render_dataset(400, seed=123_456)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    predicted = evaluator.predict(x)
    for kind in ("object", "colour", "style"):
        accuracy = np.mean([p == getattr(s, kind) for p, s in zip(predicted[kind], scenes)])
        assert accuracy >= 0.97, (kind, accuracy)


def test_sampling_shapes_dtypes_and_determinism(builtin_pipe):
    from duge.world.model import generate

    a = generate(builtin_pipe, ["a red circle", "a dotted shape"], seed=3, steps=4)
    b = generate(builtin_pipe, ["a red circle", "a dotted shape"], seed=3, steps=4)
    assert a.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.float32
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b)


def test_sample_command_writes_grid_and_named_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na dotted blue star\n")
    out = tmp_path / "samples"
    assert duge_main(["sample", "--model", "builtin", "--prompts", str(prompts), "--n", "2",
                      "--seed", "0", "--steps", "3", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_000.png", "000_001.png", "001_000.png", "001_001.png", "grid.png"]
    assert Image.open(out / "000_000.png").size == (IMAGE_SIZE, IMAGE_SIZE)
    grid = tmp_path / "grid.png"
    assert duge_main(["sample", "--prompt", "a star", "--n", "2", "--steps", "3", "--out", str(grid)]) == 0
    assert grid.exists()
    # Same seed, same images; refusing to overwrite without the flag.
    assert duge_main(["sample", "--prompt", "a star", "--n", "2", "--steps", "3", "--out", str(grid)]) == 2


def test_model_path_that_is_not_a_model_gives_clear_error(tmp_path, capsys):
    from duge.errors import ModelLoadError
    from duge.models import load_pipeline

    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path)
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(pickle_file)
    assert duge_main(["sample", "--model", str(tmp_path / "nothing"), "--prompt", "a", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_world_commands(tmp_path, capsys):
    assert duge_main(["world", "concepts", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {c["kind"] for c in doc["concepts"]} == {"object", "colour", "style"}
    assert all(len(c["names"]) >= 2 for c in doc["concepts"])
    out = tmp_path / "render"
    assert duge_main(["world", "render", "--n", "6", "--seed", "2", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert [l["file"] for l in lines] == [f"{i:05d}.png" for i in range(6)]
    assert set(lines[0]) == {"file", "caption", "object", "colour", "style"}
    first = (out / "00000.png").read_bytes()
    out2 = tmp_path / "render2"
    duge_main(["world", "render", "--n", "6", "--seed", "2", "--out", str(out2)])
    assert (out2 / "00000.png").read_bytes() == first
