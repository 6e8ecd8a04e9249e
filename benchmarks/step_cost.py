"""Cost of a training step and of a request: ESD-x and DUGE, in ONE process, on the same requests,
interleaved round by round.

Each variant runs the first two requests of a concept set (the second replays the first) with
`--steps` steps each; the second request is timed: seconds per step (median over its steps after the
first two) and the request's set-up (its images, and the pool where there is one = request seconds −
steps × s/step). A variant's seconds per request are its set-up plus ITS OWN steps (the method's
settings: `duge.methods`, ESD-x's tuned 500 steps of one image; DUGE's defaults) × its s/step. Variants:

- "esd-x" — ESD-x at its own (tuned) settings: one image per step, every attn2 projection, 500 steps;
  the reference of the per-request ratio;
- "esd-x, batch 8, K/V" — ESD-x's step at DUGE's batch and layers: the reference of the per-step ratio
  ("seconds per step at most ESD-x's at the same batch size");
- "duge" — DUGE's defaults (teacher pools);
- "duge, teachers every step" — the same without pools (`teacher_pool=0`).

Every variant repeats `--rounds` times, variants alternating, and the medians are reported, with the
ratios to ESD-x's — the only numbers to read on a shared machine.

    python benchmarks/step_cost.py [--concepts SET.yaml] [--steps 30] [--rounds 2] [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

VARIANTS = {  # name → (method, settings over the method's own)
    "esd-x": ("esd-x", {}),
    "esd-x, batch 8, K/V": ("esd-x", {"batch_size": 8, "trainable": "kv"}),
    "duge": ("duge", {}),
    "duge, teachers every step": ("duge", {"teacher_pool": 0}),
}
STEP_REFERENCE, REQUEST_REFERENCE = "esd-x, batch 8, K/V", "esd-x"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=None, help="concept set (default: the shipped demo set); two requests run")
    parser.add_argument("--steps", type=int, default=30, help="steps per request in this measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.concepts import ConceptSet, example_concept_set_path, load_concept_set, resolve_concept_set
    from duge.config import method_config
    from duge.models import load_pipeline
    from duge.trainer import unlearn

    torch.set_num_threads(args.threads)
    full = load_concept_set(args.concepts or example_concept_set_path("demo"))
    concept_set = ConceptSet(full.name, full.requests[:2], full.general_prompts)
    requests = resolve_concept_set(concept_set, builtin_world=True)
    backend = DiffusersBackend(load_pipeline("builtin"), dtype="float32")
    configs = {name: method_config(method, seed=args.seed, **overrides) for name, (method, overrides) in VARIANTS.items()}
    samples = {name: {"step": [], "setup": []} for name in VARIANTS}
    for _ in range(args.rounds):
        for name, config in configs.items():
            stamps: list[float] = []

            def progress(info, _stamps=stamps):
                if info["request"] == requests[1].target:
                    _stamps.append(time.perf_counter())

            measured = dataclasses.replace(config, steps=args.steps)
            result = unlearn(backend, requests, measured, concept_set.general_prompts, progress=progress)
            per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:]))
            samples[name]["step"].append(per_step)
            samples[name]["setup"].append(result.requests[1].seconds - args.steps * per_step)
    rows = {}
    for name, s in samples.items():
        step, setup, own = statistics.median(s["step"]), statistics.median(s["setup"]), configs[name]
        rows[name] = {"seconds_per_step": step, "setup_seconds": setup, "steps": own.steps, "batch_size": own.batch_size,
                      "trainable": own.trainable, "seconds_per_request": setup + own.steps * step, "samples": s}
    for row in rows.values():
        row["step_ratio_to_esd_x"] = row["seconds_per_step"] / rows[STEP_REFERENCE]["seconds_per_step"]
        row["request_ratio_to_esd_x"] = row["seconds_per_request"] / rows[REQUEST_REFERENCE]["seconds_per_request"]
    header = (f"{'variant':<28}{'batch':>6}{'steps':>6}{'s/step':>8}{'set-up s':>10}{'s/request':>11}"
              f"{'step/ESD-x b8':>15}{'request/ESD-x':>15}")
    print(f"second request of {[r.target for r in requests]}, {args.threads} torch thread(s), {args.rounds} round(s); "
          f"s/request at each variant's own steps")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<28}{row['batch_size']:>6}{row['steps']:>6}{row['seconds_per_step']:>8.3f}{row['setup_seconds']:>10.1f}"
              f"{row['seconds_per_request']:>11.1f}{row['step_ratio_to_esd_x']:>15.2f}{row['request_ratio_to_esd_x']:>15.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"concept_set": full.name, "steps_measured": args.steps,
                                                 "rounds": args.rounds, "threads": args.threads,
                                                 "step_reference": STEP_REFERENCE, "request_reference": REQUEST_REFERENCE,
                                                 "variants": rows}, indent=2), overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
