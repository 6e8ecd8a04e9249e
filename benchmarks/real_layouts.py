"""SD 1.5, SD 2.1 and SDXL layouts on this CPU: train a few DUGE steps, write the LoRA and the single
file, load them back with diffusers (and ComfyUI), and compare `duge plan` with what was measured.

    python benchmarks/real_layouts.py [--json PATH] [--reduced] [--layouts sd1,sd2,sdxl] [--full-text]

Models are built from the reference configs in duge/configs with random weights (nothing is
downloaded). Default: full-size UNets and VAEs, text encoders cut to 2 layers (their width, and so
the UNet's cross-attention inputs, stay real; `--full-text` keeps every layer). `--reduced`: UNet and
VAE channels divided by 10 (same blocks, layers and key names; what CI runs). Latents 8x8 (64 px).

Per layout: trainable parameter count (attn2 to_k/to_v, checked against the count computed from the
UNet config), seconds per step, the loaders' unmatched / missing / differing tensor counts
(diffusers `from_single_file` with a local config folder, diffusers `load_lora_weights` + `fuse_lora`,
and ComfyUI's checkpoint UNet loading and LoraLoader path when COMFYUI_PATH is set, run in
`COMFYUI_PYTHON` or COMFYUI_PATH/.venv), and planned vs measured peak memory (benchmarks/peak_memory.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from duge.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from duge.concepts import parse_concept_set, resolve_concept_set  # noqa: E402
from duge.edits import trainable_pattern  # noqa: E402
from duge.io import load_lora, pipeline_config_files, pipeline_to_ldm_state_dict, save_lora, save_single_file  # noqa: E402
from duge.layouts import LAYOUTS, random_pipeline  # noqa: E402
from benchmarks.peak_memory import PeakMemory  # noqa: E402
from duge.paths import atomic_write_text  # noqa: E402
from duge.plan import measure_tflops, plan_run  # noqa: E402
from duge.trainer import UnlearnConfig, unlearn  # noqa: E402
from duge.world.model import BUILTIN_MODEL_DIR  # noqa: E402

CONCEPTS = "name: layouts\nrequests:\n  - target: circle\n    anchor: shape\n    preserve: [square]\n"
COMFY_CHECK = Path(__file__).with_name("comfy_layout_check.py")


def expected_kv_parameters(unet_config: dict) -> int:
    """Σ over every cross-attention transformer block of to_k + to_v weights: 2 · channels · cross_attention_dim."""
    channels = list(unet_config["block_out_channels"])
    n = len(channels)
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    layers, depth = per(unet_config["layers_per_block"]), per(unet_config.get("transformer_layers_per_block") or 1)
    dim = unet_config["cross_attention_dim"]
    total = 0
    for i, kind in enumerate(unet_config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            total += layers[i] * depth[i] * 2 * channels[i] * dim
    reverse_depth = per(unet_config.get("reverse_transformer_layers_per_block") or depth[::-1])
    for i, kind in enumerate(unet_config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            total += (layers[::-1][i] + 1) * reverse_depth[i] * 2 * channels[::-1][i] * dim
    total += depth[-1] * 2 * channels[-1] * dim  # mid block
    return total


def _config_folder(pipe, folder: Path) -> Path:
    for name, text in pipeline_config_files(pipe).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return folder


def check_single_file_with_diffusers(edited, path: Path, workdir: Path, layout) -> dict:
    """Load `path` with diffusers' from_single_file and a local config folder; count what does not match `edited`."""
    import diffusers
    from safetensors import safe_open

    folder = _config_folder(edited, workdir / "config")
    cls = getattr(diffusers, layout.pipeline_class)
    extra = {"add_watermarker": False} if layout.name == "sdxl" else {"safety_checker": None,
                                                                        "requires_safety_checker": False}
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    with safe_open(str(path), framework="pt") as f:
        file_keys = set(f.keys())
    loaded_state = pipeline_to_ldm_state_dict(loaded)
    expected_state = pipeline_to_ldm_state_dict(edited)
    meta = sum(p.device.type == "meta" for c in ("unet", "vae", *layout.text_encoders)
               for p in getattr(loaded, c).parameters())
    differing = [k for k in expected_state if k in loaded_state and not torch.equal(expected_state[k], loaded_state[k])]
    result = {"unmatched": len(file_keys - set(loaded_state)), "missing": len(set(expected_state) - file_keys) + meta,
              "differing": len(differing), "tensors": len(file_keys)}
    del loaded
    return result


def check_lora_with_diffusers(host, edited, lora: Path, modules: list[str]) -> dict:
    """`load_lora_weights` + `fuse_lora` on the host: LoRA layers injected, and the fused weights vs the edit."""
    host.load_lora_weights(str(lora), adapter_name="duge")
    injected = {name for name, m in host.unet.named_modules() if hasattr(m, "lora_A") and "duge" in m.lora_A}
    host.fuse_lora(adapter_names=["duge"])
    host_modules, edited_modules = dict(host.unet.named_modules()), dict(edited.unet.named_modules())
    error = max(float((host_modules[m].weight - edited_modules[m].weight).abs().max()) for m in modules if m in injected)
    host.unfuse_lora()
    host.unload_lora_weights()
    return {"unmatched": len(set(modules) - injected), "missing": len(injected - set(modules)),
            "max_abs_weight_error": error, "modules": len(modules)}


def check_with_comfyui(layout, checkpoint: Path, lora: Path) -> dict | None:
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        return None
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(comfy) / ".venv" / "bin" / "python")
    out = subprocess.run([python, str(COMFY_CHECK), "--layout", layout.name, "--checkpoint", str(checkpoint),
                          "--lora", str(lora)], capture_output=True, text=True, env=dict(os.environ), check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_layout(name: str, width_divisor: int, text_layers: int | None, latent: int, steps: int, workdir: Path,
               tflops: float, trainable_mode: str = "full") -> dict:
    layout = LAYOUTS[name]
    peak = PeakMemory()
    t0 = time.time()
    pipe = random_pipeline(name, BUILTIN_MODEL_DIR / "tokenizer", width_divisor=width_divisor, text_layers=text_layers)
    build_seconds = time.time() - t0
    backend = DiffusersBackend(pipe, device="cpu", resolution=latent * 8)
    trainable = sum(m.weight.numel() for m in backend.trainable_linears(trainable_pattern("kv")).values())
    config = UnlearnConfig(steps=steps, batch_size=2, anchor_images=2, related_images=1, sampler_steps=2,
                           trainable_mode=trainable_mode)
    plan = plan_run(pipe, config, f"{name} (random)", resolution=latent * 8, device="cpu", tflops=tflops)
    peak.reset()
    t1 = time.time()
    result = unlearn(backend, resolve_concept_set(parse_concept_set(CONCEPTS), False, config.setting), config)
    train_seconds = time.time() - t1
    measured_peak, start = peak.peak_mb(), peak.start_mb
    peak.close()
    edited = backend.edited_pipeline(result.total_delta)
    single, lora = workdir / f"{name}.safetensors", workdir / f"{name}_lora.safetensors"
    save_single_file(edited, single, None, overwrite=True)
    save_lora(result.total_delta, lora, None, overwrite=True)
    read_back, _ = load_lora(lora)
    lora_file_error = max(float((read_back[m] - d).abs().max()) for m, d in result.total_delta.items())
    largest_delta = max(float(d.abs().max()) for d in result.total_delta.values())
    row = {
        "layout": name, "title": layout.title, "width_divisor": width_divisor, "text_layers": text_layers,
        "latent": latent, "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "trainable_parameters": trainable, "expected_kv_parameters": expected_kv_parameters(dict(pipe.unet.config)),
        "trainable_mode": trainable_mode, "prediction_type": backend.prediction_type, "steps": steps,
        "build_seconds": round(build_seconds, 1), "train_seconds": round(train_seconds, 1),
        "delta_norm": float(sum(d.norm() ** 2 for d in result.total_delta.values()) ** 0.5),
        "diffusers_single_file": check_single_file_with_diffusers(edited, single, workdir / name, layout),
        "lora_file_max_abs_error": lora_file_error, "largest_delta_entry": largest_delta,
        "diffusers_lora": check_lora_with_diffusers(pipe, edited, lora, sorted(result.total_delta)),
        "comfyui": check_with_comfyui(layout, single, lora),
        "plan": {"total_gib": plan.memory_gib["total"], "weights_gib": plan.memory_gib["weights"],
                 "edits_gib": plan.memory_gib["edits"], "activations_gib": plan.memory_gib["activations"],
                 "seconds_per_request": plan.seconds_per_request},
        "measured": {"peak_mib": round(measured_peak), "start_mib": round(start),
                     "above_start_mib": round(measured_peak - start), "method": peak.method},
    }
    for path in (single, lora):
        path.unlink()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| layout | UNet params | trainable (expected) | s/request | single file unmatched/missing/differing | "
             "LoRA unmatched/missing (max err) | ComfyUI | plan GiB (edits+act) | measured peak MiB (above start) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sf, lo, c = r["diffusers_single_file"], r["diffusers_lora"], r["comfyui"]
        comfy = "not run" if c is None else (c.get("error") or
                                             f"{c['unet_missing']}/{c['unet_unexpected']} unet, {c['lora_not_loaded']} LoRA not loaded")
        lines.append(
            f"| {r['title']} (÷{r['width_divisor']}) | {r['unet_parameters'] / 1e6:.1f} M | "
            f"{r['trainable_parameters'] / 1e6:.3f} M ({r['expected_kv_parameters'] / 1e6:.3f} M) | {r['train_seconds']} | "
            f"{sf['unmatched']}/{sf['missing']}/{sf['differing']} of {sf['tensors']} | "
            f"{lo['unmatched']}/{lo['missing']} ({lo['max_abs_weight_error']:.1e}) | {comfy} | "
            f"{r['plan']['total_gib']:.2f} ({r['plan']['edits_gib'] + r['plan']['activations_gib']:.2f}) | "
            f"{r['measured']['peak_mib']} ({r['measured']['above_start_mib']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--reduced", action="store_true", help="UNet/VAE channels ÷ 10 (CI size)")
    parser.add_argument("--layouts", default="sd1,sd2,sdxl")
    parser.add_argument("--full-text", action="store_true", help="keep every text-encoder layer")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--trainable-mode", default="full", choices=["full", "lora"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tflops = measure_tflops(torch.device("cpu"), torch.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="duge-layouts-") as folder:
        for name in args.layouts.split(","):
            row = run_layout(name, 10 if args.reduced else 1, None if args.full_text else 2, args.latent, args.steps,
                             Path(folder), tflops, args.trainable_mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "cpu_tflops_measured": tflops, "torch": torch.__version__, "rows": rows}
    print(table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
