"""The shipped object-level prompt set `examples/prompts/objects3d` (a local dataset folder with two splits)."""

import json
from pathlib import Path

import datasets
import pytest

from carve3d_trl import load_prompts

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "prompts" / "objects3d"
SIZES = {"train": 120, "validation": 30}
MAX_CHARS = 200  # well under CLIP's 77 tokens: a token is at least one character, most English words one token


@pytest.fixture(scope="module")
def splits():
    return {split: load_prompts(str(FOLDER), split=split) for split in SIZES}


def raw_rows(split):
    return [json.loads(line) for line in (FOLDER / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def test_both_splits_load_with_their_sizes(splits):
    assert {split: len(prompts) for split, prompts in splits.items()} == SIZES
    loaded = datasets.load_dataset(str(FOLDER))  # the dataset card's configs name the two files
    assert {split: loaded[split].num_rows for split in loaded} == SIZES
    assert all(loaded[split].column_names == ["prompt"] for split in loaded)
    assert all(loaded[split]["prompt"] == splits[split] for split in SIZES)


def test_no_duplicates_and_no_overlap(splits):
    for split in SIZES:
        # load_prompts drops repeats: the raw files must not have any to drop
        raw = [row["prompt"] for row in raw_rows(split)]
        assert raw == splits[split]
        assert len({prompt.lower() for prompt in raw}) == len(raw)
    assert not {p.lower() for p in splits["train"]} & {p.lower() for p in splits["validation"]}
    smaller_list = (FOLDER.parent / "objects.txt").read_text().splitlines()
    assert not {p.lower() for p in smaller_list} & {p.lower() for split in splits.values() for p in split}


def test_every_prompt_is_short_clean_text(splits):
    for prompt in (p for split in splits.values() for p in split):
        assert prompt and prompt == prompt.strip() and "\n" not in prompt
        assert len(prompt) < MAX_CHARS and len(prompt.split()) < 40


def test_the_dataset_card_declares_the_licence_and_the_splits():
    card = (FOLDER / "README.md").read_text()
    header = card.split("---")[1]
    assert "license: apache-2.0" in header
    assert "path: train.jsonl" in header and "path: validation.jsonl" in header
