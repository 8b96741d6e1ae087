"""Import a checkpoint of the official NVAE code into an ordinary NVAE run directory.

    import_nvae(Path("checkpoint.pt"), Path("runs/nvae-official"))

The official file is a `torch.save` dict {state_dict, args (an argparse.Namespace), arch_instance,
epoch, global_step, ...}. Steps:

1. read it safely: `torch.load(weights_only=True)` with only `argparse.Namespace` allowlisted, so
   nothing but tensors, containers, numbers, strings and that one class is ever unpickled;
2. translate `args` into an `NVAEConfig` (channels, scales, groups, latents, cells, pre/post blocks,
   SE, residual posterior, flows, bits). The image size and channels come from the tensors
   (`prior_ftr0`, `stem`), so no dataset table is needed. Decoders other than the Gaussian one of
   the VAEBM backbones are refused by name;
3. rename every tensor (`models/nvae/official.py`) and check the mapping both ways: every official
   tensor placed or a recognized alias, every tensor of ours filled (except `ours_only`), shapes equal;
4. write the run atomically (a staging directory renamed into place): `config.yaml` (the resolved
   training config, with the official training flags where we have the same knob) and one checkpoint
   at the official global step in the trainer's own format (`trainer/run/checkpoint.py`): model and EMA
   weights (the same tensors: the official code keeps no EMA), a fresh optimizer state (the official
   `fast_adamax` state is stacked by shape and not carried over) and `state.json` with an `imported`
   entry. An imported checkpoint has no per-process state: resuming it starts a fresh data stream
   with per-process seeds, on any number of processes (`trainer/nvae/loop.py restore`).

The imported run is "finished" at the official step (`train.max_steps` = that step): `train_vaebm.py
--vae RUN` and `export.py RUN` use it as it is; continue NVAE training with `train.max_steps=N`.
The energy-network importer is `trainer/official/ebm.py`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from models.nvae.config import NVAEConfig
from models.nvae.model import NVAE
from models.nvae.official import official_to_ours, ours_only
from trainer.config.common import DataConfig, TrainConfig
from trainer.config.loader import validate
from trainer.config.nvae import NVAELossConfig, NVAEOptimConfig, NVAETrainingConfig
from trainer.errors import UserError
from trainer.official.common import load_official, map_state, provenance, tensor_dict, write_imported_run
from trainer.run.checkpoint import checkpoint_name

# Official flag → NVAEConfig field, for the flags that fix the architecture (all required).
ARCHITECTURE_FLAGS = {
    "num_channels_enc": "channels_enc", "num_channels_dec": "channels_dec",
    "num_latent_scales": "num_latent_scales", "num_groups_per_scale": "groups_per_scale",
    "ada_groups": "ada_groups", "min_groups_per_scale": "min_groups_per_scale",
    "num_latent_per_group": "latents_per_group",
    "num_cell_per_cond_enc": "cells_per_cond_enc", "num_cell_per_cond_dec": "cells_per_cond_dec",
    "num_preprocess_blocks": "preprocess_blocks", "num_preprocess_cells": "preprocess_cells",
    "num_postprocess_blocks": "postprocess_blocks", "num_postprocess_cells": "postprocess_cells",
    "use_se": "use_se", "res_dist": "residual_posterior", "num_nf": "num_flows", "num_x_bits": "num_x_bits",
}
BOOLEAN_FLAGS = {"ada_groups", "use_se", "res_dist"}
# The ops of each cell kind in the `res_mbconv` architecture instance of the official code, the one built here.
RES_MBCONV_CELLS = {
    "normal_pre": ["res_bnswish", "res_bnswish"], "down_pre": ["res_bnswish", "res_bnswish"],
    "normal_enc": ["res_bnswish", "res_bnswish"], "down_enc": ["res_bnswish", "res_bnswish"],
    "normal_dec": ["mconv_e6k5g0"], "up_dec": ["mconv_e6k5g0"],
    "normal_post": ["mconv_e3k5g0"], "up_post": ["mconv_e3k5g0"],
}


# ----------------------------------------------------------------------------------------------
# args → NVAEConfig.


def _flag(args: dict, name: str, where: str):
    if name not in args:
        raise UserError(f"{where}: args has no '{name}' (is this an NVAE checkpoint of the official code?)")
    value = args[name]
    if name in BOOLEAN_FLAGS:
        if not isinstance(value, bool):
            raise UserError(f"{where}: args.{name} must be true/false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: args.{name} must be an integer, got {value!r}")
    return value


def nvae_config_from_args(args: dict, state: dict[str, torch.Tensor], arch_cells: Any = None,
                          where: str = "checkpoint") -> NVAEConfig:
    """The NVAEConfig an official checkpoint describes; UserError for what this NVAE does not build.

    `state` may hold meta tensors: only the shapes of `prior_ftr0`, `stem.weight` and the output
    head are read (image size, input channels, decoder type).
    """
    mixtures = args.get("num_mixture_dec")
    if isinstance(mixtures, int) and mixtures > 1:
        raise UserError(f"{where} uses the discretized logistic mixture decoder (num_mixture_dec {mixtures}), "
                        f"which this NVAE does not implement; only the Gaussian decoder of the VAEBM backbones "
                        f"(num_mixture_dec 1) can be imported")
    if mixtures != 1:
        raise UserError(f"{where}: args.num_mixture_dec must be 1 (the Gaussian decoder), got {mixtures!r}")
    arch = args.get("arch_instance", "res_mbconv")
    if arch != "res_mbconv" or (isinstance(arch_cells, dict) and any(
            list(arch_cells.get(kind, [])) != ops for kind, ops in RES_MBCONV_CELLS.items())):
        raise UserError(f"{where} uses the '{arch}' architecture instance; only res_mbconv cells are built here")
    values = {ours: _flag(args, theirs, where) for theirs, ours in ARCHITECTURE_FLAGS.items()}
    if values["num_latent_scales"] == 1 and values["groups_per_scale"] == 1:
        raise UserError(f"{where} is a single-group 'vanilla VAE' (1 scale x 1 group), whose official decoder "
                        f"is a different network; it cannot be imported")
    for name in ("prior_ftr0", "stem.weight", "image_conditional.1.weight"):
        if name not in state:
            raise UserError(f"{where}: the state dict has no '{name}' (not an official NVAE state dict)")
    in_channels = int(state["stem.weight"].shape[1])
    head = int(state["image_conditional.1.weight"].shape[0])
    if head != 2 * in_channels:
        decoder = "a Bernoulli decoder" if head == in_channels else f"a {head}-channel output head"
        raise UserError(f"{where} uses {decoder} (dataset {args.get('dataset')!r}); only the Gaussian decoder "
                        f"(2 x {in_channels} output channels: mean and log-scale) can be imported")
    top = state["prior_ftr0"].shape  # [C, h, w] at the top latent resolution
    if len(top) != 3 or top[1] != top[2]:
        raise UserError(f"{where}: prior_ftr0 has shape {list(top)}, expected [C, h, h]")
    image_size = int(top[1]) * 2 ** (values["preprocess_blocks"] + values["num_latent_scales"] - 1)
    cfg = NVAEConfig(image_size=image_size, in_channels=in_channels, decoder="gaussian", **values)
    try:
        return cfg.validate()
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Tensors: official names → ours.


def map_nvae_state(official: dict[str, torch.Tensor], cfg: NVAEConfig, expected: dict[str, torch.Tensor],
                   where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every official NVAE tensor under our name, checked against our `expected` state dict."""
    return map_state(official, expected, lambda state: official_to_ours(state, cfg), where, skip=ours_only)


# ----------------------------------------------------------------------------------------------
# The imported run's training config.


def nvae_training_config(model: NVAEConfig, args: dict, step: int) -> NVAETrainingConfig:
    """Our training config for an imported NVAE: the official training flags where we have the knob.

    Data comes from shards (`--data` when training continues), flipped as the official loaders do.
    `train.max_steps` is the official step, so the run counts as finished until it is raised.
    """
    def pick(name: str, default, kind=float):
        value = args.get(name, default)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    defaults_optim, defaults_loss, defaults_train = NVAEOptimConfig(), NVAELossConfig(), TrainConfig()
    per_device = pick("batch_size", defaults_train.per_device_batch_size, int)
    processes = pick("num_proc_node", 1, int) * pick("num_process_per_node", 1, int)
    lr = pick("learning_rate", defaults_optim.lr)
    cfg = NVAETrainingConfig(
        model=model,
        data=DataConfig(dataset="shards", image_size=model.image_size, hflip=True),
        optim=NVAEOptimConfig(lr=lr, lr_min=min(lr, pick("learning_rate_min", defaults_optim.lr_min)),
                              weight_decay=pick("weight_decay", defaults_optim.weight_decay)),
        loss=NVAELossConfig(
            kl_anneal_portion=pick("kl_anneal_portion", defaults_loss.kl_anneal_portion),
            kl_const_portion=pick("kl_const_portion", defaults_loss.kl_const_portion),
            kl_min_coeff=pick("kl_const_coeff", defaults_loss.kl_min_coeff),
            spectral_coeff=pick("weight_decay_norm", defaults_loss.spectral_coeff),
            spectral_coeff_init=pick("weight_decay_norm_init", defaults_loss.spectral_coeff_init),
            spectral_anneal=bool(args.get("weight_decay_norm_anneal", False))),
        train=TrainConfig(max_steps=max(step, 1), per_device_batch_size=per_device,
                          global_batch_size=per_device * max(processes, 1), seed=pick("seed", 0, int)),
    )
    for section in (cfg.model, cfg.optim, cfg.loss, cfg.train):  # data waits for --data
        validate(section)
    return cfg


# ----------------------------------------------------------------------------------------------
# The whole NVAE import.


def import_nvae(checkpoint: str | Path, out: str | Path, log=print) -> Path:
    """Official NVAE checkpoint → NVAE run directory `out` (see the module docstring)."""
    path = Path(checkpoint).expanduser()
    where = f"official NVAE checkpoint '{path}'"
    data = load_official(path, "NVAE")
    if "state_dict" not in data or "args" not in data:
        hint = " (an energy-network checkpoint? use `import_official.py ebm`)" if "model" in data else ""
        raise UserError(f"'{path}' is not an official NVAE checkpoint: it has no 'state_dict' and 'args' "
                        f"(keys: {sorted(map(str, data))[:8]}){hint}")
    args = vars(data["args"]) if isinstance(data["args"], argparse.Namespace) else data["args"]
    if not isinstance(args, dict):
        raise UserError(f"{where}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
    state = tensor_dict(data["state_dict"], f"{where} 'state_dict'")
    model_cfg = nvae_config_from_args(args, state, data.get("arch_instance"), where)
    step = int(data.get("global_step", 0) or 0)

    torch.manual_seed(0)  # the ours-only tensors (spectral power-iteration vectors) are drawn fresh
    model = NVAE(model_cfg)
    tensors = map_nvae_state(state, model_cfg, model.state_dict(), where)
    model.load_state_dict(tensors, strict=False)  # strictness checked above (ours_only stay fresh)
    cfg = nvae_training_config(model_cfg, args, step)
    weights = model.state_dict()
    # The trainer's optimizer, fresh (a resumed run loads it like any checkpoint's optimizer.pt).
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                                   weight_decay=cfg.optim.weight_decay)
    imported = provenance(path, "official-nvae", epoch=data.get("epoch"), global_step=step,
                          args={k: v for k, v in args.items() if isinstance(v, (bool, int, float, str))})
    shared = {"model.safetensors": weights, "ema.safetensors": weights, "optimizer.pt": optimizer.state_dict(),
              "state.json": {"step": step, "kind": "nvae", "deepspeed": False, "imported": imported}}
    params = sum(p.numel() for p in model.parameters())
    note = (f"imported official NVAE {path} (step {step}, {params / 1e6:.2f} M parameters, "
            f"{model.num_groups} latent groups, {model_cfg.image_size}x{model_cfg.image_size})")
    run = write_imported_run(Path(out), cfg, step, shared, note)
    log(f"{note} into {run}/checkpoints/{checkpoint_name(step)}")
    return run
