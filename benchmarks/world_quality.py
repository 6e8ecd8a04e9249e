"""How well the built-in model follows its prompts, read by the built-in evaluator.

For every concept: a prompt naming it alone, `--samples` images (the pipeline's default sampler,
25 steps, classifier-free guidance 7.5), scored on the concept's kind. Then `--combinations`
prompts naming object, colour and style together, scored on all three. Also the time to sample
8 images. Prints a table and writes JSON.

    python benchmarks/world_quality.py [--model builtin] [--samples 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

TARGETS = {"per_kind": 0.90, "per_concept": 0.75, "all_three": 0.70, "seconds_for_8": 5.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--combinations", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from duge.models import load_pipeline
    from duge.world.callbacks import builtin_evaluator
    from duge.world.model import generate
    from duge.world.quality import measure_quality

    pipe = load_pipeline(args.model)
    evaluator = builtin_evaluator()
    generate_fn = lambda prompts, seed: generate(pipe, prompts, seed, steps=args.steps, guidance=args.guidance)  # noqa: E731

    generate_fn(["a red circle"] * 8, 0)  # warm-up
    t0 = time.perf_counter()
    generate_fn(["a striped blue star"] * 8, 1)
    seconds_for_8 = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = measure_quality(generate_fn, evaluator, samples_per_prompt=args.samples,
                             n_combinations=args.combinations, seed=args.seed)
    total = time.perf_counter() - t0

    print(f"{'concept':<12}{'kind':<8}{'agreement':>10}")
    from duge.world.vocabulary import CONCEPTS

    for c in CONCEPTS:
        print(f"{c.name:<12}{c.kind:<8}{report.per_concept[c.name]:>10.3f}")
    print()
    for kind, value in report.per_kind.items():
        print(f"mean {kind:<8}{value:>10.3f}   (target >= {TARGETS['per_kind']:.2f})")
    print(f"weakest concept     {min(report.per_concept.values()):.3f}   (target >= {TARGETS['per_concept']:.2f})")
    print(f"all three right     {report.combination_all_three:.3f}   (target >= {TARGETS['all_three']:.2f}); "
          f"per kind {json.dumps({k: round(v, 3) for k, v in report.combination_per_kind.items()})}")
    print(f"8 images            {seconds_for_8:.2f} s (target <= {TARGETS['seconds_for_8']:.1f} s, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()})")
    result = {
        "model": args.model, "samples_per_prompt": args.samples, "combinations": args.combinations,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "per_concept": report.per_concept, "per_kind": report.per_kind,
        "weakest_concept": min(report.per_concept.values()),
        "combination_all_three": report.combination_all_three,
        "combination_per_kind": report.combination_per_kind,
        "seconds_for_8_images": seconds_for_8, "seconds_total": total, "targets": TARGETS,
        "meets_targets": {
            "per_kind": all(v >= TARGETS["per_kind"] for v in report.per_kind.values()),
            "per_concept": min(report.per_concept.values()) >= TARGETS["per_concept"],
            "all_three": report.combination_all_three >= TARGETS["all_three"],
            "seconds_for_8": seconds_for_8 <= TARGETS["seconds_for_8"],
        },
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2), overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
