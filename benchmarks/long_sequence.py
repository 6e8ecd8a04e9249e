"""Twenty sequential requests on the built-in model: no memory growth, no drift of θ0.

Erases 20 of the built-in world's 21 concepts one after another (kinds interleaved; each request
preserves up to two concepts of its kind that no earlier request erased; `square` is never
erased) with DUGE's default settings except the step count (`--steps`, default 20 per request, so
the run takes minutes, not an hour). Measures per request the wall time and the process's peak
memory (`benchmarks/peak_memory.py`, reset after every request), and the SHA-256 of the host model's
weights (θ0, `duge.io.model_hash`) before the first request and after the last. Checks:

- peak memory of request 20 within 10 % of request 2's (request 1 also pays for first-use
  allocations, so request 2 is the baseline);
- θ0's checksum unchanged (the edits are deltas beside the frozen weights, never written into them);
- every request's ΔW finite.

Prints a table, writes JSON (`--json`) and the same table as Markdown beside it.

    nice -n 10 python benchmarks/long_sequence.py --json benchmarks/results/long_sequence.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402

N_REQUESTS = 20
NEVER_ERASED = "square"
MEMORY_TOLERANCE = 0.10


def sequence_concept_set():
    """20 requests over the world's concepts, kinds interleaved, as a ConceptSet."""
    from duge.concepts import ConceptRequest, ConceptSet
    from duge.world.vocabulary import CONCEPTS_BY_KIND

    queues = {kind: [c.name for c in concepts if c.name != NEVER_ERASED] for kind, concepts in CONCEPTS_BY_KIND.items()}
    order = []
    while any(queues.values()):
        for kind in ("object", "colour", "style"):
            if queues[kind]:
                order.append((kind, queues[kind].pop(0)))
    erased: set[str] = set()
    requests = []
    for kind, target in order[:N_REQUESTS]:
        erased.add(target)
        kept = [c.name for c in CONCEPTS_BY_KIND[kind] if c.name not in erased][:2]
        requests.append(ConceptRequest(target=target, preserve=kept))
    return ConceptSet(name="long_sequence", requests=requests, source="benchmarks/long_sequence.py")


def markdown_table(result: dict) -> str:
    lines = [
        f"# Long sequence: {len(result['requests'])} sequential requests on the built-in model",
        "",
        f"Command: `{result['command']}`; {result['steps_per_request']} steps per request, other settings "
        f"the defaults; memory: {result['memory_measure']}.",
        "",
        "| # | target | seconds | peak MiB | ΔW max abs |",
        "|---|---|---|---|---|",
    ]
    for r in result["requests"]:
        lines.append(f"| {r['index']} | {r['target']} | {r['seconds']:.1f} | {r['peak_memory_mb']:.1f} | "
                     f"{r['delta_max_abs']:.3g} |")
    c = result["checks"]
    lines += [
        "",
        f"- peak memory request 20 / request 2: {c['peak_ratio_20_to_2']:.4f} (limit 1 ± {MEMORY_TOLERANCE}): "
        f"{'pass' if c['memory_within_10_percent'] else 'FAIL'}",
        f"- θ0 SHA-256 before: `{result['theta0_sha256_start']}`",
        f"- θ0 SHA-256 after:  `{result['theta0_sha256_end']}`: {'equal' if c['theta0_unchanged'] else 'CHANGED'}",
        f"- every ΔW finite: {c['deltas_finite']}",
        f"- total wall time: {result['seconds_total']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps per request (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (and a .md table beside it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared, loaded CPU two OpenMP threads ran the "
                             "sampler 16x slower than one)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    from duge.backends.diffusers_backend import DiffusersBackend
    from duge.io import model_hash
    from benchmarks.peak_memory import PeakMemory
    from duge.models import load_pipeline
    from duge.concepts import resolve_concept_set
    from duge.world.callbacks import anchor_filter, builtin_evaluator
    from duge.trainer import UnlearnConfig, unlearn

    concept_set = sequence_concept_set()
    result_load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    pipe = load_pipeline("builtin")
    backend = DiffusersBackend(pipe, dtype="float32")
    evaluator = builtin_evaluator()
    config = UnlearnConfig(seed=args.seed, steps=args.steps)
    theta0_start = model_hash(pipe)

    memory = PeakMemory()
    rows: list[dict] = []
    clock = {"t": time.time()}

    def request_done(k, result, cache):
        now = time.time()
        rows.append({
            "index": k + 1, "target": result.target, "seconds": round(now - clock["t"], 2),
            "training_seconds": round(result.seconds, 2), "peak_memory_mb": round(memory.peak_mb(), 1),
            "delta_max_abs": max(float(d.abs().max()) for d in result.delta.values()),
            "delta_finite": all(bool(torch.isfinite(d).all()) for d in result.delta.values()),
            "final_losses": result.final_losses,
        })
        r = rows[-1]
        print(f"request {r['index']:>2} {r['target']:<10} {r['seconds']:6.1f} s  peak {r['peak_memory_mb']:7.1f} MiB",
              flush=True)
        memory.reset()
        clock["t"] = time.time()

    t0 = time.time()
    memory.reset()
    unlearn(backend, resolve_concept_set(concept_set, True, config.setting), config, concept_set.general_prompts,
            image_filter=anchor_filter(backend, evaluator),
            on_request_done=request_done)
    seconds_total = time.time() - t0
    theta0_end = model_hash(pipe)
    memory.close()

    ratio = rows[-1]["peak_memory_mb"] / rows[1]["peak_memory_mb"]
    result = {
        "command": " ".join(["python", "benchmarks/long_sequence.py", *(argv if argv is not None else sys.argv[1:])]),
        "steps_per_request": args.steps,
        "seed": args.seed,
        "concept_set": [{"target": r.target, "preserve": r.preserve} for r in concept_set.requests],
        "memory_measure": memory.method,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), load average before "
                   f"{result_load_before}",
        "requests": rows,
        "seconds_total": round(seconds_total, 1),
        "theta0_sha256_start": theta0_start,
        "theta0_sha256_end": theta0_end,
        "checks": {
            "peak_ratio_20_to_2": round(ratio, 4),
            "memory_within_10_percent": abs(ratio - 1) <= MEMORY_TOLERANCE,
            "theta0_unchanged": theta0_start == theta0_end,
            "deltas_finite": all(r["delta_finite"] for r in rows),
        },
    }
    table = markdown_table(result)
    print(table)
    if args.json:
        path = Path(args.json)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n", overwrite=True)
        atomic_write_text(path.with_suffix(".md"), table, overwrite=True)
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all(v for v in result["checks"].values() if isinstance(v, bool)) else 1


if __name__ == "__main__":
    sys.exit(main())
