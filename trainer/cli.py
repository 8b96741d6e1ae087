"""Shared command-line plumbing for the training scripts: `--config`, `--run-dir`, `--data`, overrides."""
from __future__ import annotations

import argparse
import dataclasses


def training_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="preset name (e.g. digits, celebahq256) or a YAML file")
    parser.add_argument("--run-dir", required=True, help="run directory; re-running the command resumes it")
    parser.add_argument("--data", default=None, help="shard directory, URL prefix, or brace pattern / pipe: command "
                        "with data.index=... (sets data.shards; README \"Data\")")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")
    return parser


def architecture_dict(name: str) -> dict:
    """Expand `model: <name>` in a preset into the registered NVAE architecture."""
    from models.nvae.config import ARCHITECTURES
    from trainer.errors import UserError

    if name not in ARCHITECTURES:
        raise UserError(f"unknown model architecture '{name}' (known: {', '.join(sorted(ARCHITECTURES))})")
    return dataclasses.asdict(ARCHITECTURES[name])
