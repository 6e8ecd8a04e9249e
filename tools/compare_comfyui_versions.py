"""Runs the demo workflow's API twin, unchanged (same seed), in several ComfyUI installs and compares
the LoRAs (and checkpoints) they save: the same edit on every version, to float32 rounding?

    python tools/compare_comfyui_versions.py /work/comfyui/0.3.64 /work/comfyui/0.8.0 \
        [--json benchmarks/results/comfyui_versions.json] [--tolerance 1e-5]

Each argument is an install folder laid out as <dir>/ComfyUI and <dir>/venv. Every install
runs the workflow in its own server (tests/comfyui_server.py) with this checkout loaded; the first
install is the reference. Prints, per install, the largest absolute difference of any LoRA tensor
from the reference's and of any checkpoint tensor, and exits 1 when a LoRA differs by more than
--tolerance (a few float32 ulps of the deltas; default 1e-5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # comfyui_server: the test servers' start/stop code

from comfyui_server import ComfyServer, status_messages  # noqa: E402

WORKFLOW = REPO / "workflows" / "api" / "duge_demo_api.json"
RUN_TIMEOUT = 7200  # seconds; the demo takes minutes on a busy 2-core CPU


def run_demo(install: Path, workdir: Path) -> dict:
    """Runs the demo in `install`; returns {"version", "lora", "checkpoint"} (saved file paths)."""
    prompt = json.loads(WORKFLOW.read_text())
    version = (install / "ComfyUI" / "comfyui_version.py").read_text().split('"')[1]
    with ComfyServer(install / "ComfyUI", workdir, python=str(install / "venv" / "bin" / "python")) as server:
        entry = server.wait(server.queue(prompt), timeout=RUN_TIMEOUT)
        if entry["status"]["status_str"] != "success":
            raise SystemExit(f"{install}: the demo failed:\n{status_messages(entry)}\n{server.log_tail()}")
    loras = sorted((workdir / "output" / "loras").glob("duge_demo_*.safetensors"))
    checkpoints = sorted((workdir / "output" / "checkpoints").glob("duge_demo_*.safetensors"))
    return {"version": version, "lora": loras[-1], "checkpoint": checkpoints[-1]}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> float:
    if set(a) != set(b):
        raise SystemExit(f"{what}: different tensor names ({len(set(a) ^ set(b))} not in both)")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("installs", nargs="+", type=Path, help="install folders (<dir>/ComfyUI, <dir>/venv)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="duge-versions-") as tmp:
        runs = [run_demo(install.resolve(), Path(tmp) / f"run{i}") for i, install in enumerate(args.installs)]
        reference_lora, reference_checkpoint = load_file(str(runs[0]["lora"])), load_file(str(runs[0]["checkpoint"]))
        rows = []
        for install, run in zip(args.installs, runs):
            lora, checkpoint = load_file(str(run["lora"])), load_file(str(run["checkpoint"]))
            rows.append({
                "install": str(install), "comfyui": run["version"],
                "lora_tensors": len(lora),
                "lora_max_abs_difference": max_difference(reference_lora, lora, f"{install} LoRA"),
                "lora_max_abs_value": max(float(t.double().abs().max()) for t in reference_lora.values()),
                "checkpoint_max_abs_difference": max_difference(reference_checkpoint, checkpoint, f"{install} checkpoint"),
            })
    print(f"demo workflow ({WORKFLOW.relative_to(REPO)}), reference: ComfyUI {rows[0]['comfyui']}")
    print(f"{'ComfyUI':>10} {'LoRA tensors':>13} {'LoRA max |Δ|':>14} {'checkpoint max |Δ|':>20}")
    for row in rows:
        print(f"{row['comfyui']:>10} {row['lora_tensors']:>13} {row['lora_max_abs_difference']:>14.3e} "
              f"{row['checkpoint_max_abs_difference']:>20.3e}")
    print(f"largest LoRA tensor value (its .alpha included): {rows[0]['lora_max_abs_value']:.3e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"workflow": str(WORKFLOW.relative_to(REPO)), "tolerance": args.tolerance,
                                         "rows": rows}, indent=1) + "\n")
    return 0 if all(row["lora_max_abs_difference"] <= args.tolerance for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
