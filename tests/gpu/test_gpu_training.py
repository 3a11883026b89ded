"""`Carve3DTrainer` on CUDA (issue 16), for every model family (`conftest.FAMILIES`): LoRA in fp16 and bf16, full
fine-tuning in fp16, the KL at a fresh LoRA under autocast, GradScaler's overflow handling, exact resume, and the
memory of the KL reference.

Marked `gpu` and skipped without CUDA; `make test-gpu` runs them, and so does `benchmarks/gpu_check.sh`. The models
are the tiny random pipelines of `carve3d_trl.testing`, built in the test session (nothing is downloaded).
"""

import gc
import math

import pytest
import torch
from small_run import PROMPTS, SMALL

from carve3d_trl import Carve3DConfig, Carve3DTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make test-gpu` on a machine with one"
    ),
]

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
MiB = 2**20


def brightness(images, prompts, metadata):
    """Mean brightness per sample, of a grid `(B, 3, H, W)` or of the views `(B, V, 3, h, w)` (view-batched)."""
    return images.flatten(1).mean(dim=1), {}


def cycle():
    state = {"i": 0}

    def prompt_fn():
        state["i"] += 1
        return PROMPTS[(state["i"] - 1) % len(PROMPTS)], {}

    return prompt_fn


def make_trainer(model, logdir, *, use_lora=True, **overrides):
    """A trainer of the small configuration on `model` (a `conftest.SavedModel`), on the GPU accelerate picks."""
    config = Carve3DConfig(**{**SMALL, "logdir": str(logdir), **overrides})
    trainer = Carve3DTrainer(config, brightness, cycle(), model.pipeline(use_lora=use_lora))
    assert trainer.accelerator.device.type == "cuda"
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    return trainer


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().float().clone() for p in trainer.trainable_layers])


def record_losses(trainer, monkeypatch):
    """Keep every training loss `calculate_loss` returns (detached)."""
    losses = []
    calculate_loss = trainer.calculate_loss

    def recording(*args, **kwargs):
        loss, approx_kl, clipfrac = calculate_loss(*args, **kwargs)
        losses.append(loss.detach().float())
        return loss, approx_kl, clipfrac

    monkeypatch.setattr(trainer, "calculate_loss", recording)
    return losses


def assert_finite_history(trainer):
    for epoch in trainer.history:
        assert math.isfinite(epoch["reward_mean"]) and epoch["reward_invalid"] == 0, epoch
        if "kl_mean" in epoch:
            assert math.isfinite(epoch["kl_mean"]), epoch


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lora_trains_in_mixed_precision_with_fp32_adapters(tiny_model, precision, tmp_path, monkeypatch):
    trainer = make_trainer(
        tiny_model, tmp_path, mixed_precision=precision, warmup_first_epoch=False, train_learning_rate=3e-3
    )
    unet = trainer.sd_pipeline.unet
    lora = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert lora and all(p.is_cuda and p.dtype == torch.float32 for p in lora)
    assert frozen and all(p.dtype == HALF[precision] for p in frozen)
    losses = record_losses(trainer, monkeypatch)
    before = lora_vector(trainer)

    # three updates: each also runs on the optimizer (and, in fp16, GradScaler) state the one before left
    trainer.train(epochs=3)
    after = lora_vector(trainer)
    assert trainer.global_step == 3
    assert_finite_history(trainer)
    assert losses and all(torch.isfinite(loss) for loss in losses)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), "the LoRA did not train"
    assert all(p.dtype == torch.float32 for p in lora), "the LoRA left fp32"
    assert all(p.dtype == HALF[precision] for p in frozen)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_kl_is_exactly_zero_with_a_fresh_lora_under_autocast(tiny_model, precision, tmp_path):
    """A fresh LoRA's `B` is zero, so the sampled and the reference passes (adapters disabled) compute the same
    half-precision numbers: the KL is exactly 0, not merely small. This also needs the sampler's log-probability to
    be that of x_{t-1} as stored (in the latents' half precision), which is what the reference pass and the
    training recomputation score."""
    trainer = make_trainer(tiny_model, tmp_path, mixed_precision=precision)  # epoch 0: warm-up, no update
    (sample,), _ = trainer._generate_samples(iterations=1, batch_size=2)
    assert sample["log_probs"].is_cuda
    torch.testing.assert_close(sample["ref_log_probs"], sample["log_probs"], atol=0, rtol=0)
    trainer.train(epochs=1)
    assert trainer.history[0]["kl_mean"] == 0.0 and trainer.history[0]["kl_std"] == 0.0


def test_full_fine_tuning_in_fp16_keeps_the_unet_in_fp32_and_trains_it(tiny_model, tmp_path, monkeypatch):
    """TRL 0.23.1 casts the trained UNet to fp16, and GradScaler then refuses its fp16 gradients."""
    trainer = make_trainer(tiny_model, tmp_path, use_lora=False, mixed_precision="fp16", warmup_first_epoch=False)
    unet, reference = trainer.sd_pipeline.unet, trainer.reference_unet
    assert all(p.is_cuda and p.dtype == torch.float32 and p.requires_grad for p in unet.parameters())
    assert reference is not None and reference is not unet
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in reference.parameters())
    before = [p.detach().clone() for p in unet.parameters()]
    reference_before = [p.detach().clone() for p in reference.parameters()]
    losses = record_losses(trainer, monkeypatch)

    trainer.train(epochs=3)
    after = [p.detach() for p in unet.parameters()]
    assert trainer.global_step == 3
    assert_finite_history(trainer)
    assert losses and all(torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in after), "the trained UNet left fp32"
    assert all(torch.isfinite(p).all() for p in after)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed > len(after) // 2, f"only {changed} of {len(after)} UNet tensors trained"
    assert all(torch.equal(a, b) for a, b in zip(reference_before, reference.parameters())), "the reference moved"


def test_an_fp16_overflow_skips_one_update_and_training_goes_on(tiny_model, tmp_path, monkeypatch):
    """GradScaler meets infinite gradients by design (its scale starts at 2**16 and halves at each overflow): the
    overflowing update must be skipped with the scale lowered, and the next update must train as usual."""
    trainer = make_trainer(
        tiny_model, tmp_path, mixed_precision="fp16", warmup_first_epoch=False, kl_penalty=False, kl_log=False
    )
    scaler = trainer.accelerator.scaler
    assert scaler is not None
    calculate_loss = trainer.calculate_loss
    overflow = {"on": True}

    def overflowing(*args, **kwargs):
        loss, approx_kl, clipfrac = calculate_loss(*args, **kwargs)
        return (loss * float("inf") if overflow["on"] else loss), approx_kl, clipfrac

    monkeypatch.setattr(trainer, "calculate_loss", overflowing)
    before, scale = lora_vector(trainer), scaler.get_scale()
    trainer.train(epochs=1)
    assert torch.equal(before, lora_vector(trainer)), "an overflowing update reached the LoRA"
    assert scaler.get_scale() < scale, "GradScaler's scale was not lowered after the overflow (update() never ran)"

    overflow["on"] = False
    trainer.train(epochs=3)
    after = lora_vector(trainer)
    assert torch.isfinite(after).all() and not torch.equal(before, after), "training did not go on"


def test_a_run_resumed_on_cuda_reaches_the_same_lora_as_an_uninterrupted_one(
    tiny_model, tmp_path, deterministic, monkeypatch
):
    """As the CPU test of exact resume, in fp16 (the GradScaler state is checkpointed too). A second uninterrupted
    run measures what the GPU itself varies between identical runs; the resumed run may differ by no more."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    settings = dict(
        prompt_dataset=str(prompts),
        train_learning_rate=3e-3,
        per_prompt_stat_tracking_min_count=2,
        mixed_precision="fp16",
    )

    def run(name, epochs, **extra):
        config = Carve3DConfig(**{**SMALL, **settings, "logdir": str(tmp_path / name), **extra})
        trainer = Carve3DTrainer(config, brightness, sd_pipeline=tiny_model.pipeline())
        assert trainer.accelerator.device.type == "cuda"
        trainer.sd_pipeline.set_progress_bar_config(disable=True)
        initial, first_epoch = lora_vector(trainer), trainer.first_epoch
        trainer.train(epochs=epochs)
        return trainer, initial, first_epoch

    uninterrupted, initial, _ = run("a", 4)
    repeated, _, _ = run("c", 4)
    interrupted, _, _ = run("b", 2)  # warm-up epoch + one update; checkpoint_1 written
    del interrupted
    gc.collect()
    resumed, _, first_epoch = run("b", 4, resume_from=str(tmp_path / "b"))
    assert first_epoch == 2
    assert resumed.global_step == uninterrupted.global_step == 3

    expected = lora_vector(uninterrupted)
    trained = (expected - initial).abs().max().item()
    noise = (lora_vector(repeated) - expected).abs().max().item()
    assert noise <= 1e-3 * trained, f"two identical runs differ by {noise:.3g} (training moved the LoRA {trained:.3g})"
    difference = (lora_vector(resumed) - expected).abs().max().item()
    assert difference <= max(1e-6, 2 * noise), (
        f"resumed run differs by {difference:.3g}; identical runs by {noise:.3g}; training moved {trained:.3g}"
    )
    rewards = [h["reward_mean"] for h in uninterrupted.history]
    assert [h["reward_mean"] for h in resumed.history] == pytest.approx(rewards, rel=1e-5, abs=1e-6)


def test_the_kl_reference_costs_no_cuda_memory_with_lora(medium_model, tmp_path):
    """With LoRA the KL reference is the same UNet with its adapters disabled and its pass runs without gradients,
    so the KL may not raise the peak of an epoch (construction included) above 5% + 8 MiB of the KL-off peak.

    The margin leaves room for the caching allocator, whose allocated bytes depend on the order of earlier
    allocations (a reused block is counted whole), and is far below the ~126 MiB a second UNet would add."""

    def peak(name, **kl):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer = make_trainer(medium_model, tmp_path / name, mixed_precision="fp16", warmup_first_epoch=False, **kl)
        trainer.train(epochs=1)
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - start
        unet_bytes = sum(p.numel() * p.element_size() for p in trainer.sd_pipeline.unet.parameters())
        return used, unet_bytes

    kl_off = dict(kl_penalty=False, kl_log=False)
    peak("warm-up", **kl_off)  # what CUDA keeps for good (cuBLAS workspaces, handles) is allocated here
    off, unet_bytes = peak("kl-off", **kl_off)
    on, _ = peak("kl-on")
    margin = int(0.05 * off) + 8 * MiB
    assert unet_bytes > margin, "the test's UNet is too small for a second copy to show"
    assert on <= off + margin, (
        f"peak with the KL {on / MiB:.1f} MiB, without {off / MiB:.1f} MiB (margin {margin / MiB:.1f} MiB; "
        f"the UNet holds {unet_bytes / MiB:.1f} MiB)"
    )
