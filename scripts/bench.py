"""Benchmarks; each prints one JSON line.

    python scripts/bench.py nvae --config nvae-bench-small --batch-size 8 [--steps N] [--mixed-precision bf16]
                                 [--compile [--compile-backend B]]
    python scripts/bench.py nvae --config celebahq256 --batch-size 1 --compare-checkpointing
    python scripts/bench.py cpu-paths --config nvae-bench-small --batch-size 8 [--repeats R] [--steps N]
    python scripts/bench.py data --shards OUT [--size S]
    python scripts/bench.py langevin --config digits [--batch-size B]
    python scripts/bench.py vaebm-step --config digits [--batch-size B]
    python scripts/bench.py sample --bundle BUNDLE [--n N] [--batch-size B] [--steps K]
    python scripts/bench.py contention [--settings off:default,1:PASSIVE,...] [--quickstart] [--out TABLE.md]
    python scripts/bench.py gpu-suite --out DIR [--tiny] [--parts nvae-batch,vaebm,...] [--budget-s 480]

For `langevin` and `vaebm-step`, --config names a VAEBM preset; the NVAE is the NVAE preset of the
same name (randomly initialized: costs do not depend on the weights).

CPU threads: every benchmark but `contention` and `gpu-suite` takes `--threads N` (compute threads;
default: the scripts' setting, `trainer/run/threads.py`) and `--busy` (one competing process spinning on
a core while it runs); the JSON reports threads, OpenMP's wait policy and busy. `contention` runs
`nvae` (and optionally the quick start) under several settings, idle and busy (`trainer/bench/contention.py`).
`gpu-suite` measures everything README awaits from a GPU in one run (`trainer/bench/gpu_suite.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.bench.contention import DEFAULT_SETTINGS, busy_competitor
from trainer.errors import UserError
from trainer.cli import run_cli
from trainer.run.host_memory import malloc_setting
from trainer.run.threads import set_threads


def nvae_config(name: str):
    """The NVAE architecture config of the NVAE preset `name` (no data needed)."""
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict

    overrides = ["data.shards=unused"]
    return load_config(NVAETrainingConfig, "nvae", name, overrides, expand={"model": architecture_dict}).model


def bench_nvae_command(args) -> dict:
    """`bench.py nvae`: time one NVAE training step, or compare peak memory with checkpointing off and on."""
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
    import torch

    from trainer.bench.nvae import bench_nvae

    config = nvae_config(args.config)
    checkpointing = None if args.checkpointing is None else args.checkpointing == "on"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench_nvae(config, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        gradient_checkpointing=checkpointing, device=device, mixed_precision=args.mixed_precision,
                        compile=args.compile, compile_backend=args.compile_backend)
    return {"config": args.config, **result}


def bench_cpu_paths_command(args) -> dict:
    """`bench.py cpu-paths`: the depthwise backward and ELU, PyTorch's against ours, per shape and per step (CPU)."""
    from trainer.bench.cpu_paths import bench_cpu_paths

    return {"config": args.config, **bench_cpu_paths(nvae_config(args.config), args.batch_size,
                                                      repeats=args.repeats, steps=args.steps, warmup=args.warmup)}


def bench_data_command(args) -> dict:
    """`bench.py data`: the training stream vs a bare tar+decode loop over the same shards (needs index.json)."""
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
    """`bench.py langevin`: time Langevin steps of a random VAEBM preset's energy on its NVAE's output."""
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
    """`bench.py vaebm-step`: time one energy iteration of a random VAEBM preset, with peak memory per image."""
    import torch

    from trainer.bench.ebm import bench_vaebm_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, vae, energy = vaebm_parts(args.config, args.checkpointing == "on", device)
    result = bench_vaebm_step(vae, energy, cfg, args.batch_size, steps=args.steps)
    return {"config": args.config, **result, "peak_mem_mb_per_image": result["peak_mem_mb"] / args.batch_size}


def bench_sample_command(args) -> dict:
    """`bench.py sample`: time sampling from an exported bundle."""
    from trainer.bench.sample import bench_sample

    if not Path(args.bundle).is_dir():
        raise UserError(f"--bundle '{args.bundle}' is not a bundle directory (make one with scripts/export.py)")
    return bench_sample(Path(args.bundle), args.n, args.batch_size, args.steps)


def bench_contention_command(args) -> dict:
    """`bench.py contention`: NVAE (and quick start) speed per CPU thread setting, idle and busy; --out table."""
    from trainer.bench.contention import bench_contention, markdown_table

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    result = bench_contention(settings, args.nvae_args, args.quickstart, args.quickstart_args, args.timeout)
    if args.out:
        Path(args.out).write_text(markdown_table(result))
    return result


def gpu_suite_command(args) -> dict:
    """`bench.py gpu-suite`: run the GPU benchmark suite, or one of its parts in this process."""
    from trainer.bench.gpu_suite import BUDGETS, run_part, run_suite

    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else list(BUDGETS)
    unknown = [p for p in parts + ([args.part] if args.part else []) if p not in BUDGETS]
    if unknown:
        raise UserError(f"unknown gpu-suite part(s) {', '.join(unknown)}; known: {', '.join(BUDGETS)}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.part:  # one part, in this process (the suite runs each part like this, in its own process)
        return run_part(args.part, Path(args.out), args.tiny, args.budget_s)
    return run_suite(Path(args.out), args.tiny, parts, args.budget_s)


def cpu_setting(args) -> dict:
    """The CPU settings a benchmark ran with (its JSON reports them)."""
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    return {"threads": threads, "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "malloc": malloc_setting(), "busy": args.busy}


def main() -> None:
    """Parse the benchmark subcommand, run it, and print its result as one JSON line."""
    parser = argparse.ArgumentParser(description="Benchmarks (JSON on stdout).")
    sub = parser.add_subparsers(dest="command", required=True)
    cpu = argparse.ArgumentParser(add_help=False)
    cpu.add_argument("--threads", type=int, default=None, help="compute threads (default: the scripts' setting)")
    cpu.add_argument("--busy", action="store_true", help="run beside one competing process spinning on a core")
    nvae = sub.add_parser("nvae", parents=[cpu], help="one NVAE training step (forward, loss, backward, Adamax)")
    nvae.add_argument("--config", default="nvae-bench-small")
    nvae.add_argument("--batch-size", type=int, default=8)
    nvae.add_argument("--steps", type=int, default=10)
    nvae.add_argument("--warmup", type=int, default=2)
    nvae.add_argument("--checkpointing", choices=("on", "off"), default=None)
    nvae.add_argument("--compare-checkpointing", action="store_true",
                      help="run with and without gradient checkpointing, each in its own process")
    nvae.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    nvae.add_argument("--compile", action="store_true", help="train.compile: compile the model and its regularizer")
    nvae.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    cpu_paths = sub.add_parser(
        "cpu-paths", parents=[cpu],
        help="the CPU fast paths (depthwise backward, ELU) vs PyTorch's ops (per shape, per step)")
    cpu_paths.add_argument("--config", default="nvae-bench-small")
    cpu_paths.add_argument("--batch-size", type=int, default=8)
    cpu_paths.add_argument("--repeats", type=int, default=10, help="alternating pairs per input shape")
    cpu_paths.add_argument("--steps", type=int, default=6, help="alternating pairs of whole training steps, per path")
    cpu_paths.add_argument("--warmup", type=int, default=2)
    data = sub.add_parser("data", parents=[cpu], help="training stream vs a bare tar+decode loop over the same shards")
    data.add_argument("--shards", required=True)
    data.add_argument("--size", type=int, default=None)
    langevin = sub.add_parser("langevin", parents=[cpu],
                              help="one Langevin step vs generator fwd + energy fwd + backward")
    langevin.add_argument("--config", default="digits")
    langevin.add_argument("--batch-size", type=int, default=16)
    langevin.add_argument("--steps", type=int, default=5)
    step = sub.add_parser("vaebm-step", parents=[cpu], help="one whole VAEBM training iteration")
    step.add_argument("--config", default="digits")
    step.add_argument("--batch-size", type=int, default=16)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--checkpointing", choices=("on", "off"), default="off")
    sample = sub.add_parser("sample", parents=[cpu],
                            help="images/s of VAE-only sampling vs VAEBM with K Langevin steps")
    sample.add_argument("--bundle", required=True)
    sample.add_argument("--n", type=int, default=50)
    sample.add_argument("--batch-size", type=int, default=50)
    sample.add_argument("--steps", type=int, default=None, help="default: the bundle's test-time steps")
    contention = sub.add_parser("contention",
                                help="nvae (and the quick start) under CPU thread settings, idle and busy")
    contention.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                            help="THREADS[:POLICY],...; THREADS a number, auto or off; POLICY PASSIVE, ACTIVE, default")
    contention.add_argument("--nvae-args", default="--config nvae-bench-small --batch-size 8 --steps 5 --warmup 2")
    contention.add_argument("--quickstart", action="store_true", help="also time scripts/quickstart.py")
    contention.add_argument("--quickstart-args", default="", help='e.g. "--scale 0.1"')
    contention.add_argument("--timeout", type=float, default=7200.0, help="seconds per measurement")
    contention.add_argument("--out", default=None, help="also write the results as a Markdown table here")
    suite = sub.add_parser("gpu-suite", help="every GPU figure README awaits, in one run (at most --budget-s)")
    suite.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    suite.add_argument("--tiny", action="store_true", help="tiny configs, 1-2 steps each, any device (the tests)")
    suite.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    suite.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's time budget, seconds")
    suite.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args()
    handlers = {"sample": bench_sample_command, "nvae": bench_nvae_command, "data": bench_data_command,
                "cpu-paths": bench_cpu_paths_command,
                "langevin": bench_langevin_command, "vaebm-step": bench_vaebm_step_command,
                "contention": bench_contention_command, "gpu-suite": gpu_suite_command}
    if getattr(args, "threads", None) is not None:
        set_threads(args.threads)  # before torch loads (the handlers import it)
    if not hasattr(args, "busy"):
        print(json.dumps(handlers[args.command](args)))
        return
    with busy_competitor(args.busy):
        result = handlers[args.command](args)
    print(json.dumps({**result, **cpu_setting(args)}))


if __name__ == "__main__":
    run_cli(main)
