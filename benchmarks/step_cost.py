"""Cost of a training step and of a request: DUGE with its teachers run every step, DUGE with teacher
pools (`duge.teachers`), and ESD-x, in ONE process, on the same requests, interleaved round by round.

Each variant runs the first two requests of a concept set (the second replays the first) with
`--steps` steps each; the second request is timed: seconds per step (median over its steps after the
first two) and the request's set-up (its images, and the pool where there is one = request seconds −
steps × s/step). Seconds per request at the default number of steps are set-up + steps × s/step.
Every variant repeats `--rounds` times, variants alternating, and the medians are reported, with the
ratios to ESD-x's — the only numbers to read on a shared machine.

    python benchmarks/step_cost.py [--concepts SET.yaml] [--steps 30] [--rounds 2] [--json PATH]
                                   [--set VARIANT:FIELD=VALUE ...] [--threads 1]
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

VARIANTS = {
    "esd-x": {"method": "esd-x"},
    "duge, teachers every step": {"method": "duge", "teacher_pool": 0},
    "duge, teacher pools (128 rows)": {"method": "duge", "teacher_pool": 128},
}


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
    from duge.concepts import ConceptSet, example_concept_set_path, load_concept_set
    from duge.config import UnlearnConfig
    from duge.models import load_pipeline
    from duge.trainer import unlearn

    torch.set_num_threads(args.threads)
    full = load_concept_set(args.concepts or example_concept_set_path("demo"))
    concept_set = ConceptSet(full.name, full.requests[:2], full.general_prompts)
    backend = DiffusersBackend(load_pipeline("builtin"), dtype="float32")
    default_steps = UnlearnConfig().steps
    samples = {name: {"step": [], "setup": []} for name in VARIANTS}
    for _ in range(args.rounds):
        for name, overrides in VARIANTS.items():
            config = dataclasses.replace(UnlearnConfig(seed=args.seed, steps=args.steps), **overrides)
            stamps: list[float] = []

            def progress(info, _stamps=stamps):
                if info["request"] == concept_set.requests[1].target:
                    _stamps.append(time.perf_counter())

            result = unlearn(backend, concept_set, config, builtin_world=True, progress=progress)
            per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:]))
            samples[name]["step"].append(per_step)
            samples[name]["setup"].append(result.requests[1].seconds - args.steps * per_step)
    rows = {}
    for name, s in samples.items():
        step, setup = statistics.median(s["step"]), statistics.median(s["setup"])
        rows[name] = {"seconds_per_step": step, "setup_seconds": setup,
                      "seconds_per_request": setup + default_steps * step, "samples": s}
    reference = rows["esd-x"]
    for row in rows.values():
        row["step_ratio_to_esd_x"] = row["seconds_per_step"] / reference["seconds_per_step"]
        row["request_ratio_to_esd_x"] = row["seconds_per_request"] / reference["seconds_per_request"]
    header = f"{'variant':<34}{'s/step':>8}{'set-up s':>10}{'s/request':>11}{'step/ESD-x':>12}{'request/ESD-x':>15}"
    print(f"second request of {[r.target for r in concept_set.requests]}, batch {UnlearnConfig().batch_size}, "
          f"s/request at {default_steps} steps")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<34}{row['seconds_per_step']:>8.3f}{row['setup_seconds']:>10.1f}{row['seconds_per_request']:>11.1f}"
              f"{row['step_ratio_to_esd_x']:>12.2f}{row['request_ratio_to_esd_x']:>15.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"concept_set": full.name, "steps_measured": args.steps,
                                                 "rounds": args.rounds, "variants": rows}, indent=2), overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
