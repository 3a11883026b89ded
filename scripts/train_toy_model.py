"""Train the toy models shipped in `carve3d_trl/toy/weights/`: the single-view text-to-image toy (stage 1) and, from
it, the grid toy (stage 2), as Instant3D is made from SDXL (CPU, one thread).

1. Render `--num_scenes` captioned synthetic scenes (`carve3d_trl.toy.data`) at the grid toy's 4 cameras
   (`instant3d_layout()`) and at `--random_views` cameras at random azimuths and elevations 0-40 degrees, and the
   further scenes up to `--pretrain_scenes` (stage 1 only) at `--random_views` random cameras.
2. Train the VAE as an autoencoder on all the single views (foreground-weighted pixel and chroma errors, a small KL
   term) and set its latent scaling factor to 1 / latent std.
3. Stage 1, the single-view model (32-px images, 8x8x4 latents; `--tokenizer`: characters, or one token per caption
   word as CLIP's BPE gives common words): train the UNet and the text encoder with the
   epsilon-prediction DDPM loss (Min-SNR weighting, 10% empty captions for classifier-free guidance) on every single
   view and its mirror image; save it as `single_view/` (the "pretrained text-to-image model").
4. Stage 2, the grid model (64x64 grids of 2x2 views, 16x16x4 latents): fine-tune the UNet of stage 1, text encoder
   and VAE frozen, on the grids, each giving 8 consistent grids by turning the scene in quarter turns (a cyclic shift
   of the views) and mirroring it; save `short/` after `--short_steps` and `long/` after `--grid_steps`.

Every checkpoint is an fp16 diffusers folder written atomically. Deterministic for a given `--seed` (and thread
count). The view-batched toy is fine-tuned from `single_view/` by `scripts/train_toy_view_batched.py`. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_toy_model.py [--output_dir carve3d_trl/toy/weights]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "carve3d_trl" / "toy" / "weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="Gets single_view/, short/, long/.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes, the weights and the batches.")
    parser.add_argument(
        "--tokenizer",
        choices=("character", "word"),  # TOY_TOKENIZERS of carve3d_trl.toy.tokenizer (imported after parsing)
        default="word",
        help="The text encoder's tokenizer: one token per toy word (the shipped checkpoints') or characters.",
    )
    parser.add_argument("--text_layers", type=int, default=2, help="Transformer layers of the text encoder.")
    parser.add_argument(
        "--unet_channels",
        type=int,
        nargs=3,
        default=list(UNET_CHANNELS),
        help="The UNet's 3 block widths (multiples of 8; the shipped checkpoints': 32 64 64).",
    )
    parser.add_argument("--num_scenes", type=int, default=1000, help="Multi-view scenes (stages 1 and 2).")
    parser.add_argument(
        "--pretrain_scenes",
        type=int,
        help="Scenes of stage 1 (default: --num_scenes): the first --num_scenes at the grid cameras and random ones, "
        "the others at random cameras only (a larger single-view set, as image data outnumbers 3D data).",
    )
    parser.add_argument("--random_views", type=int, default=4, help="Random-camera views per scene (stage 1).")
    parser.add_argument("--vae_steps", type=int, default=1000, help="VAE optimizer steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16, help="Single views per VAE step.")
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3, help="VAE AdamW learning rate.")
    parser.add_argument("--chroma_weight", type=float, default=10.0, help="VAE loss weight of the chroma error.")
    parser.add_argument("--pretrain_steps", type=int, default=3000, help="Stage 1 (single-view) steps.")
    parser.add_argument("--pretrain_batch_size", type=int, default=128, help="Single views per stage 1 step.")
    parser.add_argument("--pretrain_learning_rate", type=float, default=1e-3, help="Stage 1 AdamW rate.")
    parser.add_argument("--short_steps", type=int, default=150, help="Stage 2 steps of the short-SFT checkpoint.")
    parser.add_argument("--grid_steps", type=int, default=800, help="Stage 2 steps of the long-SFT checkpoint.")
    parser.add_argument("--batch_size", type=int, default=32, help="Grids per stage 2 step.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="Stage 2 AdamW rate.")
    parser.add_argument("--snapshot_every", type=int, default=0, help="Also save every N stage 2 steps (0: never).")
    parser.add_argument("--snapshot_dir", type=Path, help="Where the snapshots go (default: output_dir/snapshots).")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    add_schedule_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.short_steps <= args.grid_steps:
        parser.error(f"--short_steps must be in [1, --grid_steps = {args.grid_steps}], got {args.short_steps}.")
    if args.random_views < 0:
        parser.error(f"--random_views must be >= 0, got {args.random_views}.")
    if args.text_layers < 1:
        parser.error(f"--text_layers must be >= 1, got {args.text_layers}.")
    if not valid_unet_channels(args.unet_channels):
        parser.error(f"--unet_channels must be multiples of 8 (group norms of 8), got {args.unet_channels}.")
    if args.pretrain_scenes is None:
        args.pretrain_scenes = args.num_scenes
    if args.pretrain_scenes < args.num_scenes:
        parser.error(
            f"--pretrain_scenes must be >= --num_scenes = {args.num_scenes} (stage 1 sees every multi-view scene), "
            f"got {args.pretrain_scenes}."
        )
    if args.pretrain_scenes > args.num_scenes and args.random_views < 1:
        parser.error("--pretrain_scenes > --num_scenes needs --random_views >= 1: those scenes have no other views.")
    return args


import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from carve3d_trl.rewards import instant3d_layout, tile_views  # noqa: E402
from carve3d_trl.toy.data import random_scene, render_random_views, turned_and_mirrored  # noqa: E402
from carve3d_trl.toy.model import (  # noqa: E402
    SINGLE_VIEW_SIZE,
    TOY_IMAGE_SIZE,
    UNET_CHANNELS,
    build_toy_pipeline,
    valid_unet_channels,
)
from carve3d_trl.toy.training import (  # noqa: E402
    add_schedule_arguments,
    caption_vocabulary,
    checkpoint_saver,
    denoiser_schedule,
    encode_images,
    save_pipeline,
    token_ids,
    train_denoiser,
    train_vae,
)
from carve3d_trl.toy.view_batched import render_scene_views  # noqa: E402

logger = logging.getLogger("train_toy_model")


def pretrain(pipeline, views: torch.Tensor, captions: list[str], args, generator: torch.Generator) -> None:
    """Stage 1: the UNet and text encoder on single-view latents `(M, C, 8, 8)` (unscaled) with their captions."""
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    vocabulary, caption_index = caption_vocabulary(captions)
    ids = token_ids(pipeline.tokenizer, vocabulary)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)

    def predict(noisy, timesteps, caption_ids):
        return unet(noisy, timesteps, text_encoder(ids[caption_ids])[0]).sample

    schedule = denoiser_schedule(args, args.pretrain_steps, args.pretrain_batch_size, args.pretrain_learning_rate)
    latents = views * pipeline.vae.config.scaling_factor
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    train_denoiser(
        predict, parameters, latents, caption_index, len(vocabulary) - 1, pipeline.scheduler.config, schedule,
        generator, log_name="single-view unet",
    )  # fmt: skip
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def fine_tune_grid(pipeline, latents: torch.Tensor, captions: list[str], args, generator: torch.Generator) -> None:
    """Stage 2: the UNet on grid latents `(M, C, 16, 16)` (unscaled), text encoder frozen; saves the checkpoints."""
    unet = pipeline.unet
    vocabulary, caption_index = caption_vocabulary(captions)
    with torch.no_grad():
        embeddings = pipeline.text_encoder(token_ids(pipeline.tokenizer, vocabulary))[0]
    unet.train().requires_grad_(True)

    def predict(noisy, timesteps, caption_ids):
        return unet(noisy, timesteps, embeddings[caption_ids]).sample

    on_step = checkpoint_saver(
        pipeline, args.output_dir, args.short_steps, args.grid_steps, args.snapshot_every, args.snapshot_dir
    )
    schedule = denoiser_schedule(args, args.grid_steps, args.batch_size, args.learning_rate)
    latents = latents * pipeline.vae.config.scaling_factor
    train_denoiser(
        predict, unet.parameters(), latents, caption_index, len(vocabulary) - 1, pipeline.scheduler.config, schedule,
        generator, on_step=on_step, log_name="grid unet",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    scenes = [random_scene(generator) for _ in range(args.pretrain_scenes)]
    multi_view = scenes[: args.num_scenes]
    captions = [scene.caption for scene in multi_view]
    layout = instant3d_layout()
    grid_views = render_scene_views(multi_view, layout=layout)  # (N, 4, 3, 32, 32)
    single_views = grid_views
    if args.random_views:
        random_views = render_random_views(multi_view, args.random_views, generator)
        single_views = torch.cat([grid_views, random_views], dim=1)
    single_captions = [c for c in captions for _ in range(single_views.shape[1])]
    flat = single_views.flatten(0, 1)
    if args.pretrain_scenes > args.num_scenes:  # stage-1-only scenes: random views only
        single_only = scenes[args.num_scenes :]
        flat = torch.cat([flat, render_random_views(single_only, args.random_views, generator).flatten(0, 1)])
        single_captions += [s.caption for s in single_only for _ in range(args.random_views)]
    logger.info("rendered %d scenes in %.0f s", args.pretrain_scenes, time.time() - start)

    pipeline = build_toy_pipeline(
        args.seed,
        image_size=SINGLE_VIEW_SIZE,
        tokenizer=args.tokenizer,
        text_layers=args.text_layers,
        unet_channels=tuple(args.unet_channels),
    )
    train_vae(
        pipeline.vae, flat, generator, args.vae_steps, args.vae_batch_size, args.vae_learning_rate, args.chroma_weight
    )
    view_latents = encode_images(pipeline.vae, torch.cat([flat, flat.flip(-1)]))
    scale = 1.0 / float(view_latents.std())
    pipeline.vae.register_to_config(scaling_factor=scale)
    logger.info("vae done at %.0f s; latent scaling factor %.4f", time.time() - start, scale)

    pretrain(pipeline, view_latents, single_captions * 2, args, generator)
    save_pipeline(pipeline, args.output_dir / "single_view")
    logger.info("stage 1 done at %.0f s", time.time() - start)

    pipeline.unet.register_to_config(sample_size=TOY_IMAGE_SIZE // 4)
    pipeline.vae.register_to_config(sample_size=TOY_IMAGE_SIZE)
    # whole grids, as the pipeline decodes them: latents encoded view by view and tiled put the latents of a view's
    # edge (seen by the encoder next to its zero padding) at the seams, which decode to coloured haze
    grid_latents = encode_images(pipeline.vae, turned_and_mirrored(tile_views(grid_views, layout)))
    fine_tune_grid(pipeline, grid_latents, [c for c in captions for _ in range(8)], args, generator)
    logger.info("total %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
