"""What an unlearning run produced: per-request results, the run's result, and a stopped run's state to resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .concepts import ResolvedRequest
from .config import UnlearnConfig
from .image_cache import RequestCache


@dataclass
class RequestResult:
    target: str
    delta: dict[str, torch.Tensor]  # this request's ΔW per layer [out, in], float32
    seconds: float
    steps: int
    final_losses: dict[str, float]
    metrics: dict = field(default_factory=dict)


@dataclass
class UnlearnResult:
    config: UnlearnConfig
    requests: list[RequestResult]
    total_delta: dict[str, torch.Tensor]  # θ - θ0 per layer

    def manifest_requests(self, resolved: list[ResolvedRequest]) -> list[dict]:
        """Per request: target, anchor, preserve, settings and measured metrics (for a manifest)."""
        by_target = {r.target: r for r in resolved}
        out = []
        for r in self.requests:
            spec = by_target.get(r.target)
            out.append({
                "target": r.target,
                "anchor": spec.anchor if spec else None,
                "preserve": list(spec.preserve) if spec else [],
                "settings": {"method": self.config.method, "setting": self.config.setting, "steps": r.steps,
                             "learning_rate": self.config.learning_rate, "trainable": self.config.trainable},
                "metrics": {"seconds": round(r.seconds, 3),
                            **{k: r.metrics.get(k) for k in ("UA", "IRA", "CRA") if k in r.metrics}},
            })
        return out


@dataclass
class ResumeState:
    """What a stopped sequential (or independent) run had finished: requests 0..k-1, in order.

    `results[i].delta` is request i's ΔW; `caches[i]` its anchor/related images, which later
    requests replay. `duge.progress` writes and reads these.
    """

    results: list[RequestResult]
    caches: list[RequestCache]


ProgressFn = Callable[[dict], None]
RequestDoneFn = Callable[[int, RequestResult, RequestCache], None]
