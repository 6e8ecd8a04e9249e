"""What an unlearning run produced: per-request results, the run's result, and a stopped run's state to resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .concepts import ResolvedRequest
from .config import UnlearnConfig
from .edits import LayerEdits
from .errors import ModelLoadError
from .image_cache import RequestCache


@dataclass
class RequestResult:
    target: str
    delta: dict[str, torch.Tensor]  # this request's ΔW per layer [out, in], float32
    seconds: float
    steps: int
    final_losses: dict[str, float]
    metrics: dict = field(default_factory=dict)
    # adversarial training (duge.adversarial): per attack search, its step, the prompt found, the objective of
    # the plain and the attacked prompt, its UNet passes and seconds; [] when off
    adversarial: list[dict] = field(default_factory=list)


@dataclass
class UnlearnResult:
    config: UnlearnConfig
    requests: list[RequestResult]
    total_delta: dict[str, torch.Tensor]  # θ - θ0 per layer


def manifest_rows(result: UnlearnResult, requests: list[ResolvedRequest]) -> list[dict]:
    """The manifest's entry per trained request — target, anchor, preserve (as the trainer used them:
    `requests` are the run's resolved requests), settings, measured metrics and every name it erased (target
    and aliases) — for the CLI and ComfyUI alike. A simultaneous run's one result names every target, has no
    single anchor and erased every request's names."""
    by_target = {r.target: r for r in requests}
    config = result.config
    rows = []
    for r in result.requests:
        request = by_target.get(r.target)
        rows.append({
            "target": r.target,
            "anchor": request.anchor if request else None,
            "preserve": list(request.preserve) if request else [],
            "settings": {"method": config.method, "setting": config.setting, "steps": r.steps,
                         "learning_rate": config.learning_rate, "beta": config.beta,
                         "lambda_prior": config.lambda_prior, "lambda_reg": config.lambda_reg,
                         "trainable": config.trainable, "seed": config.seed},
            "metrics": {"seconds": round(r.seconds, 3), **{k: r.metrics[k] for k in ("UA", "IRA", "CRA") if k in r.metrics}},
            "erased": [name for q in ([request] if request else requests) for name in (q.target, *q.aliases)],
        })
    return rows


def erased_in_manifest(manifest: dict, where: str) -> list[str]:
    """Every name the requests listed in an earlier run's `manifest` erased, in order: each row's `erased`
    (`manifest_rows`), or its `target` in a manifest written before rows had `erased`. For
    `resolve_concept_set(erased_before=...)` when a run continues that model. ModelLoadError naming `where`
    (the manifest's file or model) when `requests` is not a list of rows with a target."""
    rows = manifest.get("requests", [])
    if not isinstance(rows, list):
        raise ModelLoadError(f"{where}: 'requests' of the DUGE manifest is not a list; expected one row per "
                             "earlier request (as `duge inspect` shows)")
    names = []
    for i, row in enumerate(rows):
        erased = row.get("erased", [row.get("target")]) if isinstance(row, dict) else None
        if not isinstance(erased, list) or not erased or not all(isinstance(n, str) and n.strip() for n in erased):
            raise ModelLoadError(f"{where}: requests[{i}] of the DUGE manifest names no erased concept; expected a "
                                 "row with a non-empty 'target' (and 'erased', a list of names)")
        names += erased
    return names



@dataclass
class ResumeState:
    """What a stopped sequential (or independent) run had finished: requests 0..k-1, in order.

    `results[i].delta` is request i's ΔW; `caches[i]` its anchor/related images, which later
    requests replay. `duge.progress` writes and reads these.
    """

    results: list[RequestResult]
    caches: list[RequestCache]

    def restore(self, edits: LayerEdits, setting: str) -> int:
        """Commit the finished requests' deltas onto `edits` again when `setting` is sequential (the same float32
        additions as `commit_request` made; independent requests each start from θ0) and return the index of
        the request to continue at."""
        if setting == "sequential":
            for done in self.results:
                edits.add_committed(done.delta)
        return len(self.results)


ProgressFn = Callable[[dict], None]
RequestDoneFn = Callable[[int, RequestResult, RequestCache], None]
