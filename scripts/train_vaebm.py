"""Train a VAEBM energy network on a frozen NVAE.

    accelerate launch scripts/train_vaebm.py --config digits --vae runs/nvae --run-dir runs/vaebm [key=value ...]

Re-running the same command resumes, against the VAE checkpoint the run pinned at its first start; a resume
against another VAE needs --vae-changed-ok. A run that diverged is not resumed into; roll it back with
--resume-from RUN/checkpoints/step-NNNNNNN and changed settings.
Exit codes: 0 finished or stopped cleanly, 2 bad input, 3 diverged (README, "Exit codes").
"""
from pathlib import Path

from trainer.cli import run_cli


def main() -> None:
    """Parse the command line and config, then train (or resume) an energy run; --print-config only prints."""
    from trainer.cli import parse_training_args, print_config, training_config, training_parser

    parser = training_parser(__doc__.splitlines()[0], "vaebm")
    parser.add_argument("--vae", default=None, help="NVAE run directory or checkpoint (sets vae.path)")
    parser.add_argument("--resume-from", default=None, type=Path, help="a checkpoint of this run to roll back to")
    parser.add_argument("--vae-changed-ok", action="store_true",
                        help="resume against the VAE --vae names now, not the one this run pinned at its first start")
    args = parse_training_args(parser)
    cfg = training_config("vaebm", args, [f"vae.path={args.vae}"] if args.vae else [])
    if args.print_config:
        print_config(cfg)
        return

    from trainer.ebm.loop import train_vaebm  # heavy imports only after the config is known to be valid

    train_vaebm(cfg, Path(args.run_dir), resume_from=args.resume_from, vae_changed_ok=args.vae_changed_ok)


if __name__ == "__main__":
    run_cli(main)
