"""What the toy models' training scripts share: the VAE's autoencoder training, encoding, the epsilon-prediction
diffusion loop (one loop for the single-view, grid and view-batched toys), caption vocabularies, and saving.

The diffusion loop (`train_denoiser`) draws, per step and in this order from one generator: the samples, which
captions are dropped (for classifier-free guidance), the noise and the timesteps; so a run is deterministic in its
seed (and thread count). The model enters as a function `predict(noisy, timesteps, caption_ids)`, which hides the
family's conditioning (text encoder or cached embeddings, camera inputs).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..rewards.crop import foreground_mask

__all__ = [
    "add_schedule_arguments",
    "checkpoint_saver",
    "denoiser_schedule",
    "DenoiserSchedule",
    "caption_vocabulary",
    "encode_images",
    "save_pipeline",
    "token_ids",
    "train_denoiser",
    "train_vae",
]

logger = logging.getLogger(__name__)
FOREGROUND_WEIGHT = 10.0  # VAE loss weight of foreground pixels (background: 1)


def train_vae(
    vae,
    views: torch.Tensor,
    generator: torch.Generator,
    steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    chroma_weight: float = 10.0,
) -> None:
    """Fit the VAE as a deterministic autoencoder (decoding the posterior mean) on random batches of single `views`
    `(M, 3, h, w)` in [0, 1] on white, randomly mirrored; leaves it in eval mode, frozen.

    The squared and absolute errors are weighted up on the foreground, and the error of the chroma (each pixel minus
    its grey level) is added: without it the VAE learns the scenes' shapes first and renders every colour as the
    same brown. AdamW with cosine decay.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train().requires_grad_(True)
    for step in range(1, steps + 1):
        batch = views[torch.randint(len(views), (batch_size,), generator=generator)]
        mirror = torch.rand(batch_size, 1, 1, 1, generator=generator) < 0.5
        batch = torch.where(mirror, batch.flip(-1), batch)
        posterior = vae.encode(batch * 2 - 1).latent_dist
        error = vae.decode(posterior.mean).sample - (batch * 2 - 1)
        chroma = error - error.mean(dim=1, keepdim=True)
        weight = 1 + (FOREGROUND_WEIGHT - 1) * foreground_mask(batch)[:, None].float()
        pixel_loss = weight * (error.pow(2) + error.abs() + chroma_weight * chroma.pow(2))
        loss = pixel_loss.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            logger.info("vae step %d/%d loss %.4f", step, steps, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (unscaled) of images `(..., 3, H, W)` in [0, 1]: `(..., C, H/f, W/f)` (the toy VAEs are
    trained as deterministic autoencoders)."""
    flat = images.reshape(-1, *images.shape[-3:]) * 2 - 1
    means = torch.cat([vae.encode(flat[i : i + batch_size]).latent_dist.mean for i in range(0, len(flat), batch_size)])
    return means.view(*images.shape[:-3], *means.shape[1:])


def caption_vocabulary(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The sorted distinct captions plus the empty caption (last), and the index `(len(captions),)` of each caption
    in it."""
    vocabulary = sorted(set(captions)) + [""]
    position = {caption: i for i, caption in enumerate(vocabulary)}
    return vocabulary, torch.tensor([position[c] for c in captions])


def token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids `(K, L)` of `texts`, padded to the tokenizer's maximum length."""
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@dataclass
class DenoiserSchedule:
    """The diffusion loop's settings: `steps` optimizer steps of `batch_size` samples, AdamW (`learning_rate`,
    `weight_decay`) with linear warm-up over `warmup_steps` then cosine decay to `final_lr_fraction` of the rate,
    gradients clipped to norm 1, Min-SNR weighting `snr_gamma` (0: plain MSE), a share `empty_caption_rate` of
    captions dropped."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    snr_gamma: float = 5.0
    empty_caption_rate: float = 0.1
    weight_decay: float = 1e-2

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 1:
            raise ValueError(
                f"steps, batch_size and warmup_steps must be >= 1, got {self.steps}, {self.batch_size} and "
                f"{self.warmup_steps}."
            )
        if not 0.0 <= self.empty_caption_rate < 1.0:
            raise ValueError(f"empty_caption_rate must be in [0, 1), got {self.empty_caption_rate}.")

    def learning_rate_factor(self, step: int) -> float:
        """The factor of the learning rate at `step` (counted from 0)."""
        decay = 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        return warmup * (self.final_lr_fraction + (1 - self.final_lr_fraction) * decay)


def train_denoiser(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    empty_index: int,
    scheduler_config,
    schedule: DenoiserSchedule,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
    log_name: str = "unet",
) -> list[float]:
    """Train with the epsilon-prediction DDPM loss: noise scaled `latents` `(M, ...)` (one timestep per sample),
    predict the noise, minimise the (Min-SNR weighted) squared error.

    Args:
        predict (`Callable`): `predict(noisy (B, ...), timesteps (B,), caption_ids (B,))` -> the predicted noise
            `(B, ...)`; `caption_ids` index the caption vocabulary, `empty_index` being the empty caption.
        parameters (`Iterable[torch.nn.Parameter]`): What the optimizer trains (the modules must be in train mode).
        latents (`torch.Tensor`): Training latents `(M, ...)`, already multiplied by the VAE's scaling factor.
        caption_index (`torch.Tensor`): Caption id `(M,)` of each latent.
        scheduler_config: The noise schedule (a diffusers scheduler's config, read by `DDPMScheduler`).
        schedule (`DenoiserSchedule`): Steps, batch, optimizer and loss settings.
        generator (`torch.Generator`): The one source of the loop's randomness.
        on_step (`Callable[[int], None]`, *optional*): Called after each optimizer step with its number (from 1),
            e.g. to save checkpoints.

    Returns:
        `list[float]`: the loss of every step.
    """
    from diffusers import DDPMScheduler

    if latents.shape[0] != caption_index.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {caption_index.shape[0]} caption ids; give one per latent.")
    parameters = list(parameters)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.learning_rate_factor)
    batch, reduce = schedule.batch_size, tuple(range(1, latents.ndim))
    losses = []
    start = time.time()
    for step in range(1, schedule.steps + 1):
        index = torch.randint(len(latents), (batch,), generator=generator)
        clean = latents[index]
        dropped = torch.rand(batch, generator=generator) < schedule.empty_caption_rate
        ids = torch.where(dropped, empty_index, caption_index[index])
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        per_sample = (predict(noisy, timesteps, ids) - noise).pow(2).mean(dim=reduce)
        if schedule.snr_gamma > 0:
            per_sample = per_sample * snr[timesteps].clamp(max=schedule.snr_gamma) / snr[timesteps]
        loss = per_sample.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            logger.info(
                "%s step %d/%d loss %.4f (%.0f s)", log_name, step, schedule.steps, losses[-1], time.time() - start
            )
        if on_step is not None:
            on_step(step)
    return losses


def save_pipeline(pipeline, path: str | Path) -> None:
    """Save a copy of `pipeline` as a diffusers folder at `path`, atomically: UNet and VAE in fp16 (diffusers loads
    them in fp32), the text encoder in fp32 (transformers would load it in the dtype it was saved in)."""
    copy_ = copy.deepcopy(pipeline)
    copy_.unet.to(torch.float16)
    copy_.vae.to(torch.float16)
    with atomic_directory(path) as tmp:
        copy_.save_pretrained(tmp, safe_serialization=True)
    logger.info("saved %s", path)


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the diffusion loop's shared options to a training script's parser (`denoiser_schedule` reads them)."""
    parser.add_argument("--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps.")
    parser.add_argument("--final_lr_fraction", type=float, default=0.1, help="Cosine decay to this rate fraction.")
    parser.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain MSE).")
    parser.add_argument("--empty_caption_rate", type=float, default=0.1, help="Captions dropped for CFG.")


def denoiser_schedule(args: argparse.Namespace, steps: int, batch_size: int, learning_rate: float) -> DenoiserSchedule:
    """The `DenoiserSchedule` of `steps` steps of `batch_size` at `learning_rate`, with the options of
    `add_schedule_arguments`."""
    return DenoiserSchedule(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=args.warmup_steps,
        final_lr_fraction=args.final_lr_fraction,
        snr_gamma=args.snr_gamma,
        empty_caption_rate=args.empty_caption_rate,
    )


def checkpoint_saver(
    pipeline,
    output_dir: Path,
    short_steps: int,
    long_steps: int,
    snapshot_every: int = 0,
    snapshot_dir: Path | None = None,
) -> Callable[[int], None]:
    """An `on_step` for `train_denoiser` that saves `pipeline` (`save_pipeline`) as `output_dir/short` after
    `short_steps` steps, as `output_dir/long` after `long_steps`, and every `snapshot_every` steps (0: never) as
    `snapshot_dir/step_<N>` (default `output_dir/snapshots`)."""
    snapshot_dir = snapshot_dir or output_dir / "snapshots"

    def on_step(step: int) -> None:
        if snapshot_every and step % snapshot_every == 0:
            save_pipeline(pipeline, snapshot_dir / f"step_{step}")
        if step == short_steps:
            save_pipeline(pipeline, output_dir / "short")
        if step == long_steps:
            save_pipeline(pipeline, output_dir / "long")

    return on_step
