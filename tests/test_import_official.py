"""Importing official NVAE / VAEBM checkpoints (scripts/import_official.py, trainer/official/nvae.py,
trainer/official/ebm.py): equivalence with the outputs the official code computed (the official-format
fixture), the full-size name/shape mapping (tests/fixtures/official-state-dicts.json, on the meta device),
refusals (exit code 2, one line), resuming imported runs, and the pipeline import → train → export → sample.
"""
import argparse
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, ROOT, run_script
from safetensors.torch import load_file

from models.bundle import load_bundle
from models.energy import LAYOUTS, build_energy
from models.nvae import ARCHITECTURES, NVAE
from models.nvae.official import ours_only
from trainer.errors import UserError
from trainer.cli import run_cli
from trainer.official.ebm import (
    adam_state,
    energy_config,
    find_layout,
    import_ebm,
    map_energy_state,
)
from trainer.official.nvae import map_nvae_state, nvae_config_from_args
from trainer.run.checkpoint import Checkpoint, latest_checkpoint

# The official-format fixture and the official name/shape listing live in the repository, so a fresh
# clone runs these tests (never skipped).
FIXTURE = ROOT / "tests" / "fixtures" / "official-format"
LISTING = ROOT / "tests" / "fixtures" / "official-state-dicts.json"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


import_main, export_main, sample_main = _script("import_official"), _script("export"), _script("sample")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fails(argv: list[str], capsys) -> str:
    """Run the script's main as the CLI does; assert exit code 2 and one line; return the line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: import_main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _official_nvae() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURE / "official_nvae_checkpoint.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------
# The fixture: import (through the CLI, in a subprocess), export, compare with the official outputs.


@pytest.fixture(scope="module")
def nvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "nvae"
    run_script("import_official.py", "nvae", str(FIXTURE / "official_nvae_checkpoint.pt"), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def ebm_run(nvae_run):
    out = nvae_run.parent / "ebm"
    import_ebm(FIXTURE / "official_ebm_checkpoint.pth", nvae_run, out, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def bundle(ebm_run):
    out = ebm_run.parent / "bundle"
    assert export_main([str(ebm_run), "--out", str(out), "--bn-passes", "1", "--temperatures", "1.0"]) == 0
    return load_bundle(out)


def test_bundle_reproduces_the_official_generator(bundle):
    expected = load_file(str(FIXTURE / "official_nvae_expected.safetensors"))
    eps = [expected[f"eps_z_{i}"] for i in range(bundle.vae.num_groups)]
    for key, temperature in (("decoder_mean", 1.0), ("decoder_mean_t0.7", 0.7)):
        torch.testing.assert_close(bundle.decoder_mean(eps, temperature=temperature), expected[key], atol=1e-4, rtol=0)
    assert expected["decoder_mean"].min() < -1  # the official mean is soft-clamped only, and so is ours
    generation = bundle.vae.decode(eps)
    for i, z in enumerate(generation.z):
        torch.testing.assert_close(z, expected[f"z_{i}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(generation.x_log_sigma.exp(), expected["decoder_sigma"], atol=1e-4, rtol=0)


def test_bundle_reproduces_the_official_energies(bundle):
    expected = load_file(str(FIXTURE / "official_ebm_expected.safetensors"))
    images = expected["images_0_1"]
    torch.testing.assert_close(bundle.energy(images), expected["energy"], atol=1e-4, rtol=0)
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(bundle.energy(as_bytes), bundle.energy(as_bytes.float() / 255), atol=1e-5, rtol=0)
    # The network takes [−1, 1] like every energy here and maps it to the [0, 1] its weights expect.
    assert bundle.manifest["energy"]["config"]["input_range"] == "0..1"
    torch.testing.assert_close(bundle.energy_net(images * 2 - 1), expected["energy"], atol=1e-4, rtol=0)


def test_imported_runs_hold_ordinary_checkpoints(nvae_run, ebm_run):
    official = _official_nvae()
    checkpoint = Checkpoint(latest_checkpoint(nvae_run))
    assert checkpoint.step == official["global_step"] == 1234
    assert set(checkpoint.manifest["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"}
    model, ema = checkpoint.tensors("model.safetensors"), checkpoint.tensors("ema.safetensors")
    assert model.keys() == ema.keys() and all(torch.equal(model[k], ema[k]) for k in model)
    torch.testing.assert_close(model["prior_ftr0"], official["state_dict"]["prior_ftr0"], atol=0, rtol=0)
    assert checkpoint.torch("optimizer.pt")["state"] == {}  # fresh: the official fast_adamax state is not carried
    state = checkpoint.json("state.json")
    assert state["imported"]["global_step"] == 1234 and state["imported"]["args"]["num_nf"] == 1
    fixture_args = json.loads((FIXTURE / "fixture.json").read_text())["nvae_args"]
    config = Path(nvae_run / "config.yaml").read_text()
    assert f"channels_enc: {fixture_args['num_channels_enc']}" in config and "num_flows: 1" in config
    ebm = Checkpoint(latest_checkpoint(ebm_run))
    energy = ebm.tensors("energy.safetensors")
    assert all(bool(v) for k, v in energy.items() if k.endswith("data_init_done"))  # never re-initialized
    assert Path(ebm.json("state.json")["vae_checkpoint"]) == checkpoint.path.resolve()


# ----------------------------------------------------------------------------------------------
# Resuming: the pipeline of the issue, continued NVAE training, and resumes on other process counts.


@pytest.mark.slow
def test_import_train_export_sample(nvae_run, ebm_run, cache_dir, tmp_path):
    """train_vaebm.py --vae on the imported NVAE, resuming the imported energy run; export; sample."""
    run = tmp_path / "vaebm"
    shutil.copytree(ebm_run, run)
    run_script("train_vaebm.py", "--config", str(run / "config.yaml"), "--vae", str(nvae_run),
               "--run-dir", str(run), "data.dataset=digits", f"data.cache_dir={cache_dir}", *FAST,
               "train.per_device_batch_size=4", "train.global_batch_size=4", "train.max_steps=2",
               "langevin.steps=1", "train.image_every=0")
    assert latest_checkpoint(run).name == "step-0000002"
    out = tmp_path / "bundle"
    assert export_main([str(run), "--out", str(out), "--bn-passes", "1", "--temperatures", "1.0"]) == 0
    assert sample_main([str(out), "--n", "2", "--out", str(tmp_path / "samples"), "--steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["000000.png", "000001.png"]


@pytest.mark.slow
def test_nvae_training_continues_from_an_import(nvae_run, cache_dir, tmp_path):
    run = tmp_path / "nvae"
    shutil.copytree(nvae_run, run)
    result = run_script("train_nvae.py", "--config", str(run / "config.yaml"), "--run-dir", str(run),
                        "data.dataset=digits", f"data.cache_dir={cache_dir}", *FAST, "train.per_device_batch_size=4",
                        "train.global_batch_size=4", "train.max_steps=1235", "train.image_every=0")
    assert "resuming from step 1234" in result.stderr
    assert latest_checkpoint(run).name == "step-0001235"


def _fake_launch(processes: int, rank: int):
    accelerator = SimpleNamespace(num_processes=processes, process_index=rank, scaler=None, unwrap_model=lambda m: m)
    return SimpleNamespace(accelerator=accelerator, deepspeed=False, unwrap=lambda m: m)


class _UntouchedStream:
    def load_state_dict(self, state):
        raise AssertionError("an imported checkpoint has no data-stream position to load")


def test_imported_checkpoints_resume_on_any_number_of_processes(nvae_run, ebm_run):
    from trainer.ebm.loop import restore as restore_vaebm
    from trainer.ebm.replay import ReplayBuffer
    from trainer.nvae.loop import restore as restore_nvae
    from trainer.run.divergence import DivergenceDetector
    from trainer.run.ema import EMA
    from trainer.run.launch import process_seed

    checkpoint = Checkpoint(latest_checkpoint(nvae_run))
    model = NVAE(nvae_config_from_args(vars(_official_nvae()["args"]), _official_nvae()["state_dict"]))
    optimizer = torch.optim.Adamax(model.parameters())
    step = restore_nvae(checkpoint, model, EMA(model, 0.9), optimizer, _fake_launch(2, 1), _UntouchedStream(), seed=7)
    assert step == 1234 and torch.equal(model.prior_ftr0, checkpoint.tensors("model.safetensors")["prior_ftr0"])
    drawn = torch.rand(3)
    torch.manual_seed(process_seed(7, 1))
    assert torch.equal(drawn, torch.rand(3))  # rank 1 of 2 got its own seed, as in a fresh run

    energy_checkpoint = Checkpoint(sorted((ebm_run / "checkpoints").iterdir())[0])  # the imported step 0
    net = build_energy(energy_config("cifar10", 16, 3))
    buffer = ReplayBuffer(model.latent_shapes, capacity=4)
    step = restore_vaebm(energy_checkpoint, net, torch.optim.Adam(net.parameters()), buffer,
                         DivergenceDetector(1e4, 1e3, 5), _UntouchedStream(), _fake_launch(4, 3), seed=7)
    assert step == 0 and len(buffer) == 0 and net.data_init_done


# ----------------------------------------------------------------------------------------------
# The energy importer's choices.


def test_energy_layout_width_and_adam_state(nvae_run, tmp_path, capsys):
    state = torch.load(FIXTURE / "official_ebm_checkpoint.pth", weights_only=True)["model"]
    assert find_layout(state, None, 3, 16, "fixture") == "cifar10"
    with pytest.raises(UserError, match="layout celeba64"):
        find_layout(state, "celeba64", 3, 16, "fixture")
    line = _fails(["ebm", str(FIXTURE / "official_ebm_checkpoint.pth"), "--vae", str(nvae_run), "--out",
                   str(tmp_path / "x"), "--n-channel", "32"], capsys)
    assert "--n-channel 32" in line and "16 channels" in line
    # An official Adam state (same parameter order as ours: same names) is carried over, step from the name.
    net = build_energy(energy_config("cifar10", 16, 3))
    net.load_state_dict(map_energy_state(state, energy_config("cifar10", 16, 3), "fixture"), strict=False)
    official_optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    official_optimizer.step()
    path = tmp_path / "EBM_40.pth"
    torch.save({"model": state, "optimizer": official_optimizer.state_dict()}, path)
    run = import_ebm(path, nvae_run, tmp_path / "run", log=lambda line: None)
    checkpoint = Checkpoint(latest_checkpoint(run))
    assert checkpoint.step == 40
    moved = checkpoint.torch("optimizer.pt")
    assert len(moved["state"]) == len(list(net.parameters()))
    torch.testing.assert_close(moved["state"][0]["exp_avg_sq"], official_optimizer.state_dict()["state"][0]["exp_avg_sq"])
    assert moved["param_groups"][0]["lr"] == 4e-5  # hyper-parameters are the run's (cifar10 preset)
    fresh, note = adam_state({}, net, torch.optim.Adam(net.parameters()))
    assert fresh["state"] == {} and "fresh" in note


# ----------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2.


class _OpensAFile:
    """Unpickling this would create `path` (a safe load must never run it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_inputs_are_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "does not exist" in _fails(["nvae", str(tmp_path / "missing.pt"), "--out", out], capsys)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert "not a readable torch checkpoint" in _fails(["nvae", str(tmp_path / "text.pt"), "--out", out], capsys)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert "not an official NVAE checkpoint" in _fails(["nvae", str(tmp_path / "other.pt"), "--out", out], capsys)
    line = _fails(["nvae", str(FIXTURE / "official_ebm_checkpoint.pth"), "--out", out], capsys)
    assert "import_official.py ebm" in line

    marker = tmp_path / "unpickled"
    checkpoint = _official_nvae()
    checkpoint["extra"] = _OpensAFile(marker)
    torch.save(checkpoint, tmp_path / "unsafe.pt")
    line = _fails(["nvae", str(tmp_path / "unsafe.pt"), "--out", out], capsys)
    assert "refusing to unpickle" in line and "open" in line and not marker.exists()

    checkpoint = _official_nvae()
    checkpoint["args"].num_mixture_dec = 10
    torch.save(checkpoint, tmp_path / "mixture.pt")
    result = run_script("import_official.py", "nvae", str(tmp_path / "mixture.pt"), "--out", out, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "discretized logistic mixture decoder" in result.stderr and "num_mixture_dec 10" in result.stderr
    assert not Path(out).exists()  # nothing left behind by any refusal


# ----------------------------------------------------------------------------------------------
# Full-size mapping: the four VAEBM backbones and energy networks, names and shapes only (meta device).

BACKBONE_LISTING = {"cifar10": "cifar10", "celeba64": "celeba64", "lsun_church64": "celeba64",  # same network
                    "celebahq256": "celebahq256"}


def _synthesized(entries) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    return {name: torch.empty(shape, dtype=dtypes[dtype], device="meta") for name, shape, dtype in entries}


@pytest.mark.parametrize("name", sorted(BACKBONE_LISTING))
def test_full_size_nvae_maps_completely(name):
    listing = json.loads(LISTING.read_text())["nvae"][BACKBONE_LISTING[name]]
    official = _synthesized(listing["state_dict"])
    cfg = nvae_config_from_args(listing["args"], official, where=name)
    # The listing's args were written with 8 bits; the CelebA-HQ backbone trains on 5-bit inputs.
    assert cfg == ARCHITECTURES[name].replace(num_x_bits=cfg.num_x_bits)
    with torch.device("meta"):
        ours = NVAE(cfg).state_dict()
    mapped = map_nvae_state(official, cfg, ours, where=name)
    assert set(mapped) == {k for k in ours if not ours_only(k)}  # every tensor of ours filled ...
    aliases = [k for k in official if k.endswith(".weight_normalized")]
    assert len(mapped) + len(aliases) == len(official) and aliases  # ... by every official tensor
    assert all(mapped[k].shape == ours[k].shape for k in mapped)
    assert sum(v.numel() for k, v in mapped.items() if ours[k].dtype.is_floating_point and "running_" not in k) \
        == listing["num_params"]


def test_full_size_mapping_notices_every_mismatch():
    listing = json.loads(LISTING.read_text())["nvae"]["celeba64"]
    official = _synthesized(listing["state_dict"])
    cfg = nvae_config_from_args(listing["args"], official)
    with torch.device("meta"):
        ours = NVAE(cfg).state_dict()
    dropped = dict(official)
    dropped.pop("dec_tower.1._ops.0.conv.0.weight")  # a BN scale of the first decoder cell
    with pytest.raises(UserError, match="not filled"):
        map_nvae_state(dropped, cfg, ours)
    extra = {**official, "dec_tower.99.se.se.0.weight": torch.empty(4, 4, device="meta")}
    with pytest.raises(UserError, match="cannot place"):
        map_nvae_state(extra, cfg, ours)
    reshaped = {**official, "stem.weight": torch.empty(48, 3, 5, 5, device="meta")}
    with pytest.raises(UserError, match="stem.weight"):
        map_nvae_state(reshaped, cfg, ours)
    alias = next(k for k in official if k.endswith(".weight_normalized"))
    with pytest.raises(UserError, match="differs"):
        map_nvae_state({**official, alias: torch.empty(1, device="meta")}, cfg, ours)
    with pytest.raises(UserError, match="args"):  # args that do not describe the tensors
        map_nvae_state(official, cfg.replace(num_flows=2), ours)


@pytest.mark.parametrize("layout", ["cifar10", "celeba64", "lsun_church64", "celebahq256"])
def test_full_size_energy_maps_completely(layout):
    listing = json.loads(LISTING.read_text())["ebm"][layout]
    official = _synthesized(listing["state_dict"])
    width = listing["n_channel"]
    assert width == LAYOUTS[layout].base_channels
    assert find_layout(official, None, 3, width, layout) == layout  # recognized among the four
    mapped = map_energy_state(official, energy_config(layout, width, 3), layout)
    with torch.device("meta"):
        ours = build_energy(energy_config(layout, width, 3)).state_dict()
    assert set(mapped) == set(official) == {k for k in ours if not ours_only(k)}
    assert sum(v.numel() for v in mapped.values()) == listing["num_params"]
