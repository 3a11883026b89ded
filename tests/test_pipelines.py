"""The pipelines package: the Stable Diffusion pipeline samples through the library's one loop and gives what TRL's
own loop gives; evaluation samples and computes the KL through the same loop."""

import pytest
import torch
from trl.models.modeling_sd_base import pipeline_step

from carve3d_trl import Carve3DStableDiffusionPipeline
from carve3d_trl.evaluation import sample_with_kl
from carve3d_trl.pipelines import add_lora_adapter, sample_with_log_probs, transition_log_probs


def test_the_sd_pipeline_call_equals_trls_loop_from_the_same_random_state(tiny_model_path):
    # TRL's loop draws its step noise from the global generator (it does not pass `generator` to its DDIM step), so
    # both runs start from the same global random state.
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path)
    settings = dict(num_inference_steps=3, guidance_scale=5.0, eta=1.0)
    torch.manual_seed(0)
    ours = pipeline(["a red cube", "a blue sphere"], **settings)
    torch.manual_seed(0)
    trls = pipeline_step(pipeline.sd_pipeline, ["a red cube", "a blue sphere"], output_type="pt", **settings)
    assert ours.images.shape == trls.images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours.images, trls.images, atol=1e-5, rtol=0)
    for mine, theirs in zip(ours.latents, trls.latents, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    for mine, theirs in zip(ours.log_probs, trls.log_probs, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)


def test_the_sd_pipeline_call_takes_embeddings_and_images_per_prompt(tiny_model_path):
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path)
    embeds = pipeline.conditioner.encode(["a red cube"])["prompt_embeds"]
    settings = dict(num_inference_steps=2, guidance_scale=5.0, eta=1.0, num_images_per_prompt=2)
    from_text = pipeline("a red cube", generator=torch.Generator().manual_seed(1), **settings)
    from_embeds = pipeline(prompt_embeds=embeds, generator=torch.Generator().manual_seed(1), **settings)
    torch.testing.assert_close(from_text.images, from_embeds.images)
    assert from_text.images.shape[0] == 2 and not torch.equal(from_text.images[0], from_text.images[1])
    with pytest.raises(ValueError, match="exactly one of `prompt` and `prompt_embeds`"):
        pipeline(num_inference_steps=2)
    with pytest.raises(ValueError, match="does not support \\['guidance_rescale'\\]"):
        pipeline("a red cube", num_inference_steps=2, guidance_rescale=0.7)


def test_evaluation_kl_is_zero_against_itself_and_positive_once_the_lora_moves(tiny_model_path):
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path)
    pipe = pipeline.sd_pipeline
    add_lora_adapter(pipe.unet, rank=2, alpha=2, target_modules=("to_q", "to_v"))
    settings = dict(num_inference_steps=3, guidance_scale=5.0)
    images, kl = sample_with_kl(pipe, ["a red cube", "a blue sphere"], [0, 1], reference=pipe, **settings)
    assert images.shape == (2, 3, 32, 32) and torch.equal(kl, torch.zeros(2))  # a fresh LoRA is the base model
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    moved, kl = sample_with_kl(pipe, ["a red cube", "a blue sphere"], [0, 1], reference=pipe, **settings)
    assert (kl > 0).all() and not torch.allclose(moved, images)
    _, none = sample_with_kl(pipe, ["a red cube"], [0], **settings)
    assert torch.equal(none, torch.zeros(1))


def test_a_half_precision_step_records_the_log_prob_of_the_stored_latent(tiny_model_path):
    # TRL's step scores x_{t-1} before rounding it to the latents' dtype; the KL reference and training score the
    # stored one, so the recorded value must be that one's (else the KL of a fresh LoRA is not 0 in fp16/bf16).
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path)
    pipe = pipeline.sd_pipeline.to(torch.bfloat16)
    conditioning = pipeline.conditioner.encode(["a red cube", "a blue sphere"])
    negative = pipeline.conditioner.encode_negative("", 2)
    settings = dict(guidance_scale=5.0, eta=1.0)
    output = sample_with_log_probs(
        pipe,
        pipeline.conditioner,
        conditioning,
        negative,
        num_inference_steps=3,
        generator=torch.Generator(),
        **settings,
    )
    latents = torch.stack(output.latents, dim=1)
    assert latents.dtype == torch.bfloat16
    recomputed = transition_log_probs(
        pipe,
        pipe.unet,
        pipeline.conditioner,
        pipe.scheduler.timesteps,
        latents[:, :-1],
        latents[:, 1:],
        conditioning,
        negative,
        **settings,
    )
    torch.testing.assert_close(torch.stack(output.log_probs, dim=1), recomputed, atol=0, rtol=0)
