"""Turning SIGTERM/SIGINT into a clean stop at a point where the run can be checkpointed exactly."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Raised inside an epoch when a stop was requested; carries the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StopRequest:
    """Remembers the first SIGTERM/SIGINT received while installed (see `stop_on_signals`)."""

    def __init__(self):
        self.signum: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT only set the yielded `StopRequest`; the handlers are restored after.

    Outside the main thread signal handlers cannot be installed, and the request simply never fires.
    """
    request = StopRequest()

    def handler(signum, frame):
        request.signum = signum

    try:
        previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def capture_rng_states() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo everything drawn since `capture_rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def exit_for(signum: int) -> BaseException:
    """The exception a process stopped by `signum` ends with: KeyboardInterrupt for SIGINT, else SystemExit."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
