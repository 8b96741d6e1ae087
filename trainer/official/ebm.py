"""Import an energy network trained with the official VAEBM code into a VAEBM run directory.

    import_ebm(Path("EBM_12000.pth"), vae=Path("runs/nvae-official"), out=Path("runs/vaebm-official"))

The official file is a `torch.save` dict {model: state dict, optimizer: Adam state dict}, read as
safely as the NVAE checkpoints (`trainer/official/common.py load_official`). The official networks
(EBM_CIFAR32, EBM_CelebA64, EBM_LSUN64, EBM_CelebA256) use the parameter names of our conv energies,
so the layout and base width C (`--n-channel`) are recognized from the tensor shapes (or checked when
given). Their weights expect images in [0, 1]; our trainer feeds [−1, 1], so the imported network is
built with `energy.input_range: "0..1"`, an exact affine in front of the first conv: the same images
get the official energies.

The run directory holds `config.yaml` (the VAEBM preset of the layout, with the imported energy
section and `vae.path` = the NVAE run) and one checkpoint at the official iteration (from a file name
`EBM_<iteration>.pth`, or `step`): the energy weights with every data-dependent init marked done (so
training never re-initializes them), the official Adam state when the file holds a usable one (else a
fresh one), a fresh divergence detector and an `imported` entry in state.json. No per-process state:
resuming starts a fresh data stream and an empty replay buffer, on any number of processes.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from models.energy import LAYOUTS, EnergyNetConfig, build_energy
from models.layers import Conv2d
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.config.loader import from_dict, read_yaml, resolve_preset, validate
from trainer.config.nvae import NVAETrainingConfig
from trainer.ebm.sources import resolve_vae_checkpoint
from trainer.errors import UserError
from trainer.official.common import load_official, map_state, provenance, tensor_dict, write_imported_run
from trainer.run.checkpoint import checkpoint_name
from trainer.run.divergence import DivergenceDetector

OFFICIAL_LAYOUTS = ("cifar10", "celeba64", "lsun_church64", "celebahq256")  # the four official EBM classes


def energy_only(name: str) -> bool:
    """Tensors of our conv energies that official files lack: spectral u/v and data-init flags."""
    return name.startswith("spectral.") or name.endswith(".data_init_done")


def energy_config(layout: str, n_channel: int, in_channels: int, input_range: str = "0..1",
                  data_init: bool = True) -> EnergyNetConfig:
    """The conv energy config that matches an official VAEBM network (layout, channels, input range)."""
    return EnergyNetConfig(kind="conv", layout=layout, base_channels=n_channel, in_channels=in_channels,
                           data_init=data_init, input_range=input_range)


def map_energy_state(official: dict[str, torch.Tensor], cfg: EnergyNetConfig, where: str) -> dict[str, torch.Tensor]:
    """Official energy tensors, checked against our network for `cfg` (built on the meta device)."""
    with torch.device("meta"):
        expected = build_energy(cfg).state_dict()
    return map_state(official, expected, dict, where, skip=energy_only,
                     target=f"our {cfg.layout} energy network with n_channel {cfg.base_channels}")


def find_layout(official: dict[str, torch.Tensor], layout: str | None, in_channels: int, n_channel: int,
                where: str) -> str:
    """The official layout whose tensors match `official` exactly (checked against `layout` if given)."""
    if layout is not None:
        if layout not in OFFICIAL_LAYOUTS:
            raise UserError(f"--layout must be one of {', '.join(OFFICIAL_LAYOUTS)}, got '{layout}'")
        map_energy_state(official, energy_config(layout, n_channel, in_channels), f"{where} (layout {layout})")
        return layout
    matches = []
    for candidate in OFFICIAL_LAYOUTS:
        try:
            map_energy_state(official, energy_config(candidate, n_channel, in_channels), where)
            matches.append(candidate)
        except UserError:
            continue
    if len(matches) != 1:
        raise UserError(f"{where} matches {'none' if not matches else ', '.join(matches)} of the official layouts "
                        f"({', '.join(OFFICIAL_LAYOUTS)}) with n_channel {n_channel}; pass --layout to see why")
    return matches[0]


def adam_state(official: object, net: torch.nn.Module, optimizer: torch.optim.Adam) -> tuple[dict, str]:
    """(our optimizer's state dict, a note): the official Adam moments when they fit our parameters
    one to one (same order: the parameter names are the same), else the fresh state of `optimizer`.

    The hyper-parameters (lr, betas, weight decay) are always ours, from the run's config.
    """
    ours = optimizer.state_dict()
    params = list(net.parameters())
    if not official:
        return ours, "fresh Adam state (the file holds no optimizer state)"
    try:
        indices = [i for group in official["param_groups"] for i in group["params"]]
        states = official["state"]
        if len(indices) != len(params) or not states:
            return ours, "fresh Adam state (the file holds none for these parameters)"
        moved = {}
        for ours_index, (theirs, param) in enumerate(zip(indices, params)):
            if theirs in states:
                entry = dict(states[theirs])
                if entry["exp_avg"].shape != param.shape or entry["exp_avg_sq"].shape != param.shape:
                    return ours, "fresh Adam state (the file's moments do not fit the parameters)"
                moved[ours_index] = entry
    except (KeyError, TypeError, AttributeError):
        return ours, "fresh Adam state (the file's optimizer entry is not an Adam state dict)"
    ours["state"] = moved
    return ours, f"official Adam state of {len(moved)} parameter tensors"


def _iteration(path: Path) -> int | None:
    match = re.search(r"EBM_(\d+)\.pth$", path.name)
    return int(match.group(1)) if match else None


def import_ebm(checkpoint: str | Path, vae: str | Path, out: str | Path, layout: str | None = None,
               n_channel: int | None = None, input_range: str = "0..1", step: int | None = None,
               log=print) -> Path:
    """Official VAEBM energy checkpoint + our NVAE run → VAEBM run directory `out` (module docstring)."""
    path = Path(checkpoint).expanduser()
    where = f"official VAEBM energy checkpoint '{path}'"
    data = load_official(path, "VAEBM energy")
    if "state_dict" in data and "args" in data:
        raise UserError(f"'{path}' is an NVAE checkpoint, not an energy network: use `import_official.py nvae`")
    state = tensor_dict(data["model"] if "model" in data else data, f"{where} 'model'")
    if "conv1.weight" not in state or state["conv1.weight"].dim() != 4:
        raise UserError(f"'{path}' is not an official VAEBM energy checkpoint: no 'model' with a 'conv1.weight' "
                        f"(keys: {sorted(map(str, data))[:8]})")
    width, in_channels = int(state["conv1.weight"].shape[0]), int(state["conv1.weight"].shape[1])
    if n_channel is not None and n_channel != width:
        raise UserError(f"--n-channel {n_channel} does not match {where}: its first conv has {width} channels")
    layout = find_layout(state, layout, in_channels, width, where)

    vae_checkpoint, vae_config_path = resolve_vae_checkpoint(vae)
    raw = read_yaml(vae_config_path)
    if not isinstance(raw.get("model"), dict):
        raise UserError(f"'{vae_config_path}' has no model section: --vae must be an NVAE run")
    vae_model = from_dict(NVAETrainingConfig, {"model": raw["model"]}).model
    image_size = LAYOUTS[layout].image_size
    if (getattr(vae_model, "image_size", None), getattr(vae_model, "in_channels", None)) != (image_size, in_channels):
        raise UserError(f"the {layout} energy network scores {in_channels}x{image_size}x{image_size} images, but the "
                        f"NVAE of '{vae_config_path}' makes {getattr(vae_model, 'in_channels', '?')}x"
                        f"{getattr(vae_model, 'image_size', '?')}x{getattr(vae_model, 'image_size', '?')} ones")

    preset, _ = resolve_preset("vaebm", layout)
    cfg = from_dict(VAEBMTrainingConfig, preset)
    step = step if step is not None else (_iteration(path) or 0)
    cfg = dataclasses.replace(
        cfg, energy=energy_config(layout, width, in_channels, input_range, cfg.energy.data_init),
        vae=dataclasses.replace(cfg.vae, path=str(Path(vae).expanduser().resolve())),
        train=dataclasses.replace(cfg.train, max_steps=max(step, 1)))
    for section in (cfg.energy, cfg.vae, cfg.optim, cfg.langevin, cfg.replay, cfg.train):  # data waits for --data
        validate(section)

    torch.manual_seed(0)  # the ours-only tensors (spectral power-iteration vectors) are drawn fresh
    net = build_energy(cfg.energy)
    net.load_state_dict(map_energy_state(state, cfg.energy, where), strict=False)
    for conv in net.modules():
        if isinstance(conv, Conv2d):
            conv.data_init_done.fill_(True)  # trained weights: never re-initialize them from data
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay)
    optimizer_state, optimizer_note = adam_state(data.get("optimizer"), net, optimizer)
    divergence = DivergenceDetector(cfg.divergence.max_abs_energy, cfg.divergence.max_energy_gap, cfg.divergence.patience)
    imported = provenance(path, "official-vaebm-energy", layout=layout, n_channel=width, input_range=input_range)
    shared = {"energy.safetensors": net.state_dict(), "optimizer.pt": optimizer_state,
              "state.json": {"step": step, "kind": "vaebm", "vae_checkpoint": str(vae_checkpoint.resolve()),
                             "divergence": divergence.state_dict(), "deepspeed": False, "imported": imported}}
    note = (f"imported official VAEBM energy network {path} (layout {layout}, n_channel {width}, inputs "
            f"{input_range}, step {step}, {optimizer_note}) on the NVAE {vae_checkpoint}")
    run = write_imported_run(Path(out), cfg, step, shared, note)
    log(f"{note} into {run}/checkpoints/{checkpoint_name(step)}")
    return run
