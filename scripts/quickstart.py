"""The whole pipeline on bundled data, in one command, ending with a picture of what VAEBM does.

    python scripts/quickstart.py [--out runs/quickstart]

Four stages, each a real training run of this project's trainers on the CPU or GPU at hand:
  1/4  NVAE (VampPrior top group) on the bundled handwritten digits (scikit-learn's, no download)
  2/4  VAEBM: an energy network trained against the frozen NVAE, negatives by Langevin in its noise space
  3/4  the VAEBM paper's 25-Gaussians (§5.4): an MLP VAE, then an energy on it
  4/4  the picture `OUT/quickstart.png`: digits and their reconstructions; NVAE samples beside the same chains
       after Langevin; 25-Gaussians data, VAE samples and VAEBM samples (the paper's Figure 4). A digit
       classifier measures how many samples are recognizable; `OUT/summary.json` records it.

Re-running resumes (finished stages are not repeated). `touch OUT/<stage>/STOP` stops the stage at its next
step with a checkpoint, and the quick start with it; re-run to continue.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.cli import run_cli  # noqa: E402
from trainer.errors import TrainingDiverged  # noqa: E402

# The four trainings: a preset and the overrides that size it for the quick start. The header of each stage
# prints the equivalent `train_*.py` command, so any stage can be re-run by hand at another length.
# The NVAE has a VampPrior on its top group: with the standard prior, 1,797 digits leave the prior full of holes
# between the training images, and about half the samples are blends of two digits (README, "Quick start").
NVAE_DIGITS = ("vamp-top-digits16", ["data.dataset=digits", "train.max_steps=1000"])
VAEBM_DIGITS = ("digits16", ["data.dataset=digits", "train.max_steps=200"])
TOY_VAE = ("toy2d", ["train.max_steps=4000"])  # the preset's length: 2,500 steps left its samples a uniform square
# 800 of the preset's 3,000 steps, at 2.5x its learning rate: the energy learns the 25 modes late, so the short run
# needs the faster rate to show a correction (measured with the preset's resampled chain starts, seed 0: 400 steps
# at 5e-3 54% of samples within 3 std of a mode, the centre modes inside two square rings; 800 steps at the
# preset's 2e-3 81%, 800 at 5e-3 85%, all 25 modes. Before the resampled starts, 400 steps: 3e-3 41%, 5e-3 54%).
TOY_VAEBM = ("toy2d", ["train.max_steps=800", "optim.lr=5e-3"])
# What the estimate is made of: measured on this project's 2-core CPU with one single-thread job on the other core
# (README, "Quick start").
STAGE_MINUTES = {"nvae": 3.6, "vaebm": 3.3, "toy-vae": 0.5, "toy-vaebm": 2.6, "picture": 0.8}
TEMPERATURE = 0.7          # NVAE samples at t = 0.7 with BN statistics readjusted there (VAEBM App. E)
BN_PASSES = 100            # BN readjustment passes for the picture (export defaults to 500)
COLUMNS = 12               # digits per row of the picture
CONFIDENT = 0.9            # a sample is "recognizable" when the classifier's top probability reaches this


def scaled(overrides: list[str], scale: float) -> list[str]:
    """The overrides with `train.max_steps` multiplied by `scale` (at least 2 steps)."""
    return [f"train.max_steps={max(2, round(int(o.split('=')[1]) * scale))}" if o.startswith("train.max_steps=")
            else o for o in overrides]


def main() -> int:
    """Train NVAE, VAEBM and the 25-Gaussians pair on bundled data, then draw quickstart.png and summary.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", default="runs/quickstart", type=Path, help="where the runs and pictures go")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's training steps and, below 1, the picture's 25-Gaussians points "
                             "(a trial of the pipeline: 0.01)")
    args = parser.parse_args()
    if not 0 < args.scale <= 10:
        parser.error(f"--scale must be in (0, 10], got {args.scale}")
    out = args.out.expanduser().resolve()
    print(f"quick start in {out}: 4 stages, about {sum(STAGE_MINUTES.values()):.0f} minutes on 2 CPU cores "
          f"(much less on a GPU)", file=sys.stderr, flush=True)

    import torch

    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict
    from trainer.ebm.loop import train_vaebm
    from trainer.nvae.loop import train_nvae
    from trainer.run.checkpoint import Checkpoint

    def stage(number: int, name: str, what: str, run_dir: Path, kind: str, recipe, vae_dir: Path | None = None):
        """Run one training stage with a header; stop the quick start if the stage was stopped early."""
        preset, overrides = recipe[0], scaled(recipe[1], args.scale)
        if kind == "nvae":
            cfg = load_config(NVAETrainingConfig, "nvae", preset, overrides, expand={"model": architecture_dict})
            train, vae_flag = train_nvae, ""
        else:
            cfg = load_config(VAEBMTrainingConfig, "vaebm", preset, [*overrides, f"vae.path={vae_dir}"])
            train, vae_flag = train_vaebm, f" --vae {vae_dir}"
        print(f"\n== {number}/4 {what} ({cfg.train.max_steps} steps, about {STAGE_MINUTES[name]:.1f} min) -> {run_dir}\n"
              f"   (the same by hand: python scripts/train_{kind}.py --config {preset}{vae_flag} --run-dir {run_dir} "
              f"{' '.join(overrides)})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            checkpoint = train(cfg, run_dir)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{what}: {err}; re-run with a new --out") from None
        if Checkpoint(checkpoint).step < cfg.train.max_steps:
            print(f"stopped at step {Checkpoint(checkpoint).step} (a STOP file or a stop signal); re-run the same "
                  f"command to continue", file=sys.stderr)
            raise SystemExit(0)
        print(f"   done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    digits_nvae, digits_vaebm = out / "nvae", out / "vaebm"
    toy_vae, toy_vaebm = out / "toy-vae", out / "toy-vaebm"
    stage(1, "nvae", "NVAE on the bundled digits", digits_nvae, "nvae", NVAE_DIGITS)
    stage(2, "vaebm", "VAEBM energy on the frozen NVAE", digits_vaebm, "vaebm", VAEBM_DIGITS, digits_nvae)
    stage(3, "toy-vae", "25-Gaussians: the MLP VAE", toy_vae, "nvae", TOY_VAE)
    stage(3, "toy-vaebm", "25-Gaussians: the VAEBM energy", toy_vaebm, "vaebm", TOY_VAEBM, toy_vae)

    print("\n== 4/4 the picture", file=sys.stderr, flush=True)
    from trainer.evaluation.quickstart import TOY_POINTS, draw_quickstart

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary = draw_quickstart(out, digits_nvae, digits_vaebm, toy_vae, toy_vaebm, device,
                              temperature=TEMPERATURE, bn_passes=BN_PASSES, columns=COLUMNS, confident=CONFIDENT,
                              toy_points=max(2_000, round(TOY_POINTS * min(args.scale, 1.0))))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out / 'quickstart.png'}\n"
          f"  recognizable digits (classifier confidence >= {CONFIDENT}): NVAE samples "
          f"{100 * summary['nvae_recognizable']:.0f}%, the same chains after Langevin "
          f"{100 * summary['langevin_recognizable']:.0f}%\n"
          f"  25-Gaussians samples within 3 std of a mode: VAE {100 * summary['toy_vae_near_mode']:.0f}%, "
          f"VAEBM {100 * summary['toy_vaebm_near_mode']:.0f}%", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
