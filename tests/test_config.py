"""The config tree: presets resolve, overrides apply, mistakes name their key."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import list_presets, load_config, parse_override, save_config, to_dict
from trainer.config.nvae import NVAETrainingConfig, architecture_dict
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def load(preset, *overrides):
    return load_config(NVAETrainingConfig, "nvae", preset, list(overrides), expand={"model": architecture_dict})


@pytest.mark.parametrize("preset", list_presets("nvae"))
def test_every_nvae_preset_resolves(preset):
    needs_shards = preset in ("cifar10", "celeba64", "lsun_church64", "celebahq256")
    cfg = load(preset, *(["data.shards=/somewhere"] if needs_shards else []))
    if preset == "toy2d":
        assert cfg.model.data_dim == 2 and cfg.data.is_toy
    else:
        assert cfg.model.image_size == cfg.data.image_size


def test_the_papers_presets_hold_their_settings():
    """The paper datasets' presets exist and say what the papers say: NVAE architectures and VAEBM Table 8."""
    assert {"digits", "cifar10", "celeba64", "lsun_church64", "celebahq256", "nvae-bench-small"} <= set(list_presets("nvae"))
    assert load("celebahq256", "data.shards=/x").model.num_x_bits == 5  # 5-bit inputs for CelebA-HQ 256
    # lr, Langevin steps and step size in training, persistent chains, test-time steps (VAEBM Table 8)
    table8 = {"cifar10": (4e-5, 10, 8e-5, False, 16), "celeba64": (5e-5, 10, 5e-6, False, 20),
              "lsun_church64": (4e-5, 10, 4e-6, True, 20), "celebahq256": (4e-5, 6, 3e-6, True, 24)}
    for name, (lr, steps, step_size, replay, sample_steps) in table8.items():
        cfg = load_vaebm(name)
        assert cfg.optim.lr == pytest.approx(lr) and cfg.langevin.sample_steps == sample_steps, name
        assert cfg.langevin.steps == steps and cfg.langevin.step_size == pytest.approx(step_size), name
        assert cfg.replay.enabled == replay, name
        assert (cfg.optim.beta1, cfg.optim.spectral_coeff) == (0.99, 0.2) and cfg.energy.layout == name


def load_vaebm(preset, *overrides):
    return load_config(VAEBMTrainingConfig, "vaebm", preset, ["vae.path=/somewhere", "data.shards=/somewhere",
                                                             *overrides])


@pytest.mark.parametrize("preset", list_presets("vaebm"))
def test_every_vaebm_preset_resolves(preset):
    cfg = load_vaebm(preset)
    assert cfg.langevin.steps >= 1 and cfg.train.max_steps >= 1
    assert (cfg.method == "joint-prior") == (cfg.energy.kind == "latent")


def test_overrides_apply_with_types():
    cfg = load("digits", "train.max_steps=7", "optim.lr=3e-3", "data.hflip=true", "model.num_flows=1")
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-3)  # YAML 1.1 reads 3e-3 as a string; we coerce it
    assert cfg.data.hflip is True and cfg.model.num_flows == 1


def test_model_section_can_name_an_architecture():
    cfg = load("digits", "model=celebahq256", "data.image_size=256")
    assert cfg.model.image_size == 256 and cfg.model.num_x_bits == 5


@pytest.mark.parametrize("override, fragment", [
    ("train.nonsense=1", "train.nonsense"),
    ("optimm.lr=1", "optimm"),
    ("train.max_steps=ten", "train.max_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.keep_checkpoints=1", "train.keep_checkpoints"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.fp16_init_scale=0", "train.fp16_init_scale"),
    ("train.fp16_init_scale=inf", "train.fp16_init_scale"),
    ("train.compile=maybe", "train.compile"),
    ("train.compile_backend=tvm", "train.compile_backend"),
    ("train.global_batch_size=30", "global_batch_size"),
    ("data.image_size=64", "image_size"),
    ("data.dataset=imagenet", "data.dataset"),
    ("model=resnet", "resnet"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load("digits", override)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.mixed_precision=fp16"], "fp16"),
    (["train.compile=true"], "compile"),
    (["train.compile=true", "train.compile_backend=aot_eager"], "compile"),
])
def test_the_slope_penalty_refuses_what_cannot_differentiate_it_twice(overrides, fragment):
    """The slope penalty needs double backpropagation: refused up front with fp16 (no loss scaler for the inner
    gradient) and compiled energies; accepted in bf16, eagerly, and without the penalty."""
    slope = ["vae.path=x", "optim.slope_coeff=0.01"]
    with pytest.raises(UserError, match=f"optim.slope_coeff.*{fragment}"):
        load_config(VAEBMTrainingConfig, "vaebm", "toy2d", [*slope, *overrides])
    load_config(VAEBMTrainingConfig, "vaebm", "toy2d", [*slope, *overrides, "optim.slope_coeff=0"])
    load_config(VAEBMTrainingConfig, "vaebm", "toy2d", [*slope, "train.mixed_precision=bf16",
                                                        "train.compile=true", "train.compile_backend=eager"])


def test_override_syntax():
    assert parse_override("a.b=1e-3") == ("a.b", "1e-3")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(UserError):
        parse_override("novalue")


def test_unknown_preset_and_missing_file():
    with pytest.raises(UserError, match="unknown preset"):
        load("no-such-preset")
    with pytest.raises(UserError, match="does not exist"):
        load("missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load("celebahq256", "data.shards=/x")
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    again = load_config(NVAETrainingConfig, "nvae", str(path), [])
    assert to_dict(again) == to_dict(cfg)


def test_cli_unknown_key_is_one_line_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/train_nvae.py"), "--config", "digits",
                             "--run-dir", str(run_dir), "train.bogus=3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "train.bogus" in lines[0]
    assert not run_dir.exists()  # nothing written before the config is valid


# ---- Every float finite and in range, checked up front; messages bounded (issue: config values) --------------

def digits_vaebm(*overrides):
    return load_config(VAEBMTrainingConfig, "vaebm", "digits", ["vae.path=unused", *overrides])


@pytest.mark.parametrize("kind, override, fragment", [
    ("nvae", "optim.lr=nan", "optim.lr' must be a finite number"),
    ("nvae", "optim.lr=.nan", "optim.lr' must be a finite number"),
    ("nvae", "optim.lr=inf", "optim.lr' must be a finite number"),
    ("nvae", "optim.lr=1e300", "optim.lr must be in (0, 1]"),
    ("nvae", "optim.eps=-.inf", "optim.eps' must be a finite number"),
    ("nvae", "optim.weight_decay=5", "optim.weight_decay must be in [0, 1]"),
    ("nvae", "loss.spectral_coeff=1e300", "loss.spectral_coeff"),
    ("nvae", "train.ema_decay=nan", "train.ema_decay' must be a finite number"),
    ("nvae", "model.bn_eps=1e300", "bn_eps"),
    ("vaebm", "langevin.step_size=nan", "langevin.step_size' must be a finite number"),
    ("vaebm", "langevin.step_size=5", "langevin.step_size must be in (0, 1]"),
    ("vaebm", "optim.lr=1e300", "optim.lr must be in (0, 1]"),
    ("vaebm", "optim.clip_offset=1e300", "optim.clip_offset"),
    ("vaebm", "vae.temperature=1e9", "vae.temperature must be in (0, 10]"),
    ("vaebm", "divergence.max_abs_energy=inf", "divergence.max_abs_energy' must be a finite number"),
    ("vaebm", "replay.max_p=nan", "replay.max_p' must be a finite number"),
    ("vaebm", "energy.input_scale=0", "energy.input_scale must be > 0"),
    ("vaebm", "energy.input_scale=4", "energy.input_scale applies to mlp energies only"),  # digits: a conv energy
])
def test_non_finite_and_absurd_floats_are_refused_up_front(kind, override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load("digits", override) if kind == "nvae" else digits_vaebm(override)


def test_an_error_quoting_a_huge_value_is_one_short_line():
    huge = "x" * 100_000
    for attempt in (lambda: load("digits", f"optim.lr={huge}"), lambda: load("digits", f"train.{huge}=1"),
                    lambda: load("digits", f"data.dataset={huge}"), lambda: digits_vaebm(f"method={huge}")):
        with pytest.raises(UserError) as failure:
            attempt()
        message = str(failure.value)
        assert len(message) <= 400 and "\n" not in message, message[:200]


def test_cli_nan_learning_rate_is_one_line_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/train_vaebm.py"), "--config", "digits",
                             "--vae", str(tmp_path), "--run-dir", str(run_dir), "langevin.step_size=nan"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "langevin.step_size' must be a finite number" in lines[0]
    assert not run_dir.exists()
