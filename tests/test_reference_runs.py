"""Refactors change no number: a short seeded run on the grid SD toy (MRC reward) and on the tiny SDXL gives the
LoRA, history and rewards recorded before the architecture change (`tests/reference/reference_runs.py`)."""

import math

import pytest
import torch
from reference.reference_runs import RUNS, load_record, run_reference


@pytest.mark.parametrize("run", RUNS)
def test_a_seeded_run_reproduces_the_recorded_lora_history_and_rewards(run, tmp_path):
    recorded, fresh = load_record(run), run_reference(run, tmp_path)
    assert fresh["lora"].keys() == recorded["lora"].keys()
    for name, weight in recorded["lora"].items():
        torch.testing.assert_close(fresh["lora"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert len(fresh["rewards"]) == len(recorded["rewards"])
    for new, old in zip(fresh["rewards"], recorded["rewards"]):
        assert new == pytest.approx(old, rel=1e-5, abs=1e-6)
    assert [h.keys() for h in fresh["history"]] == [h.keys() for h in recorded["history"]]
    for new, old in zip(fresh["history"], recorded["history"]):
        for key, value in old.items():
            assert math.isclose(new[key], value, rel_tol=1e-5, abs_tol=1e-6) or (
                math.isnan(new[key]) and math.isnan(value)
            ), key
