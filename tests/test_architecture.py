"""The floor plan's promises: light sub-packages import lazily, every public name resolves, the library has one
denoising loop, and TRL methods that cannot work on `Carve3DTrainer` say what to call instead."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from small_run import SMALL, brightness

import carve3d_trl
from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer, KLMode

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("trl", "diffusers", "accelerate", "transformers")


def modules_loaded_by(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(__import__('json').dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import carve3d_trl",
        "import carve3d_trl.rewards",
        "from carve3d_trl.rewards import MRCReward, instant3d_layout",
    ],
)
def test_the_reward_package_loads_neither_trl_nor_diffusers(statement):
    loaded = modules_loaded_by(statement)
    assert [name for name in HEAVY if name in loaded] == []


def test_every_public_name_resolves_from_the_top_level_package():
    assert {"Carve3DTrainer", "Carve3DConfig", "load_ddpo_pipeline", "Carve3DStableDiffusionXLPipeline"} <= set(
        carve3d_trl.__all__
    )
    for name in carve3d_trl.__all__:
        assert getattr(carve3d_trl, name) is not None, name
        assert name in dir(carve3d_trl)
    with pytest.raises(AttributeError, match="no attribute 'Carve3DTrainr'"):
        carve3d_trl.Carve3DTrainr  # noqa: B018


def denoising_loops(path: Path) -> list[int]:
    """Lines of `for` loops over a scheduler's timesteps in a Python file."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.For)
        and "timesteps" in ast.unparse(node.iter)
        and "scheduler" in ast.unparse(node.iter)
    ]


def test_the_library_scripts_and_benchmarks_have_one_denoising_loop():
    files = [
        p for folder in ("carve3d_trl", "examples", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py")
    ]
    found = {str(p.relative_to(ROOT)): lines for p in files if (lines := denoising_loops(p))}
    assert (
        list(found) == ["carve3d_trl/pipelines/sampling.py"] and len(found["carve3d_trl/pipelines/sampling.py"]) == 1
    )


def test_scripts_import_no_other_script_and_benchmarks_only_their_harness():
    for path in [*ROOT.glob("examples/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        allowed = {"harness"} if path.parent.name == "benchmarks" else set()
        siblings = {p.stem for p in path.parent.glob("*.py")} - allowed
        assert not imported & siblings, f"{path.name} imports a sibling script: {imported & siblings}"


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        ({}, KLMode.IN_REWARD),
        ({"kl_in_reward": False}, KLMode.IN_LOSS),
        ({"kl_penalty": False}, KLMode.LOGGED),
        ({"kl_penalty": False, "kl_log": False}, KLMode.OFF),
    ],
)
def test_one_kl_mode_is_derived_from_the_recipe_flags(flags, mode):
    config = Carve3DConfig(**SMALL, **flags)
    assert KLMode.from_config(config) is mode is KLMode.from_config(config.to_dict())
    assert mode.computes_reference == (mode is not KLMode.OFF)


def test_trl_methods_that_cannot_work_name_the_method_to_use(tiny_model_path, tmp_path):
    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"))
    trainer = Carve3DTrainer(
        config, brightness, lambda: ("a red cube", {}), Carve3DStableDiffusionPipeline(tiny_model_path)
    )
    for call, replacement in (
        (trainer.create_model_card, "save_pretrained"),
        (trainer.generate_model_card, "save_pretrained"),
        (lambda: trainer._save_checkpoint(None, None), "save_checkpoint"),
        (lambda: Carve3DTrainer.from_pretrained("me/lora"), "resume_from"),
    ):
        with pytest.raises(NotImplementedError, match=replacement):
            call()
    trainer._save_pretrained(tmp_path / "model")  # the hub mixin's hook writes the real folder
    assert (tmp_path / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "model" / "README.md").is_file()
