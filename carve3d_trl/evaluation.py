"""What the evaluation and prompt-curation scripts share: their model, prompt and sampling arguments, the checks
that run before any model loads, the pipeline (with a LoRA), seeded sampling through the library's DDIM loop (with
the KL to a reference model), and MRC scoring.

Seed `s` fixes a sample's initial latent and the DDIM noise of every step, whatever the prompt, the batch or the model,
so two models (e.g. the base and the fine-tuned one) sampled with the same seeds differ only by their weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .hub import validate_repo_id
from .image_logging import tile_views_grid
from .pipelines import (
    FAMILIES,
    LORA_WEIGHT_NAME,
    ImageConditioner,
    MultiViewDiffusionPipeline,
    conditioner_of,
    resolve_family,
    sample_with_log_probs,
    transition_log_probs,
)
from .prompts import load_prompts

logger = logging.getLogger(__name__)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelArguments:
    pretrained_model: str = field(
        default="",
        metadata={"help": "Base multi-view model: Hub model id or local diffusers folder. Empty: the toy model."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Revision of a Hub base model."})
    pipeline_family: str = field(
        default="auto",
        metadata={
            "help": "Model family: 'sd' (Stable Diffusion 1.x/2.x), 'sdxl' (grid models), 'view_batched' (MVDream's "
            "architecture), or 'auto' (read model_index.json)."
        },
    )

    def __post_init__(self):
        if not self.pretrained_model:
            from .toy import toy_model_path

            family = "view_batched" if self.pipeline_family == "view_batched" else "grid"
            self.pretrained_model = str(toy_model_path("short", family=family))
        if self.pipeline_family not in FAMILIES:
            raise ValueError(f"--pipeline_family must be one of {FAMILIES}, got {self.pipeline_family!r}.")


@dataclass
class PromptArguments:
    prompt_dataset: str = field(
        default="", metadata={"help": "Hub dataset id, or a local txt/json/jsonl/csv/parquet file or dataset folder."}
    )
    prompt_split: str = field(default="train", metadata={"help": "Split to read (a single file has only 'train')."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    prompt_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub prompt dataset."})
    num_prompts: int = field(default=0, metadata={"help": "Use only the first N prompts (0: all)."})


@dataclass
class SamplingArguments:
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (the recipe's 5)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (1.0 as in DDPO sampling; 0: deterministic DDIM)."})
    seed: int = field(default=0, metadata={"help": "First seed; the seeds are seed, seed+1, ..."})
    batch_size: int = field(default=4, metadata={"help": "Images sampled and scored per batch."})
    mixed_precision: str = field(default="no", metadata={"help": "Pipeline precision: no (fp32), fp16 or bf16."})
    device: str = field(default="", metadata={"help": "Device (e.g. cuda, cuda:1, cpu). Empty: cuda if available."})


@dataclass
class Scores:
    """MRC and reward of each (prompt, seed) sample, and the images of the samples kept for a figure.

    Attributes:
        mrc (`np.ndarray`): `(num_prompts, num_seeds)`.
        rewards (`np.ndarray`): `(num_prompts, num_seeds)`.
        kept (`dict`): By `(prompt index, seed index)`: `image` `(3, H, W)` (a view-batched sample's views tiled),
            `renders` `(V, 3, h, w)`, `mrc`.
    """

    mrc: np.ndarray
    rewards: np.ndarray
    kept: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- input checks


def check_sampling_args(sampling: SamplingArguments) -> None:
    """Raise `ValueError` for sampling settings that cannot work."""
    if sampling.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be >= 1, got {sampling.num_inference_steps}.")
    if sampling.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {sampling.batch_size}.")
    if sampling.mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision must be one of {', '.join(DTYPES)}, got '{sampling.mixed_precision}'.")


def check_model_source(source: str, what: str = "--pretrained_model") -> None:
    """A local folder must hold `model_index.json`; anything else must look like a Hub repo id."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{what} '{source}' is a local path without model_index.json (not a diffusers model)."
            )
        return
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} '{source}' does not exist.")
    validate_repo_id(source)


def resolve_lora(source: str, revision: str | None = None) -> Path:
    """The local path of the LoRA's `pytorch_lora_weights.safetensors`, downloading it from the Hub if needed.

    `source` is a local folder holding the file, the file itself, or a Hub model repo id. Run before any model loads
    so that a wrong LoRA fails at once.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora '{source}' is a file but not a .safetensors LoRA.")
        return path
    if path.is_dir():
        weights = path / LORA_WEIGHT_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(
                f"--lora folder '{source}' has no {LORA_WEIGHT_NAME} (it holds {found}). Point --lora at the folder "
                "written by `Carve3DTrainer.save_pretrained` (e.g. outputs/<run>/lora)."
            )
        return weights
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"--lora '{source}' does not exist (and is not a Hub repo id).")
    validate_repo_id(source)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, LORA_WEIGHT_NAME, revision=revision))
    except Exception as error:
        raise FileNotFoundError(
            f"--lora '{source}' is not a local folder, and {LORA_WEIGHT_NAME} could not be fetched from the Hub repo "
            f"'{source}' ({type(error).__name__}: {error})."
        ) from error


def load_eval_prompts(args: PromptArguments) -> list[str]:
    """The prompts named by the prompt arguments ([`~carve3d_trl.load_prompts`])."""
    if args.num_prompts < 0:
        raise ValueError(f"--num_prompts must be >= 0, got {args.num_prompts}.")
    if not args.prompt_dataset:
        raise ValueError("--prompt_dataset is empty; name a Hub dataset id or a local prompt file.")
    return load_prompts(
        args.prompt_dataset,
        split=args.prompt_split,
        column=args.prompt_column,
        revision=args.prompt_revision,
        limit=args.num_prompts,
    )


# ---------------------------------------------------------------------------------------------- models


def resolve_device(name: str) -> torch.device:
    """`name`, or CUDA when available and `name` is empty."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_pipeline(model: ModelArguments, sampling: SamplingArguments, device: torch.device | str):
    """A diffusers `StableDiffusionPipeline` (without a safety checker), `StableDiffusionXLPipeline` or
    [`MultiViewDiffusionPipeline`], by the model's family, with a DDIM scheduler, on `device`; a LoRA loads into it
    with `pipe.load_lora_weights`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    family = resolve_family(model.pretrained_model, model.pipeline_family, model.pretrained_revision)
    if family == "view_batched":
        pipeline_class, extra = MultiViewDiffusionPipeline, {}
    elif family == "sdxl":
        pipeline_class, extra = StableDiffusionXLPipeline, {}
    else:
        pipeline_class, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    dtype = DTYPES[sampling.mixed_precision]
    pipe = pipeline_class.from_pretrained(
        model.pretrained_model, revision=model.pretrained_revision, torch_dtype=dtype, **extra
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------- sampling


def seeded_noise(pipe, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The initial latent of `seed` (`(C, h, w)`, or `(V, C, h, w)` for a view-batched model) and the CPU generator,
    advanced past it, for the DDIM step noise.

    Both depend on the seed only (not on the prompt, the batch or the device), so the same seed gives the same
    noise to every prompt and to every model.
    """
    shape = getattr(pipe, "conditioner", ImageConditioner()).latent_shape(pipe.unet, 1)[1:]
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = torch.randn(shape, generator=generator, dtype=torch.float32)
    return latent, generator


@torch.no_grad()
def sample_with_kl(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    reference=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one image per `(prompt, seed)` with the library's DDIM loop, and its KL estimate to `reference`.

    Args:
        pipe: A diffusers or DDPO pipeline (SD or SDXL family).
        prompts (`Sequence[str]`): One prompt per sample.
        seeds (`Sequence[int]`): One seed per sample ([`seeded_noise`]).
        num_inference_steps, guidance_scale, eta: The DDIM sampler's settings.
        reference (*optional*): The model of the KL: `None` (KL 0), `pipe` itself (its UNet with its LoRA adapters
            disabled: the base model), or another pipeline of the same family.

    Returns:
        `images` `(B, 3, H, W)` (views `(B, V, 3, h, w)`) in [0, 1] (float32, CPU) and `kl` `(B,)`: the mean over
        steps of `log p_pipe - log p_reference` of the sampled transitions.
    """
    noise = [seeded_noise(pipe, seed) for seed in seeds]
    conditioner = conditioner_of(pipe)
    conditioning = conditioner.encode(list(prompts))
    negative = conditioner.encode_negative("", len(prompts)) if guidance_scale > 1.0 else None
    output = sample_with_log_probs(
        pipe,
        conditioner,
        conditioning,
        negative,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=[generator for _, generator in noise],
        latents=torch.stack([latent for latent, _ in noise]),
    )
    images = output.images.float().cpu().clamp(0, 1)
    if reference is None:
        return images, torch.zeros(len(prompts))
    reference_conditioner = conditioner_of(reference)
    reference_conditioning = reference_conditioner.encode(list(prompts))
    reference_negative = reference_conditioner.encode_negative("", len(prompts)) if negative is not None else None
    latents = torch.stack(output.latents, dim=1)
    if reference is pipe:
        pipe.unet.disable_adapters()
    try:
        reference_log_probs = transition_log_probs(
            reference,
            reference.unet,
            reference_conditioner,
            pipe.scheduler.timesteps,
            latents[:, :-1],
            latents[:, 1:],
            reference_conditioning,
            reference_negative,
            guidance_scale=guidance_scale,
            eta=eta,
        )
    finally:
        if reference is pipe:
            pipe.unet.enable_adapters()
    kl = (torch.stack(output.log_probs, dim=1) - reference_log_probs).mean(dim=1)
    return images, kl.float().cpu()


def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingArguments) -> torch.Tensor:
    """Images `(B, 3, H, W)` (views `(B, V, 3, h, w)`) in [0, 1] (float32, CPU), one per `(prompt, seed)` pair
    ([`sample_with_kl`])."""
    images, _ = sample_with_kl(
        pipe,
        prompts,
        seeds,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
    )
    return images


def score_prompts(
    pipe,
    reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingArguments,
    keep: set[tuple[int, int]] = frozenset(),
    label: str = "model",
) -> Scores:
    """Sample every `(prompt, seed)` pair in batches of `sampling.batch_size` and score it with `reward` (an
    `MRCReward`).

    Pairs are visited in the same order and batches for every model, so the reward's own randomness (e.g. the
    radiance field's initialisation) is matched too. The images, renders and MRC of the `(prompt index, seed index)`
    pairs in `keep` are returned in `Scores.kept`.
    """
    pairs = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    scores = Scores(np.full((len(prompts), len(seeds)), np.nan), np.full((len(prompts), len(seeds)), np.nan))
    for start in range(0, len(pairs), sampling.batch_size):
        batch = pairs[start : start + sampling.batch_size]
        batch_prompts = [prompts[p] for p, _ in batch]
        images = sample_images(pipe, batch_prompts, [seeds[s] for _, s in batch], sampling)
        rewards, metadata = reward(images, batch_prompts, [{} for _ in batch])
        for i, (p, s) in enumerate(batch):
            scores.mrc[p, s] = float(metadata["mrc"][i])
            scores.rewards[p, s] = float(rewards[i])
            if (p, s) in keep:
                image = tile_views_grid(images[i][None], reward.layout.cols)[0] if images.ndim == 5 else images[i]
                scores.kept[p, s] = {"image": image, "renders": metadata["renders"][i], "mrc": scores.mrc[p, s]}
        logger.info("%s: scored %d/%d samples", label, start + len(batch), len(pairs))
    return scores
