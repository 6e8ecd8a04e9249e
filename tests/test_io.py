"""Saving and loading: key layouts, diffusers folders, single files, LoRAs, manifests, write safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from duge import io, keys, models
from duge.errors import DugeError, ModelLoadError, OutputExistsError

# The real SD 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), written inline.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# Modules of the tiny UNet a LoRA test changes: attn1/attn2 projections of several shapes (so that
# the exact factorisation gives different ranks) and a 1x1-conv proj_in.
LORA_MODULES = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # [64, 128] -> rank 64
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",  # [128, 128] -> rank 128
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.proj_in",  # 1x1 conv [64, 64, 1, 1]
)


def build_tiny_pipeline(tmp_path: Path, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from duge.world.architecture import text_encoder_config, unet_config, vae_config
    from duge.world.model import assemble_pipeline
    from duge.world.tokenizer import write_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / f"tokenizer-{seed}"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer))))
    return assemble_pipeline(unet.eval(), text_encoder.eval(), vae.eval(), tokenizer)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a training job may share this machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def manifest():
    return io.make_manifest(
        "duge",
        [
            {
                "target": "star",
                "anchor": "shape",
                "preserve": ["circle"],
                "settings": {"steps": 3},
                "metrics": {"ua": torch.tensor(0.5)},
            }
        ],
        base_model_hash="0" * 64,
        base_model="builtin",
        extra={"note": "test"},
    )


def assert_same_state(expected: dict, actual: dict):
    assert set(expected) == set(actual)
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key


def random_deltas(unet, modules=LORA_MODULES, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    return {m: scale * torch.randn(params[f"{m}.weight"].shape, generator=generator) for m in modules}


# --- key layouts ---------------------------------------------------------------------------------


def test_sd15_unet_keys_all_map_round_trip_and_match_known_ldm_names():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    state = unet.state_dict()
    ldm = keys.unet_to_ldm(state, unet.config)
    assert len(ldm) == len(state) == 686
    assert list(keys.unet_from_ldm(ldm, unet.config)) == list(state)
    for name in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' "v1" marker key
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
    ):
        assert name in ldm, name
    assert keys.unet_module_to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn2", unet.config) == (
        "input_blocks.4.1.transformer_blocks.0.attn2"
    )
    assert keys.unet_module_from_ldm("output_blocks.3.0.in_layers.2", unet.config) == "up_blocks.1.resnets.0.conv1"


def test_unet_keys_agree_with_diffusers_own_single_file_converter(tiny_pipe):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET_CONFIG)
    for unet in (sd15, tiny_pipe.unet):
        state = unet.state_dict()
        converted = convert_ldm_unet_checkpoint(keys.unet_to_ldm(state, unet.config), dict(unet.config))
        assert set(converted) == set(state)
        assert all(converted[k] is state[k] for k in state)


def test_vae_keys_round_trip_with_conv_shaped_attention_and_match_diffusers(tiny_pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny_pipe.vae
    state = vae.state_dict()
    ldm = keys.vae_to_ldm(state, vae.config)
    channels = vae.config.block_out_channels[-1]
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (channels, channels, 1, 1)
    assert ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (channels, channels, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ldm  # decoder up blocks reversed
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in ldm
    assert_same_state(state, keys.vae_from_ldm(ldm, vae.config))
    assert_same_state(state, convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config)))


def test_text_encoder_keys_for_transformers_v4_and_v5_layouts(tiny_pipe):
    v5 = tiny_pipe.text_encoder.state_dict()
    assert "embeddings.token_embedding.weight" in v5  # transformers v5: no text_model. prefix
    v4 = {keys.HF_TEXT_MODEL_PREFIX + k: v for k, v in v5.items()}
    v4["text_model.embeddings.position_ids"] = torch.arange(4)[None]
    ldm = keys.text_encoder_to_ldm(v5)
    assert keys.text_encoder_to_ldm(v4) == ldm  # position ids are not written
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ldm
    assert_same_state(v5, keys.text_encoder_from_ldm(ldm))
    v4.pop("text_model.embeddings.position_ids")
    assert_same_state(v4, keys.text_encoder_from_ldm(ldm, text_model_prefix=True))
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm.items()}
    assert_same_state(v5, keys.text_encoder_from_ldm(legacy))


def test_kohya_lora_names_round_trip_for_every_sd15_and_tiny_module(tiny_pipe):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert (
        keys.lora_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
        == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    )
    for unet in (sd15, tiny_pipe.unet):
        for key in unet.state_dict():
            module = key.rpartition(".")[0]
            assert keys.module_path_from_lora_name(keys.lora_name(module)) == module
    with pytest.raises(keys.KeyLayoutError):
        keys.module_path_from_lora_name("lora_te_text_model_encoder_layers_0_mlp_fc1")


def test_unsupported_unet_block_type_is_named():
    config = dict(SD15_UNET_CONFIG, down_block_types=("SimpleCrossAttnDownBlock2D",) * 4)
    with pytest.raises(keys.KeyLayoutError, match="SimpleCrossAttnDownBlock2D"):
        keys.unet_layout(config)


# --- diffusers folder ----------------------------------------------------------------------------


def test_diffusers_folder_round_trip_with_manifest(tiny_pipe, tmp_path, manifest):
    from diffusers import StableDiffusionPipeline

    out = io.save_diffusers_folder(tiny_pipe, tmp_path / "model", manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict())
    assert io.read_manifest(out) == manifest
    for weights in out.rglob("*.safetensors"):
        assert io.read_manifest(weights) == manifest


# --- single file ---------------------------------------------------------------------------------


def test_single_file_round_trip_maps_every_key_and_samples_the_same(tiny_pipe, tmp_path, manifest):
    from duge.world.model import generate

    path = io.save_single_file(tiny_pipe, tmp_path / "model.safetensors", manifest)
    checkpoint = load_file(str(path))
    parts = keys.split_ldm_checkpoint(checkpoint)
    assert not parts.unknown and not parts.ignored
    sizes = {name: len(getattr(tiny_pipe, name).state_dict()) for name in ("unet", "vae", "text_encoder")}
    assert (len(parts.unet), len(parts.vae), len(parts.text_encoder)) == (sizes["unet"], sizes["vae"], sizes["text_encoder"])
    assert io.read_manifest(path) == manifest
    assert io.model_hash(checkpoint) == io.model_hash(tiny_pipe)

    loaded = models.load_single_file_pipeline(path)  # configs come from the file's own metadata
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict())
    before = generate(tiny_pipe, ["a red star"], seed=3, steps=2)
    after = generate(loaded, ["a red star"], seed=3, steps=2)
    assert torch.equal(before, after)


def test_single_file_loads_with_diffusers_from_single_file(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = io.save_single_file(tiny_pipe, tmp_path / "model.safetensors", None)
    config = tmp_path / "config"  # configs and tokenizer only: the weights must come from the file
    for name, text in io.pipeline_config_files(tiny_pipe).items():
        (config / name).parent.mkdir(parents=True, exist_ok=True)
        (config / name).write_text(text, encoding="utf-8")
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict())
    ours = models.load_single_file_pipeline(path, config_dir=config)
    assert_same_state(tiny_pipe.unet.state_dict(), ours.unet.state_dict())


def test_single_file_without_configs_asks_for_a_config_folder(tiny_pipe, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in io.pipeline_to_ldm_state_dict(tiny_pipe).items()}, str(path))
    with pytest.raises(ModelLoadError, match="--config"):
        models.load_single_file_pipeline(path)


def test_single_file_finds_configs_in_the_local_base_model_named_by_its_manifest(tiny_pipe, tmp_path):
    base = io.save_diffusers_folder(tiny_pipe, tmp_path / "base", None)
    path = tmp_path / "edited.safetensors"
    manifest = io.make_manifest("duge", [{"target": "star"}], None, base_model=base)
    state = {k: v.contiguous() for k, v in io.pipeline_to_ldm_state_dict(tiny_pipe).items()}
    save_file(state, str(path), metadata=io.manifest_metadata(manifest))  # no duge_config
    loaded = models.load_single_file_pipeline(path)
    assert_same_state(tiny_pipe.unet.state_dict(), loaded.unet.state_dict())


def test_single_file_with_a_missing_tensor_names_it(tiny_pipe, tmp_path):
    path = io.save_single_file(tiny_pipe, tmp_path / "model.safetensors", None)
    checkpoint = load_file(str(path))
    missing = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    del checkpoint[missing]
    checkpoint["model.diffusion_model.input_blocks.3.1.bogus.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.safetensors"
    save_file(checkpoint, str(broken), metadata=io.read_safetensors_metadata(path))
    with pytest.raises(ModelLoadError) as error:
        models.load_single_file_pipeline(broken)
    assert "transformer_blocks.0.attn2.to_k.weight" in str(error.value) and "bogus" in str(error.value)


def test_single_file_dtype_halves_the_file(tiny_pipe, tmp_path):
    full = io.save_single_file(tiny_pipe, tmp_path / "fp32.safetensors", None)
    half = io.save_single_file(tiny_pipe, tmp_path / "fp16.safetensors", None, dtype=torch.float16)
    assert {t.dtype for t in load_file(str(half)).values()} == {torch.float16}
    assert half.stat().st_size < 0.6 * full.stat().st_size


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_exact_rank_round_trip_and_apply(tiny_pipe, tmp_path, manifest):
    unet = tiny_pipe.unet
    theta0 = {k: v.clone() for k, v in unet.state_dict().items()}
    deltas = random_deltas(unet)
    path = io.save_lora(deltas, tmp_path / "edit.safetensors", manifest)
    tensors = load_file(str(path))
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{to_k}.lora_down.weight"].shape == (64, 128)  # exact: rank = min(out, in)
    assert tensors[f"{to_k}.lora_up.weight"].shape[1] == 64
    assert len({float(v) for k, v in tensors.items() if k.endswith(".alpha")}) == 1  # one alpha per file

    loaded, loaded_manifest = io.load_lora(path)
    assert loaded_manifest == manifest == io.read_manifest(path)
    assert set(loaded) == set(deltas)
    for module, delta in deltas.items():
        assert (loaded[module] - delta).abs().max() < 1e-5, module

    edited = io.apply_lora_deltas(unet, loaded, strength=1.0)
    assert_same_state(theta0, unet.state_dict())  # the input UNet is untouched
    for key, value in edited.items():
        module = key.removesuffix(".weight")
        expected = theta0[key] + deltas[module] if module in deltas else theta0[key]
        assert torch.allclose(value, expected, atol=1e-5), key


def test_lora_truncated_rank_is_the_best_low_rank_approximation(tiny_pipe, tmp_path):
    module = LORA_MODULES[0]
    delta = random_deltas(tiny_pipe.unet, modules=[module])[module]
    path = io.save_lora({module: delta}, tmp_path / "rank2.safetensors", None, rank=2)
    assert load_file(str(path))[f"{keys.lora_name(module)}.lora_down.weight"].shape[0] == 2
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(io.load_lora(path)[0][module].double(), best, atol=1e-5)


def test_lora_loads_in_diffusers_and_fuses_to_the_edited_weights(tiny_pipe, tmp_path):
    pipe = build_tiny_pipeline(tmp_path)
    theta0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    deltas = random_deltas(pipe.unet)
    path = io.save_lora(deltas, tmp_path / "edit.safetensors", None)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for key, value in fused.items():
        module = key.removesuffix(".weight")
        expected = theta0[key] + deltas[module] if module in deltas else theta0[key]
        assert torch.allclose(value, expected, atol=1e-5), key


def test_lora_from_a_peft_adapter_keeps_its_product(tmp_path):
    from peft import LoraConfig

    pipe = build_tiny_pipeline(tmp_path, seed=1)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["attn2.to_k", "attn2.to_v"], init_lora_weights=False))
    factors = io.lora_factors_from_peft(unet)
    cross_attention_layers = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert len(factors) == 2 * len(cross_attention_layers)
    expected = {}
    for name, module in unet.named_modules():
        if name in factors:
            expected[name] = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    path = io.save_lora(factors, tmp_path / "peft.safetensors", None)
    loaded, _ = io.load_lora(path)
    for name, delta in expected.items():
        assert torch.allclose(loaded[name], delta.detach(), atol=1e-5), name


def test_apply_lora_deltas_in_place_and_shape_check(tmp_path):
    pipe = build_tiny_pipeline(tmp_path, seed=2)
    unet = pipe.unet
    module = LORA_MODULES[0]
    weight = unet.get_submodule(module).weight
    before = weight.detach().clone()
    delta = torch.ones_like(before)
    io.apply_lora_deltas_(unet, {module: delta}, strength=0.5)
    assert torch.allclose(weight.detach(), before + 0.5)
    with pytest.raises(ModelLoadError, match="shape"):
        io.apply_lora_deltas(unet, {module: torch.ones(3, 3)})
    with pytest.raises(ModelLoadError, match="does not have"):
        io.apply_lora_deltas(unet, {"down_blocks.9.nothing": delta})


# --- manifest, hashing, write safety -------------------------------------------------------------


def test_manifest_is_plain_json_with_every_request_field(manifest):
    assert manifest["requests"][0]["metrics"] == {"ua": 0.5}
    assert manifest["version"] == __import__("duge").__version__
    assert json.loads(io.manifest_metadata(manifest)[io.MANIFEST_KEY]) == manifest
    request = io.make_manifest("duge", [{"target": "star", "steps": 3}], None, "builtin")["requests"][0]
    assert request == {"target": "star", "anchor": None, "preserve": [], "settings": {}, "metrics": {}, "steps": 3}
    with pytest.raises(DugeError, match="target"):
        io.make_manifest("duge", [{"anchor": "shape"}], None, "builtin")
    with pytest.raises(DugeError, match="manifest"):
        io.make_manifest("duge", [{"target": "star", "settings": {"model": object()}}], None, "builtin")


def test_model_hash_follows_the_weights(tiny_pipe):
    state = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.float16)}
    digest = io.model_hash(state)
    assert digest == io.model_hash(dict(reversed(list(state.items()))))
    assert len(digest) == 64
    changed = dict(state, b=torch.tensor([1.0, 1.0, 2.0]))
    assert io.model_hash(changed) != digest
    assert io.model_hash(dict(state, a=state["a"].float())) != digest  # dtype is part of the model
    assert io.model_hash(tiny_pipe.unet) == io.model_hash(tiny_pipe.unet.state_dict())


def test_outputs_are_not_overwritten_unless_asked(tiny_pipe, tmp_path):
    deltas = random_deltas(tiny_pipe.unet, modules=LORA_MODULES[:1])
    lora = io.save_lora(deltas, tmp_path / "edit.safetensors", None)
    with pytest.raises(OutputExistsError):
        io.save_lora(deltas, lora, None)
    io.save_lora(deltas, lora, None, overwrite=True)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"previous")
    with pytest.raises(OutputExistsError):
        io.save_single_file(tiny_pipe, single, None)
    assert single.read_bytes() == b"previous"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("previous")
    with pytest.raises(OutputExistsError):
        io.save_diffusers_folder(tiny_pipe, folder, None)
    assert (folder / "keep.txt").read_text() == "previous"
    io.save_diffusers_folder(tiny_pipe, folder, None, overwrite=True)
    assert (folder / "model_index.json").exists() and not (folder / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_interrupted_writes_leave_the_previous_output(tiny_pipe, tmp_path, monkeypatch):
    deltas = random_deltas(tiny_pipe.unet, modules=LORA_MODULES[:1])
    lora = tmp_path / "edit.safetensors"
    lora.write_bytes(b"previous")
    single = tmp_path / "model.safetensors"

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", broken_save_file)
    with pytest.raises(KeyboardInterrupt):
        io.save_lora(deltas, lora, None, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        io.save_single_file(tiny_pipe, single, None)
    assert lora.read_bytes() == b"previous"
    assert not single.exists()
    monkeypatch.undo()

    folder = tmp_path / "folder"
    io.save_diffusers_folder(tiny_pipe, folder, None)
    previous = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    class BrokenPipe:
        def save_pretrained(self, directory, **kwargs):
            (Path(directory) / "model_index.json").write_text("{}")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_diffusers_folder(BrokenPipe(), folder, None, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_diffusers_folder(BrokenPipe(), tmp_path / "new", None)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == previous
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.safetensors", "folder"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    for read in (io.load_lora, io.read_manifest, models.load_single_file_pipeline):
        with pytest.raises(ModelLoadError, match="safetensors"):
            read(path)
    with pytest.raises(DugeError, match=".safetensors"):
        io.save_lora({LORA_MODULES[0]: torch.ones(2, 2)}, path.with_suffix(suffix + "x"), None)
    assert path.read_bytes() == b"not read"
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_models_without_a_manifest_read_as_none(tiny_pipe, tmp_path):
    folder = io.save_diffusers_folder(tiny_pipe, tmp_path / "plain", None)
    assert io.read_manifest(folder) is None
    assert io.read_manifest(folder / "unet" / "diffusion_pytorch_model.safetensors") is None


def test_files_of_other_architectures_are_refused_naming_the_layout(tiny_pipe, tmp_path):
    from duge.layouts import UnsupportedLayoutError

    path = io.save_single_file(tiny_pipe, tmp_path / "model.safetensors", None)
    checkpoint = load_file(str(path))
    refiner = {k: v for k, v in checkpoint.items() if not k.startswith("cond_stage_model.")}
    refiner["conditioner.embedders.0.model.text_projection"] = torch.zeros(4, 4)
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(UnsupportedLayoutError, match="SDXL refiner"):
        models.load_single_file_pipeline(tmp_path / "refiner.safetensors")
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)}
    save_file(sd3, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(UnsupportedLayoutError, match="Stable Diffusion 3"):
        models.load_single_file_pipeline(tmp_path / "sd3.safetensors")
    inpainting = dict(checkpoint)
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(inpainting, str(tmp_path / "inpainting.safetensors"))
    with pytest.raises(UnsupportedLayoutError, match="9 input channels"):
        models.load_single_file_pipeline(tmp_path / "inpainting.safetensors")
