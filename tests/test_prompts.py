import json
from collections import Counter

import pandas as pd
import pytest

from carve3d_trl.prompts import PromptCycler, load_prompts

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_of_every_format(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    frame = pd.DataFrame({"prompt": PROMPTS, "id": range(3)})
    if suffix == ".txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert load_prompts(str(path)) == PROMPTS


def test_folder_with_splits_and_a_chosen_column(tmp_path):
    pd.DataFrame({"caption": PROMPTS}).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    pd.DataFrame({"caption": ["a toy car"]}).to_json(tmp_path / "validation.jsonl", orient="records", lines=True)
    assert load_prompts(str(tmp_path), column="caption") == PROMPTS
    assert load_prompts(str(tmp_path), split="validation", column="caption") == ["a toy car"]


def test_missing_column_names_the_existing_ones(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"text": PROMPTS}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no column 'prompt'; its columns are \['text'\]"):
        load_prompts(str(path))


def test_empty_prompts_and_repeats(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": ["a", " ", "b"]}).to_json(path, orient="records", lines=True)
    with pytest.raises(ValueError, match=r"1 empty prompt\(s\) \(rows \[1\]\)"):
        load_prompts(str(path))
    path = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["a", "b", "a", " b "]}).to_csv(path, index=False)
    assert load_prompts(str(path)) == ["a", "b"]
    assert load_prompts(str(path), limit=1) == ["a"]


def test_missing_file_and_unsupported_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "p.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="Unsupported prompt file"):
        load_prompts(str(tmp_path / "p.xml"))


def test_hub_ids_go_to_load_dataset_with_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_dict({"prompt": PROMPTS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompts("user/carve3d-prompts", split="train", revision="v1") == PROMPTS
    assert calls == [("user/carve3d-prompts", "train", "v1")]


def draw(cycler: PromptCycler, n: int) -> list[str]:
    return [cycler()[0] for _ in range(n)]


def test_cycler_gives_every_prompt_an_equal_share_per_epoch_across_processes():
    prompts = [f"p{i}" for i in range(6)]
    processes = [PromptCycler(prompts, seed=3, process_index=r, num_processes=2) for r in range(2)]
    for _ in range(3):  # three epochs of 12 samples (6 per process)
        epoch = [c()[0] for c in processes for _ in range(6)]
        assert Counter(epoch) == {p: 2 for p in prompts}


def test_cycler_is_deterministic_per_seed_distinct_per_process_and_resumable():
    prompts = [f"p{i}" for i in range(10)]
    assert draw(PromptCycler(prompts, seed=1), 20) == draw(PromptCycler(prompts, seed=1), 20)
    assert draw(PromptCycler(prompts, seed=1), 20) != draw(PromptCycler(prompts, seed=2), 20)
    rank0, rank1 = PromptCycler(prompts, 1, 0, 2), PromptCycler(prompts, 1, 1, 2)
    first = draw(rank0, 5) + draw(rank1, 5)
    assert sorted(first) == sorted(prompts)  # the two ranks split the first permutation without overlap
    resumed = PromptCycler(prompts, 1, 0, 2)
    resumed.load_state_dict(rank0.state_dict())
    assert draw(resumed, 7) == draw(rank0, 7)


def test_cycler_blocks_deal_the_same_global_stream_on_any_number_of_processes():
    prompts = [f"prompt {i}" for i in range(5)]
    single = draw(PromptCycler(prompts, seed=4, block_size=6), 24)  # 4 batches of 6 on one process
    ranks = [PromptCycler(prompts, seed=4, process_index=r, num_processes=2, block_size=3) for r in range(2)]
    # batches of 3 per process: batch k of the run is rank 0's k-th batch, then rank 1's
    interleaved = [p for _ in range(4) for cycler in ranks for p in draw(cycler, 3)]
    assert interleaved == single
    with pytest.raises(ValueError, match="block_size"):
        PromptCycler(prompts, block_size=0)
