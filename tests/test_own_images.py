"""Your own images in three commands (README, "Your own images"): pack a folder of mixed files, train on the
shards without naming the image size, and starts that fail their checks leave no run directory behind."""
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import FAST, ROOT, run_script
from PIL import Image

from data.bundled import load_photo_crops
from data.shards import read_index
from trainer.config.common import DataConfig
from trainer.ebm.sources import check_vae_fits_data
from trainer.errors import UserError
from trainer.run.checkpoint import latest_checkpoint

SMALL_NVAE = ["train.max_steps=2", "train.per_device_batch_size=4", "train.global_batch_size=4",
              "train.image_every=0", "data.num_workers=1", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Real photographs (crops of scikit-image's) at 80 and 96 pixels, two too small for 64, a corrupt JPEG,
    a text file named like an image, and a file that is no image at all."""
    folder = tmp_path_factory.mktemp("photos")
    for i, crop in enumerate(load_photo_crops(80, count=3, seed=1)):
        Image.fromarray(crop).save(folder / f"photo{i}.png")
    (folder / "sub").mkdir()
    for i, crop in enumerate(load_photo_crops(96, count=2, seed=2)):
        Image.fromarray(crop).save(folder / "sub" / f"photo{i}.jpg", quality=90)
    for i, crop in enumerate(load_photo_crops(40, count=2, seed=3)):
        Image.fromarray(crop).save(folder / f"thumb{i}.png")
    (folder / "broken.jpg").write_bytes((folder / "sub" / "photo0.jpg").read_bytes()[:200])
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("ignored: no image suffix")
    return folder


def test_pack_mixed_folder_then_train_at_64_without_naming_the_size(mixed_folder, tmp_path):
    packed = run_script("make_shards.py", "--input", str(mixed_folder), "--output", str(tmp_path / "shards"),
                        "--size", "64")
    assert packed.stdout.startswith("wrote 1 shards, 5 samples, skipped 4 (")
    assert "2 undecodable: broken.jpg, notes.png" in packed.stdout
    assert "2 smaller than --size: thumb0.png (40x40), thumb1.png (40x40)" in packed.stdout
    assert read_index(tmp_path / "shards")["size"] == 64

    run_dir = tmp_path / "run"
    command = ["--config", "digits", "--data", str(tmp_path / "shards"), "--run-dir", str(run_dir), *SMALL_NVAE]
    # A start that fails its checks (a size against the shards') writes nothing, so the corrected one can start.
    refused = run_script("train_nvae.py", *command, "data.image_size=32", "model.image_size=32", check=False)
    assert refused.returncode == 2 and "data.image_size=64 model.image_size=64" in refused.stderr
    assert not run_dir.exists()
    refused = run_script("train_nvae.py", *command, "data.num_workers=2", check=False)  # found by the data stream
    assert refused.returncode == 2 and "fewer than world_size x num_workers" in refused.stderr
    assert not run_dir.exists()

    trained = run_script("train_nvae.py", *command)
    assert latest_checkpoint(run_dir).name == "step-0000002"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["image_size"] == saved["model"]["image_size"] == 64
    assert saved["data"]["shards"] == str(tmp_path / "shards")
    # No launcher or DeepSpeed chatter on a CPU machine where neither was asked for (DeepSpeed logs to stdout).
    output = (trained.stdout + trained.stderr).splitlines()
    assert not [line for line in output if "WARNING" in line or "accelerator" in line.lower()], output


def test_folder_of_only_small_images_is_an_error_naming_them(mixed_folder, tmp_path):
    result = run_script("make_shards.py", "--input", str(mixed_folder), "--output", str(tmp_path / "out"),
                        "--size", "128", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no usable images" in result.stderr and "7 smaller than --size" in result.stderr
    assert not (tmp_path / "out").exists()


def test_vaebm_refuses_data_of_another_size_than_its_vae():
    vae = SimpleNamespace(image_shape=(3, 64, 64))
    check_vae_fits_data(vae, DataConfig(shards="/s", image_size=64), "runs/nvae64")
    with pytest.raises(UserError, match="makes 64x64 images but the data are 32x32 .* --size 64"):
        check_vae_fits_data(vae, DataConfig(shards="/s", image_size=32), "runs/nvae64")
    check_vae_fits_data(SimpleNamespace(image_shape=(2,)), DataConfig(dataset="25gaussians"), "runs/toy")  # points


def _export_main():
    spec = importlib.util.spec_from_file_location("script_export", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_vae_that_is_not_a_run_writes_nothing_and_relative_vae_is_stored_absolute(nvae_run, cache_dir, tmp_path,
                                                                                 capsys):
    (tmp_path / "not-a-run").mkdir()
    command = [sys.executable, str(ROOT / "scripts" / "train_vaebm.py"), "--config", "digits", "--run-dir", "vaebm",
               f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=1", "langevin.steps=1", "train.image_every=0",
               "data_init_batches=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([*command, "--vae", "not-a-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "neither an NVAE run directory" in refused.stderr
    assert not (tmp_path / "vaebm").exists()

    os.symlink(nvae_run, tmp_path / "nvae")  # a relative --vae, as typed by a user in tmp_path
    trained = subprocess.run([*command, "--vae", "nvae"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "vaebm" / "config.yaml").read_text())["vae"]["path"] == str(tmp_path / "nvae")

    # export.py from another working directory (this test's: the repository root) finds the VAE.
    _export_main()([str(tmp_path / "vaebm"), "--out", str(tmp_path / "bundle"), "--bn-passes", "4",
                    "--temperatures", "0.7"])
    log = capsys.readouterr().err
    assert (tmp_path / "bundle" / "bundle.json").is_file()
    assert "fewer with --bn-passes" in log and "t=0.7: 4/4 passes" in log  # BN readjustment progress


@pytest.mark.slow
def test_accelerate_launch_with_the_cpu_config_is_quiet(tmp_path, cache_dir):
    """slurm/accelerate/cpu.yaml gives the launcher every value it would otherwise warn about ("defaults used")."""
    launcher = ["accelerate", "launch", "--config_file", str(ROOT / "slurm" / "accelerate" / "cpu.yaml")]
    result = run_script("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"),
                        f"data.cache_dir={cache_dir}", *FAST, "train.max_steps=1", "train.image_every=0",
                        launcher=launcher)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000001"
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if "defaults used" in line or "WARNING" in line or "accelerator" in line.lower()]
    assert not noise, noise
