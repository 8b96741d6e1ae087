"""The whole pipeline on bundled digits: NVAE pretraining, VAEBM training, samples before/after Langevin.

    python scripts/quickstart.py [--out runs/quickstart] [--nvae-steps N] [--vaebm-steps N]

Runs in one process on whatever device is present. Re-running resumes each stage (finished stages are
not repeated) and rewrites the grid: `OUT/samples_before_after_langevin.png`, VAE samples in the top
row and the same chains after Langevin below.
"""
import argparse
from pathlib import Path

from trainer.errors import TrainingDiverged, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", type=Path)
    parser.add_argument("--nvae-steps", type=int, default=None, help="default: the nvae/digits preset's")
    parser.add_argument("--vaebm-steps", type=int, default=None, help="default: the vaebm/digits preset's")
    args = parser.parse_args()

    import torch

    from models.adapters import VAEBMEnergy
    from models.langevin import seeded_chains
    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict
    from trainer.ebm.loop import train_vaebm
    from trainer.ebm.sources import load_frozen_vae, load_trained_energy
    from trainer.nvae.loop import train_nvae
    from trainer.run.images import make_grid, save_png, to_uint8

    nvae_dir, vaebm_dir = args.out / "nvae", args.out / "vaebm"
    steps = lambda n: [f"train.max_steps={n}"] if n else []
    nvae_cfg = load_config(NVAETrainingConfig, "nvae", "digits", steps(args.nvae_steps), expand={"model": architecture_dict})
    train_nvae(nvae_cfg, nvae_dir)
    vaebm_cfg = load_config(VAEBMTrainingConfig, "vaebm", "digits", [f"vae.path={nvae_dir}", *steps(args.vaebm_steps)])
    try:
        train_vaebm(vaebm_cfg, vaebm_dir)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"VAEBM training diverged ({err}); re-run with a new --out or resume it with "
                               f"scripts/train_vaebm.py --resume-from and changed settings") from None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae, _ = load_frozen_vae(nvae_dir, "ema", device)
    energy = load_trained_energy(vaebm_dir, device)
    adapter = VAEBMEnergy(vae, energy)
    initial, final = seeded_chains(adapter, 0, 16, seed=0, steps=vaebm_cfg.langevin.sample_steps,
                                   step_size=vaebm_cfg.langevin.step_size, device=device)
    with torch.no_grad():
        before, after = adapter.images(initial), adapter.images(final)
    out = args.out / "samples_before_after_langevin.png"
    save_png(make_grid(to_uint8(torch.cat([before, after])), ncol=16), out)
    print(f"wrote {out} (top: NVAE samples; bottom: the same chains after "
          f"{vaebm_cfg.langevin.sample_steps} Langevin steps)")


if __name__ == "__main__":
    run_cli(main)
