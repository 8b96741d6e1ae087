"""What the digit experiments (`modes`, `fd-digits`, `ood`) share: flags, quick/full settings, models.

Every experiment trains its models from scratch through `train_models` (NVAE, then VAEBM on the frozen
NVAE, with the presets `PRESET` + dotted overrides), in `--models-dir` (default: RUN_DIR/models).
Experiments given the same `--models-dir` and settings share the trained models: `fd-digits` and `ood`
both use `digits16` (trained on `digits-train`), so the second finds the first's finished runs.
The digit classifier is cached there too.

Settings resolve as: an explicit flag (`--nvae-steps`, ...) > the experiment's QUICK (with `--quick`)
or FULL table.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError


@dataclass
class DigitSettings:
    """The resolved settings of one run of a digit experiment."""

    image_size: int
    nvae_steps: int
    vaebm_steps: int
    samples: int
    sample_steps: int | None  # Langevin steps at sampling time; None: the preset's langevin.sample_steps
    bn_passes: int  # batches of the BN readjustment at temperature 1 when the bundle is exported
    models_dir: Path
    nvae_overrides: list[str]
    vaebm_overrides: list[str]


def add_arguments(parser: argparse.ArgumentParser, samples_help: str) -> None:
    """The flags of every digit experiment (the shared --out/--run-dir/--quick/--seed come from the script)."""
    group = parser.add_argument_group("models (advanced: the defaults are the --quick or full settings)")
    group.add_argument("--models-dir", type=Path, default=None,
                       help="trained NVAE/VAEBM runs and the digit classifier (default: RUN_DIR/models); "
                            "experiments given the same folder and settings reuse each other's models")
    group.add_argument("--data-cache", type=Path, default=None,
                       help="where bundled datasets are materialized (default: the presets' data.cache_dir)")
    group.add_argument("--image-size", type=int, default=None, help="image size of the data and models (16 or 32)")
    group.add_argument("--nvae-steps", type=int, default=None, help="NVAE training steps")
    group.add_argument("--vaebm-steps", type=int, default=None, help="VAEBM energy training steps")
    group.add_argument("--samples", type=int, default=None, help=samples_help)
    group.add_argument("--sample-steps", type=int, default=None, help="Langevin steps per VAEBM sample")
    group.add_argument("--bn-passes", type=int, default=500,
                       help="batches of 16 for NVAE's BN readjustment at temperature 1 (export default: 500)")
    group.add_argument("--nvae-set", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra override of the NVAE config (repeatable), e.g. train.global_batch_size=16")
    group.add_argument("--vaebm-set", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra override of the VAEBM config (repeatable)")


def resolve(args: argparse.Namespace, report, quick: dict, full: dict) -> DigitSettings:
    """Flags over the experiment's QUICK/FULL table (keys image_size, nvae_steps, vaebm_steps, samples)."""
    table = quick if args.quick else full
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else table[name]
    size = pick("image_size")
    if size not in (16, 32):
        raise UserError(f"--image-size must be 16 or 32 (the energy layouts digits16 and digits), got {size}")
    for name in ("nvae_steps", "vaebm_steps", "samples"):
        if pick(name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {pick(name)}")
    if args.sample_steps is not None and args.sample_steps < 0:
        raise UserError(f"--sample-steps must be >= 0, got {args.sample_steps}")
    if args.bn_passes < 1:
        raise UserError(f"--bn-passes must be >= 1, got {args.bn_passes}")
    common = [f"train.seed={args.seed}"] + ([f"data.cache_dir={args.data_cache}"] if args.data_cache else [])
    nvae = [*common, f"train.max_steps={pick('nvae_steps')}"]
    vaebm = [*common, f"train.max_steps={pick('vaebm_steps')}"]
    if size == 32:  # the 16×16 presets grown back to the bundled digits' 32×32 (the `digits` energy layout)
        nvae += ["data.image_size=32", "model.image_size=32"]
        vaebm += ["data.image_size=32", "energy.layout=digits"]
    return DigitSettings(
        image_size=size, nvae_steps=pick("nvae_steps"), vaebm_steps=pick("vaebm_steps"), samples=pick("samples"),
        sample_steps=args.sample_steps, bn_passes=args.bn_passes, models_dir=args.models_dir or report.work_dir("models"),
        nvae_overrides=nvae + list(args.nvae_set), vaebm_overrides=vaebm + list(args.vaebm_set))


def train_models(settings: DigitSettings, preset: str, report) -> tuple[Path, Path]:
    """(NVAE run, VAEBM run) of the nvae/<preset> and vaebm/<preset> presets, trained or found finished."""
    from trainer.evaluation.train_models import train_nvae_run, train_vaebm_run

    nvae_run = train_nvae_run(preset, settings.nvae_overrides, settings.models_dir, log=report.log)
    vaebm_run = train_vaebm_run(preset, nvae_run, settings.vaebm_overrides, settings.models_dir, log=report.log)
    return nvae_run, vaebm_run


def classifier(settings: DigitSettings, seed: int, report):
    """The digit classifier at the experiment's image size (cached in the models folder)."""
    from trainer.evaluation.digit_classifier import load_or_train_classifier

    return load_or_train_classifier(settings.image_size, seed, settings.models_dir, log=report.log)


def draw_samples(sampler, settings: DigitSettings, seed: int, report) -> tuple[torch.Tensor, torch.Tensor]:
    """(NVAE samples, VAEBM samples), uint8 [samples, 3, S, S] each, from one VAEBM bundle.

    Sample i of both starts from the same noise (seed, i): the NVAE one is the VAE's decoder mean
    (steps = 0, BN statistics readjusted at temperature 1 as NVAE samples), the VAEBM one the decoder
    mean after the Langevin chain. Grids of the first 64 of each go to the report.
    """
    n = settings.samples
    report.log(f"sampling {n} NVAE images")
    vae_images = sampler.sample(n, steps=0, seed=seed)
    steps = sampler.defaults["steps"] if settings.sample_steps is None else settings.sample_steps
    report.log(f"sampling {n} VAEBM images ({steps} Langevin steps each)")
    vaebm_images = sampler.sample(n, steps=steps, seed=seed)
    report.image("samples/nvae", vae_images[:64], value_range=(0, 255))
    report.image("samples/vaebm", vaebm_images[:64], value_range=(0, 255))
    return vae_images, vaebm_images
