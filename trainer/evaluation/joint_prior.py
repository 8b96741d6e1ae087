"""joint-prior: the joint latent EBM prior (Cui, Wu & Han 2023) against its base VAE, on digits and stacked digits.

    python scripts/evaluate.py joint-prior [--quick] --out joint.json [--run-dir runs/eval/joint-prior]

Per seed (full mode: 3 seeds, --seed, --seed+1, --seed+2; quick: 1), each part trains a base VAE from scratch with
the NVAE trainer, then energy priors on it, frozen (two-stage, the paper's default), with the one EBM loop
(`method: joint-prior`: E(z) = −Σ_l f_l(z_l) − f_joint(z) on the latents, positives z ~ q(z|x), negatives by
Langevin in ε_z; presets: 20 Langevin steps in training, as the paper; 20 at sampling on digits, 40 on stacked
digits and the HVAE). A joint-prior sample is a Langevin chain in ε_z under E(T_z(ε_z)) + ½‖ε_z‖², then the
decoder mean; the base sample is the decoder mean of the chain's starting noise (every model of a seed draws from
the same noise).

BN statistics (README, "BN statistics of an energy"): the energy trains on the NVAE with its generative-path BN
statistics readjusted at t = 1 (`vae.bn_temperature: auto`; `--bn-passes` passes), and every base below is
decoded with the statistics its energy used (`bn_statistics` says which), so base and joint prior differ only
by the energy. `*_train_bn` keys are a reference, the NVAE with the statistics as trained: the energy's base only
when it ran with `vae.bn_temperature=null` (`--joint-set vae.bn_temperature=null`).

digits   NVAE (nvae/digits16, `digits-train`, 16×16) + vaebm/joint-prior-digits16. Digit-feature Fréchet
         distance to the 359 held-out `digits-test` digits, as `fd-digits` (lower is better): `base_fd`,
         `base_fd_train_bn`, `joint_fd` (the preset's energy and sampling steps), and the paper's Langevin-steps
         ablation `joint_fd_steps_K` for K = 10, 20, 40. `--ablation train` (default) trains one energy per K
         with K steps and samples it with K steps (the paper's protocol; K = the preset's 20 reuses its energy);
         `--ablation sample` samples the preset's energy with K steps (one training instead of three).
stacked  NVAE (nvae/stacked-digits: an independent digit per RGB channel, 1,000 modes) +
         vaebm/joint-prior-stacked-digits. Modes hit and KL(sample modes ‖ uniform), as `modes`:
         `base_modes`, `base_kl`, `base_modes_train_bn`, `base_kl_train_bn`, `joint_modes`, `joint_kl`;
         `data_modes`, `data_kl`: as many images of the dataset itself.
hvae     the VampPrior paper's two-level HVAE with the standard prior (nvae/vamp-digits with
         model.prior=standard: gated MLPs, binarized 8×8 grey digits) + vaebm/joint-prior-hvae-digits.
         `hvae_base_fd`, `hvae_joint_fd`, `hvae_joint_fd_steps_K` (always trained per K: Langevin through
         MLPs is cheap), with an 8×8 digit classifier, on binary images: the decoder's samples (each chain's
         ε_x, which Langevin leaves alone, binarizes the final Bernoulli means) against the held-out digits
         binarized once with a fixed seed. The HVAE has no BN and models grey images: no stacked-digits part.

`train_fd` / `hvae_train_fd` are the training digits' own distance to the held-out ones (what a model that
reproduced its training set would score). The digit classifiers and the binarized held-out digits are the same
for every seed (seed --seed), so the seeds differ only in the models. Energy training of the preset's energy
(`trainer/evaluation/train_models.energy_gap_summary`): `*_energy_gap` (mean E(negatives) − mean E(positives),
last logged step), `*_energy_gap_tail_mean`, `*_energy_gap_tail_slope` (per 100 iterations, over the last 20%)
and `*_energy_gap_settled` (1 when the fitted change over that window is below the gaps' spread; the share of
seeds in the summary); each seed's curve is in `per_seed`.

The JSON holds the means over seeds with `<key>_seed_stderr` (standard error across seeds) when there are several,
and `per_seed`, each seed's full results. With --run-dir (or --models-dir), re-running reuses the trained models.
"""
from __future__ import annotations

import argparse
import math
import resource
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError

PARTS = ("digits", "stacked", "hvae")
ABLATIONS = ("train", "sample")
HVAE_PRESET = "vamp-digits"
HVAE_OVERRIDES = ["model.levels=2", "model.prior=standard"]  # the paper's two-level HVAE, standard prior


@dataclass
class Settings:
    """The resolved settings of one run (a QUICK or FULL table, overridden by flags)."""

    digits_nvae_steps: int    # NVAE training steps on digits-train
    stacked_nvae_steps: int   # NVAE training steps on stacked-digits
    joint_steps: int          # energy training iterations of every NVAE joint prior
    hvae_steps: int           # HVAE training steps
    hvae_joint_steps: int     # energy training iterations of every HVAE joint prior
    samples: int              # digits: samples per model for the Fréchet distances
    mode_samples: int         # stacked digits: samples per model for the mode counts
    bn_passes: int            # BN readjustment passes at t = 1 (the energies' vae.bn_passes, and the references)
    ablation: str             # train | sample (see the module docstring)
    seeds: int                # seeds --seed, --seed+1, ... (each trains its own models)


# Quick: one seed, the paper's ablation protocol (one energy per K), short trainings.
QUICK = Settings(digits_nvae_steps=400, stacked_nvae_steps=400, joint_steps=50, hvae_steps=1000,
                 hvae_joint_steps=100, samples=300, mode_samples=800, bn_passes=100, ablation="train", seeds=1)
# Full: the NVAE step counts of fd-digits and modes (FULL), so a shared --models-dir shares those NVAEs; energies
# trained until their gap settles (see energy_gap_settled in the JSON); 3 seeds.
FULL = Settings(digits_nvae_steps=3000, stacked_nvae_steps=4000, joint_steps=600, hvae_steps=3000,
                hvae_joint_steps=600, samples=2000, mode_samples=5000, bn_passes=500, ablation="train", seeds=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options: parts, ablation steps, and model settings and overrides."""
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--ablation-steps", default="10,20,40", help="Langevin steps K of the ablation")
    group = parser.add_argument_group("models (advanced: the defaults are the --quick or full settings)")
    group.add_argument("--models-dir", type=Path, default=None,
                       help="trained runs and digit classifiers (default: RUN_DIR/models); shared with other experiments")
    group.add_argument("--data-cache", type=Path, default=None, help="where bundled datasets are materialized")
    group.add_argument("--nvae-steps", type=int, default=None, help="NVAE training steps (digits and stacked digits)")
    for item in fields(Settings):
        if item.name not in ("digits_nvae_steps", "stacked_nvae_steps"):
            group.add_argument("--" + item.name.replace("_", "-"), default=None,
                               type=str if item.name == "ablation" else int,
                               help=f"default: {getattr(QUICK, item.name)} quick, {getattr(FULL, item.name)} full")
    for name, what in (("nvae", "both NVAEs"), ("joint", "every NVAE joint prior"), ("hvae", "the HVAE"),
                       ("hvae-joint", "every HVAE joint prior")):
        group.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE",
                           help=f"an extra dotted override of {what} (repeatable)")


def resolve(args: argparse.Namespace) -> tuple[Settings, list[str], list[int]]:
    """(settings, parts, ablation steps) from the flags over the QUICK/FULL table."""
    chosen = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    if args.nvae_steps is not None:
        chosen.update(digits_nvae_steps=args.nvae_steps, stacked_nvae_steps=args.nvae_steps)
    settings = replace(QUICK if args.quick else FULL, **chosen)
    for item in fields(Settings):
        value = getattr(settings, item.name)
        if item.name != "ablation" and value < 1:
            raise UserError(f"--{item.name.replace('_', '-')} must be >= 1, got {value}")
    if settings.ablation not in ABLATIONS:
        raise UserError(f"--ablation must be one of {', '.join(ABLATIONS)}, got '{settings.ablation}'")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise UserError(f"--parts must be a comma-separated subset of {', '.join(PARTS)}, got '{args.parts}'")
    try:
        steps = [int(k) for k in args.ablation_steps.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--ablation-steps must be comma-separated integers, got '{args.ablation_steps}'") from None
    if any(k < 1 for k in steps):
        raise UserError(f"--ablation-steps must be >= 1, got '{args.ablation_steps}'")
    return settings, parts, steps


# ------------------------------------------------------------------------------------------------
# Pieces shared by the parts.


class Context:
    """What every part of one seed needs: settings, flags, the seed, the report and the models folder."""

    def __init__(self, args: argparse.Namespace, settings: Settings, report, seed: int):
        self.args, self.settings, self.report, self.seed = args, settings, report, seed
        self.models_dir = args.models_dir or report.work_dir("models")
        self.common = [f"train.seed={seed}"] + ([f"data.cache_dir={args.data_cache}"] if args.data_cache else [])

    def train_vae(self, preset: str, steps: int, extra: list[str]) -> Path:
        """Train (or reuse) a base VAE run of `preset` for `steps` steps; returns its run directory."""
        from trainer.evaluation.train_models import train_nvae_run

        return train_nvae_run(preset, [*self.common, f"train.max_steps={steps}", *extra], self.models_dir,
                              log=self.report.log)

    def train_joint(self, preset: str, vae_run: Path, steps: int, langevin_steps: int | None, extra: list[str]) -> Path:
        """A joint prior on the frozen VAE `vae_run`; `langevin_steps` sets training AND sampling K (None: the
        preset's). Its BN statistics are readjusted with --bn-passes passes (vae.bn_passes)."""
        from trainer.evaluation.train_models import train_vaebm_run

        chains = [] if langevin_steps is None else [f"langevin.steps={langevin_steps}",
                                                    f"langevin.sample_steps={langevin_steps}"]
        overrides = [*self.common, f"train.max_steps={steps}", f"vae.bn_passes={self.settings.bn_passes}", *extra,
                     *chains]
        return train_vaebm_run(preset, vae_run, overrides, self.models_dir, log=self.report.log)

    def classifier(self, size: int):
        """The judge: the same digit classifier for every seed (seed --seed)."""
        from trainer.evaluation.digit_classifier import load_or_train_classifier

        return load_or_train_classifier(size, self.args.seed, self.models_dir, log=self.report.log)

    def samples(self, sampler, n: int, steps: int, tag: str, binary: bool = False) -> torch.Tensor:
        """n images (uint8 [n, 3, S, S]) of chains seeded with this seed after `steps` Langevin steps; a grid to
        the report (first seed only).

        The decoder means, or with `binary` the decoder's samples (a Bernoulli decoder's binary images,
        drawn with the chain's own ε_x, which Langevin does not move).
        """
        from models.sampler import to_uint8

        started = time.perf_counter()
        if binary:
            chunks = [sampler.sample_indices(range(start, min(n, start + 64)), self.seed, steps=steps).sample
                      for start in range(0, n, 64)]
            images = to_uint8(torch.cat(chunks))
        else:
            images = sampler.sample(n, steps=steps, seed=self.seed)
        self.report.log(f"seed {self.seed} {tag}: {n} samples, {steps} Langevin steps "
                        f"({time.perf_counter() - started:.0f} s)")
        if self.seed == self.args.seed:
            self.report.image(f"samples/{tag}", images[:64], value_range=(0, 255))
        return images

    def bundle(self, run: Path):
        """The bundle sampler of a run, with the BN statistics its energy trained with (an NVAE run: as trained).

        No extra temperature is readjusted: an energy trained on statistics readjusted at t carries them as the
        bundle's original ones and as its cached ones for t, so the same chains at 0 steps (the base) and after
        Langevin (the joint prior) are decoded with the same statistics."""
        from trainer.evaluation.train_models import sampler_for

        return sampler_for(run, temperatures=(), log=self.report.log)


def as_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] → uint8 [N, 3, S, S]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def training_diagnostics(run_dir: Path, prefix: str) -> dict:
    """The energy gap of a run's training (`energy_gap_summary`) and the BN statistics it trained with."""
    from trainer.evaluation.train_models import energy_gap_summary, trained_bn_statistics

    results = {f"{prefix}{key}": value for key, value in energy_gap_summary(run_dir).items()}
    results[f"{prefix}bn_statistics"] = trained_bn_statistics(run_dir)
    return results


# ------------------------------------------------------------------------------------------------
# The parts.


def digit_sets(size: int, binary: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out digits-test, digits-train) as uint8 [N, 3, S, S]; with `binary` each pixel binarized once,
    b ~ Bernoulli(grey/255) with a fixed seed (what a Bernoulli VAE is trained to generate)."""
    from data.bundled import load_digits_split
    from models.sampler import to_uint8

    sets = []
    for offset, split in enumerate(("test", "train")):
        images = as_nchw(load_digits_split(split, size)[0])
        if binary:
            generator = torch.Generator().manual_seed(seed + offset)
            images = to_uint8(torch.bernoulli(images.float() / 255.0, generator=generator)[:, :1].expand_as(images) * 2 - 1)
        sets.append(images)
    return sets[0], sets[1]


def fd_part(ctx: Context, *, prefix: str, size: int, vae_run: Path, joint_runs: dict[int, Path], main_steps: int,
            ablation: str, steps: list[int], train_bn: bool, binary: bool) -> dict:
    """Fréchet distances of the base VAE and its joint priors to the held-out digits (keys prefixed `prefix`).

    joint_runs: training K → run (ablation train: one per K; sample: only the preset's); main_steps: the preset's
    training K. `joint_fd` is the preset's energy at its sampling steps; `joint_fd_steps_K` the energy trained
    with K steps sampled with K (ablation sample: the preset's energy sampled with K). The base samples are
    the K = 0 chains of the preset's bundle; `train_bn`: also the NVAE with its trained statistics (reference).
    """
    from trainer.metrics.frechet import frechet_distance

    judge = ctx.classifier(size)
    held_out, training = digit_sets(size, binary, ctx.args.seed)
    if ctx.seed == ctx.args.seed:
        ctx.report.image(f"{prefix}held_out", held_out[:64], value_range=(0, 255))
    reference = judge.features(held_out)
    fd = lambda images: frechet_distance(reference, judge.features(images))
    draw = lambda sampler, k, tag: ctx.samples(sampler, ctx.settings.samples, k, tag, binary=binary)
    main = ctx.bundle(joint_runs[main_steps])
    sample_steps = int(main.defaults["steps"])
    results = {f"{prefix}base_fd": fd(draw(main, 0, f"{prefix}base")), f"{prefix}train_fd": fd(training),
               f"{prefix}classifier_acc": judge.accuracy,
               f"{prefix}joint_fd": fd(draw(main, sample_steps, f"{prefix}joint"))}
    if train_bn:  # the same noise decoded by the NVAE with its trained statistics (its own bundle, none readjusted)
        results[f"{prefix}base_fd_train_bn"] = fd(draw(ctx.bundle(vae_run), 0, f"{prefix}base_train_bn"))
    for k in steps:
        sampler = ctx.bundle(joint_runs[k]) if ablation == "train" else main
        results[f"{prefix}joint_fd_steps_{k}"] = fd(draw(sampler, k, f"{prefix}joint_steps_{k}"))
    results.update(training_diagnostics(joint_runs[main_steps], f"{prefix}joint_"))
    results.update({f"{prefix}samples": ctx.settings.samples, f"{prefix}reference_count": len(held_out),
                    f"{prefix}train_steps": main_steps, f"{prefix}sample_steps": sample_steps,
                    f"{prefix}ablation": ablation, f"{prefix}images": "binary samples" if binary else "decoder means"})
    return results


def joint_runs_for(ctx: Context, preset: str, vae_run: Path, train_steps: int, ablation: str, steps: list[int],
                   extra: list[str]) -> tuple[dict[int, Path], int]:
    """({training K: run}, K of the preset): the preset's energy, plus one per ablation K when `ablation` is train
    (the preset's own K is its energy: trained once)."""
    from trainer.evaluation.train_models import vaebm_config

    main_steps = vaebm_config(preset, vae_run, extra).langevin.steps
    runs = {main_steps: ctx.train_joint(preset, vae_run, train_steps, None, extra)}
    if ablation == "train":
        for k in steps:
            if k not in runs:
                runs[k] = ctx.train_joint(preset, vae_run, train_steps, k, extra)
    return runs, main_steps


def digits_part(ctx: Context, steps: list[int]) -> dict:
    """The digits part: base NVAE vs joint prior on 16×16 digits, Fréchet distances and the steps ablation."""
    s, args = ctx.settings, ctx.args
    vae_run = ctx.train_vae("digits16", s.digits_nvae_steps, list(args.nvae_set))
    runs, main_steps = joint_runs_for(ctx, "joint-prior-digits16", vae_run, s.joint_steps, s.ablation, steps,
                                      list(args.joint_set))
    results = fd_part(ctx, prefix="", size=16, vae_run=vae_run, joint_runs=runs, main_steps=main_steps,
                      ablation=s.ablation, steps=steps, train_bn=True, binary=False)
    return {**results, "nvae_steps": s.digits_nvae_steps, "joint_steps": s.joint_steps}


def stacked_part(ctx: Context) -> dict:
    """The stacked-digits part: modes hit and KL to uniform for data, base NVAE and joint prior."""
    from data.bundled import load_stacked_digits
    from trainer.evaluation.modes import NUM_MODES, classify_channels, mode_statistics, stacked_labels

    s, args = ctx.settings, ctx.args
    judge = ctx.classifier(16)
    images, _ = load_stacked_digits(16)
    data = as_nchw(images[:s.mode_samples])
    data_modes, data_kl = mode_statistics(stacked_labels(classify_channels(judge, data)))
    vae_run = ctx.train_vae("stacked-digits", s.stacked_nvae_steps, list(args.nvae_set))
    run = ctx.train_joint("joint-prior-stacked-digits", vae_run, s.joint_steps, None, list(args.joint_set))
    sampler = ctx.bundle(run)  # base and joint prior with the energy's statistics, as in fd_part
    k = int(sampler.defaults["steps"])
    results = {"data_modes": data_modes, "data_kl": data_kl, "mode_samples": len(data), "kl_max": math.log(NUM_MODES),
               "stacked_nvae_steps": s.stacked_nvae_steps, "stacked_sample_steps": k}
    for model, suffix, source, n_steps in (("base", "", sampler, 0), ("base", "_train_bn", ctx.bundle(vae_run), 0),
                                           ("joint", "", sampler, k)):
        samples = ctx.samples(source, s.mode_samples, n_steps, f"stacked_{model}{suffix}")
        modes, kl = mode_statistics(stacked_labels(classify_channels(judge, samples)))
        results.update({f"{model}_modes{suffix}": modes, f"{model}_kl{suffix}": kl})
    results.update(training_diagnostics(run, "stacked_joint_"))
    return results


def hvae_part(ctx: Context, steps: list[int]) -> dict:
    """The HVAE part: base two-level HVAE vs joint prior on binarized 8×8 digits, Fréchet distances."""
    s, args = ctx.settings, ctx.args
    vae_run = ctx.train_vae(HVAE_PRESET, s.hvae_steps, [*HVAE_OVERRIDES, *args.hvae_set])
    runs, main_steps = joint_runs_for(ctx, "joint-prior-hvae-digits", vae_run, s.hvae_joint_steps, "train", steps,
                                      list(args.hvae_joint_set))
    results = fd_part(ctx, prefix="hvae_", size=8, vae_run=vae_run, joint_runs=runs, main_steps=main_steps,
                      ablation="train", steps=steps, train_bn=False, binary=True)
    return {**results, "hvae_steps": s.hvae_steps, "hvae_joint_steps": s.hvae_joint_steps}


# ------------------------------------------------------------------------------------------------
# Seeds.


def evaluate_seed(seed: int, args: argparse.Namespace, settings: Settings, parts: list[str], steps: list[int],
                  report) -> dict:
    """Every requested part with the models of one seed."""
    ctx = Context(args, settings, report, seed)
    results: dict = {"seed": seed}
    for part in parts:
        started = time.perf_counter()
        if part == "digits":
            results.update(digits_part(ctx, steps))
        elif part == "stacked":
            results.update(stacked_part(ctx))
        else:
            results.update(hvae_part(ctx, steps))
        results[f"{part}_seconds"] = round(time.perf_counter() - started, 1)
    if "digits" in parts:
        results["joint_fd_gain"] = results["base_fd"] - results["joint_fd"]  # > 0: the joint prior is better
    if "hvae" in parts:
        results["hvae_joint_fd_gain"] = results["hvae_base_fd"] - results["hvae_joint_fd"]
    return results


def summary_keys(steps: list[int]) -> list[str]:
    """The per-seed numbers the summary averages (each with its standard error across seeds)."""
    gap = ["energy_gap", "energy_gap_tail_mean", "energy_gap_tail_slope", "energy_gap_settled"]
    fds = ["base_fd", "joint_fd", "joint_fd_gain", "train_fd", *[f"joint_fd_steps_{k}" for k in steps]]
    return [*fds, "base_fd_train_bn", *[f"joint_{key}" for key in gap],
            "base_modes", "base_kl", "base_modes_train_bn", "base_kl_train_bn", "joint_modes", "joint_kl",
            "data_modes", "data_kl", *[f"stacked_joint_{key}" for key in gap],
            *[f"hvae_{key}" for key in fds], *[f"hvae_joint_{key}" for key in gap]]


def run(args: argparse.Namespace, report) -> dict:
    """Run the chosen parts for every seed; returns the per-seed results and their summary."""
    from trainer.evaluation.toy_metrics import summarize_seeds

    settings, parts, steps = resolve(args)
    report.log(f"parts {', '.join(parts)}; settings {settings}")
    seeds = [args.seed + k for k in range(settings.seeds)]
    per_seed = [evaluate_seed(seed, args, settings, parts, steps, report) for seed in seeds]
    results = summarize_seeds(per_seed, summary_keys(steps))
    first = per_seed[0]
    # Settings and descriptions: the same for every seed (taken from the first).
    results.update({key: value for key, value in first.items()
                    if key not in results and key != "seed" and not key.endswith(("_curve", "_seconds"))})
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results["cpu_seconds"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)  # data workers included
    results.update(seeds=seeds, ablation_steps=steps, quick=bool(args.quick), per_seed=per_seed)
    for part in parts:
        results[f"{part}_seconds"] = round(sum(row[f"{part}_seconds"] for row in per_seed), 1)
    if "digits" in parts:
        report.log(f"{len(seeds)} seed(s): FD base {results['base_fd']:.1f} -> joint {results['joint_fd']:.1f} "
                   f"(same BN statistics: {first['joint_bn_statistics']}); steps "
                   + ", ".join(f"{k}: {results[f'joint_fd_steps_{k}']:.1f}" for k in steps))
    return results
