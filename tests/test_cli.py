"""The training scripts' command line: fast `--help` (no torch), presets and keys listed, `--print-config`,
"did you mean", and the config fitted to its shards (image size, channels, absolute paths)."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.shards import write_shards
from trainer.cli import training_config
from trainer.config.loader import list_presets, load_config, to_dict
from trainer.config.nvae import NVAETrainingConfig, architecture_dict
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "accelerate", "deepspeed")


def run(script: str, *args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a script under `python -X importtime`; returns the result and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scripts" / script), *args],
                            capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)$", result.stderr, flags=re.M))
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return result, {name.split(".")[0] for name in imported}


@pytest.mark.parametrize("script, kind", [("train_nvae.py", "nvae"), ("train_vaebm.py", "vaebm")])
def test_training_help_lists_presets_and_keys_without_torch(script, kind):
    result, imported = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert imported and not imported & set(HEAVY), imported & set(HEAVY)  # the import log was read, and is light
    presets = result.stdout.split("presets (")[1].split("config keys")[0]
    assert all(name in presets for name in list_presets(kind))
    assert "max_steps" in result.stdout and "image_size" in result.stdout and "--print-config" in result.stdout


def test_evaluate_help_lists_experiments_without_torch():
    result, imported = run("evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    assert imported and not imported & set(HEAVY), imported & set(HEAVY)
    assert "toy-likelihood" in result.stdout and "exact test log-likelihoods" in result.stdout


def test_config_error_is_one_line_with_a_suggestion_and_no_torch(tmp_path):
    result, imported = run("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"),
                           "train.max_step=3")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"
    assert not imported & set(HEAVY) and not (tmp_path / "run").exists()


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result, imported = run("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"),
                           "--print-config", "train.max_steps=7", "optim.lr=3e-3")
    assert result.returncode == 0, result.stderr
    expected = load_config(NVAETrainingConfig, "nvae", "digits", ["train.max_steps=7", "optim.lr=3e-3"],
                           expand={"model": architecture_dict})
    assert yaml.safe_load(result.stdout) == to_dict(expected)
    assert not (tmp_path / "run").exists() and not imported & set(HEAVY)
    result, _ = run("train_vaebm.py", "--config", "digits", "--vae", "runs/some-nvae", "--print-config")
    assert result.returncode == 0, result.stderr  # no --run-dir needed to print
    assert yaml.safe_load(result.stdout)["vae"]["path"] == str(ROOT / "runs" / "some-nvae")  # made absolute


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_step=3", "train.max_steps"),
    ("trian.max_steps=3", "train"),
    ("max_steps=3", "train.max_steps"),          # a key put at the top level
    ("model.channel_enc=8", "model.channels_enc"),
])
def test_unknown_keys_get_did_you_mean(override, suggestion):
    with pytest.raises(UserError, match=rf"\(did you mean '{re.escape(suggestion)}'\?\)"):
        load_config(NVAETrainingConfig, "nvae", "digits", [override], expand={"model": architecture_dict})
    with pytest.raises(UserError, match=r"did you mean 'digits'\?"):
        load_config(NVAETrainingConfig, "nvae", "digit", [], expand={"model": architecture_dict})
    with pytest.raises(UserError) as err:  # nothing close: no suggestion
        load_config(NVAETrainingConfig, "nvae", "digits", ["train.zzzzzz=1"], expand={"model": architecture_dict})
    assert "did you mean" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# The config fitted to its shards.


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s64"
    write_shards([(f"{i:09d}", np.full((64, 64, 3), i, np.uint8)) for i in range(4)], out, size=64)
    return out


def args(config, *overrides, data=None):
    return argparse.Namespace(config=config, data=None if data is None else str(data), overrides=list(overrides))


def test_image_size_comes_from_the_shards(shards64):
    cfg = training_config("nvae", args("digits", data=shards64))
    assert cfg.data.image_size == cfg.model.image_size == 64
    cfg = training_config("nvae", args("digits", "model=nvae-bench-small", data=shards64))  # after `model=NAME` too
    assert cfg.model.image_size == 64 and cfg.model.channels_enc == 32
    cfg = training_config("vaebm", args("digits", "vae.path=/x", data=shards64))
    assert cfg.data.image_size == 64
    cfg = training_config("nvae", args("digits", "data.image_size=64", "model.image_size=64", data=shards64))
    assert cfg.data.image_size == 64  # set by the user, and agreeing with the shards


@pytest.mark.parametrize("overrides", [["data.image_size=32"], ["model.image_size=32"],
                                       ["data.image_size=32", "model.image_size=32"]])
def test_an_image_size_against_the_shards_names_the_fix(shards64, overrides):
    with pytest.raises(UserError, match="are 64x64 .* data.image_size=64 model.image_size=64"):
        training_config("nvae", args("digits", *overrides, data=shards64))


def test_a_config_files_image_size_against_the_shards_names_the_fix(shards64, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": "digits", "data": {"dataset": "shards", "shards": str(shards64)}}))
    with pytest.raises(UserError, match="are 64x64 but the image size is 32; set data.image_size=64 model.image_size"):
        training_config("nvae", args(str(path)))


def test_channels_are_checked_against_the_data(shards64):
    with pytest.raises(UserError, match=r"model.in_channels is 1 .* 3 channels .* set model.in_channels=3"):
        training_config("nvae", args("digits", "model.in_channels=1", data=shards64))
    with pytest.raises(UserError, match=r"model.in_channels is 1 .* set model.in_channels=3"):
        training_config("nvae", args("digits", "model.in_channels=1"))  # bundled digits are RGB too
    with pytest.raises(UserError, match=r"energy.in_channels is 1 .* set energy.in_channels=3"):
        training_config("vaebm", args("digits", "vae.path=/x", "energy.in_channels=1", data=shards64))


def test_stored_paths_are_absolute(shards64, monkeypatch):
    monkeypatch.chdir(shards64.parent)
    cfg = training_config("vaebm", args("digits", "vae.path=runs/nvae", "eval.fid_ref=ref", data=shards64.name))
    assert cfg.data.shards == str(shards64)
    assert cfg.vae.path == str(shards64.parent / "runs" / "nvae") and cfg.eval.fid_ref == str(shards64.parent / "ref")
    cfg = training_config("vaebm", args("digits", "vae.path=~/nvae", "data.shards=pipe:cat x.tar"))
    assert cfg.vae.path == os.path.expanduser("~/nvae") and cfg.data.shards == "pipe:cat x.tar"  # commands stay


def test_missing_or_absent_shards_are_config_errors(tmp_path):
    with pytest.raises(UserError, match="index.json not found"):
        training_config("nvae", args("digits", data=tmp_path / "nowhere"))
    with pytest.raises(UserError, match="pass --data SHARDS_DIR"):
        training_config("nvae", args("celeba64"))
