"""Train the view-batched toy model shipped in `carve3d_trl/toy/weights/view_batched/` (CPU, one thread).

MVDream's recipe in miniature: a view-batched model fine-tuned from a single-view text-to-image one.

1. Render `--num_scenes` captioned synthetic scenes (the grid toy's scenes, `carve3d_trl.toy.data`) as 4 views of
   32 px at the view-batched family's cameras (`multiview_cameras(4, elevation=15.0)`); each object gives 8 objects
   by turning the scene in quarter turns (a cyclic shift of the views) and mirroring it (views flipped, views 1 and 3
   swapped).
2. Start from the single-view toy (`--base`, default the shipped `single_view` checkpoint of
   `scripts/train_toy_model.py`): its tokenizer, text encoder and VAE, frozen, and its UNet's weights in a UNet with
   the camera embedding (last layer zero) and cross-view attention
   (`carve3d_trl.toy.view_batched.build_toy_view_batched_pipeline`).
3. Train the UNet with the epsilon-prediction DDPM loss on view-batched latents `(B, 4, C, h, w)`, one timestep per
   object (Min-SNR weighting, 10% empty captions for classifier-free guidance, cosine learning-rate decay;
   `carve3d_trl.toy.training.train_denoiser`). Save the short-SFT checkpoint after `--short_steps` and the long-SFT
   one after `--unet_steps`, as fp16 `MultiViewDiffusionPipeline` folders written atomically.

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
    parser.add_argument("--base", type=Path, help="Single-view toy folder to start from (default: the shipped one).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes, the camera layer and the batches.")
    parser.add_argument("--num_scenes", type=int, default=1000, help="Rendered scenes (x8 by augmentation).")
    parser.add_argument("--short_steps", type=int, default=200, help="UNet steps of the short-SFT checkpoint.")
    parser.add_argument("--unet_steps", type=int, default=1000, help="UNet steps of the long-SFT checkpoint.")
    parser.add_argument("--batch_size", type=int, default=24, help="Objects (of 4 views) per UNet step.")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="UNet AdamW learning rate.")
    parser.add_argument("--snapshot_every", type=int, default=0, help="Also save every N UNet steps (0: never).")
    parser.add_argument("--snapshot_dir", type=Path, help="Where the snapshots go (default: output_dir/snapshots).")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    add_schedule_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.short_steps <= args.unet_steps:
        parser.error(f"--short_steps must be in [1, --unet_steps = {args.unet_steps}], got {args.short_steps}.")
    return args


import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from carve3d_trl.toy.training import (  # noqa: E402
    add_schedule_arguments,
    caption_vocabulary,
    checkpoint_saver,
    denoiser_schedule,
    encode_images,
    token_ids,
    train_denoiser,
)
from carve3d_trl.toy.view_batched import (  # noqa: E402
    build_toy_view_batched_pipeline,
    mirrored_views,
    scene_view_dataset,
    turned_views,
)

logger = logging.getLogger("train_toy_view_batched")


def augmented_latents(vae, views: torch.Tensor) -> torch.Tensor:
    """Latents `(8N, V, C, h, w)` of each object's 8 versions, object by object: the 4 quarter turns of the scene
    (a cyclic shift of the per-view latents), then those of its mirror image (encoded from the mirrored views)."""
    latents, mirrored = encode_images(vae, views), encode_images(vae, mirrored_views(views))
    versions = [turned_views(v, quarter) for v in (latents, mirrored) for quarter in range(4)]
    return torch.stack(versions, dim=1).flatten(0, 1)


def train_unet(pipeline, latents, captions, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Train the UNet on unscaled view-batched `latents` `(M, V, C, h, w)` with their captions; save the
    checkpoints."""
    unet, conditioner = pipeline.unet, pipeline.conditioner
    vocabulary, caption_index = caption_vocabulary(captions)
    with torch.no_grad():
        embeddings = pipeline.text_encoder(token_ids(pipeline.tokenizer, vocabulary))[0]
    camera = pipeline.camera_inputs()[None].expand(args.batch_size, -1, -1)
    unet.train().requires_grad_(True)

    def predict(noisy, timesteps, caption_ids):
        conditioning = {"prompt_embeds": embeddings[caption_ids], "camera": camera}
        return conditioner.predict_noise(unet, noisy, timesteps, conditioning)

    on_step = checkpoint_saver(
        pipeline, args.output_dir, args.short_steps, args.unet_steps, args.snapshot_every, args.snapshot_dir
    )
    schedule = denoiser_schedule(args, args.unet_steps, args.batch_size, args.learning_rate)
    latents = latents * pipeline.vae.config.scaling_factor
    train_denoiser(
        predict, unet.parameters(), latents, caption_index, len(vocabulary) - 1, pipeline.scheduler.config, schedule,
        generator, on_step=on_step, log_name="view-batched unet",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    captions, views = scene_view_dataset(args.num_scenes, seed=args.seed)
    logger.info("rendered %d scenes (4 views each) in %.0f s", args.num_scenes, time.time() - start)

    base = None
    if args.base is not None:
        from diffusers import StableDiffusionPipeline

        base = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32, local_files_only=True)
    pipeline = build_toy_view_batched_pipeline(base, seed=args.seed)
    pipeline.vae.eval().requires_grad_(False)
    pipeline.text_encoder.eval().requires_grad_(False)
    latents = augmented_latents(pipeline.vae, views)
    captions = [c for c in captions for _ in range(8)]
    logger.info("encoded %d objects at %.0f s", len(latents), time.time() - start)

    train_unet(pipeline, latents, captions, args, generator)
    logger.info("total %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
