"""Progress checkpoints of a sequential run, so that `duge unlearn --resume` continues where it stopped.

After each request `duge unlearn` saves, in `OUT/progress/`:

- `request_KK.safetensors`: request K's ΔW per edited layer (`delta/<layer>`, float32, exactly the
  tensors the trainer committed) and the images its later requests replay (`cache/anchor_latents`,
  `cache/related_latents`, `cache/target_latents`), with the request's report entry and cache
  bookkeeping as JSON in the metadata (`duge_progress`);
- `state.json`: how many requests are done, each file with its SHA-256, and the run's inputs — the
  model (name and `model_hash`), the concept set and every `UnlearnConfig` field — with their hash.

Both are written with `atomic_write` (request file first, then `state.json`, which is the commit
point), so a kill at any moment leaves the last complete checkpoint. `load` refuses a checkpoint
whose inputs differ from the resumed run's, naming what differs, and a request file whose SHA-256
or content does not check out. Given the same inputs, the trainer continues from the saved deltas
and caches and ends with the same weights as a run that was never stopped (tests/test_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from . import __version__
from .concepts import ConceptSet, ResolvedRequest, concept_set_to_dict
from .errors import DugeError
from .io import _json_default
from .paths import atomic_write, atomic_write_text, contained_path
from .safe_weights import load_tensors, read_header
from .config import UnlearnConfig
from .image_cache import RequestCache
from .results import RequestResult, ResumeState

PROGRESS_FOLDER = "progress"
STATE_FILE = "state.json"
FORMAT = "duge-progress"
METADATA_KEY = "duge_progress"
DELTA_PREFIX = "delta/"
CACHE_TENSORS = ("anchor_latents", "related_latents", "target_latents")
# Where generated images are kept between runs, and when the run is measured: not what the weights become.
SETTINGS_NOT_IN_INPUTS = ("image_cache_dir", "eval")


class ResumeError(DugeError):
    """A progress checkpoint that cannot be resumed: missing, damaged, or from other inputs."""


def progress_folder(out: str | Path) -> Path:
    return contained_path(out, PROGRESS_FOLDER)


def require_progress(folder: str | Path) -> Path:
    """The state file of the progress `folder`; ResumeError if there is nothing to resume."""
    state_path = Path(folder) / STATE_FILE
    if not state_path.is_file():
        raise ResumeError(f"nothing to resume: '{state_path}' does not exist (the run stopped before its first "
                          "request finished, or was never started here); run without --resume")
    return state_path


def run_inputs(model: str, model_sha256: str, config: UnlearnConfig, concept_set: ConceptSet) -> dict:
    """Everything that decides a run's weights, as plain JSON: a checkpoint resumes only the same inputs.

    Config fields that cannot change the weights (`SETTINGS_NOT_IN_INPUTS`, and the adversarial settings while
    `adversarial_every` is 0) are left out, and `adversarial_attack` at "prompt" (what checkpoints written before it
    existed did, and lack it).
    """
    settings = {k: v for k, v in asdict(config).items() if k not in SETTINGS_NOT_IN_INPUTS}
    if not config.adversarial_every:  # off, the adversarial settings change nothing (and older checkpoints lack them)
        settings = {k: v for k, v in settings.items() if not k.startswith("adversarial_")}
    elif settings.get("adversarial_attack") == "prompt":
        del settings["adversarial_attack"]
    return json.loads(json.dumps({
        "model": str(model),
        "model_sha256": model_sha256,
        "concept_set": concept_set_to_dict(concept_set),
        "config": settings,
    }, default=_json_default))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inputs_sha256(inputs: dict) -> str:
    return _sha256(json.dumps(inputs, sort_keys=True).encode("utf-8"))


def _differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two run-input dicts (config field by field)."""
    found = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            found += [f"config.{f}: checkpoint {a.get(f)!r}, now {b.get(f)!r}"
                      for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        elif key == "concept_set":
            found.append("the concept set (its requests or settings changed)")
        else:
            found.append(f"{key}: checkpoint {str(a)[:80]!r}, now {str(b)[:80]!r}")
    return found


class ProgressCheckpoint:
    """The progress folder of one run: `save` after each request, `load` to resume."""

    def __init__(self, folder: str | Path, inputs: dict):
        self.folder = Path(folder)
        self.inputs = inputs
        self.files: list[dict] = []  # {"file", "sha256", "target"} per finished request, in order

    @property
    def completed(self) -> int:
        return len(self.files)

    def clear(self) -> None:
        """Forget an earlier run's progress (a fresh start with --overwrite)."""
        if self.folder.is_symlink() or self.folder.is_file():
            self.folder.unlink()
        elif self.folder.exists():
            shutil.rmtree(self.folder)
        self.files = []

    def save(self, index: int, result: RequestResult, cache: RequestCache, extra: dict | None = None) -> Path:
        """Checkpoint request `index` (0-based; requests 0..index-1 must be saved already)."""
        if index != self.completed:
            raise DugeError(f"progress: request {index} finished but {self.completed} are saved; expected them in order")
        tensors = {f"{DELTA_PREFIX}{name}": d.detach().float().cpu().contiguous() for name, d in result.delta.items()}
        for key in CACHE_TENSORS:
            value = getattr(cache, key)
            if value is not None:
                tensors[f"cache/{key}"] = value.detach().cpu().contiguous()
        entry = {
            "index": index, "target": result.target, "seconds": result.seconds, "steps": result.steps,
            "final_losses": result.final_losses, "metrics": result.metrics, "adversarial": result.adversarial,
            "cache": {"request": asdict(cache.request), "anchor_templates": list(cache.anchor_templates),
                      "related_prompts": list(cache.related_prompts),
                      "related_concepts": list(cache.related_concepts),
                      "dropped_anchor_images": cache.dropped_anchor_images},
        }
        metadata = {"format": "pt", METADATA_KEY: json.dumps(entry, default=_json_default)}
        name = f"request_{index + 1:02d}.safetensors"
        path = atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                            overwrite=True)
        self.files.append({"file": name, "sha256": _sha256(path.read_bytes()), "target": result.target})
        state = {"format": FORMAT, "version": __version__, "completed": self.completed, "requests": self.files,
                 "inputs_sha256": _inputs_sha256(self.inputs), "inputs": self.inputs, "extra": extra or {}}
        atomic_write_text(self.folder / STATE_FILE, json.dumps(state, indent=1, default=_json_default), overwrite=True)
        return path

    @classmethod
    def load(cls, folder: str | Path, inputs: dict) -> tuple[ProgressCheckpoint, ResumeState, dict]:
        """The checkpoint in `folder` for a run with `inputs`: itself, what the trainer resumes from, and `extra`."""
        folder = Path(folder)
        state_path = require_progress(folder)
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ResumeError(f"'{state_path}' is not a readable progress file ({err}); remove '{folder}' and "
                              "start again") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("requests"), list):
            raise ResumeError(f"'{state_path}': expected a {FORMAT} file with a list of requests")
        saved_inputs = state.get("inputs") if isinstance(state.get("inputs"), dict) else {}
        if state.get("inputs_sha256") != _inputs_sha256(inputs) or saved_inputs != inputs:
            changed = _differences(saved_inputs, inputs) or ["the recorded inputs hash"]
            raise ResumeError(f"'{state_path}' was written by a run with other inputs, so resuming would not give the "
                              f"same model; differs: {'; '.join(changed)}. Resume with the same command, or start "
                              "again with --overwrite")
        checkpoint = cls(folder, inputs)
        results, caches = [], []
        for k, entry in enumerate(state["requests"]):
            result, cache = checkpoint._read_request(k, entry)
            results.append(result)
            caches.append(cache)
            checkpoint.files.append(entry)
        return checkpoint, ResumeState(results, caches), state.get("extra") or {}

    def _read_request(self, k: int, entry) -> tuple[RequestResult, RequestCache]:
        name = entry.get("file") if isinstance(entry, dict) else None
        if name != f"request_{k + 1:02d}.safetensors":
            raise ResumeError(f"'{self.folder / STATE_FILE}': requests[{k}] names {str(name)[:80]!r}; "
                              f"expected 'request_{k + 1:02d}.safetensors'")
        path = contained_path(self.folder, name)
        if not path.is_file():
            raise ResumeError(f"'{path}' is missing; the progress folder is incomplete — remove it and start again")
        if _sha256(path.read_bytes()) != entry.get("sha256"):
            raise ResumeError(f"'{path}' changed since it was written (SHA-256 differs); remove '{self.folder}' "
                              "and start again")
        try:
            meta = json.loads(read_header(path).metadata[METADATA_KEY])
            tensors = load_tensors(path)
            info = meta["cache"]
            request = ResolvedRequest(**info["request"])
            delta = {key.removeprefix(DELTA_PREFIX): t for key, t in tensors.items() if key.startswith(DELTA_PREFIX)}
            cache = RequestCache(request, tensors["cache/anchor_latents"], list(info["anchor_templates"]),
                                 tensors["cache/related_latents"], list(info["related_prompts"]),
                                 int(info["dropped_anchor_images"]), tensors.get("cache/target_latents"),
                                 list(info["related_concepts"]))
            result = RequestResult(meta["target"], delta, float(meta["seconds"]), int(meta["steps"]),
                                   dict(meta["final_losses"]), dict(meta["metrics"]), list(meta.get("adversarial", [])))
        except (KeyError, TypeError, ValueError) as err:
            raise ResumeError(f"'{path}': not a progress file of this version ({type(err).__name__}: {err})") from None
        if not delta:
            raise ResumeError(f"'{path}' holds no ΔW tensors (delta/<layer>)")
        return result, cache
