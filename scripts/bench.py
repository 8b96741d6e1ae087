"""Benchmarks; each prints one JSON line.

    python scripts/bench.py nvae --config nvae-bench-small --batch-size 8 [--steps N]
    python scripts/bench.py nvae --config celebahq256 --batch-size 1 --compare-checkpointing
    python scripts/bench.py data --shards OUT [--size S]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trainer.errors import UserError, run_cli


def nvae_config(name: str):
    from trainer.cli import architecture_dict
    from trainer.config import load_config
    from trainer.sections import NVAETrainingConfig

    overrides = ["data.shards=unused"]
    return load_config(NVAETrainingConfig, "nvae", name, overrides, expand={"model": architecture_dict}).model


def bench_nvae_command(args) -> dict:
    if args.compare_checkpointing:
        # Peak memory is a per-process high-water mark: measure each setting in its own process.
        results = {}
        for flag in ("off", "on"):
            command = [sys.executable, __file__, "nvae", "--config", args.config, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--checkpointing", flag]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[flag] = json.loads(output.strip().splitlines()[-1])
        on, off = results["on"], results["off"]
        return {"config": args.config, "batch_size": args.batch_size, "resolution": off["resolution"],
                "params_m": off["params_m"],
                "peak_mem_mb_per_image": off["peak_mem_mb"] / args.batch_size,
                "peak_mem_mb_per_image_checkpointing": on["peak_mem_mb"] / args.batch_size,
                "img_per_s": off["img_per_s"], "img_per_s_checkpointing": on["img_per_s"],
                "memory_ratio": on["peak_mem_mb"] / off["peak_mem_mb"]}
    from trainer.benchmark_nvae import bench_nvae

    config = nvae_config(args.config)
    checkpointing = None if args.checkpointing is None else args.checkpointing == "on"
    result = bench_nvae(config, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        gradient_checkpointing=checkpointing)
    return {"config": args.config, **result}


def bench_data_command(args) -> dict:
    from data.benchmark import bench_data

    if not (Path(args.shards) / "index.json").is_file():
        raise UserError(f"--shards '{args.shards}' has no index.json")
    return bench_data(Path(args.shards), args.size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmarks (JSON on stdout).")
    sub = parser.add_subparsers(dest="command", required=True)
    nvae = sub.add_parser("nvae", help="one NVAE training step (forward, loss, backward, Adamax)")
    nvae.add_argument("--config", default="nvae-bench-small")
    nvae.add_argument("--batch-size", type=int, default=8)
    nvae.add_argument("--steps", type=int, default=10)
    nvae.add_argument("--warmup", type=int, default=2)
    nvae.add_argument("--checkpointing", choices=("on", "off"), default=None)
    nvae.add_argument("--compare-checkpointing", action="store_true",
                      help="run with and without gradient checkpointing, each in its own process")
    data = sub.add_parser("data", help="training stream vs a bare tar+decode loop over the same shards")
    data.add_argument("--shards", required=True)
    data.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    handlers = {"nvae": bench_nvae_command, "data": bench_data_command}
    print(json.dumps(handlers[args.command](args)))


if __name__ == "__main__":
    run_cli(main)
