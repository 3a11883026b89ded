"""`Carve3DTrainer`: TRL's `DDPOTrainer` with Carve3D's on-policy batching, KL regularisation and fixes."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from trl import DDPOConfig, DDPOTrainer
from trl.models import DDPOStableDiffusionPipeline

from .batches import SampledBatch, ScoredBatch
from .config import as_carve3d_config
from .distributed import ensure_process_state
from .image_logging import LoggedSample, collect_samples
from .interrupts import (
    StopRequest,
    TrainingInterrupted,
    capture_rng_states,
    exit_for,
    restore_rng_states,
    stop_on_signals,
)
from .kl import KLMode, KLReference
from .model_folder import ModelFolderMixin
from .pipelines import (
    Conditioning,
    check_reward_cameras,
    concat_conditioning,
    conditioner_of,
    guided_noise,
    load_lora_into_unet_adapter,
    repeat_conditioning,
    sample_with_log_probs,
    split_conditioning,
)
from .prompts import PromptCycler, load_prompts
from .rewards.metadata import per_sample_values
from .run_state import RunCheckpoints, resolve_checkpoint
from .stats import PromptStatTracker, compute_advantages
from .trl_compat import UnsupportedTRLMethods

logger = logging.getLogger(__name__)

NUM_CARD_SAMPLES = 4


class Carve3DTrainer(ModelFolderMixin, UnsupportedTRLMethods, DDPOTrainer):
    """DDPO with Carve3D's changes: pure on-policy batching, a KL penalty against the base model normalised per
    prompt, and per-prompt statistics keyed on the prompts and checkpointed with the run.

    A TRL DDPO script keeps working when it swaps `DDPOTrainer` for this class: given a plain `DDPOConfig` it
    trains as DDPO does (with TRL 0.23.1's crashes fixed); Carve3D's features come with a [`Carve3DConfig`].

    Args:
        config ([`DDPOConfig`] or [`Carve3DConfig`]): The training configuration.
        reward_function (`Callable[[torch.Tensor, tuple[str], tuple[Any]], tuple[torch.Tensor, Any]]`):
            Maps images `(B, 3, H, W)` in [0, 1], their prompts and prompt metadata to rewards `(B,)` and metadata.
        prompt_function (`Callable[[], tuple[str, Any]]`, *optional*): Returns one prompt and its metadata per
            call. Optional when `config.prompt_dataset` names a dataset: the trainer then cycles through its prompts.
        sd_pipeline ([`~trl.DDPOStableDiffusionPipeline`]): The pipeline to fine-tune.
        image_samples_hook (`Callable[[list, int, Any], Any]`, *optional*): Called each epoch with the
            [`ScoredBatch`] list (`images, prompts, prompt_metadata, rewards, reward_metadata` each), the global step
            and the first tracker (`None` when no tracker runs on this process).

    Every per-sample tensor `(B,)` a reward returns in its metadata dict is logged as `<key>_mean` (MRC's `mrc` as
    `mrc_mean`). Of TRL's `DDPOTrainer` methods, `train`, `step`, `compute_rewards`, `calculate_loss`, `loss`,
    `save_pretrained` and `push_to_hub` work here; `create_model_card`, `_save_checkpoint`, `from_pretrained` and
    `generate_model_card` raise an error naming the method to use instead.
    """

    _tag_names = ["trl", "ddpo", "carve3d"]

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable[[torch.Tensor, tuple[str], tuple[Any]], Any],
        prompt_function: Callable[[], tuple[str, Any]] | None = None,
        sd_pipeline: DDPOStableDiffusionPipeline | None = None,
        image_samples_hook: Callable[[Any, Any, Any], Any] | None = None,
    ):
        # accelerate's logging needs a state before the Accelerator exists
        state = ensure_process_state(cpu=bool(config.accelerator_kwargs.get("cpu", False)))
        if sd_pipeline is None:
            raise ValueError("`sd_pipeline` is required, e.g. Carve3DStableDiffusionPipeline('<model id or folder>').")
        check_reward_cameras(reward_function, sd_pipeline)  # before any tracker or checkpoint folder is made
        self.config = config = as_carve3d_config(config)
        self.reward_fn = reward_function
        self.image_samples_callback = image_samples_hook
        self.prompt_cycler: PromptCycler | None = None
        self.eval_prompts: list[str] = []
        self.prompt_fn = prompt_function or self._prompt_function_from_dataset(state)
        self.history: list[dict[str, float]] = []
        self.card_samples: list[LoggedSample] = []
        self.global_step = 0
        self.stop_request = StopRequest()
        self.kl_mode = KLMode.from_config(config)
        self._epoch_updated = False  # whether the current epoch has changed the weights yet
        self._sampling_epoch = 0  # seeds the sampling noise (see `_sample_generators`)

        resume_dir = resolve_checkpoint(config.resume_from) if config.resume_from else None
        self.num_train_timesteps = int(config.sample_num_steps * config.train_timestep_fraction)
        project_config = ProjectConfiguration(**config.project_kwargs)
        self.checkpoints = RunCheckpoints(
            Path(project_config.project_dir or config.logdir) / "checkpoints", config.num_checkpoint_limit
        )
        if state.is_main_process:
            self.checkpoints.clean()
        project_config.automatic_checkpoint_naming = False  # checkpoints are named and rotated here
        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,
            project_config=project_config,
            # gradients accumulate over timesteps too: one optimizer step per `train_gradient_accumulation_steps`
            # train batches, each contributing `num_train_timesteps` backward passes.
            gradient_accumulation_steps=config.train_gradient_accumulation_steps * self.num_train_timesteps,
            **config.accelerator_kwargs,
        )
        is_okay, message = self._config_check()
        if not is_okay:
            raise ValueError(message)
        if self.accelerator.is_main_process:
            tensorboard = config.log_with == "tensorboard"
            self.accelerator.init_trackers(
                config.tracker_project_name,
                config=config.to_dict() if tensorboard else {"carve3d_trainer_config": config.to_dict()},
                init_kwargs=config.tracker_kwargs,
            )
        set_seed(config.seed, device_specific=True)

        self.sd_pipeline = sd_pipeline
        self.conditioner = conditioner_of(sd_pipeline)
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)
        inference_dtype = inference_dtype or torch.float32
        self.sd_pipeline.vae.to(self.accelerator.device, dtype=inference_dtype)
        self.conditioner.to(self.accelerator.device, inference_dtype)
        use_lora = bool(getattr(self.sd_pipeline, "use_lora", False))
        # A fully trained UNet keeps fp32 weights (autocast computes in half precision); TRL casts it to fp16.
        self.sd_pipeline.unet.to(self.accelerator.device, dtype=inference_dtype if use_lora else torch.float32)

        self.kl_reference = None
        if self.kl_mode.computes_reference:
            self.kl_reference = KLReference(
                self.sd_pipeline, self.conditioner, frozen_copy=not use_lora, dtype=inference_dtype
            )

        trainable_layers = self.sd_pipeline.get_trainable_layers()
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:  # no dataloader tells DeepSpeed the micro batch, so set it here
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        self.optimizer = self._setup_optimizer(
            trainable_layers.parameters() if not isinstance(trainable_layers, list) else trainable_layers
        )
        self.negative_conditioning = self.conditioner.encode_negative(config.negative_prompts or "", 1)

        stat_sizes = (config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count)
        self.stat_tracker = PromptStatTracker(*stat_sizes) if config.per_prompt_stat_tracking else None
        kl_per_prompt = self.kl_mode is KLMode.IN_REWARD and config.kl_per_prompt_stat_tracking
        self.kl_stat_tracker = PromptStatTracker(*stat_sizes) if kl_per_prompt else None

        self.autocast = self.sd_pipeline.autocast or self.accelerator.autocast
        # The training forward must run through the prepared (DDP-wrapped) UNet, or gradients are never averaged
        # across processes; TRL keeps only the parameters of the prepared LoRA UNet, so its ranks drift apart.
        self.training_unet, self.optimizer = self.accelerator.prepare(trainable_layers, self.optimizer)
        if use_lora:
            self.trainable_layers = [p for p in self.training_unet.parameters() if p.requires_grad]
        else:
            self.trainable_layers = self.training_unet
        if config.async_reward_computation:
            self.executor = futures.ThreadPoolExecutor(max_workers=config.max_workers)

        self.first_epoch = 0
        if resume_dir is not None:
            state = self.checkpoints.load(self.accelerator, resume_dir)
            self.load_trainer_state_dict(state)
            self.first_epoch = int(state["epoch"]) + 1

    # ------------------------------------------------------------------ set-up helpers

    @property
    def reference_unet(self) -> torch.nn.Module | None:
        """The frozen copy of the base UNet (full fine-tuning with the KL on); `None` with LoRA, whose reference is
        the trained UNet with its adapters disabled."""
        return self.kl_reference.frozen_unet if self.kl_reference is not None else None

    def _prompt_function_from_dataset(self, state: PartialState) -> Callable[[], tuple[str, Any]]:
        config = self.config
        if not config.prompt_dataset:
            raise ValueError("Pass a `prompt_function`, or set `prompt_dataset` in a Carve3DConfig.")
        load = dict(column=config.prompt_column, revision=config.prompt_dataset_revision or None)
        prompts = load_prompts(
            config.prompt_dataset, config.prompt_dataset_split, limit=config.prompt_dataset_size, **load
        )
        if config.prompt_dataset_eval_split:
            self.eval_prompts = load_prompts(config.prompt_dataset, config.prompt_dataset_eval_split, **load)
        self.prompt_cycler = PromptCycler(
            prompts, config.seed, state.process_index, state.num_processes, block_size=config.sample_batch_size
        )
        return self.prompt_cycler

    # ------------------------------------------------------------------ sampling and rewards

    def _generate_samples(self, iterations: int, batch_size: int):
        """Sample `iterations` batches of `batch_size` images, plus the base model's log-probabilities.

        Each sample's noise comes from its own generator seeded by `(seed, epoch, global sample index)`, where the
        global index counts the epoch's samples over all processes (batch by batch, process by process); with the
        prompt cycler dealing prompts in the same order, a run draws the same samples on any number of processes.

        Returns:
            samples (`list[dict[str, torch.Tensor]]`): per batch, the conditioning tensors (e.g. `prompt_embeds`) and
            their `negative_*` counterparts, `timesteps` `(B, T)`, `latents`/`next_latents` `(B, T, C, h, w)`,
            `log_probs` `(B, T)`, `ref_log_probs` `(B, T)` when the KL is computed, and `prompts` (`list[str]`).
            prompt_image_pairs (`list[SampledBatch]`): `(images (B, 3, H, W), prompts, prompt_metadata)` per batch.
        """
        config = self.config
        samples, prompt_image_pairs = [], []
        self.sd_pipeline.unet.eval()
        negative = repeat_conditioning(self.negative_conditioning, batch_size)
        for batch_index in range(iterations):
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            conditioning = self.conditioner.encode(prompts)
            with self.autocast():
                output = sample_with_log_probs(
                    self.sd_pipeline,
                    self.conditioner,
                    conditioning,
                    negative,
                    num_inference_steps=config.sample_num_steps,
                    guidance_scale=config.sample_guidance_scale,
                    eta=config.sample_eta,
                    generator=self._sample_generators(batch_index, batch_size),
                )
            latents = torch.stack(output.latents, dim=1)  # (B, T + 1, C, h, w)
            sample = {
                **conditioning,
                **{f"negative_{key}": value for key, value in negative.items()},
                "timesteps": self.sd_pipeline.scheduler.timesteps.repeat(batch_size, 1),
                "latents": latents[:, :-1],
                "next_latents": latents[:, 1:],
                "log_probs": torch.stack(output.log_probs, dim=1),
            }
            if self.kl_reference is not None:
                sample["ref_log_probs"] = self.reference_log_probs(sample)
            sample["prompts"] = list(prompts)
            samples.append(sample)
            prompt_image_pairs.append(SampledBatch(output.images, prompts, prompt_metadata))
        return samples, prompt_image_pairs

    def _sample_generators(self, batch_index: int, batch_size: int) -> list[torch.Generator]:
        """One generator per sample of this process's batch `batch_index` of the current epoch."""
        first = (batch_index * self.accelerator.num_processes + self.accelerator.process_index) * batch_size
        seeds = [
            np.random.SeedSequence([self.config.seed, self._sampling_epoch, first + i]).generate_state(1, np.uint64)[0]
            for i in range(batch_size)
        ]
        return [torch.Generator(self.accelerator.device).manual_seed(int(seed)) for seed in seeds]

    def _split_conditioning(self, sample: dict[str, torch.Tensor]) -> tuple[Conditioning, Conditioning]:
        """The prompts' and the unconditional conditioning stored in `sample`."""
        keys = self.conditioner.keys
        return {k: sample[k] for k in keys}, {k: sample[f"negative_{k}"] for k in keys}

    def reference_log_probs(self, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probability `(B, T)` of each sampled transition `x_t -> x_{t-1}` under the base model, with the same
        `x_t`, timestep, conditioning and classifier-free guidance as the sampler ([`KLReference.log_probs`])."""
        conditioning, negative = self._split_conditioning(sample)
        return self.kl_reference.log_probs(
            sample["timesteps"][0],  # one schedule per batch, exactly as the sampler used it
            sample["latents"],
            sample["next_latents"],
            conditioning,
            negative,
            guidance_scale=self.config.sample_guidance_scale,
            eta=self.config.sample_eta,
            autocast=self.autocast,
        )

    def compute_rewards(self, prompt_image_pairs, is_async: bool = False):
        """Rewards per sampled batch: `(rewards, reward_metadata)` tuples, as in TRL (whose async mode crashes)."""
        if is_async:
            results = list(self.executor.map(lambda pair: self.reward_fn(*pair), prompt_image_pairs))
        else:
            results = [self.reward_fn(*pair) for pair in self._progress(prompt_image_pairs, "Reward")]
        rewards = [
            (torch.as_tensor(reward, dtype=torch.float32, device=self.accelerator.device), metadata)
            for reward, metadata in results
        ]
        return zip(*rewards)

    # ------------------------------------------------------------------ one epoch

    def step(self, epoch: int, global_step: int) -> int:
        """Sample, score, compute advantages and train for one epoch; returns the updated global step.

        Side effects: updates the model, logs statistics to the trackers, calls the image hook, and saves a checkpoint
        every `save_freq` epochs.
        """
        config = self.config
        self._sampling_epoch = epoch
        samples, prompt_image_data = self._generate_samples(
            iterations=config.sample_num_batches_per_epoch, batch_size=config.sample_batch_size
        )
        prompts = [p for s in samples for p in s.pop("prompts")]
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        rewards, rewards_metadata = self.compute_rewards(prompt_image_data, is_async=config.async_reward_computation)
        scored = [ScoredBatch(*batch, r, m) for batch, r, m in zip(prompt_image_data, rewards, rewards_metadata)]
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(scored, global_step, tracker)
        self.card_samples = collect_samples(scored, NUM_CARD_SAMPLES)

        all_rewards = self.accelerator.gather(torch.cat(rewards)).cpu().numpy()
        all_prompts = gather_object(prompts)
        kl = None
        if "ref_log_probs" in samples:
            kl = self.accelerator.gather((samples["log_probs"] - samples["ref_log_probs"]).mean(dim=1))
            kl = kl.float().cpu().numpy()
        self._log_epoch(epoch, global_step, all_rewards, kl, scored)
        self._raise_if_stop_requested()

        advantages = compute_advantages(
            all_prompts,
            all_rewards,
            self.stat_tracker,
            kl=kl if self.kl_mode is KLMode.IN_REWARD else None,
            kl_tracker=self.kl_stat_tracker,
            kl_coeff=config.kl_normalized_coeff,
        )
        samples["advantages"] = (
            torch.as_tensor(advantages, dtype=torch.float32)
            .reshape(self.accelerator.num_processes, -1)[self.accelerator.process_index]
            .to(self.accelerator.device)
        )
        if self.kl_mode is not KLMode.IN_LOSS:
            samples.pop("ref_log_probs", None)  # only the in-loss KL needs it during training

        if not (config.warmup_first_epoch and epoch == 0):
            global_step = self._train_epoch(epoch, global_step, samples)
        self.global_step = global_step
        if (epoch + 1) % config.save_freq == 0:
            self.save_checkpoint(epoch)
        return global_step

    def _train_epoch(self, epoch: int, global_step: int, samples: dict[str, torch.Tensor]) -> int:
        total_batch_size, num_timesteps = samples["timesteps"].shape
        device = self.accelerator.device
        for inner_epoch in range(self.config.train_num_inner_epochs):
            perm = torch.randperm(total_batch_size, device=device)
            samples = {k: v[perm] for k, v in samples.items()}
            # shuffle the timesteps of each sample independently
            perms = torch.stack([torch.randperm(num_timesteps, device=device) for _ in range(total_batch_size)])
            rows = torch.arange(total_batch_size, device=device)[:, None]
            for key in ("timesteps", "latents", "next_latents", "log_probs", "ref_log_probs"):
                if key in samples:
                    samples[key] = samples[key][rows, perms]
            batched = [
                dict(zip(samples, values))
                for values in zip(
                    *(v.reshape(-1, self.config.train_batch_size, *v.shape[1:]) for v in samples.values())
                )
            ]
            self.sd_pipeline.unet.train()
            global_step = self._train_batched_samples(inner_epoch, epoch, global_step, batched)
            if not self.accelerator.sync_gradients:
                raise ValueError("An optimizer step should have been taken at the end of the inner epoch.")
        return global_step

    def _log_epoch(
        self, epoch: int, global_step: int, rewards: np.ndarray, kl: np.ndarray | None, scored: list[ScoredBatch]
    ) -> None:
        """Log and record (in `history`) the epoch's reward, KL and per-sample reward metadata statistics."""
        finite = rewards[np.isfinite(rewards)]
        invalid = int(rewards.size - finite.size)
        summary = {"epoch": epoch, "reward_mean": _mean(finite), "reward_std": _std(finite), "reward_invalid": invalid}
        if invalid:
            logger.warning(
                "Epoch %d: %d of %d rewards are NaN or infinite (e.g. a failed reconstruction); those samples are "
                "left out of the advantages and statistics.",
                epoch,
                invalid,
                rewards.size,
            )
        logs: dict[str, Any] = {"reward": rewards, **summary}
        if kl is not None:
            summary.update(kl_mean=float(kl.mean()), kl_std=float(kl.std()))
            logs.update(kl=kl, kl_mean=summary["kl_mean"], kl_std=summary["kl_std"])
        for key, values in self._per_sample_metadata(scored).items():
            values = self.accelerator.gather(values.to(self.accelerator.device)).cpu().numpy()
            summary[f"{key}_mean"] = logs[f"{key}_mean"] = _mean(values[np.isfinite(values)])
        self.history.append(summary)
        self.accelerator.log(logs, step=global_step)
        if self.accelerator.is_main_process:
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))

    @staticmethod
    def _per_sample_metadata(scored: list[ScoredBatch]) -> dict[str, torch.Tensor]:
        """Every per-sample value the reward returned in its metadata, over this process's batches, by key."""
        per_batch = [per_sample_values(batch.reward_metadata, len(batch.prompts)) for batch in scored]
        keys = [key for key in per_batch[0] if all(key in values for values in per_batch)] if per_batch else []
        return {key: torch.cat([values[key] for values in per_batch]) for key in keys}

    def _progress(self, items, description: str):
        """A progress bar over `items` on the local main process (the epoch bar stays, the others clear)."""
        from tqdm.auto import tqdm

        disable = not self.accelerator.is_local_main_process
        return tqdm(items, desc=description, leave=description == "Epoch", disable=disable)

    # ------------------------------------------------------------------ loss

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds, ref_log_probs=None):
        """TRL's clipped PPO loss for one timestep of a train batch, plus, in Carve3D's in-loss KL mode,
        `kl_beta * mean(log p_theta - log p_ref)` when `ref_log_probs` `(B,)` is given.

        Args:
            latents (`torch.Tensor`): `x_t`, shape `(B, C, h, w)`.
            timesteps (`torch.Tensor`): `t`, shape `(B,)`.
            next_latents (`torch.Tensor`): the sampled `x_{t-1}`, shape `(B, C, h, w)`.
            log_probs (`torch.Tensor`): log-probabilities at sampling time, shape `(B,)`.
            advantages (`torch.Tensor`): shape `(B,)`, clipped to `train_adv_clip_max` here.
            embeds (`Conditioning` or `torch.Tensor`): the conditioning (a tensor is taken as `prompt_embeds`, as in
                TRL); `[negative; positive]`, `(2B, ...)` per key, when `train_cfg`.
            ref_log_probs (`torch.Tensor`, *optional*): the base model's log-probabilities, shape `(B,)`.

        Returns:
            loss, approx_kl, clipfrac (`torch.Tensor`, scalars).
        """
        conditioning = embeds if isinstance(embeds, dict) else {"prompt_embeds": embeds}
        negative = None
        if self.config.train_cfg:
            negative, conditioning = split_conditioning(conditioning)
        guidance = self.config.sample_guidance_scale
        with self.autocast():
            noise_pred = guided_noise(
                self.training_unet, self.conditioner, latents, timesteps, conditioning, negative, guidance
            )
            log_prob = self.sd_pipeline.scheduler_step(
                noise_pred, timesteps, latents, eta=self.config.sample_eta, prev_sample=next_latents
            ).log_probs
        advantages = torch.clamp(advantages, -self.config.train_adv_clip_max, self.config.train_adv_clip_max)
        ratio = torch.exp(log_prob - log_probs)
        loss = self.loss(advantages, self.config.train_clip_range, ratio)
        if ref_log_probs is not None:
            loss = loss + self.config.kl_beta * torch.mean(log_prob - ref_log_probs)
        approx_kl = 0.5 * torch.mean((log_prob - log_probs) ** 2)
        clipfrac = torch.mean((torch.abs(ratio - 1.0) > self.config.train_clip_range).float())
        return loss, approx_kl, clipfrac

    def _train_batched_samples(self, inner_epoch, epoch, global_step, batched_samples):
        """Train on the rebatched samples; one optimizer step per `train_gradient_accumulation_steps` batches."""
        info = defaultdict(list)
        params = self.trainable_layers
        params = params if isinstance(params, list) else list(params.parameters())
        for sample in self._progress(batched_samples, "Train"):
            conditioning, negative = self._split_conditioning(sample)
            embeds = concat_conditioning(negative, conditioning) if self.config.train_cfg else conditioning
            for j in range(self.num_train_timesteps):
                if not self._epoch_updated:
                    self._raise_if_stop_requested()
                with self.accelerator.accumulate(self.training_unet):
                    loss, approx_kl, clipfrac = self.calculate_loss(
                        sample["latents"][:, j],
                        sample["timesteps"][:, j],
                        sample["next_latents"][:, j],
                        sample["log_probs"][:, j],
                        sample["advantages"],
                        embeds,
                        ref_log_probs=sample["ref_log_probs"][:, j] if "ref_log_probs" in sample else None,
                    )
                    info["approx_kl"].append(approx_kl)
                    info["clipfrac"].append(clipfrac)
                    info["loss"].append(loss)
                    self.accelerator.backward(loss)
                    finite = True
                    if self.accelerator.sync_gradients:
                        grad_norm = self.accelerator.clip_grad_norm_(params, self.config.train_max_grad_norm)
                        finite = bool(torch.isfinite(grad_norm))
                    if finite or self.accelerator.scaler is not None:
                        # fp16's GradScaler skips a non-finite step itself and must see it to lower its scale
                        self.optimizer.step()
                        finite = finite and not self.optimizer.step_was_skipped
                    if finite:
                        self._epoch_updated = self._epoch_updated or self.accelerator.sync_gradients
                    else:  # never write NaN/inf into the weights
                        logger.warning("Epoch %d: non-finite gradient norm; optimizer step skipped.", epoch)
                        info["skipped_steps"].append(torch.ones((), device=self.accelerator.device))
                    self.optimizer.zero_grad()
                if self.accelerator.sync_gradients:
                    logs = {k: torch.mean(torch.stack(v)) for k, v in info.items()}
                    logs = self.accelerator.reduce(logs, reduction="mean")
                    logs.update({"epoch": epoch, "inner_epoch": inner_epoch})
                    self.accelerator.log(logs, step=global_step)
                    global_step += 1
                    info = defaultdict(list)
        return global_step

    # ------------------------------------------------------------------ training loop and checkpoints

    def train(self, epochs: int | None = None) -> None:
        """Train until epoch `epochs` (default `config.num_epochs`), continuing the global step of a resumed run."""
        epochs = self.config.num_epochs if epochs is None else epochs
        with stop_on_signals() as self.stop_request:
            for epoch in self._progress(range(self.first_epoch, epochs), "Epoch"):
                self._run_epoch(epoch)
        self.first_epoch = max(self.first_epoch, epochs)

    def _run_epoch(self, epoch: int) -> None:
        """One `step`, made interruptible: on SIGTERM/SIGINT, save a checkpoint the run resumes from exactly, exit.

        A stop requested before the epoch changes the weights abandons the epoch: the random generators and the
        trainer state are rolled back to the epoch's start and the checkpoint of the previous epoch is written. A
        stop requested later (multi-update DDPO) lets the epoch finish and checkpoints it.
        """
        rng_states, trainer_state = capture_rng_states(), copy.deepcopy(self.trainer_state_dict())
        self._epoch_updated = False
        try:
            self.step(epoch, self.global_step)
        except TrainingInterrupted as interrupt:
            restore_rng_states(rng_states)
            self.load_trainer_state_dict(trainer_state)
            if epoch > 0:  # before epoch 0 completes there is no progress to keep
                self.save_checkpoint(epoch - 1)
            logger.warning(
                "%s during epoch %d: the run is saved up to epoch %d; exiting.", interrupt, epoch, epoch - 1
            )
            raise exit_for(interrupt.signum) from None
        signum = self._agreed_stop_signal()
        if signum:
            if (epoch + 1) % self.config.save_freq:
                self.save_checkpoint(epoch)
            logger.warning("Stop requested: saved the run up to epoch %d; exiting.", epoch)
            raise exit_for(signum)

    def _agreed_stop_signal(self) -> int:
        """The signal any process received (0: none), the same on every process so that all stop together."""
        signum = torch.tensor([self.stop_request.signum or 0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            signum = self.accelerator.gather(signum).max()
        return int(signum.max())

    def _raise_if_stop_requested(self) -> None:
        signum = self._agreed_stop_signal()
        if signum:
            raise TrainingInterrupted(signum)

    def trainer_state_dict(self) -> dict[str, Any]:
        """Everything besides the model, optimizer and RNG states that an exact resume needs (JSON-serialisable)."""
        return {
            "global_step": self.global_step,
            "history": self.history,
            "reward_stats": self.stat_tracker.state_dict() if self.stat_tracker else None,
            "kl_stats": self.kl_stat_tracker.state_dict() if self.kl_stat_tracker else None,
            "prompt_cycler": self.prompt_cycler.state_dict() if self.prompt_cycler else None,
        }

    def load_trainer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `trainer_state_dict` saved."""
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        for tracker, key in ((self.stat_tracker, "reward_stats"), (self.kl_stat_tracker, "kl_stats")):
            if tracker is not None and state.get(key):
                tracker.load_state_dict(state[key])
        if self.prompt_cycler is not None and state.get("prompt_cycler"):
            self.prompt_cycler.load_state_dict(state["prompt_cycler"])

    def save_checkpoint(self, epoch: int) -> Path:
        """Save a resumable checkpoint of the run after `epoch` (`<logdir>/checkpoints/checkpoint_<epoch>`, written
        atomically, the newest `num_checkpoint_limit` kept; [`RunCheckpoints.save`]). Every process must call it."""
        return self.checkpoints.save(self.accelerator, epoch, self.trainer_state_dict())

    def _save_model_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:  # accelerate calls the hook on every process
            self.sd_pipeline.save_checkpoint(models, weights, output_dir)
        weights.pop()  # accelerate must not save the model itself

    def _load_model_hook(self, models, input_dir):
        if getattr(self.sd_pipeline, "use_lora", False):
            load_lora_into_unet_adapter(self.sd_pipeline.unet, input_dir)
            models.pop()  # accelerate must not load the model itself
        else:
            super()._load_model_hook(models, input_dir)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _std(values: np.ndarray) -> float:
    return float(values.std()) if values.size else float("nan")
