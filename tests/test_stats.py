import numpy as np
import pytest

from carve3d_trl.stats import PromptStatTracker, compute_advantages, normalize_batch

PROMPTS = ["a cat", "a dog", "a cat", "a dog", "a cat", "a dog"]
REWARDS = np.array([1.0, 4.0, 2.0, 6.0, 3.0, 8.0])
KL = np.array([0.1, 0.0, 0.3, 0.2, 0.2, 0.4])


def test_batch_normalisation_by_hand():
    mean, std = REWARDS.mean(), REWARDS.std()
    np.testing.assert_allclose(normalize_batch(REWARDS), (REWARDS - mean) / (std + 1e-8))


def test_per_prompt_normalisation_by_hand():
    tracker = PromptStatTracker(buffer_size=16, min_count=3)
    got = tracker.update(PROMPTS, REWARDS)
    # "a cat": [1, 2, 3], mean 2, std sqrt(2/3); "a dog": [4, 6, 8], mean 6, std sqrt(8/3)
    expected = [
        (1 - 2) / (np.sqrt(2 / 3) + 1e-6),
        (4 - 6) / (np.sqrt(8 / 3) + 1e-6),
        0.0,
        0.0,
        (3 - 2) / (np.sqrt(2 / 3) + 1e-6),
        (8 - 6) / (np.sqrt(8 / 3) + 1e-6),
    ]
    np.testing.assert_allclose(got, expected)


def test_prompts_below_min_count_use_batch_statistics():
    tracker = PromptStatTracker(buffer_size=16, min_count=4)
    got = tracker.update(PROMPTS, REWARDS)
    np.testing.assert_allclose(got, (REWARDS - REWARDS.mean()) / (REWARDS.std() + 1e-6))


def test_buffer_keeps_only_the_last_values_and_keys_on_exact_prompts():
    tracker = PromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["A Cat", "a cat"], np.array([1.0, 5.0]))
    tracker.update(["A Cat", "A Cat"], np.array([2.0, 3.0]))
    assert set(tracker.buffers) == {"A Cat", "a cat"}  # case is kept: prompts are the keys
    assert list(tracker.buffers["A Cat"]) == [2.0, 3.0]


def test_state_dict_round_trip_gives_identical_future_advantages():
    a = PromptStatTracker(buffer_size=4, min_count=2)
    a.update(PROMPTS, REWARDS)
    b = PromptStatTracker(buffer_size=4, min_count=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.update(PROMPTS, REWARDS * 2), b.update(PROMPTS, REWARDS * 2))


def test_kl_in_reward_with_batch_normalisation_by_hand():
    got = compute_advantages(PROMPTS, REWARDS, None, kl=KL, kl_tracker=None, kl_coeff=0.2)
    expected = normalize_batch(REWARDS) - 0.2 * (KL - KL.mean()) / (KL.std() + 1e-8)
    np.testing.assert_allclose(got, expected)


def test_kl_in_reward_with_per_prompt_normalisation_by_hand():
    got = compute_advantages(
        PROMPTS, REWARDS, PromptStatTracker(16, 3), kl=KL, kl_tracker=PromptStatTracker(16, 3), kl_coeff=0.2
    )
    cat, dog = np.array([0, 2, 4]), np.array([1, 3, 5])
    expected = np.empty(6)
    for idx in (cat, dog):
        r, k = REWARDS[idx], KL[idx]
        expected[idx] = (r - r.mean()) / (r.std() + 1e-6) - 0.2 * (k - k.mean()) / (k.std() + 1e-6)
    np.testing.assert_allclose(got, expected)


def test_without_kl_the_advantage_is_the_normalised_reward():
    np.testing.assert_allclose(compute_advantages(PROMPTS, REWARDS, None), normalize_batch(REWARDS))


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 prompts for 3 values"):
        PromptStatTracker(4, 1).update(["a", "b"], np.zeros(3))


def test_non_finite_rewards_are_left_out_of_advantages_and_statistics():
    rewards = np.array([1.0, np.nan, 3.0, np.inf, 2.0, 4.0])
    tracker = PromptStatTracker(buffer_size=16, min_count=1)
    got = compute_advantages(PROMPTS, rewards, tracker)
    assert got[1] == 0.0 and got[3] == 0.0
    cat = np.array([1.0, 3.0, 2.0])  # "a cat" rows 0, 2, 4; "a dog" keeps only row 5
    np.testing.assert_allclose(got[[0, 2, 4]], (cat - cat.mean()) / (cat.std() + 1e-6))
    assert all(np.isfinite(v) for buffer in tracker.buffers.values() for v in buffer)
    assert list(tracker.buffers["a dog"]) == [4.0]


def test_a_non_finite_kl_excludes_its_sample_and_all_invalid_gives_zero():
    kl = KL.copy()
    kl[0] = np.nan
    got = compute_advantages(PROMPTS, REWARDS, None, kl=kl, kl_coeff=0.2)
    valid = np.arange(1, 6)
    expected = normalize_batch(REWARDS[valid]) - 0.2 * normalize_batch(KL[valid])
    assert got[0] == 0.0
    np.testing.assert_allclose(got[valid], expected)
    np.testing.assert_array_equal(compute_advantages(["a"], np.array([np.nan]), None), [0.0])
