"""Train the view-batched toy model shipped in `carve3d_trl/toy/weights/view_batched/` (CPU, one thread).

MVDream's recipe in miniature: a view-batched model made from a single-image one.

1. Render `--num_scenes` captioned synthetic scenes (the grid toy's scenes, `carve3d_trl.toy.data`) as 4 views of
   32 px at the view-batched family's cameras (`multiview_cameras(4, elevation=15.0)`); each object gives 8 objects
   by turning the scene in quarter turns (a cyclic shift of the views) and mirroring it (views flipped, views 1 and 3
   swapped).
2. Start from the grid toy (`--base`, default the shipped `long` checkpoint): its tokenizer, text encoder and VAE,
   frozen, and its UNet's weights in a UNet with the camera embedding (last layer zero) and cross-view attention
   (`carve3d_trl.toy.view_batched.build_toy_view_batched_pipeline`).
3. Train the UNet with the epsilon-prediction DDPM loss on view-batched latents `(B, 4, C, h, w)`, one timestep per
   object (Min-SNR weighting, 10% empty captions for classifier-free guidance, cosine learning-rate decay). Save the
   short-SFT checkpoint after `--short_steps` and the long-SFT one after `--unet_steps`, as fp16
   `MultiViewDiffusionPipeline` folders written atomically.

Deterministic for a given `--seed` (and thread count). Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_toy_view_batched.py [--output_dir DIR]   # --help: all options
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "carve3d_trl" / "toy" / "weights" / "view_batched"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="Gets short/ and long/.")
    parser.add_argument("--base", type=Path, help="Grid toy folder to start from (default: the shipped long one).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes, the camera layer and the batches.")
    parser.add_argument("--num_scenes", type=int, default=1000, help="Rendered scenes (x8 by augmentation).")
    parser.add_argument("--short_steps", type=int, default=200, help="UNet steps of the short-SFT checkpoint.")
    parser.add_argument("--unet_steps", type=int, default=1800, help="UNet steps of the long-SFT checkpoint.")
    parser.add_argument("--batch_size", type=int, default=24, help="Objects (of 4 views) per UNet step.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="UNet AdamW learning rate.")
    parser.add_argument("--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps.")
    parser.add_argument("--final_lr_fraction", type=float, default=0.1, help="Cosine decay to this rate fraction.")
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
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from carve3d_trl.atomic import atomic_directory  # noqa: E402
from carve3d_trl.toy.model import load_toy_pipeline  # noqa: E402
from carve3d_trl.toy.view_batched import (  # noqa: E402
    build_toy_view_batched_pipeline,
    mirrored_views,
    scene_view_dataset,
    turned_views,
)

logger = logging.getLogger("train_toy_view_batched")


@torch.no_grad()
def encode(vae, views: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means `(N, V, C, h, w)` of views `(N, V, 3, H, W)` in [0, 1], view by view (the grid toy's VAE was
    trained as a deterministic autoencoder on single views)."""
    flat = views.flatten(0, 1) * 2 - 1
    means = [vae.encode(flat[i : i + batch_size]).latent_dist.mean for i in range(0, len(flat), batch_size)]
    return torch.cat(means).unflatten(0, views.shape[:2])


def augmented_latents(vae, views: torch.Tensor) -> torch.Tensor:
    """Latents `(8N, V, C, h, w)` of each object's 8 versions, object by object: the 4 quarter turns of the scene
    (a cyclic shift of the per-view latents), then those of its mirror image (encoded from the mirrored views)."""
    latents, mirrored = encode(vae, views), encode(vae, mirrored_views(views))
    versions = [turned_views(v, quarter) for v in (latents, mirrored) for quarter in range(4)]
    return torch.stack(versions, dim=1).flatten(0, 1)


def save_pipeline(pipeline, path: Path) -> None:
    """Save a copy of `pipeline` as a diffusers folder at `path`, atomically: UNet and VAE in fp16 (diffusers loads
    them in fp32), the text encoder in fp32 (transformers would load it in the dtype it was saved in)."""
    copy_ = copy.deepcopy(pipeline)
    copy_.unet.to(torch.float16)
    copy_.vae.to(torch.float16)
    with atomic_directory(path) as tmp:
        copy_.save_pretrained(tmp, safe_serialization=True)
    logger.info("saved %s", path)


@torch.no_grad()
def caption_embeddings(pipeline, vocabulary: list[str]) -> torch.Tensor:
    """The frozen text encoder's embeddings `(K, L, D)` of `vocabulary`."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(
        vocabulary, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipeline.text_encoder(ids)[0]


def learning_rate_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to `--final_lr_fraction` at `--unet_steps` (step counted from 0)."""
    decay = 0.5 * (1 + math.cos(math.pi * min(step, args.unet_steps) / args.unet_steps))
    return min(1.0, (step + 1) / args.warmup_steps) * (args.final_lr_fraction + (1 - args.final_lr_fraction) * decay)


def train_unet(pipeline, latents, captions, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Train the UNet on unscaled view-batched `latents` `(M, V, C, h, w)` with their captions; save the
    checkpoints."""
    from diffusers import DDPMScheduler

    unet, conditioner = pipeline.unet, pipeline.conditioner
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    vocabulary = sorted(set(captions)) + [""]
    embeddings = caption_embeddings(pipeline, vocabulary)
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    camera = pipeline.camera_inputs()[None].expand(args.batch_size, -1, -1)
    latents = latents * pipeline.vae.config.scaling_factor
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, args))
    unet.train().requires_grad_(True)
    snapshot_dir = args.snapshot_dir or args.output_dir / "snapshots"
    start = time.time()
    for step in range(1, args.unet_steps + 1):
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        clean = latents[index]
        dropped = torch.rand(args.batch_size, generator=generator) < args.empty_caption_rate
        conditioning = {
            "prompt_embeds": embeddings[torch.where(dropped, len(vocabulary) - 1, caption_index[index])],
            "camera": camera,
        }
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # one timestep per object
        prediction = conditioner.predict_noise(unet, noisy, timesteps, conditioning)
        per_object = (prediction - noise).pow(2).mean(dim=(1, 2, 3, 4))
        if args.snr_gamma > 0:
            per_object = per_object * snr[timesteps].clamp(max=args.snr_gamma) / snr[timesteps]
        loss = per_object.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
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
    captions, views = scene_view_dataset(args.num_scenes, seed=args.seed)
    logger.info("rendered %d scenes (4 views each) in %.0f s", args.num_scenes, time.time() - start)

    if args.base is None:
        grid = load_toy_pipeline("long")
    else:
        from diffusers import StableDiffusionPipeline

        grid = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32, local_files_only=True)
    pipeline = build_toy_view_batched_pipeline(grid, seed=args.seed)
    pipeline.vae.eval().requires_grad_(False)
    pipeline.text_encoder.eval().requires_grad_(False)
    latents = augmented_latents(pipeline.vae, views)
    captions = [c for c in captions for _ in range(8)]
    logger.info("encoded %d objects at %.0f s", len(latents), time.time() - start)

    train_unet(pipeline, latents, captions, args, generator)
    logger.info("total %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
