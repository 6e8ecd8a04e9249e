"""Reading weight files that may come from strangers: checked safetensors, and pickles only by opt-in.

A safetensors file is 8 bytes of header length N (little-endian), N bytes of JSON header, then the
tensor data. `read_header` checks all of it against the file before any tensor is touched: N
within safetensors' own 100 MiB limit and within the file, the header UTF-8 JSON of the right
shape, every tensor's dtype known, its shape non-negative integers, its byte range the size its
shape and dtype need, inside the file, and the ranges covering the data without overlap or gap.
Only then does `load_tensors` let the safetensors library read the tensors, and it checks that
every floating-point tensor is finite. Each problem raises `ModelLoadError` naming the file, the
tensor and what was expected — never a crash deep in torch.

Pickled files (`.ckpt`, `.pt`, `.pth`, `.bin`, ...) can run code when loaded. They are refused
with a message saying how to convert them, unless the caller opts in (`allow_pickle=True`, the
command line's `--allow-pickle`); then they are read with `torch.load(weights_only=True)`, which
builds tensors and plain containers only and refuses any other object the pickle asks for.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import ModelLoadError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MIN_TORCH_FOR_PICKLES = "2.6"  # torch.load(weights_only=True) before 2.6: CVE-2025-32434
HEADER_LENGTH_BYTES = 8
# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "I16": (torch.int16, 2),
    "U16": (getattr(torch, "uint16", None), 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (getattr(torch, "uint32", None), 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (getattr(torch, "uint64", None), 8),
    "F64": (torch.float64, 8),
}

PICKLE_HELP = (
    "pickles can run code when loaded, so they are not read by default. Convert it to safetensors in an "
    "environment you trust, e.g. `python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('IN', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'OUT.safetensors')\"`, "
    "or load it in ComfyUI and save it with CheckpointSave; or, if you trust it, pass --allow-pickle "
    "(allow_pickle=True), which reads it with torch.load(weights_only=True)"
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it; `begin`/`end` are offsets into the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_bytes: int


def is_pickle_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def require_safetensors(path: str | Path) -> Path:
    """`path` if it names a .safetensors file; ModelLoadError for pickles and anything else."""
    path = Path(path)
    if is_pickle_path(path):
        raise ModelLoadError(f"'{path}' is a pickled file ({path.suffix.lower()}); {PICKLE_HELP}")
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ModelLoadError(f"'{path}' is not a .safetensors file; expected a path ending in .safetensors")
    return path


def _bad(path: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"'{path}' is not a valid safetensors file: {problem}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of a safetensors file (see the module doc); no tensor data is read."""
    path = require_safetensors(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < HEADER_LENGTH_BYTES:
                raise _bad(path, f"the file has {size} bytes; expected at least the 8-byte header length")
            n = int.from_bytes(f.read(HEADER_LENGTH_BYTES), "little")
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"the header claims {n} bytes; expected at most {MAX_HEADER_BYTES} (100 MiB)")
            if HEADER_LENGTH_BYTES + n > size:
                raise _bad(path, f"the header claims {n} bytes but only {size - HEADER_LENGTH_BYTES} follow "
                                 "(a truncated file?)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelLoadError(f"'{path}' does not exist") from None
    except IsADirectoryError:
        raise ModelLoadError(f"'{path}' is a folder; expected a .safetensors file") from None
    except OSError as err:
        raise ModelLoadError(f"'{path}' cannot be read: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _bad(path, f"the header is not UTF-8 (byte {err.start}); expected a JSON object") from None
    except (ValueError, RecursionError) as err:
        raise _bad(path, f"the header is not JSON ({str(err)[:200]}); expected a JSON object") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}; expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_bytes = size - HEADER_LENGTH_BYTES - n
    tensors = {}
    for name, info in header.items():
        at = f"tensor '{name[:200]}'"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"{at}: expected an object with exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES or DTYPES[dtype][0] is None:
            known = ", ".join(k for k, (t, _) in DTYPES.items() if t is not None)
            raise _bad(path, f"{at}: unknown dtype {str(dtype)[:40]!r}; expected one of {known}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _bad(path, f"{at}: shape {str(shape)[:80]} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _bad(path, f"{at}: data_offsets {str(offsets)[:80]} is not [begin, end] with 0 <= begin <= end")
        needed = math.prod(shape) * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != needed:
            raise _bad(path, f"{at}: shape {shape} of {dtype} needs {needed} bytes, its data_offsets "
                             f"{offsets} give {offsets[1] - offsets[0]}")
        if offsets[1] > data_bytes:
            raise _bad(path, f"{at}: its data ends at byte {offsets[1]} but the file holds only {data_bytes} "
                             "bytes of data (a truncated file?)")
        tensors[name] = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps the tensor before it" if entry.begin < position else f"leaves bytes {position}..{entry.begin} unused"
            raise _bad(path, f"tensor '{entry.name[:200]}' (data_offsets [{entry.begin}, {entry.end}]) {what}")
        position = entry.end
    if position != data_bytes:
        raise _bad(path, f"the tensors cover {position} bytes of data but the file holds {data_bytes}")
    return SafetensorsHeader(tensors, dict(metadata), data_bytes)


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """ModelLoadError naming the first floating-point tensor that holds NaN or ±inf."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor if tensor.dtype.itemsize > 1 else tensor.float())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ModelLoadError(f"'{path}': tensor '{name}' holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                                 "expected finite weights (the file is corrupt or the model diverged)")


def load_tensors(path: str | Path, allow_pickle: bool = False, finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file (on the CPU), checked; see the module doc.

    `.safetensors`: header checked by `read_header`, then read. A pickle: refused, or with
    `allow_pickle` read by `torch.load(weights_only=True)` (a checkpoint's `state_dict` entry
    when it has one; entries that are not tensors, such as `global_step`, are dropped).
    `finite`: refuse NaN/inf in floating-point tensors.
    """
    path = Path(path)
    if is_pickle_path(path) and allow_pickle:
        tensors = load_pickled_tensors(path)
    else:
        read_header(path)
        try:
            tensors = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - the header was checked; anything left is the library's word
            raise _bad(path, str(err)[:300]) from err
    if finite:
        check_finite(tensors, path)
    return tensors


def load_pickled_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, read with `torch.load(weights_only=True)` only.

    Refused on torch < 2.6, whose weights-only unpickler could be made to run code (CVE-2025-32434).
    """
    path = Path(path)
    if torch.__version__ < MIN_TORCH_FOR_PICKLES:
        raise ModelLoadError(f"'{path}': pickles are not read with torch {torch.__version__}: its weights-only "
                             f"loader can be bypassed (CVE-2025-32434); upgrade torch to {MIN_TORCH_FOR_PICKLES} "
                             "or later, or convert the file to safetensors elsewhere")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"'{path}' does not exist") from None
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"'{path}': refused — the pickle asks for objects that weights-only loading does not build "
            f"({' '.join(str(err).split())[:300]}); expected tensors and plain containers only"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a broken archive
        raise ModelLoadError(f"'{path}' is not a readable torch checkpoint: {str(err)[:300]}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"'{path}' holds a {type(loaded).__name__}; expected a dict of tensors (a state dict)")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"'{path}' holds no tensors; expected a state dict")
    return tensors


def check_fits(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str | Path,
               what: str) -> None:
    """ModelLoadError for the first tensor whose shape, or kind of dtype, differs from the model's."""
    for name, tensor in tensors.items():
        target = expected.get(name)
        if target is None:
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(f"'{path}': tensor '{name}' of the {what} has shape {list(tensor.shape)}; "
                                 f"the model expects {list(target.shape)}")
        if tensor.is_floating_point() != target.is_floating_point():
            raise ModelLoadError(f"'{path}': tensor '{name}' of the {what} is {str(tensor.dtype).removeprefix('torch.')}; "
                                 f"the model expects {str(target.dtype).removeprefix('torch.')}")
