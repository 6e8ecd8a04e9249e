"""Hostile weight files: crafted safetensors byte by byte, NaN/inf, shapes that do not fit, pickles.

Every one must give a ModelLoadError naming the file and the tensor — never a crash in torch or
the safetensors library — and a pickle must never run code.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from duge import io, models
from duge.cli import main
from duge.errors import ModelLoadError
from duge.models import load_pipeline
from duge.safe_weights import MAX_HEADER_BYTES, load_tensors, read_header


def craft(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A file laid out like safetensors: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "empty file": (b"", None, b"", "the file has 0 bytes; expected at least the 8-byte header length"),
    "huge header length": ({"a": entry()}, 2**63, bytes(8), f"the header claims {2**63} bytes; expected at most {MAX_HEADER_BYTES}"),
    "header longer than the file": ({"a": entry()}, 10_000, bytes(8), "the header claims 10000 bytes but only"),
    "header not utf-8": (b'{"a\xff": 1}', None, b"", "the header is not UTF-8"),
    "header not json": (b"{not json", None, b"", "the header is not JSON"),
    "header nested deeply": (b"[" * 100_000, None, b"", "the header is not JSON"),
    "header a list": (b"[1, 2]", None, b"", "the header is a JSON list; expected a JSON object"),
    "metadata not strings": ({"__metadata__": {"k": 1}}, None, b"", "__metadata__ must map strings to strings"),
    "unknown dtype": ({"w": entry(dtype="F128")}, None, bytes(8), "tensor 'w': unknown dtype 'F128'"),
    "negative dimension": ({"w": entry(shape=(-2,))}, None, bytes(8), "tensor 'w': shape [-2] is not a list of non-negative"),
    "boolean dimension": ({"w": entry(shape=(True,))}, None, bytes(8), "tensor 'w': shape [True] is not a list"),
    "offsets reversed": ({"w": entry(offsets=(8, 0))}, None, bytes(8), "tensor 'w': data_offsets [8, 0] is not [begin, end]"),
    "size not shape x dtype": ({"w": entry(shape=(3,))}, None, bytes(8), "tensor 'w': shape [3] of F32 needs 12 bytes, its data_offsets [0, 8] give 8"),
    "huge shape": ({"w": entry(shape=(2**40, 2**40))}, None, bytes(8), "tensor 'w': shape [1099511627776, 1099511627776] of F32 needs"),
    "truncated data": ({"w": entry(shape=(4,), offsets=(0, 16))}, None, bytes(8), "tensor 'w': its data ends at byte 16 but the file holds only 8 bytes of data"),
    "overlapping tensors": ({"a": entry(), "b": entry(offsets=(4, 12))}, None, bytes(12), "tensor 'b' (data_offsets [4, 12]) overlaps the tensor before it"),
    "gap between tensors": ({"a": entry(), "b": entry(offsets=(12, 20))}, None, bytes(20), "tensor 'b' (data_offsets [12, 20]) leaves bytes 8..12 unused"),
    "trailing bytes": ({"a": entry()}, None, bytes(12), "the tensors cover 8 bytes of data but the file holds 12"),
    "entry with extra field": ({"a": {**entry(), "code": "x"}}, None, bytes(8), "tensor 'a': expected an object with exactly dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_crafted_safetensors_are_refused_naming_file_and_tensor(tmp_path, case):
    header, length, data, expected = HOSTILE[case]
    path = craft(tmp_path / "bad.safetensors", header, data, length) if header != b"" or data else tmp_path / "bad.safetensors"
    if case == "empty file":
        path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as error:
        load_tensors(path)
    message = str(error.value)
    assert message.startswith(f"'{path}' is not a valid safetensors file: "), message
    assert expected in message
    for reader in (io.read_manifest, io.load_lora):  # every reader goes through the same check
        with pytest.raises(ModelLoadError, match="is not a valid safetensors file"):
            reader(path)


def test_files_written_by_safetensors_pass_the_checks(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(7), "bool": torch.tensor([True, False]), "u8": torch.arange(3, dtype=torch.uint8),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"} and set(header.tensors) == set(tensors)
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_weights_are_refused_naming_the_tensor(tmp_path, bad):
    weights = torch.zeros(10)
    weights[3] = bad
    path = tmp_path / "w.safetensors"
    save_file({"fine": torch.ones(2), "layer.weight": weights.half()}, str(path))
    with pytest.raises(ModelLoadError, match=r"tensor 'layer.weight' holds 1 NaN/inf value\(s\) of 10"):
        load_tensors(path)
    assert not torch.isfinite(load_tensors(path, finite=False)["layer.weight"][3])  # finite=False: read as it is


@pytest.fixture(scope="module")
def single_file(builtin_pipe, tmp_path_factory):
    return io.save_single_file(builtin_pipe, tmp_path_factory.mktemp("single") / "model.safetensors", None,
                               dtype=torch.float16)


def _rewritten(single_file, tmp_path, change) -> Path:
    checkpoint = load_file(str(single_file))
    metadata = read_header(single_file).metadata
    change(checkpoint)
    path = tmp_path / "changed.safetensors"
    save_file(checkpoint, str(path), metadata=metadata)
    return path


KEY = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"


def test_single_file_with_a_wrong_shape_names_the_tensor(single_file, tmp_path):
    def change(checkpoint):
        checkpoint[KEY] = torch.zeros(3, 3, dtype=torch.float16)

    with pytest.raises(ModelLoadError, match=r"changed.safetensors': tensor '.*attn2.to_k.weight' of the UNet has "
                                             r"shape \[3, 3\]; the model expects \[64, 128\]"):
        models.load_single_file_pipeline(_rewritten(single_file, tmp_path, change))


def test_single_file_with_an_integer_weight_names_the_dtype(single_file, tmp_path):
    def change(checkpoint):
        checkpoint[KEY] = torch.zeros(checkpoint[KEY].shape, dtype=torch.int32)

    with pytest.raises(ModelLoadError, match=r"tensor '.*attn2.to_k.weight' of the UNet is int32; the model expects float32"):
        models.load_single_file_pipeline(_rewritten(single_file, tmp_path, change))


def test_single_file_with_nan_or_cut_short_is_refused(single_file, tmp_path):
    def change(checkpoint):
        checkpoint[KEY][0, 0] = float("nan")

    with pytest.raises(ModelLoadError, match=f"tensor '{KEY}' holds 1 NaN/inf"):
        models.load_single_file_pipeline(_rewritten(single_file, tmp_path, change))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="a truncated file"):
        load_pipeline(cut)
    assert main(["sample", "--model", str(cut), "--prompt", "a circle", "--out", str(tmp_path / "x.png")]) == 2


def test_lora_with_nan_or_the_wrong_shape_is_refused(builtin_pipe, tmp_path):
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    delta = torch.zeros(64, 64)
    delta[0, 0] = 1.0
    path = io.save_lora({module: delta}, tmp_path / "wrong.safetensors", None)
    deltas, _ = io.load_lora(path)
    with pytest.raises(ModelLoadError, match=f"the LoRA's ΔW of '{module}' has shape \\[64, 64\\]; the UNet's weight is"):
        io.apply_lora_deltas(builtin_pipe.unet, deltas)
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    with pytest.raises(ModelLoadError, match=f"inf.safetensors': tensor '{name}' holds 1 NaN/inf"):
        io.load_lora(tmp_path / "inf.safetensors")


@pytest.fixture(scope="module")
def folder(builtin_pipe, tmp_path_factory):
    return io.save_diffusers_folder(builtin_pipe, tmp_path_factory.mktemp("folder") / "model", None)


def test_diffusers_folder_with_broken_or_pickled_weights_is_refused(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"'{weights}' is not a valid safetensors file: the header claims"):
        load_pipeline(broken)

    pickled = shutil.copytree(folder, tmp_path / "pickled")
    weights = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model.bin' is pickled and '.*vae' has no "
                                             r"\.safetensors weights"):
        load_pipeline(pickled)


def test_diffusers_folder_with_a_wrong_shape_names_the_tensor(folder, tmp_path):
    changed = shutil.copytree(folder, tmp_path / "changed")
    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match=f"could not load '{changed}'.*{name} expected shape "
                                             r"torch.Size\(\[64, 128\]\), but got torch.Size\(\[3, 3\]\)"):
        load_pipeline(changed)


def test_diffusers_folder_with_nan_weights_names_component_and_parameter(folder, tmp_path):
    poisoned = shutil.copytree(folder, tmp_path / "poisoned")
    weights = poisoned / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
    tensors[name][1, 1] = float("nan")
    save_file(tensors, str(weights), metadata=read_header(weights).metadata)
    with pytest.raises(ModelLoadError, match=r"text_encoder weight '.*q_proj.weight' holds NaN/inf"):
        load_pipeline(poisoned)


# ---------------------------------------------------------------- pickles


class RunsCode:
    """A pickle payload that would create a file if unpickled by a plain `pickle.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    for read in (load_tensors, io.load_lora, models.load_single_file_pipeline, load_pipeline):
        with pytest.raises(ModelLoadError) as error:
            read(path)
        message = str(error.value)
        assert f"'{path}' is a pickled" in message
        assert "Convert it to safetensors" in message and "--allow-pickle" in message
    assert main(["sample", "--model", str(path), "--prompt", "a circle", "--out", str(tmp_path / "x.png")]) == 2


def test_allow_pickle_reads_tensors_only_and_never_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, hostile)
    with pytest.raises(ModelLoadError, match="hostile.ckpt': refused — the pickle asks for objects that weights-only"):
        load_tensors(hostile, allow_pickle=True)
    assert not marker.exists()

    benign = tmp_path / "benign.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "b": torch.zeros(3)}, "global_step": 7}, benign)
    tensors = load_tensors(benign, allow_pickle=True)
    assert sorted(tensors) == ["b", "w"] and torch.equal(tensors["w"], torch.ones(2))
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}}, benign)
    with pytest.raises(ModelLoadError, match="tensor 'w' holds 1 NaN/inf"):
        load_tensors(benign, allow_pickle=True)


def test_allow_pickle_loads_a_checkpoint_like_its_safetensors_twin(single_file, tmp_path):
    from duge.world.model import BUILTIN_MODEL_DIR

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single_file)), "global_step": 1}, checkpoint)
    pipe = models.load_single_file_pipeline(checkpoint, allow_pickle=True, config_dir=BUILTIN_MODEL_DIR)
    twin = models.load_single_file_pipeline(single_file)
    a, b = pipe.unet.state_dict(), twin.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pickles_are_refused_on_a_torch_with_a_bypassable_weights_only_loader(tmp_path, monkeypatch):
    from duge import safe_weights

    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(1)}, path)
    monkeypatch.setattr(safe_weights, "MIN_TORCH_FOR_PICKLES", "99.0")  # as if this torch were older than needed
    with pytest.raises(ModelLoadError, match="its weights-only loader can be bypassed \\(CVE-2025-32434\\)"):
        load_tensors(path, allow_pickle=True)
