"""Cost of one Langevin step against the work it cannot avoid (README, Benchmarks: ratio ≤ 1.15).

One Langevin step must run the generator forward, the energy forward and a backward pass to the noise;
everything else (the update, the injected noise, the diagnostics) is overhead. `bench_langevin` times
both in the same run, interleaved so clock drift and thermal state hit both alike:

    ld_step_s  = time of `langevin(..., steps)` / steps            (the real sampler, end to end)
    fwd_bwd_s  = time of one generator fwd + energy fwd + autograd.grad(E.sum(), noise)
    ratio      = ld_step_s / fwd_bwd_s

Each is the best (minimum) over repeats, as `timeit` advises: on a shared machine contention only ever
adds time, so the minimum is the least noisy estimate of the cost itself. Works with any
`generator_fn(noise_list) -> images`.

`bench_vaebm_step` times a whole energy-training iteration through the training loop's own step.

    python scripts/bench.py langevin --config digits --batch-size 16
    python scripts/bench.py vaebm-step --config digits --batch-size 16
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from models.adapters import build_adapter
from models.langevin import BatchNoise, energy_on_generator, langevin
from trainer.config.common import TrainConfig
from trainer.ebm.loop import EnergyUpdate
from trainer.ebm.replay import ReplayBuffer
from trainer.run.collective import BatchRows
from trainer.run.launch import make_accelerator, peak_memory_mb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_langevin(
    generator_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    energy: Callable[[torch.Tensor], torch.Tensor],
    noise_shapes: Sequence[Sequence[int]],
    batch_size: int,
    steps: int,
    step_size: float,
    repeats: int = 5,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Time Langevin steps and the bare generator+energy forward/backward on the same inputs.

    Args:
        generator_fn: list of noise tensors [B, *shape] → images (the energy's input).
        energy: images → energies [B].
        noise_shapes: per-sample shape of each noise tensor.
        batch_size, steps, step_size: the chain to time (steps per timed block).
        repeats: timed blocks of each kind (after one warm-up block of each).
        device: where the noise lives; default: the energy's parameters' device, else CPU.

    Returns:
        {"ld_step_s", "fwd_bwd_s", "ratio", "peak_mem_mb", "device", "batch_size", "steps", "repeats"}.
        peak_mem_mb is the CUDA peak allocated during the run on GPU, the process's peak RSS on CPU.
    """
    if device is None:
        params = list(energy.parameters()) if isinstance(energy, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    noise = [torch.randn((batch_size, *s), generator=gen, device=device) for s in noise_shapes]
    energy_fn = energy_on_generator(generator_fn, energy)
    source = BatchNoise(gen)

    def run_langevin() -> None:
        langevin(noise, energy_fn, steps, step_size, noise_source=source, autocast_dtype=autocast_dtype)

    def run_fwd_bwd() -> None:
        autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        for _ in range(steps):
            eps = [n.detach().requires_grad_(True) for n in noise]
            with autocast:
                e = energy_fn(eps)
            torch.autograd.grad(e.float().sum(), eps)

    def timed(fn: Callable[[], None]) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - start) / steps

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(run_langevin), timed(run_fwd_bwd)  # warm-up (allocator, kernel selection)
    ld, fb = [], []
    for _ in range(repeats):
        ld.append(timed(run_langevin))
        fb.append(timed(run_fwd_bwd))
    peak_mb = peak_memory_mb(device)
    ld_s, fb_s = min(ld), min(fb)
    return {
        "ld_step_s": ld_s,
        "fwd_bwd_s": fb_s,
        "ratio": ld_s / fb_s,
        "peak_mem_mb": peak_mb,
        "device": str(device),
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
    }


def bench_vaebm_step(vae, energy, cfg, batch_size: int, steps: int = 3, warmup: int = 1,
                     mixed_precision: str = "no") -> dict:
    """One whole energy-training iteration, the loop's own (`trainer.ebm.loop.EnergyUpdate.step`: Langevin
    negatives, the loss with its regularizers, backward, element-wise clip, Adam, replay push), timed over
    `steps` after `warmup`, on random positives in [−1, 1].

    `vae`: a frozen VAE; `energy`: an energy network (data-initialized); `cfg`: a VAEBMTrainingConfig. The
    iteration index is `replay.anneal_steps`, so a replay buffer (when enabled) is drawn from at its full
    probability, as in the steady state of training. `mixed_precision`: no or bf16, as `train.mixed_precision` (the
    energy network then runs under autocast everywhere, Langevin included; the generator in Langevin runs in
    bf16 with `langevin.autocast`).
    """
    device = next(vae.parameters()).device
    launch = make_accelerator(TrainConfig(global_batch_size=batch_size, per_device_batch_size=batch_size,
                                          mixed_precision=mixed_precision))
    optimizer = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay)
    energy, optimizer = launch.accelerator.prepare(energy, optimizer)
    net = launch.unwrap(energy)
    adapter = build_adapter(cfg.method, vae, net, cfg.vae.temperature)
    buffer = ReplayBuffer(vae.latent_shapes, capacity=4 * batch_size) if cfg.replay.enabled else None
    update = EnergyUpdate(energy, net, optimizer, adapter, buffer, None, launch, cfg,
                          rows=BatchRows(0, batch_size, batch_size), noise_rank=0)
    positives = torch.rand((batch_size, *vae.image_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = iter(lambda: {"image": positives}, None)  # the same positives, forever
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        update.step(cfg.replay.anneal_steps + index, batches)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    step_s = min(times)
    return {"img_per_s": batch_size / step_s, "step_s": step_s, "batch_size": batch_size,
            "langevin_steps": cfg.langevin.steps, "peak_mem_mb": peak_memory_mb(device),
            "resolution": vae.image_shape[-1]}
