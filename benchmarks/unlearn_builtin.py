"""DUGE on the built-in world: three sequential requests (object, colour, style), default settings.

Measures, per request and after the last: UA (also under each concept's other names), IRA and
CRA, and IRA/CRA as fractions of the unedited model's; seconds and peak memory per request. Then
one ablation row per loss switched off (β = 0, λ_prior = 0, λ_reg = 0), one without the
anchor guidance (η = 0), and one per part of docs/method.md (teacher pools; pools with the
input-space penalty; the input-space projection), on the same requests and seeds, so each part's
effect is visible.
Prints a table and writes JSON.

    python benchmarks/unlearn_builtin.py [--concepts duge/concept_sets/demo.yaml] [--json PATH]
                                         [--set FIELD=VALUE ...] [--threads N]

--set changes a default for every row (e.g. --set lambda_reg=2e-6), to measure a setting
side by side with the same seeds before it becomes the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

TARGETS = {"UA": 0.90, "UA_each": 0.80, "IRA_ratio": 0.90, "CRA_ratio": 0.95, "seconds_per_request": 180.0}
VARIANTS = {
    "duge": {},
    "no attention term (beta=0)": {"beta": 0.0},
    "no prior preservation (lambda_prior=0)": {"lambda_prior": 0.0},
    "no regularisation (lambda_reg=0)": {"lambda_reg": 0.0},
    "no anchor guidance (anchor_guidance=0)": {"anchor_guidance": 0.0},
    # issue 15's parts (docs/method.md), each switched on alone
    "teacher pools (teacher_pool=128)": {"teacher_pool": 128},
    "pools + input-space penalty (regularizer=penalty)": {"teacher_pool": 128, "regularizer": "penalty"},
    "input-space projection (regularizer=projection)": {"regularizer": "projection"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=None, help="concept set (default: the shipped demo set)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the rows")
    parser.add_argument("--steps", type=int, default=None, help="override the default steps per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change an UnlearnConfig default for every row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    from continual import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    common = parse_overrides(args.set)
    if any(":" in key for key in common):
        raise SystemExit("--set: this benchmark runs DUGE only; write FIELD=VALUE without a method")

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import example_concept_set_path, load_concept_set, resolve_concept_set, resolve_request
    from duge.evaluation import retention_ratios
    from benchmarks.peak_memory import PeakMemory
    from duge.models import load_pipeline
    from duge.world.callbacks import anchor_filter, builtin_evaluator, world_evaluate
    from duge.config import EVALUATION_SEED_OFFSET
    from duge.trainer import UnlearnConfig, unlearn

    concept_set = load_concept_set(args.concepts or example_concept_set_path("demo"))
    pipe = load_pipeline("builtin")
    backend = DiffusersBackend(pipe, dtype="float32")
    evaluator = builtin_evaluator()
    evaluate = world_evaluate(backend, evaluator, seed=args.seed + EVALUATION_SEED_OFFSET)
    requests = [resolve_request(r, builtin_world=True) for r in concept_set.requests]
    base = {k: evaluate(backend, requests[: k + 1]) for k in range(len(requests))}
    memory = PeakMemory()
    rows = {}
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        config = dataclasses.replace(UnlearnConfig(seed=args.seed), **{**common, **overrides})
        if args.steps:
            config.steps = args.steps
        per_request, peaks = [], []
        memory.reset()
        t0 = time.time()

        def track(info, _peaks=peaks):
            if info["step"] == info["steps"]:
                _peaks.append(memory.peak_mb())
                memory.reset()

        result = unlearn(backend, resolve_concept_set(concept_set, True, config.setting), config,
                         concept_set.general_prompts, image_filter=anchor_filter(backend, evaluator), evaluate=evaluate, progress=track)
        for k, r in enumerate(result.requests):
            m = r.metrics
            per_request.append({
                "target": r.target, "seconds": r.seconds, "peak_memory_mb": peaks[k] if k < len(peaks) else None,
                "UA": m["UA"], "IRA": m["IRA"], "CRA": m["CRA"], **retention_ratios(m, base[k]),
                "UA_per_concept": m["UA_per_concept"],
            })
        final = per_request[-1]
        rows[name] = {"config": dataclasses.asdict(config), "requests": per_request, "final": {
            "UA": final["UA"], "UA_min_concept": min(final["UA_per_concept"].values()),
            "IRA": final["IRA"], "CRA": final["CRA"],
            "IRA_ratio": final.get("IRA_ratio"), "CRA_ratio": final.get("CRA_ratio"),
            "max_seconds_per_request": max(r["seconds"] for r in per_request),
            "peak_memory_mb": max((p for p in peaks if p), default=None)},
            "seconds_total": time.time() - t0}
    memory.close()

    print("base model: " + "; ".join(f"after {k + 1}: IRA {b['IRA']:.3f} CRA {b['CRA']:.3f}" for k, b in base.items()))
    header = f"{'variant':<42}{'UA':>6}{'minUA':>7}{'IRA':>7}{'CRA':>7}{'IRA/0':>7}{'CRA/0':>7}{'s/req':>7}{'MiB':>7}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        f = row["final"]
        print(f"{name:<42}{f['UA']:>6.3f}{f['UA_min_concept']:>7.3f}{f['IRA']:>7.3f}{f['CRA']:>7.3f}"
              f"{f['IRA_ratio'] or 0:>7.3f}{f['CRA_ratio'] or 0:>7.3f}{f['max_seconds_per_request']:>7.1f}"
              f"{f['peak_memory_mb'] or 0:>7.0f}")
    print("\nper request (duge):")
    for r in rows.get("duge", {"requests": []})["requests"]:
        print(f"  {r['target']:<10} UA {r['UA']:.3f}  IRA {r['IRA']:.3f}  CRA {r['CRA']:.3f}  {r['seconds']:.1f} s  "
              f"UA per erased concept {json.dumps({k: round(v, 3) for k, v in r['UA_per_concept'].items()})}")
    print(f"targets: {TARGETS}")
    result = {"concept_set": concept_set.name, "base": base, "variants": rows, "targets": TARGETS,
              "memory_measure": memory.method}
    if "duge" in rows:
        f = rows["duge"]["final"]
        result["meets_targets"] = {
            "UA": f["UA"] >= TARGETS["UA"], "UA_each": f["UA_min_concept"] >= TARGETS["UA_each"],
            "IRA_ratio": (f["IRA_ratio"] or 0) >= TARGETS["IRA_ratio"],
            "CRA_ratio": (f["CRA_ratio"] or 0) >= TARGETS["CRA_ratio"],
            "seconds_per_request": f["max_seconds_per_request"] <= TARGETS["seconds_per_request"]}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2), overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
