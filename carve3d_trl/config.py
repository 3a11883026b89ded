"""`Carve3DConfig`: TRL's `DDPOConfig` plus Carve3D's on-policy batching, KL regularisation and prompt dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DDPOConfig

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class Carve3DConfig(DDPOConfig):
    r"""
    Configuration class for the [`Carve3DTrainer`]. Every [`~trl.DDPOConfig`] field keeps its name and meaning; the
    fields below add Carve3D's changes to DDPO. Defaults follow the Carve3D recipe (`carve3d_train`).

    Using [`~transformers.HfArgumentParser`] this class turns into command-line arguments.

    Parameters:
        on_policy (`bool`, *optional*, defaults to `True`):
            Pure on-policy batching: `train_gradient_accumulation_steps` is derived so that the total train batch
            (`train_batch_size * train_gradient_accumulation_steps * num_processes`) equals the total sample batch
            (`sample_batch_size * sample_num_batches_per_epoch * num_processes`), so each epoch makes exactly one
            optimizer update on all of its fresh samples. With `False`, DDPO's behaviour: the sample total may be a
            multiple of the train total, giving that many updates per epoch.
        kl_penalty (`bool`, *optional*, defaults to `True`):
            Regularise towards the base model (LoRA disabled, or a frozen copy of the UNet without LoRA): the
            log-probability of each sampled transition `x_t -> x_{t-1}` is also computed under the base model.
        kl_in_reward (`bool`, *optional*, defaults to `True`):
            Put the KL penalty into the advantage: `advantage = normalised_reward - kl_normalized_coeff *
            normalised_kl`. With `False`, add `kl_beta * (log p_theta - log p_ref)` to the loss instead.
        kl_per_prompt_stat_tracking (`bool`, *optional*, defaults to `True`):
            Normalise the per-sample KL per prompt, with a second per-prompt tracker configured like the reward's
            (`per_prompt_stat_tracking_buffer_size`, `per_prompt_stat_tracking_min_count`). With `False`, normalise
            over the batch.
        kl_normalized_coeff (`float`, *optional*, defaults to `0.2`):
            Weight of the normalised KL in the advantage (in-reward mode).
        kl_beta (`float`, *optional*, defaults to `0.001`):
            Weight of the KL term in the loss (in-loss mode).
        kl_log (`bool`, *optional*, defaults to `True`):
            Compute and log the per-sample KL to the base model (values, mean, std). With `kl_penalty=False` this
            monitors the drift without penalising it (it costs the same reference pass).
        warmup_first_epoch (`bool`, *optional*, defaults to `True`):
            The first epoch only samples and fills the per-prompt statistics; no optimizer update is made.
        prompt_dataset (`str`, *optional*, defaults to `""`):
            Hub dataset repo id or local file/folder (txt, json, jsonl, csv, parquet) with the training prompts. When
            set, the trainer's `prompt_function` may be omitted.
        prompt_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split holding the training prompts.
        prompt_dataset_eval_split (`str`, *optional*, defaults to `""`):
            Split holding the validation prompts (empty: none).
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompt text (plain `.txt` files have one prompt per line).
        prompt_dataset_revision (`str`, *optional*, defaults to `""`):
            Revision (branch, tag or commit) of a Hub dataset (empty: the default branch).
        prompt_dataset_size (`int`, *optional*, defaults to `0`):
            Use only the first `prompt_dataset_size` training prompts (the recipe's `train_size`, 30); 0 uses all.
        per_prompt_stat_tracking (`bool`, *optional*, defaults to `True`):
            DDPO's per-prompt normalisation of the rewards. **A changed default**: TRL's `DDPOConfig` defaults to
            `False` (normalise over the batch); the Carve3D recipe normalises per prompt. A plain `DDPOConfig` given to
            `Carve3DTrainer` keeps TRL's default.
    """

    on_policy: bool = field(
        default=True,
        metadata={
            "help": "Derive train_gradient_accumulation_steps so that each epoch makes one update on all samples."
        },
    )
    kl_penalty: bool = field(default=True, metadata={"help": "Regularise towards the base model with a KL penalty."})
    kl_in_reward: bool = field(
        default=True, metadata={"help": "Put the normalised KL into the advantage (else into the loss)."}
    )
    kl_per_prompt_stat_tracking: bool = field(
        default=True, metadata={"help": "Normalise the KL per prompt (else over the batch)."}
    )
    kl_normalized_coeff: float = field(default=0.2, metadata={"help": "Weight of the normalised KL in the advantage."})
    kl_beta: float = field(default=0.001, metadata={"help": "Weight of the KL term in the loss (in-loss mode)."})
    kl_log: bool = field(default=True, metadata={"help": "Log the per-sample KL to the base model."})
    warmup_first_epoch: bool = field(
        default=True, metadata={"help": "The first epoch only fills the per-prompt statistics (no update)."}
    )
    prompt_dataset: str = field(
        default="", metadata={"help": "Hub dataset repo id or local file/folder with the training prompts."}
    )
    prompt_dataset_split: str = field(default="train", metadata={"help": "Split holding the training prompts."})
    prompt_dataset_eval_split: str = field(default="", metadata={"help": "Split holding the validation prompts."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt text."})
    prompt_dataset_revision: str = field(default="", metadata={"help": "Revision of a Hub prompt dataset."})
    prompt_dataset_size: int = field(default=0, metadata={"help": "Use only the first N training prompts (0: all)."})
    per_prompt_stat_tracking: bool = field(
        default=True,
        metadata={"help": "Normalise rewards per prompt (True here; TRL's DDPOConfig defaults to False)."},
    )

    def __post_init__(self):
        super().__post_init__()
        validate_batching(self)
        if self.on_policy:
            self.train_gradient_accumulation_steps = on_policy_accumulation_steps(self)
        else:
            validate_multi_update(self)
        for name in ("kl_normalized_coeff", "kl_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}; use 0 to switch the term off.")
        if self.prompt_dataset_size < 0:
            raise ValueError(
                f"`prompt_dataset_size` must be >= 0 (0 uses all prompts), got {self.prompt_dataset_size}."
            )
        if self.resume_from:
            from .run_state import resolve_checkpoint

            resolve_checkpoint(self.resume_from)  # a missing checkpoint fails here, before any model loads


def validate_batching(config: DDPOConfig) -> None:
    """Raise a `ValueError` naming the fields when DDPO's batch settings cannot work together."""
    for name in ("sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size", "sample_num_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be >= 1, got {getattr(config, name)}.")
    if not 0 < config.train_timestep_fraction <= 1:
        raise ValueError(
            f"`train_timestep_fraction` must be in (0, 1], got {config.train_timestep_fraction}; "
            "1.0 trains on every sampled timestep."
        )
    for name in ("num_epochs", "save_freq", "num_checkpoint_limit", "per_prompt_stat_tracking_buffer_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be >= 1, got {getattr(config, name)}.")
    for name in ("train_learning_rate", "train_clip_range", "train_adv_clip_max", "train_max_grad_norm"):
        if not getattr(config, name) > 0:
            raise ValueError(f"`{name}` must be > 0, got {getattr(config, name)}.")
    if not config.sample_eta > 0:
        raise ValueError(
            f"`sample_eta` must be > 0, got {config.sample_eta}: DDPO's log-probabilities need a stochastic DDIM "
            "sampler (the recipe uses 1.0)."
        )
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISION}, got '{config.mixed_precision}'.")
    if config.log_with not in (None, "tensorboard", "wandb"):
        raise ValueError(f"`log_with` must be 'tensorboard', 'wandb' or unset, got '{config.log_with}'.")
    if config.train_cfg and config.sample_guidance_scale <= 1.0:
        raise ValueError(
            f"`train_cfg=True` trains with classifier-free guidance, but `sample_guidance_scale` is "
            f"{config.sample_guidance_scale} (<= 1 samples without it), so the log-probabilities would not match; "
            "set `sample_guidance_scale` > 1 or `train_cfg=False`."
        )
    if config.per_prompt_stat_tracking_min_count > config.per_prompt_stat_tracking_buffer_size:
        raise ValueError(
            f"`per_prompt_stat_tracking_min_count` ({config.per_prompt_stat_tracking_min_count}) exceeds "
            f"`per_prompt_stat_tracking_buffer_size` ({config.per_prompt_stat_tracking_buffer_size}), so per-prompt "
            "statistics would never be used; the recipe uses buffer = 3 x min_count."
        )
    if config.sample_batch_size % config.train_batch_size:
        raise ValueError(
            f"`sample_batch_size` ({config.sample_batch_size}) must be a multiple of `train_batch_size` "
            f"({config.train_batch_size}); for example set `train_batch_size` to one of "
            f"{_divisors(config.sample_batch_size)}."
        )


def on_policy_accumulation_steps(config: Carve3DConfig) -> int:
    """Gradient-accumulation steps that make the total train batch equal the total sample batch.

    The number of processes appears on both sides of the equality, so it cancels:
    `train_batch_size * steps == sample_batch_size * sample_num_batches_per_epoch`.
    """
    if config.train_num_inner_epochs != 1:
        raise ValueError(
            f"`on_policy=True` makes exactly one update per epoch, so `train_num_inner_epochs` must be 1 "
            f"(got {config.train_num_inner_epochs}); set `on_policy=False` for DDPO's multi-update behaviour."
        )
    samples_per_process = config.sample_batch_size * config.sample_num_batches_per_epoch
    # validate_batching guarantees sample_batch_size % train_batch_size == 0, hence divisibility here.
    steps = samples_per_process // config.train_batch_size
    if config.train_gradient_accumulation_steps not in (1, steps):
        raise ValueError(
            f"`on_policy=True` derives `train_gradient_accumulation_steps` = sample_batch_size * "
            f"sample_num_batches_per_epoch / train_batch_size = {steps}, but it was set to "
            f"{config.train_gradient_accumulation_steps}; leave it unset (or set it to {steps}), "
            "or set `on_policy=False`."
        )
    return steps


def validate_multi_update(config: DDPOConfig) -> None:
    """DDPO's rule: the samples of an epoch must split into whole train batches (processes cancel out)."""
    samples = config.sample_batch_size * config.sample_num_batches_per_epoch
    train = config.train_batch_size * config.train_gradient_accumulation_steps
    if samples % train:
        raise ValueError(
            "The samples per epoch per process (sample_batch_size * sample_num_batches_per_epoch = "
            f"{samples}) must be a multiple of train_batch_size * train_gradient_accumulation_steps = {train}; "
            "for example set `train_gradient_accumulation_steps` to one of "
            f"{_divisors(samples // config.train_batch_size)}."
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def as_carve3d_config(config: DDPOConfig) -> Carve3DConfig:
    """Return `config` itself if it is a `Carve3DConfig`, else the equivalent with Carve3D's additions turned off."""
    if isinstance(config, Carve3DConfig):
        return config
    fields = {k: v for k, v in vars(config).items() if k in Carve3DConfig.__dataclass_fields__}
    return Carve3DConfig(**fields, on_policy=False, kl_penalty=False, kl_log=False, warmup_first_epoch=False)
