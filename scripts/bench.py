"""Benchmarks; each prints one JSON line.

    python scripts/bench.py nvae --config nvae-bench-small --batch-size 8 [--steps N]
    python scripts/bench.py nvae --config celebahq256 --batch-size 1 --compare-checkpointing
    python scripts/bench.py data --shards OUT [--size S]
    python scripts/bench.py langevin --config digits [--batch-size B]
    python scripts/bench.py vaebm-step --config digits [--batch-size B]
    python scripts/bench.py sample --bundle BUNDLE [--n N] [--batch-size B] [--steps K]

For `langevin` and `vaebm-step`, --config names a VAEBM preset; the NVAE is the NVAE preset of the
same name (randomly initialized: costs do not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trainer.errors import UserError, run_cli


def nvae_config(name: str):
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict

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
    from trainer.bench.nvae import bench_nvae

    config = nvae_config(args.config)
    checkpointing = None if args.checkpointing is None else args.checkpointing == "on"
    result = bench_nvae(config, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        gradient_checkpointing=checkpointing)
    return {"config": args.config, **result}


def bench_data_command(args) -> dict:
    from trainer.bench.data import bench_data

    if not (Path(args.shards) / "index.json").is_file():
        raise UserError(f"--shards '{args.shards}' has no index.json")
    return bench_data(Path(args.shards), args.size)


def vaebm_parts(name: str, checkpointing: bool, device):
    """A randomly initialized NVAE (the NVAE preset `name`) and the VAEBM preset's energy network;
    `checkpointing` switches gradient checkpointing on in both (NVAE cells, energy ResBlocks)."""
    import torch

    from models.energy import build_energy
    from models.nvae import NVAE
    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config

    cfg = load_config(VAEBMTrainingConfig, "vaebm", name, ["vae.path=unused", "data.shards=unused"])
    cfg.energy.gradient_checkpointing = checkpointing
    model_cfg = nvae_config(name)
    model_cfg.gradient_checkpointing = checkpointing
    torch.manual_seed(0)
    vae = NVAE(model_cfg).to(device).eval().requires_grad_(False)
    energy = build_energy(cfg.energy).to(device)
    energy.initialize_from_data(torch.rand((2, *vae.image_shape), device=device) * 2 - 1)
    return cfg, vae, energy


def bench_langevin_command(args) -> dict:
    import torch

    from trainer.bench.ebm import bench_langevin

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, vae, energy = vaebm_parts(args.config, False, device)
    energy.requires_grad_(False)
    result = bench_langevin(lambda noise: vae.decode(noise[:-1], noise[-1]).x_sample, energy,
                            [*vae.latent_shapes, vae.image_shape], args.batch_size, args.steps,
                            cfg.langevin.step_size, device=device)
    return {"config": args.config, **result}


def bench_vaebm_step_command(args) -> dict:
    import torch

    from trainer.bench.ebm import bench_vaebm_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, vae, energy = vaebm_parts(args.config, args.checkpointing == "on", device)
    result = bench_vaebm_step(vae, energy, cfg, args.batch_size, steps=args.steps)
    return {"config": args.config, **result, "peak_mem_mb_per_image": result["peak_mem_mb"] / args.batch_size}


def bench_sample_command(args) -> dict:
    from trainer.bench.sample import bench_sample

    if not Path(args.bundle).is_dir():
        raise UserError(f"--bundle '{args.bundle}' is not a bundle directory (make one with scripts/export.py)")
    return bench_sample(Path(args.bundle), args.n, args.batch_size, args.steps)


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
    langevin = sub.add_parser("langevin", help="one Langevin step vs generator fwd + energy fwd + backward")
    langevin.add_argument("--config", default="digits")
    langevin.add_argument("--batch-size", type=int, default=16)
    langevin.add_argument("--steps", type=int, default=5)
    step = sub.add_parser("vaebm-step", help="one whole VAEBM training iteration")
    step.add_argument("--config", default="digits")
    step.add_argument("--batch-size", type=int, default=16)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--checkpointing", choices=("on", "off"), default="off")
    sample = sub.add_parser("sample", help="images/s of VAE-only sampling vs VAEBM with K Langevin steps")
    sample.add_argument("--bundle", required=True)
    sample.add_argument("--n", type=int, default=50)
    sample.add_argument("--batch-size", type=int, default=50)
    sample.add_argument("--steps", type=int, default=None, help="default: the bundle's test-time steps")
    args = parser.parse_args()
    handlers = {"sample": bench_sample_command, "nvae": bench_nvae_command, "data": bench_data_command, "langevin": bench_langevin_command,
                "vaebm-step": bench_vaebm_step_command}
    print(json.dumps(handlers[args.command](args)))


if __name__ == "__main__":
    run_cli(main)
