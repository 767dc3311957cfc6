"""Train the embedded model from scratch on procedural data (CPU, about 70 minutes).

    python -m inference_server.embedded.train                 # one UNet cycle (make train-model runs two)
    python -m inference_server.embedded.train --resume        # continue from data/train checkpoints
    python -m inference_server.embedded.train --smoke --out /tmp/x --export /tmp/x/pipeline

Stages: tokenizer (learned from the caption corpus), VAE (reconstruction + small KL), then UNet and
text encoder jointly on cached VAE latents with the epsilon-prediction MSE (min-SNR weighting, offset
noise, 10% empty captions for classifier-free guidance, EMA of the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import dataset
from .model import (
    assemble,
    make_sample_scheduler,
    make_text_encoder,
    make_train_scheduler,
    make_unet,
    make_vae,
)
from .tokenizer import MAX_LENGTH, build_tokenizer, save_tokenizer

DEFAULT_OUT = Path("data/train")
DEFAULT_EXPORT = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 1300
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # KL only keeps the latent scale sane; a larger weight blurs colours at this size.
    vae_kl_weight: float = 1e-6
    # Train on random crops of this size (0 = whole 64x64 images). The VAE has no attention, so it
    # is fully convolutional and 32x32 crops teach the same edges for a quarter of the compute.
    vae_crop: int = 32
    latent_pool: int = 30000
    # One cosine cycle. The shipped weights: 9000 steps, then `--resume --unet-steps 18000` (a warm
    # restart of the learning rate at 9000 continuing to 18000): what `make train-model` runs. Shape
    # kind was 34% after the first cycle and 94.8% after the second.
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup_steps: int = 200
    # Classifier-free guidance needs the unconditional branch trained on ~10% of samples.
    caption_dropout: float = 0.1
    # Per-image, per-channel constant added to the noise: the SD-1.x schedule leaves ~7% of the
    # signal at t=999, enough on flat-coloured 16x16 latents for the model to copy the mean colour
    # out of the starting noise instead of the prompt; a random offset makes that mean useless.
    offset_noise: float = 0.2
    # min-SNR-gamma loss weighting (Hang et al. 2023), gamma 5 as in the paper.
    min_snr_gamma: float = 5.0
    schedule: str = "scaled_linear"
    ema_decay: float = 0.999
    checkpoint_minutes: float = 3.0
    # Wall-clock caps per stage. 0 = none (the run is then a pure function of the seed); otherwise
    # the stage stops when its budget is spent, its learning-rate decay following the clock (see
    # _lr_factor), for a CPU shared with other work.
    vae_max_minutes: float = 0.0
    unet_max_minutes: float = 0.0


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _bar(total: int, initial: int, desc: str) -> tqdm:
    # In a log file (no tty) a bar redrawn 10x a second is noise: update every 15 s instead.
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
        dynamic_ncols=True,
    )


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_factor(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10%.

    With a wall-clock budget the decay follows whichever is further along, steps or time, so a run
    slowed down by a busy CPU still ends with a decayed learning rate instead of being cut mid-way.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Budget:
    """Optional wall-clock cap for one stage (0 = none: the run is then a pure function of the seed)."""

    def __init__(self, minutes: float, already_spent_s: float = 0.0):
        self.seconds = minutes * 60.0
        self.start = time.time() - already_spent_s

    def progress(self) -> float:
        return (time.time() - self.start) / self.seconds if self.seconds else 0.0

    def spent(self) -> float:
        return time.time() - self.start

    def over(self) -> bool:
        return bool(self.seconds) and self.progress() >= 1.0


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ---------------------------------------------------------------- VAE


def train_vae(cfg: TrainConfig, out: Path, resume: bool):
    from diffusers import AutoencoderKL

    final = out / "vae"
    if resume and (final / "config.json").exists():
        _log(f"VAE: reusing finished {final}")
        return AutoencoderKL.from_pretrained(final), {}
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = out / "vae_ckpt.pt"
    step = 0
    state = None
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        _log(f"VAE: resumed at step {step}")
    budget = _Budget(cfg.vae_max_minutes, state.get("spent_s", 0.0) if state else 0.0)
    vae.train()
    started = time.time()
    last_ckpt = time.time()
    bar = _bar(cfg.vae_steps, step, "vae")
    ema_loss = None
    while step < cfg.vae_steps:
        # Fresh images every step, seeded by step: resumable and identical across runs.
        images, _ = dataset.make_dataset(cfg.seed * 1_000_003 + 17 + step, cfg.vae_batch)
        x = _images_to_tensor(images)
        if cfg.vae_crop:
            crop_rng = random.Random(step)
            c = cfg.vae_crop
            offsets = [(crop_rng.randrange(0, 65 - c), crop_rng.randrange(0, 65 - c)) for _ in range(len(x))]
            x = torch.stack(
                [img[:, oy : oy + c, ox : ox + c] for img, (oy, ox) in zip(x, offsets, strict=True)]
            )
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, cfg.warmup_steps, budget.progress())
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss_rec = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        loss = loss_rec + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        ema_loss = loss_rec.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_rec.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        timed_out = budget.over()
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60 or step == cfg.vae_steps or timed_out:
            _save_atomic(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "spent_s": budget.spent()},
                ckpt,
            )
            last_ckpt = time.time()
        if timed_out:
            _log(f"VAE: wall-clock budget reached at step {step}")
            break
    bar.close()
    vae.eval()
    # Held-out reconstruction error, and the latent scale SD pipelines expect (1 / std of latents).
    images, _ = dataset.make_dataset(cfg.seed + 999_999, min(256, cfg.latent_pool))
    x = _images_to_tensor(images)
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample.clamp(-1, 1)
    mse = F.mse_loss(rec, x).item()
    psnr = 10 * math.log10(4.0 / mse)
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(final)
    stats = {
        "vae_steps": step,
        "vae_minutes_this_run": round((time.time() - started) / 60, 2),
        "vae_minutes_total": round(budget.spent() / 60, 2),
        "vae_heldout_mse": round(mse, 5),
        "vae_psnr_db": round(psnr, 2),
        "scaling_factor": round(float(vae.config.scaling_factor), 4),
    }
    _log(f"VAE done: {stats}")
    return vae, stats


# ---------------------------------------------------------------- latents and captions


def _combo_index(spec: dataset.ShapeSpec) -> int:
    names = list(dataset.COLOURS)
    return (dataset.SHAPES.index(spec.shape) * len(names) + names.index(spec.colour)) * len(
        names
    ) + names.index(spec.background)


def caption_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids for every (shape, colour, background) x template, plus the empty caption."""
    names = list(dataset.COLOURS)
    texts = []
    for s in dataset.SHAPES:
        for c in names:
            for b in names:
                for t in range(len(dataset.TEMPLATES)):
                    texts.append(dataset.caption(s, c, b, t) if b != c else "")
    ids = tokenizer(
        texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    return ids.view(len(dataset.SHAPES) * len(names) * len(names), len(dataset.TEMPLATES), MAX_LENGTH), empty


def encode_pool(cfg: TrainConfig, vae, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cache = out / f"latents_seed{cfg.seed}_n{cfg.latent_pool}.pt"
    vae_mtime = (out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    if cache.exists() and cache.stat().st_mtime > vae_mtime:
        data = torch.load(cache)
        return data["latents"], data["combos"]
    _log(f"encoding {cfg.latent_pool} training images to latents")
    images, specs = dataset.make_dataset(cfg.seed * 1_000_003 + 5, cfg.latent_pool)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            chunks.append(vae.encode(_images_to_tensor(images[i : i + 256])).latent_dist.mean)
    latents = torch.cat(chunks) * vae.config.scaling_factor
    combos = torch.tensor([_combo_index(s) for s in specs])
    _save_atomic({"latents": latents, "combos": combos}, cache)
    return latents, combos


# ---------------------------------------------------------------- UNet + text encoder


def train_unet(cfg: TrainConfig, out: Path, vae, tokenizer, resume: bool, export_only: bool = False):
    latents, combos = encode_pool(cfg, vae, out)
    cap_ids, empty_ids = caption_table(tokenizer)
    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = make_train_scheduler(cfg.schedule)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight_table = snr.clamp(max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon targets
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    ckpt = out / "unet_ckpt.pt"
    step = 0
    state = None
    if (resume or export_only) and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        for e, v in zip(ema, state["ema"], strict=True):
            e.copy_(v)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        _log(f"UNet: resumed at step {step}")
    budget = _Budget(cfg.unet_max_minutes, state.get("spent_s", 0.0) if state else 0.0)
    if export_only:
        if state is None:
            raise SystemExit(f"--export-only: no checkpoint at {ckpt}")
        cfg = TrainConfig(**{**asdict(cfg), "unet_steps": step})
    unet.train()
    text_encoder.train()
    started, last_ckpt = time.time(), time.time()
    bar = _bar(cfg.unet_steps, step, "unet+text")
    ema_loss = None
    n = len(latents)
    B = cfg.unet_batch

    def save():
        _save_atomic(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema": ema,
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "spent_s": budget.spent(),
            },
            ckpt,
        )

    while step < cfg.unet_steps:
        idx = torch.randint(0, n, (B,), generator=gen)
        lat = latents[idx]
        tmpl = torch.randint(0, cap_ids.shape[1], (B,), generator=gen)
        ids = cap_ids[combos[idx], tmpl].clone()
        drop = torch.rand(B, generator=gen) < cfg.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(lat.shape, generator=gen)
        noise = noise + cfg.offset_noise * torch.randn(B, lat.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * _lr_factor(step, cfg.unet_steps, cfg.warmup_steps, budget.progress())
        enc = text_encoder(ids)[0]
        pred = unet(noisy, t, enc).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight_table[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        timed_out = budget.over()
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60 or step == cfg.unet_steps or timed_out:
            save()
            last_ckpt = time.time()
        if timed_out:
            _log(f"UNet: wall-clock budget reached at step {step}")
            break
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    minutes = (time.time() - started) / 60
    stats = {
        "unet_steps": step,
        "unet_minutes_this_run": round(minutes, 2),
        "unet_minutes_total": round(budget.spent() / 60, 2),
        "unet_final_loss": round(ema_loss or 0.0, 5),
        "samples_per_s": round(B * step / max(1e-9, time.time() - started), 1),
    }
    _log(f"UNet done: {stats}")
    return unet, text_encoder, stats


def export(vae, text_encoder, tokenizer, unet, cfg: TrainConfig, folder: Path) -> float:
    pipe = assemble(vae, text_encoder, tokenizer, unet, make_sample_scheduler(cfg.schedule))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder / "tokenizer")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    _log(f"exported pipeline to {folder} ({size:.1f} MB)")
    return size


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="work dir for checkpoints (default data/train)"
    )
    p.add_argument(
        "--export",
        type=Path,
        default=None,
        help="where to save the pipeline (default: the shipped weights folder; with --smoke: OUT/pipeline)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage on tiny data (tests)")
    p.add_argument("--stage", choices=("all", "vae"), default="all", help="stop after the VAE with 'vae'")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export the EMA weights of the last UNet checkpoint without training (to inspect a run)",
    )
    defaults = TrainConfig()
    for field, value in asdict(defaults).items():
        p.add_argument(
            "--" + field.replace("_", "-"), type=type(value), default=None, help=f"default {value}"
        )
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in asdict(defaults) if getattr(args, k) is not None}
    if args.smoke:
        # One thread: the tests share the CPU with other work, and tiny ops on two oversubscribed
        # threads spend most of their time waiting for each other.
        smoke = {
            "vae_steps": 3,
            "vae_batch": 4,
            "latent_pool": 16,
            "unet_steps": 3,
            "unet_batch": 4,
            "warmup_steps": 2,
            "threads": 1,
        }
        overrides = {**smoke, **overrides}
    cfg = TrainConfig(**{**asdict(defaults), **overrides})
    if cfg.schedule not in ("scaled_linear", "linear"):
        p.error(f"--schedule must be scaled_linear or linear, not {cfg.schedule!r}")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        p.error("--caption-dropout must be in [0, 1)")
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    export_to = args.export or (out / "pipeline" if args.smoke else DEFAULT_EXPORT)
    _log(f"config: {asdict(cfg)}; out={out}; export={export_to}")
    t0 = time.time()
    tokenizer = build_tokenizer(out / "tokenizer")
    vae, vae_stats = train_vae(cfg, out, args.resume or args.export_only)
    if args.stage == "vae":
        return 0
    unet, text_encoder, unet_stats = train_unet(cfg, out, vae, tokenizer, args.resume, args.export_only)
    size = export(vae, text_encoder, tokenizer, unet, cfg, export_to)
    summary = {
        **vae_stats,
        **unet_stats,
        "total_minutes_this_run": round((time.time() - t0) / 60, 2),
        "export": str(export_to),
        "size_mb": round(size, 2),
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _log("summary:\n" + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
