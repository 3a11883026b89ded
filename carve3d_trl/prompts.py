"""Training prompts: loading them from a `datasets` repo or a local file, and a DDPO prompt function over them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompts(
    source: str,
    split: str = "train",
    column: str = "prompt",
    revision: str | None = None,
    limit: int = 0,
) -> list[str]:
    """Load prompts from a Hub dataset repo id, a local file (txt, json, jsonl, csv, parquet) or a local folder.

    Plain `.txt` files hold one prompt per line (`column` is ignored for them). Surrounding whitespace is stripped
    and repeated prompts are dropped (keeping the first), since prompts key the per-prompt statistics.

    Args:
        source (`str`): Hub dataset repo id, or path of a local file or dataset folder.
        split (`str`): Split to read. A single local file holds only `"train"`.
        column (`str`): Column holding the prompt text.
        revision (`str`, *optional*): Branch, tag or commit of a Hub dataset.
        limit (`int`): Keep only the first `limit` prompts (0 keeps all).

    Returns:
        `list[str]`: The prompts, in dataset order.
    """
    import datasets

    path = Path(source).expanduser()
    is_text_file = path.is_file() and path.suffix.lower() == ".txt"
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Unsupported prompt file '{path}': use one of {', '.join(sorted(LOCAL_BUILDERS))}, "
                "or a Hub dataset repo id."
            )
        if split != "train":
            raise ValueError(
                f"A single prompt file has only a 'train' split, but split '{split}' was requested from '{path}'. "
                "Use a folder with one file per split (e.g. train.jsonl, validation.jsonl) or a Hub dataset."
            )
        if is_text_file:
            column = "text"
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        if not path.exists() and (source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_BUILDERS):
            raise FileNotFoundError(f"Prompt file '{source}' does not exist.")
        try:
            dataset = datasets.load_dataset(str(path) if path.exists() else source, split=split, revision=revision)
        except ValueError as error:
            if "split" in str(error).lower():
                raise ValueError(f"Prompt dataset '{source}' has no split '{split}': {error}") from error
            raise
    if column not in dataset.column_names:
        raise ValueError(
            f"Prompt dataset '{source}' (split '{split}') has no column '{column}'; "
            f"its columns are {dataset.column_names}. Set `prompt_column` to one of them."
        )
    raw = dataset[column]
    if is_text_file:
        raw = [line for line in raw if line.strip()]  # blank lines in a prompt list carry no prompt
    return clean_prompts(raw, source=source, limit=limit)


def clean_prompts(raw: list[Any], source: str = "prompts", limit: int = 0) -> list[str]:
    """Strip prompts, reject empty ones, drop repeats (keeping order) and apply `limit`."""
    prompts = [str(p).strip() if p is not None else "" for p in raw]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(
            f"{source} has {len(empty)} empty prompt(s) (rows {empty[:10]}{'...' if len(empty) > 10 else ''}); "
            "remove them or fill them in."
        )
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError(f"{source} holds no prompts.")
    if len(prompts) > 1 and len(unique) == 1:
        raise ValueError(
            f"{source}: all {len(prompts)} prompts are the same ('{unique[0]}'); check the prompt column, or pass "
            "the single prompt once."
        )
    if len(unique) < len(prompts):
        logger.warning("%s: dropped %d repeated prompt(s).", source, len(prompts) - len(unique))
    return unique[:limit] if limit else unique


class PromptCycler:
    """A DDPO prompt function cycling through a fixed prompt list.

    The prompts are dealt from one global stream: the stream is the concatenation of seeded permutations of the
    prompt list, cut into blocks of `block_size` positions dealt to the processes in turn (block `k` goes to process
    `k mod P`). With `block_size` equal to the sample batch size, stream position `n` is the `n`-th sample of the
    run counted batch by batch, process by process, whatever the number of processes. Every prompt receives an equal
    share of the samples of each epoch when the samples per epoch (over all processes) are a multiple of the number
    of prompts, the draws are deterministic per seed, and no two processes draw the same position.

    Args:
        prompts (`list[str]`): The prompts.
        seed (`int`): Seed of the permutations.
        process_index (`int`): This process's rank.
        num_processes (`int`): The number of processes.
        block_size (`int`): Consecutive positions a process takes before the next process's turn.
    """

    def __init__(
        self, prompts: list[str], seed: int = 0, process_index: int = 0, num_processes: int = 1, block_size: int = 1
    ):
        if not prompts:
            raise ValueError("PromptCycler needs at least one prompt.")
        if block_size < 1:
            raise ValueError(f"PromptCycler's block_size must be >= 1, got {block_size}.")
        self.prompts = list(prompts)
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.block_size = block_size
        self.calls = 0
        self._cycle = -1
        self._order: np.ndarray = np.arange(len(self.prompts))

    def __call__(self) -> tuple[str, dict[str, Any]]:
        block, offset_in_block = divmod(self.calls, self.block_size)
        position = (block * self.num_processes + self.process_index) * self.block_size + offset_in_block
        self.calls += 1
        cycle, offset = divmod(position, len(self.prompts))
        if cycle != self._cycle:
            self._order = np.random.default_rng([self.seed, cycle]).permutation(len(self.prompts))
            self._cycle = cycle
        index = int(self._order[offset])
        return self.prompts[index], {"prompt_index": index}

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])
