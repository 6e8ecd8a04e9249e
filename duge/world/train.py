"""Training of the built-in world's evaluator, VAE, text encoder and UNet (`duge world train`).

Stages, each writing its result so the next can start from it:
  evaluator  a CNN on rendered ground truth (blur/noise augmented)        -> evaluator.safetensors
  vae        AutoencoderKL, L1 + MSE + small KL; checked with the evaluator -> work/vae
  unet       UNet2DConditionModel + CLIPTextModel jointly, min-SNR weighting, 10 % empty prompts,
             EMA of the weights; sampled and scored with the evaluator while training -> model folder
The recipe follows ../shared/research/tiny-model-notes.md. Everything is seeded; the UNet stage
saves its state (safetensors) every `checkpoint_every` steps and resumes from it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .architecture import scheduler_config, text_encoder_config, unet_config, vae_config
from .evaluator import WorldEvaluator, load_evaluator
from .model import assemble_pipeline, generate
from .quality import measure_quality
from .scenes import random_caption, render_dataset
from .tokenizer import MAX_LENGTH, UNK, unknown_piece_ids, write_tokenizer
from .vocabulary import CONCEPTS_BY_KIND, KINDS, class_index, concept_by_name


@dataclass
class WorldTrainConfig:
    seed: int = 0
    n_train: int = 60_000
    n_val: int = 2_000
    evaluator_steps: int = 1_500
    evaluator_batch: int = 128
    vae_steps: int = 1_200
    vae_batch: int = 32
    unet_steps: int = 20_000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.9995
    empty_prompt_rate: float = 0.1
    unknown_word_rate: float = 0.02
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 1_000
    eval_samples_per_prompt: int = 8


# ----------------------------------------------------------------------------- data


def _labels(scenes) -> np.ndarray:
    """[N, 3] class indices (object, colour, style)."""
    return np.array(
        [[class_index(concept_by_name(getattr(s, kind))) for kind in KINDS] for s in scenes], dtype=np.int64
    )


def _to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 -> [N, 3, 32, 32] float in [0, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and small shifts, so decoded samples (softer than renders) read fairly."""
    b = images.shape[0]
    sigma = torch.rand(b, generator=generator) * 1.0
    kernel_x = torch.arange(-2, 3).float()
    weights = torch.exp(-(kernel_x[None] ** 2) / (2 * sigma[:, None].clamp(min=0.05) ** 2))
    weights = weights / weights.sum(1, keepdim=True)  # [B, 5]
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    blurred = sum(weights[:, i, None, None, None] * padded[..., :, i : i + images.shape[-1]] for i in range(5))
    blurred = sum(weights[:, i, None, None, None] * blurred[..., i : i + images.shape[-2], :] for i in range(5))
    noise = torch.randn(images.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.06
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    out = torch.roll(blurred + noise, shifts=shift, dims=(-2, -1))
    return out.clamp(0, 1)


def _log(work: Path, record: dict) -> None:
    with open(work / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- evaluator


def train_evaluator(cfg: WorldTrainConfig, images, labels, val_images, val_labels, out_path: Path, work: Path):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = WorldEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=cfg.evaluator_steps)
    x_all, y_all = _to_tensor(images), torch.from_numpy(labels)
    model.train()
    for step in tqdm(range(cfg.evaluator_steps), desc="evaluator"):
        idx = torch.randint(0, len(x_all), (cfg.evaluator_batch,), generator=gen)
        logits = model(_augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y_all[idx, i]) for i, k in enumerate(KINDS))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    accuracy = evaluator_accuracy(model, val_images, val_labels)
    _log(work, {"stage": "evaluator", "val_accuracy": accuracy})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path))
    return model.eval(), accuracy


@torch.no_grad()
def evaluator_accuracy(model: WorldEvaluator, images, labels) -> dict[str, float]:
    model.eval()
    x = _to_tensor(images) if isinstance(images, np.ndarray) else images
    y = torch.as_tensor(labels)
    preds = {k: [] for k in KINDS}
    for i in range(0, len(x), 256):
        logits = model(x[i : i + 256])
        for k in KINDS:
            preds[k].append(logits[k].argmax(-1))
    return {k: float((torch.cat(preds[k]) == y[:, i]).float().mean()) for i, k in enumerate(KINDS)}


# ----------------------------------------------------------------------------- VAE


def train_vae(cfg: WorldTrainConfig, images, val_images, val_labels, evaluator, work: Path):
    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1.5e-3)
    x_all = _to_tensor(images) * 2 - 1
    for step in tqdm(range(cfg.vae_steps), desc="vae"):
        if step == int(cfg.vae_steps * 2 / 3):
            for group in opt.param_groups:
                group["lr"] = 5e-4
        idx = torch.randint(0, len(x_all), (cfg.vae_batch,), generator=gen)
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        x_val = _to_tensor(val_images)
        recon = torch.cat([vae(x_val[i : i + 256] * 2 - 1).sample for i in range(0, len(x_val), 256)])
        recon = ((recon + 1) / 2).clamp(0, 1)
        psnr = float(-10 * torch.log10(F.mse_loss(recon, x_val)))
        latents = torch.cat([vae.encode(x_all[i : i + 512]).latent_dist.mean for i in range(0, min(4096, len(x_all)), 512)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    accuracy = evaluator_accuracy(evaluator, recon, val_labels)
    _log(work, {"stage": "vae", "reconstruction_accuracy": accuracy, "psnr_db": psnr, "scaling_factor": scaling})
    vae.save_pretrained(work / "vae")
    return vae, {"reconstruction_accuracy": accuracy, "psnr_db": psnr, "scaling_factor": scaling}


@torch.no_grad()
def encode_latents(vae, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 16, 16] (float16) of every training image."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), 512), desc="encode"):
        dist = vae.encode(_to_tensor(images[i : i + 512]) * 2 - 1).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- UNet + text encoder


def _flat_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def train_unet(cfg, labels, latent_mean, latent_std, vae, evaluator, tokenizer_dir: Path, work: Path, log_quality=True):
    from diffusers import DDPMScheduler, UNet2DConditionModel  # deferred with transformers: seconds to import
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(cfg.seed + 2)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(vocab))))
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay)
    start = 0
    state_path = work / "unet_state.safetensors"
    if state_path.exists():
        state = load_file(str(state_path))
        unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("te.")})
        ema.shadow_params = [state[f"ema.{i}"].clone() for i in range(len(params))]
        opt_state = opt.state_dict()
        for i, p in enumerate(params):
            opt_state["state"][i] = {
                "step": state[f"opt.step.{i}"].clone(),
                "exp_avg": state[f"opt.m.{i}"].clone(),
                "exp_avg_sq": state[f"opt.v.{i}"].clone(),
            }
        opt.load_state_dict(opt_state)
        start = int(json.loads((work / "unet_state.json").read_text())["step"])
        ema.optimization_step = start
        print(f"resuming UNet training at step {start}")

    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    rng = np.random.default_rng(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3 + start)
    rng = np.random.default_rng([cfg.seed + 3, start])
    special = torch.tensor([vocab["<|startoftext|>"], vocab["<|endoftext|>"]])
    pieces = torch.tensor(unknown_piece_ids(vocab))
    names = {k: [c.name for c in CONCEPTS_BY_KIND[k]] for k in KINDS}
    unet.train()
    text_encoder.train()
    t_start = time.time()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    for step in bar:
        lr = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, len(labels), cfg.unet_batch)
        captions = [
            "" if rng.random() < cfg.empty_prompt_rate else random_caption(
                names["object"][labels[i, 0]], names["colour"][labels[i, 1]], names["style"][labels[i, 2]], rng
            )
            for i in idx
        ]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        drop = (torch.rand(ids.shape, generator=gen) < cfg.unknown_word_rate) & ~torch.isin(ids, special)
        ids = torch.where(drop, torch.full_like(ids, vocab[UNK]), ids)
        idx_t = torch.from_numpy(idx)
        latents = (latent_mean[idx_t].float() + latent_std[idx_t].float() * torch.randn(latent_mean[idx_t].shape, generator=gen))
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]  # min-SNR for epsilon prediction
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            state = {**_flat_state("unet", unet), **_flat_state("te", text_encoder)}
            opt_state = opt.state_dict()["state"]
            for i in range(len(params)):
                state[f"ema.{i}"] = ema.shadow_params[i].detach().contiguous().clone()
                state[f"opt.step.{i}"] = torch.as_tensor(opt_state[i]["step"]).clone()
                state[f"opt.m.{i}"] = opt_state[i]["exp_avg"].contiguous()
                state[f"opt.v.{i}"] = opt_state[i]["exp_avg_sq"].contiguous()
            save_file(state, str(work / "unet_state.tmp"))
            (work / "unet_state.tmp").replace(state_path)
            (work / "unet_state.json").write_text(json.dumps({"step": done}))
            record = {"stage": "unet", "step": done, "loss": float(loss.detach()), "minutes": (time.time() - t_start) / 60}
            if log_quality:
                pipe = _ema_pipeline(unet, text_encoder, ema, params, vae, tokenizer, pieces, vocab)
                report = measure_quality(
                    lambda prompts, seed: generate(pipe, prompts, seed, steps=20),
                    evaluator, samples_per_prompt=cfg.eval_samples_per_prompt, n_combinations=8,
                )
                record.update(per_kind=report.per_kind, all_three=report.combination_all_three,
                              weakest=sorted(report.per_concept.items(), key=lambda kv: kv[1])[:4])
            _log(work, record)
    return _ema_pipeline(unet, text_encoder, ema, params, vae, tokenizer, pieces, vocab)


def _ema_pipeline(unet, text_encoder, ema, params, vae, tokenizer, pieces, vocab):
    """A pipeline on copies of the parts holding the EMA weights, fragment embeddings tied to <|unk|>."""
    unet_ema, te_ema = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(unet_ema.parameters()) + list(te_ema.parameters())
    with torch.no_grad():
        for p, shadow in zip(ema_params, ema.shadow_params):
            p.copy_(shadow)
        emb = te_ema.get_input_embeddings().weight
        emb[pieces] = emb[vocab[UNK]].clone()
    return assemble_pipeline(unet_ema, te_ema, vae.eval(), tokenizer)


# ----------------------------------------------------------------------------- everything


def train_world(cfg: WorldTrainConfig, out_dir: Path, work: Path, stages=("evaluator", "vae", "unet")) -> dict:
    """Run the stages; write `evaluator.safetensors` and the diffusers folder `tiny-sd/` into `out_dir`."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir, work = Path(out_dir), Path(work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["config"] = asdict(cfg)

    t0 = time.time()
    images, scenes = render_dataset(cfg.n_train, cfg.seed)
    labels = _labels(scenes)
    val_images, val_scenes = render_dataset(cfg.n_val, cfg.seed + 10_000)
    val_labels = _labels(val_scenes)
    _log(work, {"stage": "render", "seconds": time.time() - t0})

    evaluator_path = out_dir / "evaluator.safetensors"
    if "evaluator" in stages:
        t0 = time.time()
        evaluator, acc = train_evaluator(cfg, images, labels, val_images, val_labels, evaluator_path, work)
        record["evaluator"] = {"held_out_accuracy": acc, "seconds": time.time() - t0}
    else:
        evaluator = load_evaluator(evaluator_path)

    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    if "vae" in stages:
        t0 = time.time()
        vae, vae_record = train_vae(cfg, images, val_images, val_labels, evaluator, work)
        record["vae"] = {**vae_record, "seconds": time.time() - t0}
    else:
        vae = AutoencoderKL.from_pretrained(work / "vae")

    if "unet" in stages:
        tokenizer_dir = write_tokenizer(work / "tokenizer")
        state = work / "unet_state.json"
        if state.exists() and json.loads(state.read_text())["step"] >= cfg.unet_steps:
            latent_mean = latent_std = None  # finished: only the EMA weights are exported
        else:
            latent_mean, latent_std = encode_latents(vae, images)
        t0 = time.time()
        pipe = train_unet(cfg, labels, latent_mean, latent_std, vae, evaluator, tokenizer_dir, work)
        record["unet"] = {"steps": cfg.unet_steps, "seconds_this_run": time.time() - t0}
        save_builtin_model(pipe, out_dir / "tiny-sd")
    record_path.write_text(json.dumps(record, indent=2))
    return record


def save_builtin_model(pipe, folder: Path) -> None:
    """Save the pipeline as a diffusers folder, weights in float16 (the shipped size), atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp / "tokenizer")  # also in CLIP's own vocab.json + merges.txt form
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.to(torch.float32)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
