"""The GPU suite's parts (`trainer/bench/gpu_suite.py` runs them, each in its own process): what each measures,
and the helpers they share.

| part         | measures                                                                                        |
|--------------|-------------------------------------------------------------------------------------------------|
| `nvae-batch` | NVAE `celebahq256`, bf16: the largest per-GPU batch without and with gradient checkpointing,     |
|              | and training img/s and peak memory at it                                                       |
| `vaebm`      | VAEBM `celebahq256` (its preset: bf16, 6 Langevin steps): iteration time and peak memory at     |
|              | batch 4 and at the largest batch                                                               |
| `sample`     | 50 samples at 32×32 with 16 Langevin steps, `cifar10` preset, through the bundle sampler (paper: |
|              | 8.79 s on one Titan RTX)                                                                        |
| `precision`  | the NVAE `celebahq256` loss of one batch in bf16 against fp32 (same weights, noise and data)     |
| `deepspeed`  | 3 steps of DeepSpeed ZeRO-2 NVAE training (`digits`, bf16) on one GPU through `accelerate launch` |
| `compile`    | NVAE training img/s (`nvae-bench-small`, bf16, batch 64) with `train.compile` off and on          |

Networks are randomly initialized (costs do not depend on the weights); inputs are random images. A part
gets a `PartContext` and records its figures there as it gets them, so a part stopped by its budget keeps
what it measured.

Largest batch: doubling from 1, then bisection to within 1/8, each probe one training step with CUDA's
out-of-memory error caught; the search stops at `MAX_BATCH` and at its share of the part's budget (then
the figure is a lower bound, marked "≥").

`--tiny`: tiny configs, 1–2 steps per measurement, the compile part with the `aot_eager` backend (Inductor
compiles for minutes on a CPU); without a GPU, fp32 instead of bf16 (`gpu_precision`) and DeepSpeed on the
CPU.
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH = {"nvae": 64, "nvae-checkpointing": 256, "vaebm": 64}
TINY_MAX_BATCH = 4
PAPER_SAMPLE_SECONDS = 8.79  # VAEBM paper: 50 CIFAR-10 samples, 16 Langevin steps, one Titan RTX


@dataclass
class PartContext:
    """What a part gets: tiny mode, its device, its deadline (time.monotonic()) and where figures go."""

    tiny: bool
    device: object  # torch.device
    deadline: float
    out_file: Path
    figures: dict

    def record(self, **figures) -> None:
        """Keep figures (written at once, so a part stopped by its budget keeps them)."""
        self.figures.update(figures)
        self.out_file.write_text(json.dumps(self.figures, indent=1))

    def left(self) -> float:
        """Seconds left before this part's deadline."""
        return self.deadline - time.monotonic()


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def tiny_nvae_config():
    """Two scales, one group each, 8 channels, 16×16: a complete NVAE that steps in well under a second."""
    from models.nvae import NVAEConfig

    return NVAEConfig(image_size=16, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=1,
                      latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1)


def nvae_preset(name: str):
    """The NVAE training config of preset `name` (no data needed)."""
    from trainer.config.loader import load_config
    from trainer.config.nvae import NVAETrainingConfig, architecture_dict

    return load_config(NVAETrainingConfig, "nvae", name, ["data.shards=unused"], expand={"model": architecture_dict})


def vaebm_preset(name: str, tiny: bool):
    """(VAEBM training config, NVAE architecture) of preset `name` (tiny: `digits16` shrunk, 2 Langevin steps)."""
    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config

    overrides = ["vae.path=unused", "data.shards=unused"]
    if tiny:
        overrides += ["langevin.steps=2", "energy.base_channels=8", "replay.anneal_steps=1"]
        return load_config(VAEBMTrainingConfig, "vaebm", "digits16", overrides), tiny_nvae_config()
    return load_config(VAEBMTrainingConfig, "vaebm", name, overrides), nvae_preset(name).model


def frozen_vae_and_energy(cfg, nvae_config, device):
    """A randomly initialized, frozen NVAE on `device` and a function making data-initialized energy networks."""
    import torch

    from models.energy import build_energy
    from models.nvae import NVAE

    torch.manual_seed(0)
    vae = NVAE(nvae_config).to(device).eval().requires_grad_(False)

    def new_energy():
        energy = build_energy(cfg.energy, vae.z_shapes).to(device)
        energy.initialize_from_data(torch.rand((2, *vae.image_shape), device=device) * 2 - 1)
        return energy

    return vae, new_energy


def gpu_precision(ctx: PartContext) -> str:
    """bf16 on a GPU; fp32 in --tiny runs on a CPU (there bf16 autocast of the tiny NVAE at batch 1 crashed in
    backward with torch 2.14.1, a native double free)."""
    return "bf16" if ctx.device.type == "cuda" else "no"


def is_out_of_memory(err: BaseException) -> bool:
    """True if `err` is a CUDA out-of-memory error."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory() -> None:
    """Collect garbage and empty the CUDA cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], bool], limit: int, deadline: float) -> tuple[int, bool]:
    """The largest batch ≤ `limit` for which `fits(batch)` is True: doubling from 1, then bisection to within
    1/8. Returns (batch, exact); exact is False when `limit` or `deadline` stopped the search (a lower bound)."""
    good, bad, batch = 0, None, 1
    while batch <= limit:
        if time.monotonic() > deadline:
            return good, False
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:
        if good < limit and time.monotonic() <= deadline and fits(limit):
            good = limit
        return good, False
    while bad - good > max(1, good // 8):
        if time.monotonic() > deadline:
            return good, False
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, True


def peak_mb(device) -> float:
    """Peak memory of `device` in MB (after a CUDA synchronize)."""
    import torch

    from trainer.run.launch import peak_memory_mb

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_memory_mb(device)


def reset_peak(device) -> None:
    """Synchronize and reset the peak-memory counter of a CUDA device (no-op elsewhere)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device) -> None:
    """Wait for the CUDA device's queued work (no-op elsewhere)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# The parts.


def part_nvae_batch(ctx: PartContext) -> None:
    """NVAE celebahq256 in bf16: the largest batch and img/s at it, without and with gradient checkpointing."""
    config = tiny_nvae_config() if ctx.tiny else nvae_preset("celebahq256").model
    precision = gpu_precision(ctx)
    ctx.record(config="tiny" if ctx.tiny else "celebahq256", mixed_precision=precision)
    for index, checkpointing in enumerate((False, True)):
        _nvae_batch_setting(ctx, config, precision, checkpointing, time.monotonic() + ctx.left() / (2 - index))
        release_memory()


def _nvae_batch_setting(ctx: PartContext, config, precision: str, checkpointing: bool, deadline: float) -> None:
    """One half of `part_nvae_batch`, on a fresh model, optimizer and EMA (their memory counts)."""
    import torch

    from trainer.bench.nvae import nvae_update

    key = "checkpointing" if checkpointing else "no_checkpointing"
    torch.manual_seed(0)
    model, update, at_step = nvae_update(config, 1, ctx.device, precision)
    model.gradient_checkpointing = checkpointing

    def step(batch: int) -> float:
        x = torch.rand((batch, *model.image_shape), device=ctx.device) * 2 - 1
        synchronize(ctx.device)
        start = time.perf_counter()
        update.step(at_step, iter([{"image": x}]))  # in the KL warm-up, as `bench_nvae`
        synchronize(ctx.device)
        return time.perf_counter() - start

    def fits(batch: int) -> bool:
        try:
            step(batch)
            return True
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            update.optimizer.zero_grad(set_to_none=True)
            release_memory()
            return False

    limit = TINY_MAX_BATCH if ctx.tiny else MAX_BATCH["nvae-checkpointing" if checkpointing else "nvae"]
    batch, exact = largest_batch(fits, limit, time.monotonic() + 0.6 * (deadline - time.monotonic()))
    ctx.record(**{f"{key}_largest_batch": batch, f"{key}_largest_batch_exact": exact})
    if batch:
        release_memory()
        reset_peak(ctx.device)
        times = [step(batch) for _ in range(1 if ctx.tiny else 3)]
        ctx.record(**{f"{key}_img_per_s": batch / min(times), f"{key}_step_s": min(times),
                      f"{key}_peak_mem_mb": peak_mb(ctx.device)})


def part_vaebm(ctx: PartContext) -> None:
    """VAEBM celebahq256: one training iteration's time and peak memory at batch 4 and at the largest batch."""
    from trainer.bench.ebm import bench_vaebm_step

    cfg, nvae_config = vaebm_preset("celebahq256", ctx.tiny)
    vae, new_energy = frozen_vae_and_energy(cfg, nvae_config, ctx.device)
    precision = cfg.train.mixed_precision
    ctx.record(config="tiny" if ctx.tiny else "celebahq256", mixed_precision=precision,
               langevin_steps=cfg.langevin.steps, langevin_autocast=cfg.langevin.autocast)

    def measure(batch: int, steps: int, warmup: int) -> dict:
        """A fresh energy and optimizer (so their memory counts), `warmup` + `steps` iterations."""
        release_memory()
        reset_peak(ctx.device)
        result = bench_vaebm_step(vae, new_energy(), cfg, batch, steps=steps, warmup=warmup,
                                  mixed_precision=precision)
        return {"step_s": result["step_s"], "peak_mem_mb": peak_mb(ctx.device)}

    at4 = measure(2 if ctx.tiny else 4, steps=1 if ctx.tiny else 2, warmup=1)
    ctx.record(batch4_step_s=at4["step_s"], batch4_peak_mem_mb=at4["peak_mem_mb"])

    def fits(batch: int) -> bool:
        try:
            measure(batch, steps=1, warmup=0)
            return True
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            release_memory()
            return False

    limit = TINY_MAX_BATCH if ctx.tiny else MAX_BATCH["vaebm"]
    batch, exact = largest_batch(fits, limit, time.monotonic() + 0.7 * ctx.left())
    ctx.record(largest_batch=batch, largest_batch_exact=exact)
    if batch:
        at_max = measure(batch, steps=1, warmup=1)
        ctx.record(largest_batch_step_s=at_max["step_s"], largest_batch_peak_mem_mb=at_max["peak_mem_mb"])


def part_sample(ctx: PartContext) -> None:
    """50 chains of 16 Langevin steps at 32×32 on the cifar10 preset, through the bundle sampler."""
    from models.sampler import BundleSampler

    cfg, nvae_config = vaebm_preset("cifar10", ctx.tiny)
    vae, new_energy = frozen_vae_and_energy(cfg, nvae_config, ctx.device)
    energy = new_energy()
    count, steps = (4, 2) if ctx.tiny else (50, 16)
    manifest = {"kind": "vaebm", "energy": {"method": "vaebm"},
                "sampling": {"steps": steps, "step_size": cfg.langevin.step_size, "temperature": 1.0, "chunk": count}}
    sampler = BundleSampler(vae, energy, manifest, ROOT, device=ctx.device)
    sampler.sample_indices(range(count), seed=1, steps=1)  # warm-up (kernels, allocator)
    reset_peak(ctx.device)
    synchronize(ctx.device)
    start = time.perf_counter()
    sampler.sample_indices(range(count), seed=0, steps=steps)
    synchronize(ctx.device)
    seconds = time.perf_counter() - start
    ctx.record(config="tiny" if ctx.tiny else "cifar10", images=count, langevin_steps=steps, seconds=seconds,
               peak_mem_mb=peak_mb(ctx.device), paper_seconds_titan_rtx=PAPER_SAMPLE_SECONDS)


def part_precision(ctx: PartContext) -> None:
    """The NVAE loss of one batch (reconstruction + β·balanced KL) in fp32 and under bf16 autocast: the same
    weights, posterior noise and images."""
    import torch

    from models.nvae import NVAE
    from trainer.nvae.objective import kl_balance_alphas, nvae_loss

    config = tiny_nvae_config() if ctx.tiny else nvae_preset("celebahq256").model
    torch.manual_seed(0)
    model = NVAE(config).to(ctx.device).train()
    batch = 2 if ctx.tiny else 4
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.rand((batch, *model.image_shape), generator=generator, device=ctx.device) * 2 - 1
    eps = [torch.randn((batch, *shape), generator=generator, device=ctx.device) for shape in model.latent_shapes]
    alphas = kl_balance_alphas(model.groups_per_scale_decoder_order).to(ctx.device)
    zero = torch.zeros((), device=ctx.device)  # the weight penalties do not depend on the precision of activations
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=dtype is not None)
        with torch.no_grad(), autocast:
            output = model(x, posterior_eps=eps)
            loss, terms = nvae_loss(output, 0.5, alphas, 0.0, zero, zero)
        losses[name] = {"loss": float(loss), "nelbo": float(terms["nelbo"])}
    relative = abs(losses["bf16"]["loss"] - losses["fp32"]["loss"]) / abs(losses["fp32"]["loss"])
    ctx.record(config="tiny" if ctx.tiny else "celebahq256", batch=batch, fp32_loss=losses["fp32"]["loss"],
               bf16_loss=losses["bf16"]["loss"], relative_difference=relative,
               fp32_nelbo=losses["fp32"]["nelbo"], bf16_nelbo=losses["bf16"]["nelbo"])


def part_deepspeed(ctx: PartContext) -> None:
    """3 steps of DeepSpeed ZeRO-2 NVAE training on one device through `accelerate launch` (digits, bf16 on a
    GPU; fp32 on a CPU)."""
    precision = gpu_precision(ctx)
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "run"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
                   "--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision,
                   "--dynamo_backend", "no",
                   str(ROOT / "scripts" / "train_nvae.py"), "--config", "digits", "--run-dir", str(run_dir),
                   "train.max_steps=3", "train.log_every=1", "train.image_every=0", "train.progress_bar=false",
                   "train.per_device_batch_size=8", "train.global_batch_size=8", "data.num_workers=1",
                   f"data.cache_dir={Path(work) / 'cache'}"]
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=max(ctx.left(), 1),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.monotonic() - start
        if result.returncode != 0:
            raise RuntimeError(f"accelerate launch exited {result.returncode}: {result.stderr.strip()[-800:]}")
        rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
        ctx.record(config="digits", mixed_precision=precision, steps=len(rows), launch_seconds=seconds,
                   img_per_s=rows[-1]["img_per_s"], losses_finite=all(math.isfinite(r["loss"]) for r in rows),
                   peak_mem_mb=rows[-1]["peak_mem_mb"])


def part_compile(ctx: PartContext) -> None:
    """NVAE training img/s with train.compile off and on (the compilation happens in the warm-up steps)."""
    from trainer.bench.nvae import bench_nvae

    config = tiny_nvae_config() if ctx.tiny else nvae_preset("nvae-bench-small").model
    precision = gpu_precision(ctx)
    backend = "aot_eager" if ctx.tiny else "inductor"
    batch, steps, warmup = (2, 1, 2) if ctx.tiny else (64, 10, 3)
    ctx.record(config="tiny" if ctx.tiny else "nvae-bench-small", batch=batch, mixed_precision=precision,
               backend=backend)
    for compiled in (False, True):
        start = time.monotonic()
        result = bench_nvae(config, batch_size=batch, steps=steps, warmup=warmup, device=ctx.device,
                            mixed_precision=precision, compile=compiled, compile_backend=backend)
        key = "compiled" if compiled else "eager"
        ctx.record(**{f"{key}_img_per_s": result["img_per_s"], f"{key}_seconds_with_warmup": time.monotonic() - start})
    ctx.record(speedup=ctx.figures["compiled_img_per_s"] / ctx.figures["eager_img_per_s"])


PARTS: dict[str, Callable[[PartContext], None]] = {
    "nvae-batch": part_nvae_batch, "vaebm": part_vaebm, "sample": part_sample, "precision": part_precision,
    "deepspeed": part_deepspeed, "compile": part_compile,
}
