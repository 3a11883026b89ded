"""The accelerate process state, created early (TRL logs through accelerate before it creates an Accelerator)."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def ensure_process_state(cpu: bool = False) -> PartialState:
    """Create (or return) accelerate's `PartialState`, honouring `ACCELERATE_USE_CPU` as `Accelerator` does.

    With `cpu` (or `ACCELERATE_USE_CPU=true`) several processes started by torchrun form a gloo (multi-CPU) group;
    a bare `PartialState()` would instead pin every process to single-process mode.
    """
    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
