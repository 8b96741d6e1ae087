"""The whole pipeline on bundled digits: NVAE pretraining, VAEBM training, samples before/after Langevin.

    python scripts/quickstart.py [--out runs/quickstart] [--nvae-steps N] [--vaebm-steps N]

Runs in one process on whatever device is present. Re-running resumes each stage (finished stages are
not repeated) and rewrites the grid: `OUT/samples_before_after_langevin.png`, VAE samples in the top
row and the same chains after Langevin below.
"""
import argparse
from pathlib import Path

from trainer.errors import UserError, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", type=Path)
    parser.add_argument("--nvae-steps", type=int, default=None, help="default: the nvae/digits preset's")
    parser.add_argument("--vaebm-steps", type=int, default=None, help="default: the vaebm/digits preset's")
    args = parser.parse_args()

    import torch

    from trainer.cli import architecture_dict
    from trainer.config import load_config
    from trainer.energy_adapters import VAEBMEnergy
    from trainer.images import make_grid, save_png, to_uint8
    from trainer.nvae_loop import train_nvae
    from trainer.sections import NVAETrainingConfig
    from trainer.vaebm_loop import before_after_langevin, load_trained_energy, train_vaebm
    from trainer.vaebm_sections import VAEBMTrainingConfig
    from trainer.vae_source import load_frozen_vae

    nvae_dir, vaebm_dir = args.out / "nvae", args.out / "vaebm"
    steps = lambda n: [f"train.max_steps={n}"] if n else []
    nvae_cfg = load_config(NVAETrainingConfig, "nvae", "digits", steps(args.nvae_steps), expand={"model": architecture_dict})
    train_nvae(nvae_cfg, nvae_dir)
    vaebm_cfg = load_config(VAEBMTrainingConfig, "vaebm", "digits", [f"vae.path={nvae_dir}", *steps(args.vaebm_steps)])
    if train_vaebm(vaebm_cfg, vaebm_dir) is None:
        raise UserError(f"VAEBM training diverged (see {vaebm_dir}/log.txt); re-run with a new --out or "
                        f"resume it with scripts/train_vaebm.py --resume-from and changed settings")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae, _ = load_frozen_vae(nvae_dir, "ema", device)
    energy = load_trained_energy(vaebm_dir, device)
    before, after = before_after_langevin(VAEBMEnergy(vae, energy), 16, vaebm_cfg.langevin.sample_steps,
                                          vaebm_cfg.langevin.step_size, seed=0, device=device)
    out = args.out / "samples_before_after_langevin.png"
    save_png(make_grid(to_uint8(torch.cat([before, after])), ncol=16), out)
    print(f"wrote {out} (top: NVAE samples; bottom: the same chains after "
          f"{vaebm_cfg.langevin.sample_steps} Langevin steps)")


if __name__ == "__main__":
    run_cli(main)
