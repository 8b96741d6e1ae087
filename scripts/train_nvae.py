"""Train an NVAE.  accelerate launch scripts/train_nvae.py --config digits --run-dir runs/nvae [key=value ...]

Re-running the same command resumes from the newest complete checkpoint in --run-dir.
"""
from pathlib import Path

from trainer.errors import run_cli


def main() -> None:
    from trainer.cli import parse_training_args, print_config, training_config, training_parser

    args = parse_training_args(training_parser(__doc__.splitlines()[0], "nvae"))
    cfg = training_config("nvae", args)
    if args.print_config:
        print_config(cfg)
        return

    from trainer.nvae.loop import train_nvae  # heavy imports only after the config is known to be valid

    train_nvae(cfg, Path(args.run_dir))


if __name__ == "__main__":
    run_cli(main)
