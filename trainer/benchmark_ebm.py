"""Cost of one Langevin step against the work it cannot avoid (DESIGN §6: ratio ≤ 1.15).

One Langevin step must run the generator forward, the energy forward and a backward pass to the noise;
everything else (the update, the injected noise, the diagnostics) is overhead. `bench_langevin` times
both in the same run, interleaved so clock drift and thermal state hit both alike:

    ld_step_s  = time of `langevin(..., steps)` / steps            (the real sampler, end to end)
    fwd_bwd_s  = time of one generator fwd + energy fwd + autograd.grad(E.sum(), noise)
    ratio      = ld_step_s / fwd_bwd_s

Each is the best (minimum) over repeats, as `timeit` advises: on a shared machine contention only ever
adds time, so the minimum is the least noisy estimate of the cost itself. Works with any
`generator_fn(noise_list) -> images`.

    python -m trainer.benchmark_ebm            # a small conv generator + the `digits` energy, JSON out
    python -m trainer.benchmark_ebm --layout cifar10 --batch-size 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from trainer.langevin import BatchNoise, energy_on_generator, langevin


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
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
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


class _ToyConvGenerator(nn.Module):
    """A small conv decoder for the demo: ε_z [B, 16, 8, 8] → 32×32 mean, plus 0.1·ε_x [B, C, 32, 32]."""

    def __init__(self, channels: int = 64, out_channels: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(16, channels, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1),
        )

    def forward(self, noise: list[torch.Tensor]) -> torch.Tensor:
        eps_z, eps_x = noise
        return torch.tanh(self.net(eps_z)) + 0.1 * eps_x


def main() -> None:
    from models.energy import EnergyNetConfig, build_energy

    parser = argparse.ArgumentParser(description="Langevin step cost vs generator+energy fwd/bwd (JSON).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layout", default="digits", help="energy layout (models.energy.LAYOUTS)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="autocast the energy_fn to bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default); 1 is "
                        "steadier on a shared machine")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    generator = _ToyConvGenerator().to(device).eval().requires_grad_(False)
    energy = build_energy(EnergyNetConfig(layout=args.layout, image_size=32)).to(device)
    energy.initialize_from_data(torch.rand(64, 3, 32, 32, device=device) * 2 - 1)
    result = bench_langevin(
        generator, energy, [(16, 8, 8), (3, 32, 32)], args.batch_size, args.steps, 8e-5,
        repeats=args.repeats, device=device, autocast_dtype=torch.bfloat16 if args.bf16 else None,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()


def bench_vaebm_step(vae, energy, cfg, batch_size: int, steps: int = 3, warmup: int = 1) -> dict:
    """One whole VAEBM training iteration (the loop's own `negative_samples`, the energy loss on positives
    and negatives, backward, element-wise clip, Adam step), timed over `steps` after `warmup`.

    `vae`: a frozen NVAE; `energy`: an energy network; `cfg`: a VAEBMTrainingConfig. Random positives.
    """
    from trainer.energy_adapters import VAEBMEnergy
    from trainer.replay import ReplayBuffer
    from trainer.runtime import peak_memory_mb
    from trainer.vaebm_loop import negative_samples
    from trainer.vaebm_objective import clip_to_adam_rms, ebm_loss

    device = next(vae.parameters()).device
    adapter = VAEBMEnergy(vae, energy, cfg.vae.temperature)
    buffer = ReplayBuffer(vae.latent_shapes, capacity=4 * batch_size) if cfg.replay.enabled else None
    optimizer = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    generator = torch.Generator(device=device).manual_seed(0)
    x_pos = torch.rand((batch_size, *vae.image_shape), device=device) * 2 - 1
    autocast_dtype = torch.bfloat16 if cfg.langevin.autocast == "bf16" else None
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        chains, x_neg = negative_samples(adapter, buffer, batch_size, 0.6, generator, cfg.langevin, autocast_dtype)
        energies = energy(torch.cat([x_pos, x_neg]))
        loss, _ = ebm_loss(energies[:batch_size], energies[batch_size:], energy.spectral_loss(), cfg.optim.spectral_coeff)
        loss.backward()
        clip_to_adam_rms(optimizer, cfg.optim.clip_std, cfg.optim.clip_offset)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if buffer is not None:
            buffer.push(chains.noise[:-1])
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    step_s = min(times)
    return {"img_per_s": batch_size / step_s, "step_s": step_s, "batch_size": batch_size,
            "langevin_steps": cfg.langevin.steps, "peak_mem_mb": peak_memory_mb(device),
            "resolution": vae.image_shape[-1]}
