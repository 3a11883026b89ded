"""MVDream's original weights in the view-batched family's diffusers form (issue 14).

Exactness against MVDream's own `MultiViewUNetModel` needs a clone of bytedance/MVDream (commit 618f844) named by
`MVDREAM_PATH` (and `einops`, `omegaconf`). The key mapping (against diffusers' own LDM converter), the refusals and
the pipeline folder are tested without it, on MVDream-format state dicts written from our tiny UNets by
`to_mvdream_state_dict` (whose keys are MVDream's, checked when the clone is there).
"""

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from carve3d_trl import load_ddpo_pipeline
from carve3d_trl.pipelines import (
    Carve3DViewBatchedPipeline,
    MultiViewAttnProcessor,
    MultiViewDiffusionPipeline,
    ViewBatchedConditioner,
    install_multiview_attention,
)
from carve3d_trl.pipelines.mvdream_conversion import (
    LDM_UNET_PREFIX,
    MVDREAM_UNET_PARAMS,
    build_mvdream_pipeline,
    convert_mvdream_unet_state_dict,
    diffusers_unet_config,
    load_mvdream_checkpoint,
    mvdream_unet,
    read_mvdream_port,
    to_mvdream_state_dict,
)
from carve3d_trl.rewards import multiview_cameras
from carve3d_trl.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_mvdream.py"
NUM_VIEWS = 4
BASE = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    use_spatial_transformer=True,
    legacy=False,
    camera_dim=16,
    use_checkpoint=False,
)
# Tiny MVDream UNets: SD 2.1's kind (heads of fixed width, linear projections, no attention at the coarsest level)
# and SD 1.5's (a fixed number of heads, 1x1-convolution projections).
TINY = {
    "sd21-like": dict(
        BASE,
        channel_mult=[1, 2, 2],
        attention_resolutions=[1, 2],
        num_res_blocks=2,
        num_head_channels=16,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=24,
    ),
    "sd15-like": dict(
        BASE,
        channel_mult=[1, 2],
        attention_resolutions=[1, 2],
        num_res_blocks=1,
        num_heads=2,
        transformer_depth=1,  # MVDream's transformers take deeper stacks only with a context per layer
        context_dim=32,
    ),
}


def tiny_unet(params, seed=0):
    """Our UNet of an MVDream config, random (every weight, also those diffusers initialises to zero)."""
    config = diffusers_unet_config(params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    return unet.eval()


def tiny_checkpoint(params, seed=0):
    """An MVDream-format full checkpoint: the UNet under `model.diffusion_model.`, plus other models' entries."""
    unet = tiny_unet(params, seed)
    checkpoint = to_mvdream_state_dict(unet.state_dict(), params["num_res_blocks"], prefix=LDM_UNET_PREFIX)
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    checkpoint["cond_stage_model.model.positional_embedding"] = torch.zeros(3)
    checkpoint["betas"] = torch.linspace(0.1, 0.2, 5)
    return unet, checkpoint


# --- without the clone ----------------------------------------------------------------------------------------------


def test_released_configs_are_stable_diffusion_unets_with_the_camera_mlp():
    sd21 = diffusers_unet_config("sd-v2.1-base-4view")
    assert sd21["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd21["attention_head_dim"] == [5, 10, 20, 20]  # SD 2.1-base's diffusers config: heads of 64 channels
    assert sd21["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd21["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (sd21["cross_attention_dim"], sd21["use_linear_projection"], sd21["sample_size"]) == (1024, True, 32)
    sd15 = diffusers_unet_config("sd-v1.5-4view")
    assert (sd15["attention_head_dim"], sd15["cross_attention_dim"], sd15["use_linear_projection"]) == (
        [8] * 4,
        768,
        False,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd21)
    camera_mlp = 16 * 1280 + 1280 + 1280 * 1280 + 1280
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724 + camera_mlp  # SD 2.1's UNet + camera_embed


def diffusers_converter(checkpoint, layers_per_block):
    """diffusers' own LDM-to-diffusers UNet mapping (SD's names), plus the camera MLP: an independent oracle."""
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), {"layers_per_block": layers_per_block})
    for ours, theirs in (
        ("class_embedding.linear_1", "camera_embed.0"),
        ("class_embedding.linear_2", "camera_embed.2"),
    ):
        for param in ("weight", "bias"):
            converted[f"{ours}.{param}"] = checkpoint[f"{LDM_UNET_PREFIX}{theirs}.{param}"]
    return converted


@pytest.mark.parametrize("name", sorted(TINY))
def test_mapping_round_trips_and_equals_diffusers_converter(name):
    params = TINY[name]
    unet, checkpoint = tiny_checkpoint(params)
    converted = convert_mvdream_unet_state_dict(checkpoint, diffusers_unet_config(params))
    expected = unet.state_dict()
    assert list(converted) == list(expected)
    assert all(converted[k] is v for k, v in diffusers_converter(checkpoint, params["num_res_blocks"]).items())
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    # an unprefixed UNet state dict converts the same
    unprefixed = {k[len(LDM_UNET_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    assert list(convert_mvdream_unet_state_dict(unprefixed, diffusers_unet_config(params))) == list(expected)


@pytest.mark.parametrize("name", sorted(MVDREAM_UNET_PARAMS))
def test_released_configs_map_as_diffusers_converter(name):
    """The full-size UNets (meta tensors: keys and shapes only) map as diffusers' converter maps them."""
    config = diffusers_unet_config(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    checkpoint = to_mvdream_state_dict(unet.state_dict(), config["layers_per_block"], prefix=LDM_UNET_PREFIX)
    converted = convert_mvdream_unet_state_dict(checkpoint, config)
    oracle = diffusers_converter(checkpoint, config["layers_per_block"])
    assert converted.keys() == oracle.keys() and all(converted[k] is v for k, v in oracle.items())


def test_mismatched_weights_are_refused_with_the_key():
    params = TINY["sd21-like"]
    config = diffusers_unet_config(params)
    _, checkpoint = tiny_checkpoint(params)

    wrong_shape = dict(checkpoint)
    key = LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    wrong_shape[key] = torch.zeros(32, 7)
    message = (
        "Shape mismatch: 'input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight' has shape (32, 7), "
        "our 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' needs (32, 24)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_mvdream_unet_state_dict(wrong_shape, config)

    missing = dict(checkpoint)
    del missing[LDM_UNET_PREFIX + "camera_embed.2.bias"]
    with pytest.raises(
        ValueError,
        match=r"Missing key 'camera_embed\.2\.bias' \(our 'class_embedding\.linear_2\.bias'\).*attention_resolutions",
    ):
        convert_mvdream_unet_state_dict(missing, config)

    missing_block = {k: v for k, v in checkpoint.items() if ".output_blocks.2." not in k}
    message = "Missing key 'output_blocks.2.0.in_layers.0.weight' (our 'up_blocks.0.resnets.2.norm1.weight')"
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_mvdream_unet_state_dict(missing_block, config)

    unexpected = dict(checkpoint)
    unexpected[LDM_UNET_PREFIX + "label_emb.0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"Unexpected key 'label_emb\.0\.weight'"):
        convert_mvdream_unet_state_dict(unexpected, config)

    extra_level = dict(checkpoint)  # a fourth input block of the first level: weights of a deeper UNet
    extra_level[LDM_UNET_PREFIX + "input_blocks.9.0.in_layers.0.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"Unexpected key 'input_blocks\.9\.0\.in_layers\.0\.weight'"):
        convert_mvdream_unet_state_dict(extra_level, config)

    # the SD 1.5-like weights are not those of the SD 2.1-like config
    _, other = tiny_checkpoint(TINY["sd15-like"])
    with pytest.raises(ValueError, match="MVDream config"):
        convert_mvdream_unet_state_dict(other, config)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(use_scale_shift_norm=True), "use_scale_shift_norm=True"),
        (dict(resblock_updown=True), "resblock_updown=True"),
        (dict(camera_dim=12), "camera_dim=12"),
        (dict(num_res_blocks=[1, 2, 1]), "num_res_blocks must be one integer"),
        (dict(model_channels=48), "not a multiple of 32 groups"),
        (dict(num_head_channels=64), "Width 32 of level 0 does not split evenly into attention heads"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        diffusers_unet_config({**TINY["sd21-like"], **change})
    with pytest.raises(ValueError, match="Unknown MVDream model 'sd-v3'"):
        diffusers_unet_config("sd-v3")


def test_checkpoint_to_pipeline_folder(tmp_path, tiny_model_path, capsys):
    """The script writes a loadable `MultiViewDiffusionPipeline` of the checkpoint's UNet and the base model's other
    parts (the tiny SD pipeline stands in for SD 2.1-base), and refuses a mismatch without leaving a folder."""
    params = dict(TINY["sd15-like"], image_size=16)  # context 32: the tiny text encoder's width
    unet, checkpoint = tiny_checkpoint(params)
    torch.save(checkpoint, tmp_path / "tiny-4view.pt")
    assert load_mvdream_checkpoint(tmp_path / "tiny-4view.pt").keys() == checkpoint.keys()
    (tmp_path / "tiny.json").write_text(json.dumps(params))
    script = load_script(SCRIPT)

    def convert(checkpoint, unet_config, output_dir, *extra):
        paths = ("--checkpoint", checkpoint, "--sd21_base", tiny_model_path, "--output_dir", output_dir)
        return script.main([*map(str, paths), "--unet_config", str(tmp_path / unet_config), *extra])

    output = tmp_path / "mvdream-tiny"
    assert convert(tmp_path / "tiny-4view.pt", "tiny.json", output, "--elevation", "20") == 0
    mismatched = dict(TINY["sd21-like"], image_size=16)  # context 24: not the text encoder's width
    torch.save(tiny_checkpoint(mismatched)[1], tmp_path / "other.pt")
    (tmp_path / "other.json").write_text(json.dumps(mismatched))
    assert convert(tmp_path / "other.pt", "other.json", output) == 1  # the existing folder stays as it was
    assert "has width 32, MVDream's UNet reads 24" in capsys.readouterr().err
    assert convert(tmp_path / "other.pt", "tiny.json", tmp_path / "refused") == 1
    assert "MVDream config" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    pipeline = MultiViewDiffusionPipeline.from_pretrained(output)
    assert (pipeline.config.num_views, pipeline.config.elevation) == (4, 20.0)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    state = pipeline.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert isinstance(
        pipeline.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"],
        MultiViewAttnProcessor,
    )
    views = pipeline("a chair", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert views.shape == (1, 4, 3, 32, 32) and torch.isfinite(views).all()
    assert isinstance(load_ddpo_pipeline(str(output)), Carve3DViewBatchedPipeline)


def base_with_scheduler(tmp_path, tiny_model_path, **changes):
    """A copy of the tiny base model whose scheduler is a PNDM config with other sampler settings (and `changes`)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0)
    config.update(timestep_spacing="trailing", **changes)
    path.write_text(json.dumps(config))
    return base


def test_base_model_with_another_training_schedule_is_refused(tmp_path, tiny_model_path):
    params = dict(TINY["sd15-like"], image_size=16)
    base = base_with_scheduler(tmp_path, tiny_model_path, beta_end=0.02)
    with pytest.raises(ValueError, match=r"has beta_end=0\.02, MVDream was trained with beta_end=0\.012"):
        build_mvdream_pipeline(tiny_checkpoint(params)[1], base, model=params)


# What ashawkey's port drops from MVDream's `unet_config.params` when it writes `unet/config.json`.
PORT_DROPPED = ("legacy", "use_linear_in_transformer", "use_spatial_transformer")


def write_port_folder(folder, tiny_model_path, unet_state_dict, params, **extra_config):
    """A folder laid out as ashawkey's port writes it: `unet/` with MVDream's keys and its config, plus the base
    model's other parts (here the tiny SD's)."""
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(Path(tiny_model_path) / part, folder / part)
    (folder / "unet").mkdir()
    config = {k: v for k, v in params.items() if k not in PORT_DROPPED}
    config = {"_class_name": "MultiViewUNetModel", "_diffusers_version": "0.25.0", **config, **extra_config}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in unet_state_dict.items()}, folder / "unet" / PORT_WEIGHT_NAME)
    return folder


PORT_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
PORT_PARAMS = dict(TINY["sd21-like"], image_size=16, context_dim=32)  # the port is SD 2.1's kind: linear projections


def test_port_folder_converts(tmp_path, tiny_model_path, capsys):
    unet = tiny_unet(PORT_PARAMS)
    port = write_port_folder(
        tmp_path / "port", tiny_model_path, to_mvdream_state_dict(unet.state_dict(), 2), PORT_PARAMS, ip_dim=0
    )
    state_dict, params = read_mvdream_port(port)
    assert params.keys() == PORT_PARAMS.keys() - {"legacy"}  # ip_dim and the port's metadata are not MVDream's
    assert diffusers_unet_config(params) == diffusers_unet_config(PORT_PARAMS)
    assert all(torch.equal(state_dict[k], v) for k, v in to_mvdream_state_dict(unet.state_dict(), 2).items())
    module = load_script(SCRIPT)
    assert module.main(["--checkpoint", str(port), "--output_dir", str(tmp_path / "out")]) == 0
    converted = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "out").unet.state_dict()
    assert all(torch.equal(converted[k], v) for k, v in unet.state_dict().items())

    imagedream = write_port_folder(tmp_path / "imagedream", tiny_model_path, {}, PORT_PARAMS, ip_dim=16)
    assert module.main(["--checkpoint", str(imagedream), "--output_dir", str(tmp_path / "no")]) == 1
    assert "ImageDream model (ip_dim=16)" in capsys.readouterr().err
    assert module.main(["--checkpoint", str(tmp_path / "tiny.pt"), "--output_dir", str(tmp_path / "no")]) == 1
    assert "base_model is needed" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_unsafe_pickles_are_refused(tmp_path):
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_mvdream_checkpoint(tmp_path / "pickled.pt")


# --- against MVDream's own code --------------------------------------------------------------------------------------


@pytest.fixture
def openaimodel(monkeypatch):
    """MVDream's `openaimodel` module from the clone at `MVDREAM_PATH` (on `sys.path` for this test only), with plain
    attention (xformers off) so it runs on CPU."""
    path = os.environ.get("MVDREAM_PATH")
    if not path:
        pytest.skip("set MVDREAM_PATH to a clone of bytedance/MVDream")
    for dependency in ("einops", "omegaconf"):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(f"MVDream's code needs {dependency} (pip install einops omegaconf)")
    monkeypatch.syspath_prepend(path)
    if importlib.util.find_spec("mvdream") is None:
        pytest.skip(f"MVDREAM_PATH={path} has no mvdream package; set MVDREAM_PATH to a clone of bytedance/MVDream")
    before = set(sys.modules)
    try:
        module = importlib.import_module("mvdream.ldm.modules.diffusionmodules.openaimodel")
        attention = importlib.import_module("mvdream.ldm.modules.attention")
    except ImportError as error:
        pytest.skip(f"MVDream's code does not import here: {error}")
    monkeypatch.setattr(attention, "XFORMERS_IS_AVAILBLE", False)
    yield module
    for name in set(sys.modules) - before:
        if name == "mvdream" or name.startswith("mvdream."):
            del sys.modules[name]


@pytest.mark.parametrize("name", sorted(TINY))
def test_converted_unet_equals_mvdream(openaimodel, name):
    """MVDream's `MultiViewUNetModel` (random tiny weights) and our converted UNet with cross-view attention agree in
    fp32 on 2 objects x 4 views: one timestep per object, the text repeated per view, MVDream's cameras."""
    params = TINY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = openaimodel.MultiViewUNetModel(**params).eval()
        with torch.no_grad():
            for parameter in reference.parameters():  # also the zero-initialised output layers
                parameter.copy_(torch.randn_like(parameter) * 0.2)
        batch, height = 2, params["image_size"]
        latents = torch.randn(batch * NUM_VIEWS, 4, height, height)
        text = torch.randn(batch, 7, params["context_dim"])
    timesteps = torch.tensor([17, 803])
    cameras = multiview_cameras(NUM_VIEWS).model_inputs  # (V, 16)
    unet = mvdream_unet(reference.state_dict(), params).eval()
    exported = to_mvdream_state_dict(unet.state_dict(), params["num_res_blocks"])
    assert exported.keys() == reference.state_dict().keys()  # MVDream's keys: the no-clone tests' checkpoints too
    assert all(torch.equal(exported[k], v) for k, v in reference.state_dict().items())
    install_multiview_attention(unet, NUM_VIEWS)
    with torch.no_grad():
        expected = reference(
            latents,
            timesteps.repeat_interleave(NUM_VIEWS),
            context=text.repeat_interleave(NUM_VIEWS, dim=0),
            camera=cameras.repeat(batch, 1),
            num_frames=NUM_VIEWS,
        )
        ours = unet(
            latents,
            timesteps.repeat_interleave(NUM_VIEWS),
            encoder_hidden_states=text.repeat_interleave(NUM_VIEWS, dim=0),
            class_labels=cameras.repeat(batch, 1),
        ).sample
        # the training path: ViewBatchedConditioner.predict_noise on (B, V, C, h, w) with one timestep per object
        conditioning = {"prompt_embeds": text, "camera": cameras.expand(batch, -1, -1)}
        predicted = ViewBatchedConditioner(None).predict_noise(
            unet, latents.unflatten(0, (batch, NUM_VIEWS)), timesteps, conditioning
        )
        install_multiview_attention(unet, 1)  # per-view self-attention: must differ (the check is sensitive)
        per_view = unet(
            latents,
            timesteps.repeat_interleave(NUM_VIEWS),
            encoder_hidden_states=text.repeat_interleave(NUM_VIEWS, dim=0),
            class_labels=cameras.repeat(batch, 1),
        ).sample
    difference = (ours - expected).abs().max().item()
    print(f"{name}: max abs difference {difference:.3g} (outputs up to {expected.abs().max().item():.3g})")
    assert difference <= 1e-4
    assert (predicted.flatten(0, 1) - expected).abs().max().item() <= 1e-4
    assert (per_view - expected).abs().max().item() > 1e-2


def test_released_configs_convert_mvdream_full_size_models(openaimodel):
    """MVDream's two released UNets (built on the meta device: keys and shapes, no weights) convert under the
    presets, which equal the `unet_config` of MVDream's own YAML configs."""
    configs = Path(openaimodel.__file__).parents[3] / "configs"
    for name, config_file in (("sd-v2.1-base-4view", "sd-v2-base.yaml"), ("sd-v1.5-4view", "sd-v1.yaml")):
        params = yaml.safe_load((configs / config_file).read_text())["model"]["params"]["unet_config"]["params"]
        assert params == MVDREAM_UNET_PARAMS[name]
        with torch.device("meta"):
            reference = openaimodel.MultiViewUNetModel(**params)
        checkpoint = {LDM_UNET_PREFIX + k: v for k, v in reference.state_dict().items()}
        converted = convert_mvdream_unet_state_dict(checkpoint, diffusers_unet_config(name))
        assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in reference.state_dict().values())


def test_scheduler_is_mvdreams_ddim(openaimodel, tmp_path, tiny_model_path):
    """The converted pipeline's DDIM takes MVDream's steps and alphas (its `make_ddim_timesteps` "uniform" and
    `make_ddim_sampling_parameters`, over its "linear" betas of 0.00085-0.012), whatever sampler settings the base
    model's scheduler has (here a PNDM config with other ones)."""
    util = importlib.import_module("mvdream.ldm.modules.diffusionmodules.util")
    params = dict(TINY["sd15-like"], image_size=16)
    base = base_with_scheduler(tmp_path, tiny_model_path)
    scheduler = build_mvdream_pipeline(tiny_checkpoint(params)[1], base, model=params).scheduler
    alphas_cumprod = torch.cumprod(1 - torch.from_numpy(util.make_beta_schedule("linear", 1000, 0.00085, 0.012)), 0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alphas_cumprod, rtol=1e-6, atol=1e-7)
    for steps in (50, 20):
        scheduler.set_timesteps(steps)
        ddim_steps = util.make_ddim_timesteps("uniform", steps, 1000, verbose=False)
        assert scheduler.timesteps.tolist() == ddim_steps[::-1].tolist()
        _, alphas, alphas_prev = util.make_ddim_sampling_parameters(alphas_cumprod.numpy(), ddim_steps, 0.0, False)
        assert torch.allclose(scheduler.alphas_cumprod[ddim_steps].double(), torch.from_numpy(alphas), rtol=1e-6)
        ours_prev = [
            scheduler.alphas_cumprod[t - 1000 // steps] if t >= 1000 // steps else scheduler.final_alpha_cumprod
            for t in ddim_steps
        ]
        assert torch.allclose(torch.stack(ours_prev).double(), torch.from_numpy(alphas_prev), rtol=1e-6)


@pytest.fixture
def port_unet_module(monkeypatch):
    """`mv_unet` of ashawkey's port from the clone at `MVDREAM_DIFFUSERS_PATH` (on `sys.path` for this test only),
    with stand-ins for the modules it imports but the UNet does not need on CPU: xformers' attention is PyTorch's
    `scaled_dot_product_attention` (the same softmax attention), `kiui` (cameras) is empty."""
    path = os.environ.get("MVDREAM_DIFFUSERS_PATH")
    if not path:
        pytest.skip("set MVDREAM_DIFFUSERS_PATH to a clone of ashawkey/mvdream_diffusers")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("the port's code needs einops")
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v, attn_bias=None, op=None: F.scaled_dot_product_attention(q, k, v)
    xformers.ops = ops
    kiui, cam = types.ModuleType("kiui"), types.ModuleType("kiui.cam")
    cam.orbit_camera = None
    kiui.cam = cam
    for name, module in (("xformers", xformers), ("xformers.ops", ops), ("kiui", kiui), ("kiui.cam", cam)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(path)
    monkeypatch.delitem(sys.modules, "mv_unet", raising=False)
    if importlib.util.find_spec("mv_unet") is None:
        pytest.skip(f"MVDREAM_DIFFUSERS_PATH={path} has no mv_unet.py")
    module = importlib.import_module("mv_unet")
    yield module
    sys.modules.pop("mv_unet", None)


def test_port_unet_converts_exactly(port_unet_module, tmp_path, tiny_model_path):
    """ashawkey's `MultiViewUNetModel` (random tiny weights), saved as the port saves it, converts to our UNet, which
    gives its outputs in fp32 (2 objects x 4 views)."""
    config = {k: v for k, v in PORT_PARAMS.items() if k not in PORT_DROPPED}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = port_unet_module.MultiViewUNetModel(**config).eval()
        reference.register_to_config(**config)  # as the port's converter does
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.2)
        batch, height = 2, config["image_size"]
        latents = torch.randn(batch * NUM_VIEWS, 4, height, height)
        text = torch.randn(batch, 7, config["context_dim"]).repeat_interleave(NUM_VIEWS, dim=0)
    reference.save_pretrained(tmp_path / "port" / "unet", safe_serialization=True)
    state_dict, params = read_mvdream_port(tmp_path / "port")
    unet = mvdream_unet(state_dict, params).eval()
    install_multiview_attention(unet, NUM_VIEWS)
    timesteps = torch.tensor([17, 803]).repeat_interleave(NUM_VIEWS)
    cameras = multiview_cameras(NUM_VIEWS).model_inputs.repeat(batch, 1)
    with torch.no_grad():
        expected = reference(latents, timesteps, context=text, camera=cameras, num_frames=NUM_VIEWS)
        ours = unet(latents, timesteps, encoder_hidden_states=text, class_labels=cameras).sample
    difference = (ours - expected).abs().max().item()
    print(f"port: max abs difference {difference:.3g} (outputs up to {expected.abs().max().item():.3g})")
    assert difference <= 1e-4
