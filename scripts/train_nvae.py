"""Train an NVAE.  accelerate launch scripts/train_nvae.py --config digits --run-dir runs/nvae [key=value ...]

Re-running the same command resumes from the newest checkpoint in --run-dir that verifies. A run that
diverged is not resumed into; roll it back with --resume-from RUN/checkpoints/step-NNNNNNN and changed settings.
Exit codes: 0 finished or stopped cleanly, 2 bad input, 3 diverged (README, "Exit codes").
"""
from pathlib import Path

from trainer.cli import parse_training_args, print_config, run_cli, training_config, training_parser


def main() -> None:
    """Parse the command line and config, then train (or resume) an NVAE run; --print-config only prints."""

    parser = training_parser(__doc__.splitlines()[0], "nvae")
    parser.add_argument("--resume-from", default=None, type=Path, help="a checkpoint of this run to roll back to")
    args = parse_training_args(parser)
    cfg = training_config("nvae", args)
    if args.print_config:
        print_config(cfg)
        return

    from trainer.nvae.loop import train_nvae  # heavy imports only after the config is known to be valid

    train_nvae(cfg, Path(args.run_dir), resume_from=args.resume_from)


if __name__ == "__main__":
    run_cli(main)
