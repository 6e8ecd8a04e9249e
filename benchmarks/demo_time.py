"""How long `duge demo` takes, phase by phase.

Runs exactly what `duge demo` runs (the built-in model, the demo concept set, default settings,
measuring the unedited model and the result of the last request) in this process, and records
the wall time of each phase — loading, the requests' anchor/related images, training, measuring,
the before/after grid and writing the outputs — with the work each did (images, steps, files).
Prints a table and writes JSON. The machine's load average is recorded before and after: other
processes on the same cores lengthen every phase, so only a quiet machine's total says how long
the demo takes.

    python benchmarks/demo_time.py [--json benchmarks/results/demo_time.json] [--out FOLDER] [--eval final|each]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duge.paths import atomic_write_text  # noqa: E402
from duge.phases import KINDS, Phases  # noqa: E402

TARGET_SECONDS = 180  # the target for the whole demo on a quiet 2-core machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/demo_time.json")
    parser.add_argument("--out", default=None, help="where the demo writes (default: a temporary folder, removed)")
    parser.add_argument("--eval", default="final", choices=["final", "each"],
                        help="final: what `duge demo` does; each: measure after every request as `duge unlearn` does")
    args = parser.parse_args(argv)

    from duge.cli import load_libraries
    from duge.concepts import example_concept_set_path
    from duge.config import UnlearnConfig

    load_before = os.getloadavg()
    phases = Phases()
    config = UnlearnConfig(eval=args.eval)
    with tempfile.TemporaryDirectory(prefix="duge-demo-time-") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "duge-demo"
        t0 = time.perf_counter()
        run_unlearn = load_libraries(phases).run_unlearn  # as `duge demo` does: torch and diffusers first
        report = run_unlearn("builtin", str(example_concept_set_path("demo")), out, config, overwrite=True,
                             phases=phases, log=lambda *a: None)
        total = time.perf_counter() - t0
    load_after = os.getloadavg()

    import torch

    rows = []
    for kind in KINDS:
        seconds = phases.seconds.get(kind, 0.0)
        work = {unit: round(n, 1) for unit, n in phases.counts.get(kind, {}).items()}  # e.g. training: steps, rows
        rows.append({"phase": kind, "seconds": round(seconds, 2), "share": round(seconds / total, 3), "work": work})
    other = total - sum(phases.seconds.values())
    result = {
        "what": "wall time of `duge demo` per phase (this process, default settings, eval=" + args.eval + ")",
        "total_seconds": round(total, 2), "target_seconds": TARGET_SECONDS, "phases": rows,
        "outside_phases_seconds": round(other, 2),
        "final": report.get("final"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }
    print(f"duge demo (eval={args.eval}) on {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
          f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          "(a quiet machine is near 0; more means other processes shared the cores)")
    print(f"{'phase':<11}{'seconds':>9}{'share':>8}  work")
    for row in rows:
        work = ", ".join(f"{n:.0f} {unit}" for unit, n in row["work"].items()) or "-"
        print(f"{row['phase']:<11}{row['seconds']:>9.1f}{row['share']:>8.1%}  {work}")
    print(f"{'total':<11}{total:>9.1f}{1:>8.0%}   (target {TARGET_SECONDS} s on a quiet 2-core machine; "
          f"{'met' if total <= TARGET_SECONDS else 'not met'} here)")
    final = report.get("final") or {}
    print("final: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items() if isinstance(v, (int, float))))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2), overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
