"""The view-batched family (MVDream's architecture): the V views of an object are denoised jointly, each with its
camera, by a Stable Diffusion UNet with two additions, both diffusers' own parts:

1. a camera embedding added to the time embedding: `UNet2DConditionModel(class_embed_type="projection",
   projection_class_embeddings_input_dim=16)` builds `Linear(16, D) -> SiLU -> Linear(D, D)` (MVDream's
   `camera_embed`), fed the flattened camera-to-world matrix of each view as `class_labels` `(B * V, 16)`;
2. self-attention across the views of one object: [`MultiViewAttnProcessor`] on every transformer block's `attn1`,
   which attends over `(B, V * L, C)` instead of `(B * V, L, C)`; cross-attention to the text stays per view.

The UNet sees `(B * V, C, h, w)` with an object's views contiguous, one timestep per object, the text repeated per
view. LoRA is plain peft on the stock UNet, so adapters save and load in the diffusers format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils import BaseOutput

from ..image_logging import tile_views_grid
from ..rewards.cameras import CameraLayout, ViewBatchedCameras, multiview_cameras
from .conditioning import Conditioning, repeat_conditioning
from .lora import DEFAULT_LORA_TARGETS
from .sampling import Generators, sample_prompts
from .wrapped import WrappedDDPOPipeline

CAMERA_INPUTS = 16  # a flattened 4x4 camera-to-world matrix
TRAINED_ELEVATIONS = (0.0, 30.0)  # MVDream was trained with elevations in this range (degrees)
logger = logging.getLogger(__name__)


class MultiViewAttnProcessor:
    """Self-attention over all the views of an object: hidden states `(B * V, L, C)` attend as `(B, V * L, C)`.

    Args:
        num_views (`int`): V, the views of one object (contiguous in the batch).
    """

    def __init__(self, num_views: int):
        self.num_views = num_views
        self.attention = AttnProcessor2_0()

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs
    ) -> torch.Tensor:
        batch_views, length, channels = hidden_states.shape
        if batch_views % self.num_views:
            raise ValueError(
                f"Cross-view attention got {batch_views} views, not a multiple of the model's {self.num_views}; "
                "view-batched latents are (B * num_views, ...) with each object's views contiguous."
            )
        joint = hidden_states.reshape(batch_views // self.num_views, self.num_views * length, channels)
        out = self.attention(attn, joint, encoder_hidden_states, attention_mask, **kwargs)
        return out.reshape(batch_views, length, channels)


def install_multiview_attention(unet: torch.nn.Module, num_views: int) -> None:
    """Make every self-attention (`attn1`) of `unet` attend across the `num_views` views of an object; the other
    attention layers get diffusers' default processor."""
    processors = {
        name: MultiViewAttnProcessor(num_views) if name.endswith("attn1.processor") else AttnProcessor2_0()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)


def check_view_batched_unet(unet: torch.nn.Module) -> None:
    """Refuse a UNet without MVDream's camera embedding, naming what to change."""
    config = unet.config
    if config.class_embed_type != "projection" or config.projection_class_embeddings_input_dim != CAMERA_INPUTS:
        raise ValueError(
            "A view-batched UNet needs a camera embedding: UNet2DConditionModel(class_embed_type='projection', "
            f"projection_class_embeddings_input_dim={CAMERA_INPUTS}); this one has class_embed_type="
            f"{config.class_embed_type!r}, projection_class_embeddings_input_dim="
            f"{config.projection_class_embeddings_input_dim}. Grid models use the 'sd' or 'sdxl' family."
        )


def cameras_of_config(config: dict[str, Any]) -> ViewBatchedCameras:
    """The cameras a [`MultiViewDiffusionPipeline`] config (or its `model_index.json`) describes
    ([`~carve3d_trl.rewards.multiview_cameras`]); missing settings take the pipeline's defaults."""
    return multiview_cameras(
        int(config.get("num_views", 4)),
        elevation=float(config.get("elevation", 15.0)),
        azimuth_start=float(config.get("azimuth_start", 0.0)),
        fov=float(config.get("camera_fov", 50.0)),
        radius=float(config.get("camera_radius", 2.5)),
    )


def check_reward_cameras(reward_fn: Any, ddpo_pipeline: Any) -> None:
    """Refuse a reward whose camera layout (`reward_fn.layout`, as `MRCReward`'s) is not a view-batched model's own
    cameras: MRC would reconstruct the views from the wrong viewpoints. Other rewards and grid models pass."""
    layout = getattr(reward_fn, "layout", None)
    if not isinstance(layout, CameraLayout) or not hasattr(ddpo_pipeline, "camera_layout"):
        return
    expected = ddpo_pipeline.camera_layout()
    same = layout.num_views == expected.num_views and torch.allclose(layout.cam2world, expected.cam2world, atol=1e-4)
    if not same:
        raise ValueError(
            f"The reward's camera layout ({layout.num_views} views, {layout.rows}x{layout.cols}) is not this "
            f"view-batched model's cameras ({expected.num_views} views at elevation "
            f"{ddpo_pipeline.sd_pipeline.config.elevation}); build the reward with the model's: "
            "MRCReward(pipeline.camera_layout(), ...)."
        )


class ViewBatchedConditioner:
    """The conditioning of a view-batched model: `{"prompt_embeds": (B, L, D), "camera": (B, V, 16)}`.

    The text is encoded once per object and repeated per view when the UNet runs; the cameras are the model's
    camera inputs (the same for every object and for the unconditional branch).

    Args:
        pipeline ([`MultiViewDiffusionPipeline`]): Supplies the tokenizer, the frozen text encoder and the cameras.
    """

    keys = ("prompt_embeds", "camera")

    def __init__(self, pipeline: MultiViewDiffusionPipeline):
        self.pipeline = pipeline

    @property
    def num_views(self) -> int:
        return int(self.pipeline.config.num_views)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        tokenizer, text_encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        ids = tokenizer(
            list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
        ).input_ids.to(text_encoder.device)
        embeds = text_encoder(ids)[0]
        camera = self.pipeline.camera_inputs().to(embeds.device, embeds.dtype)
        return {"prompt_embeds": embeds, "camera": camera.expand(len(prompts), -1, -1).contiguous()}

    def encode_negative(self, negative_prompt: str, batch_size: int) -> Conditioning:
        return repeat_conditioning(self.encode([negative_prompt]), batch_size)

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        """`encoder_hidden_states` `(B * V, L, D)` and `class_labels` (the cameras) `(B * V, 16)`."""
        views = conditioning["camera"].shape[1]
        return {
            "encoder_hidden_states": conditioning["prompt_embeds"].repeat_interleave(views, dim=0),
            "class_labels": conditioning["camera"].flatten(0, 1),
        }

    def latent_shape(self, unet: torch.nn.Module, batch_size: int) -> tuple[int, ...]:
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.num_views, unet.config.in_channels, height, width)

    def predict_noise(
        self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """Noise `(B, V, C, h, w)` for latents `(B, V, C, h, w)`; `timesteps` scalar or `(B,)`, one per object."""
        views = latents.shape[1]
        if timesteps.ndim:
            timesteps = timesteps.repeat_interleave(views)
        noise = unet(latents.flatten(0, 1), timesteps, **self.unet_kwargs(conditioning)).sample
        return noise.unflatten(0, latents.shape[:2])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.pipeline.text_encoder.to(device, dtype=dtype)


@dataclass
class MultiViewPipelineOutput(BaseOutput):
    """`images`: the views `(B, V, 3, H, W)` in [0, 1]; `grid`: each sample's views tiled for display
    `(B, 3, rows * H, cols * W)`."""

    images: torch.Tensor
    grid: torch.Tensor


class MultiViewDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A text-to-multi-view pipeline of MVDream's architecture (module docstring), in diffusers form.

    `from_pretrained` / `save_pretrained` as any diffusers pipeline; `load_lora_weights(folder)` loads a Carve3D LoRA.
    The camera settings are part of its config; building it installs the cross-view attention.

    Args:
        vae (`AutoencoderKL`), text_encoder (`CLIPTextModel`), tokenizer (`CLIPTokenizer`), unet
            (`UNet2DConditionModel` with the camera embedding), scheduler (`DDIMScheduler`): the components.
        num_views (`int`, *optional*, defaults to 4): Views per object.
        elevation (`float`, *optional*, defaults to 15.0): Camera elevation of every view, degrees.
        azimuth_start (`float`, *optional*, defaults to 0.0): Azimuth of the first view, degrees (views evenly
            spaced over 360).
        camera_fov (`float`, *optional*, defaults to 50.0): Field of view of the renders MRC compares against,
            degrees (the model itself takes no intrinsics).
        camera_radius (`float`, *optional*, defaults to 2.5): Camera distance of those renders.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        num_views: int = 4,
        elevation: float = 15.0,
        azimuth_start: float = 0.0,
        camera_fov: float = 50.0,
        camera_radius: float = 2.5,
    ):
        super().__init__()
        check_view_batched_unet(unet)
        low, high = TRAINED_ELEVATIONS
        if not low <= elevation <= high:
            logger.warning(
                "Camera elevation %.1f degrees is outside the %.0f-%.0f degrees MVDream-style models are trained on; "
                "expect views the model was not trained to draw.",
                elevation,
                low,
                high,
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(
            num_views=num_views,
            elevation=elevation,
            azimuth_start=azimuth_start,
            camera_fov=camera_fov,
            camera_radius=camera_radius,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        install_multiview_attention(unet, num_views)
        self.conditioner = ViewBatchedConditioner(self)

    def cameras(self) -> ViewBatchedCameras:
        """The model's cameras ([`cameras_of_config`])."""
        return cameras_of_config(self.config)

    def camera_inputs(self) -> torch.Tensor:
        """The model's camera inputs `(V, 16)`: MVDream's flattened camera-to-world matrices."""
        return self.cameras().model_inputs

    def camera_layout(self) -> CameraLayout:
        """The same cameras as a [`CameraLayout`] in the project's frame, for `MRCReward(layout)`."""
        return self.cameras().layout

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        *,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
    ) -> MultiViewPipelineOutput:
        """Generate `num_images_per_prompt` objects per prompt, each as `num_views` views, with DDIM through the
        library's one loop (eta 0: deterministic DDIM; DDPO samples with eta 1).

        Returns:
            [`MultiViewPipelineOutput`]: `images` `(B, V, 3, H, W)` in [0, 1] and their tiled `grid`.
        """
        output = sample_prompts(
            self,
            self.conditioner,
            prompt,
            negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            latents=latents,
        )
        return MultiViewPipelineOutput(images=output.images, grid=tile_views_grid(output.images))


class Carve3DViewBatchedPipeline(WrappedDDPOPipeline):
    """TRL's DDPO pipeline interface for a view-batched model ([`MultiViewDiffusionPipeline`]).

    A sample is its V views: latents `(B, V, C, h, w)`, images `(B, V, 3, H, W)`; a step's log-probability is one
    number per object (the mean over all its views), so DDPO treats an object as one action. The trainer, the KL
    reference and the checkpoints go through the same code as the other families ([`ViewBatchedConditioner`]).

    Args:
        pretrained_model_name (`str`): Hub model id or local folder of a [`MultiViewDiffusionPipeline`].
        pretrained_model_revision (`str`, *optional*, defaults to `"main"`): Revision of a Hub model.
        use_lora (`bool`, *optional*, defaults to `True`): Train LoRA adapters (else the whole UNet).
        lora_rank (`int`, *optional*, defaults to 4): LoRA rank (the Carve3D recipe uses 4).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `lora_rank` (scale 1).
        lora_target_modules (`tuple[str, ...]`, *optional*, defaults to `("to_k", "to_q", "to_v", "to_out.0")`): UNet
            modules receiving adapters.
    """

    def __init__(
        self,
        pretrained_model_name: str,
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: int | None = None,
        lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    ):
        lora_options = (lora_rank, lora_alpha, lora_target_modules)
        self._load(
            MultiViewDiffusionPipeline, pretrained_model_name, pretrained_model_revision, use_lora, lora_options
        )
        self.conditioner = self.sd_pipeline.conditioner

    @property
    def num_views(self) -> int:
        return self.conditioner.num_views

    def camera_layout(self) -> CameraLayout:
        """The model's cameras as the [`CameraLayout`] its MRC reward must use."""
        return self.sd_pipeline.camera_layout()
