"""Train the toy text-to-multi-view model shipped in `carve3d_trl/toy/weights/` (CPU, one thread, < 30 minutes).

1. Render `--num_scenes` captioned synthetic scenes (`carve3d_trl.toy.data`) as 2x2 grids of 32-px views; each grid
   gives 8 consistent grids by turning the scene in steps of 90 degrees (a cyclic shift of the views) and mirroring it.
2. Train the VAE as an autoencoder on single views (foreground-weighted pixel and chroma errors, a small KL term) and
   set its latent scaling factor to 1 / latent std.
3. Train the UNet and the text encoder with the epsilon-prediction DDPM loss (Min-SNR weighting, 10% empty
   captions for classifier-free guidance). Save the short-SFT checkpoint after `--short_steps` and the long-SFT one
   after `--unet_steps`, as fp16 diffusers folders written atomically.

Deterministic for a given `--seed` (and thread count). Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_toy_model.py [--output_dir carve3d_trl/toy/weights]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "carve3d_trl" / "toy" / "weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="Gets short/ and long/.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes, the weights and the batches.")
    parser.add_argument("--num_scenes", type=int, default=1000, help="Rendered scenes (x8 by augmentation).")
    parser.add_argument("--vae_steps", type=int, default=1000, help="VAE optimizer steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16, help="Single views per VAE step.")
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3, help="VAE AdamW learning rate.")
    parser.add_argument("--chroma_weight", type=float, default=10.0, help="VAE loss weight of the chroma error.")
    parser.add_argument("--short_steps", type=int, default=400, help="UNet steps of the short-SFT checkpoint.")
    parser.add_argument("--unet_steps", type=int, default=1500, help="UNet steps of the long-SFT checkpoint.")
    parser.add_argument("--batch_size", type=int, default=32, help="Grids per UNet step.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="UNet and text encoder AdamW rate.")
    parser.add_argument("--warmup_steps", type=int, default=100, help="Linear learning-rate warm-up steps.")
    parser.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain MSE).")
    parser.add_argument("--empty_caption_rate", type=float, default=0.1, help="Captions dropped for CFG.")
    parser.add_argument("--snapshot_every", type=int, default=0, help="Also save every N UNet steps (0: never).")
    parser.add_argument("--snapshot_dir", type=Path, help="Where the snapshots go (default: output_dir/snapshots).")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args(argv)
    if not 0 < args.short_steps <= args.unet_steps:
        parser.error("--short_steps must be in [1, --unet_steps].")
    return args


import copy  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from carve3d_trl.atomic import atomic_directory  # noqa: E402
from carve3d_trl.rewards import foreground_mask, instant3d_layout, split_grid  # noqa: E402
from carve3d_trl.toy.data import scene_dataset, turned_and_mirrored  # noqa: E402
from carve3d_trl.toy.model import build_toy_pipeline  # noqa: E402

logger = logging.getLogger("train_toy_model")
WHITE = (1.0, 1.0, 1.0)
FOREGROUND_WEIGHT = 10.0  # VAE loss weight of foreground pixels (background: 1)


def train_vae(vae, views: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Fit the VAE as a deterministic autoencoder (decoding the posterior mean) on random batches of single `views`
    `(M, 3, h, w)` in [0, 1], randomly mirrored.

    The squared and absolute errors are weighted up on the foreground, and the error of the chroma (each pixel minus
    its grey level) is added: without it the VAE learns the scenes' shapes in minutes but renders every colour as
    the same brown.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.vae_steps)
    vae.train()
    for step in range(1, args.vae_steps + 1):
        batch = views[torch.randint(len(views), (args.vae_batch_size,), generator=generator)]
        mirror = torch.rand(args.vae_batch_size, 1, 1, 1, generator=generator) < 0.5
        batch = torch.where(mirror, batch.flip(-1), batch)
        posterior = vae.encode(batch * 2 - 1).latent_dist
        error = vae.decode(posterior.mean).sample - (batch * 2 - 1)
        chroma = error - error.mean(dim=1, keepdim=True)
        weight = 1 + (FOREGROUND_WEIGHT - 1) * foreground_mask(batch, WHITE)[:, None].float()
        pixel_loss = weight * (error.pow(2) + error.abs() + args.chroma_weight * chroma.pow(2))
        loss = pixel_loss.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            logger.info("vae step %d/%d loss %.4f", step, args.vae_steps, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, grids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means of `grids` in [0, 1] (the VAE was trained as a deterministic autoencoder)."""
    return torch.cat(
        [vae.encode(grids[i : i + batch_size] * 2 - 1).latent_dist.mean for i in range(0, len(grids), batch_size)]
    )


def save_pipeline(pipeline, path: Path) -> None:
    """Save a copy of `pipeline` as a diffusers folder at `path`, atomically: UNet and VAE in fp16 (diffusers loads
    them in fp32), the text encoder in fp32 (transformers would load it in the dtype it was saved in)."""
    copy_ = copy.deepcopy(pipeline)
    copy_.unet.to(torch.float16)
    copy_.vae.to(torch.float16)
    with atomic_directory(path) as tmp:
        copy_.save_pretrained(tmp, safe_serialization=True)
    logger.info("saved %s", path)


def train_denoiser(pipeline, latents, captions, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Train the UNet and text encoder on unscaled `latents` with their captions; save the checkpoints."""
    from diffusers import DDPMScheduler

    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    vocabulary = sorted(set(captions)) + [""]
    token_ids = tokenizer(
        vocabulary, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    latents = latents * pipeline.vae.config.scaling_factor
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    unet.train()
    text_encoder.train()
    snapshot_dir = args.snapshot_dir or args.output_dir / "snapshots"
    start = time.time()
    for step in range(1, args.unet_steps + 1):
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        clean = latents[index]
        dropped = torch.rand(args.batch_size, generator=generator) < args.empty_caption_rate
        ids = token_ids[torch.where(dropped, len(vocabulary) - 1, caption_index[index])]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        if args.snr_gamma > 0:
            per_sample = per_sample * snr[timesteps].clamp(max=args.snr_gamma) / snr[timesteps]
        loss = per_sample.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()
        if step % 50 == 0 or step == 1:
            logger.info("unet step %d/%d loss %.4f (%.0f s)", step, args.unet_steps, loss.item(), time.time() - start)
        if args.snapshot_every and step % args.snapshot_every == 0:
            save_pipeline(pipeline, snapshot_dir / f"step_{step}")
        if step == args.short_steps:
            save_pipeline(pipeline, args.output_dir / "short")
    save_pipeline(pipeline, args.output_dir / "long")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    captions, rendered = scene_dataset(args.num_scenes, seed=args.seed)
    logger.info("rendered %d scenes in %.0f s", args.num_scenes, time.time() - start)
    grids = turned_and_mirrored(rendered)
    captions = [c for c in captions for _ in range(8)]

    pipeline = build_toy_pipeline(args.seed)
    pipeline.unet.requires_grad_(True)
    pipeline.text_encoder.requires_grad_(True)
    train_vae(pipeline.vae, split_grid(rendered, instant3d_layout()).flatten(0, 1), args, generator)
    latents = encode(pipeline.vae, grids)
    scale = 1.0 / float(latents.std())
    pipeline.vae.register_to_config(scaling_factor=scale)
    logger.info("vae done at %.0f s; latent scaling factor %.4f", time.time() - start, scale)

    train_denoiser(pipeline, latents, captions, args, generator)
    logger.info("total %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
