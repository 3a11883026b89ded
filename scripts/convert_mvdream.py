"""Convert MVDream's released checkpoint into a `MultiViewDiffusionPipeline` folder (the view-batched family).

The UNet comes from MVDream's checkpoint (`sd-v2.1-base-4view.pt` from the Hub repo `MVDream/MVDream`, read with
`torch.load(weights_only=True)`); the VAE, text encoder, tokenizer and scheduler (as DDIM) from the diffusers folder of
the Stable Diffusion MVDream was fine-tuned from. A folder of ashawkey's diffusers port
(`ashawkey/mvdream-sd2.1-diffusers`) may replace both. The folder is written atomically;
`load_ddpo_pipeline(output_dir)` or `MultiViewDiffusionPipeline.from_pretrained(output_dir)` loads it. Exits with
code 1 and the reason when the checkpoint or the base model does not fit. Usage:

    .venv/bin/python scripts/convert_mvdream.py --checkpoint sd-v2.1-base-4view.pt \\
        --sd21_base stable-diffusion-2-1-base --output_dir mvdream-sd21-4view
    .venv/bin/python scripts/convert_mvdream.py --checkpoint mvdream-sd2.1-diffusers --output_dir mvdream-sd21-4view
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

MODELS = ("sd-v2.1-base-4view", "sd-v1.5-4view")  # carve3d_trl.pipelines.mvdream_conversion.MVDREAM_UNET_PARAMS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="MVDream's checkpoint (sd-v2.1-base-4view.pt), or a folder of ashawkey's diffusers port.",
    )
    parser.add_argument(
        "--sd21_base",
        "--base_model",
        dest="sd21_base",
        default=None,
        help="Diffusers folder (or Hub id) of the base model: Stable Diffusion 2.1-base for sd-v2.1-base-4view "
        "(stabilityai/stable-diffusion-2-1-base), Stable Diffusion 1.5 for sd-v1.5-4view. Needed with a checkpoint "
        "file; a port folder holds its own.",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="Where to write the pipeline folder.")
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help=f"Which MVDream model the checkpoint is (its UNet configuration); default {MODELS[0]}, or a port "
        "folder's own configuration.",
    )
    parser.add_argument(
        "--unet_config",
        type=Path,
        default=None,
        help="For another MVDream model: its `unet_config.params` as a JSON file (replaces --model).",
    )
    parser.add_argument(
        "--num_views", type=int, default=4, help="Views per object (the released models are trained with 4)."
    )
    parser.add_argument("--elevation", type=float, default=15.0, help="Camera elevation of the views, degrees.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="Dtype of the saved weights.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from carve3d_trl.pipelines.mvdream_conversion import convert_mvdream_checkpoint

    try:
        model = json.loads(args.unet_config.read_text()) if args.unet_config else args.model
        path = convert_mvdream_checkpoint(
            args.checkpoint,
            args.sd21_base,
            args.output_dir,
            model=model,
            num_views=args.num_views,
            elevation=args.elevation,
            torch_dtype=args.dtype,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MultiViewDiffusionPipeline written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
