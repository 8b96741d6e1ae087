"""Throughput and peak memory of one full NVAE training step (README, Benchmarks).

A step is the training loop's own (`trainer.nvae.loop.NVAEUpdate.step`): forward, the loss with the KL
balancing, spectral and BN terms, backward, an Adamax step (the `nvae` optimizer defaults: lr 1e-2 in
warm-up, eps 1e-3, weight decay 3e-4) and the EMA update, on random inputs in [−1, 1].

Peak memory:
- CUDA: torch.cuda.max_memory_allocated after a reset, from before the model is built, so it
  includes weights, gradients, optimizer state and activations.
- CPU: the growth of the process's peak resident set size over the same span, measured in the
  current process. On Linux the kernel's high-water mark is reset first (`/proc/self/clear_refs`,
  value 5) and `VmHWM` is read afterwards, so earlier work in the process does not mask the peak.
  Where that reset is unavailable, `resource.getrusage(...).ru_maxrss` growth is reported, which
  can under-count when the process peaked earlier (`peak_mem_method` says which was used).

    python scripts/bench.py nvae --config nvae-bench-small --batch-size 8 --steps 5 --warmup 2

`spectral_s` is the time of the spectral loss's forward within a step (the power iteration and the σ's;
its backward is part of the step's backward), measured around `net.spectral_loss()` inside the step.

On a CPU shared with other processes, OpenMP's default spin-waiting makes 2 threads several times
slower than 1 (measured: a BatchNorm went from 1.3 ms to 17–35 ms). The scripts set the thread count and
`OMP_WAIT_POLICY` before torch loads (`trainer/run/threads.py`); `bench.py nvae --threads N --busy` and
`bench.py contention` measure the settings.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from models.nvae import NVAE, NVAEConfig
from trainer.config.common import TrainConfig
from trainer.config.nvae import NVAETrainingConfig
from trainer.nvae.loop import NVAEUpdate
from trainer.nvae.objective import kl_balance_alphas
from trainer.run.collective import BatchRows
from trainer.run.ema import EMA
from trainer.run.launch import make_accelerator


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_status_kb("VmHWM") is not None
    except OSError:
        return False


class _PeakMemory:
    """Peak memory growth (MB) over a `with` block, on CPU or CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.peak_mb = 0.0

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
        elif _reset_peak_rss():
            self.base = _read_status_kb("VmRSS") * 1024
            self.method = "linux_vmhwm_after_reset"
        else:
            # ru_maxrss is in KiB on Linux, bytes on macOS.
            scale = 1 if sys.platform == "darwin" else 1024
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.scale = scale
            self.method = "ru_maxrss_growth"
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "linux_vmhwm_after_reset":
            peak = _read_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * self.scale
        self.peak_mb = max(peak - self.base, 0) / 2**20


def bench_nvae(
    config: NVAEConfig,
    batch_size: int,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    mixed_precision: str = "no",
    compile: bool = False,
    compile_backend: str = "inductor",
) -> dict:
    """Time `steps` full training steps (the loop's own `NVAEUpdate.step`) after `warmup` untimed ones, in
    `mixed_precision` (no, bf16), with `train.compile` on or off (the compilation happens in the warm-up).

    The steps are taken at a point of the KL warm-up (10% of the default schedule) where β < 1, so the KL
    balancing runs as it does early in training. Returns img_per_s, step_s (mean over the timed steps),
    step_s_median (steadier than the mean on a shared CPU), step_s_min, spectral_s (mean, see the module
    docstring), page_faults_per_step (the process's minor page faults per timed step: pages the kernel had to
    map, README "Host memory"), loss (of the last step), peak_mem_mb (see the module docstring),
    peak_mem_method, params_m, batch_size, resolution, threads, gradient_checkpointing, mixed_precision,
    compile and device.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    with _PeakMemory(device) as memory:
        model, take_step = training_step(config, batch_size, device, mixed_precision, compile, compile_backend)
        if gradient_checkpointing is not None:
            model.gradient_checkpointing = gradient_checkpointing
        spectral_times = _time_spectral_loss(model, device)
        for _ in range(warmup):
            take_step()
        times, loss = [], float("nan")
        spectral_times.clear()
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            _synchronize(device)
            start = time.perf_counter()
            loss = take_step().loss
            _synchronize(device)
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    step_s = sum(times) / max(len(times), 1)
    return {
        "img_per_s": batch_size / step_s if step_s > 0 else float("nan"),
        "step_s": step_s,
        "step_s_median": statistics.median(times) if times else float("nan"),
        "step_s_min": min(times) if times else float("nan"),
        "spectral_s": sum(spectral_times) / len(spectral_times) if spectral_times else float("nan"),
        "page_faults_per_step": faults / max(len(times), 1),
        "loss": loss,
        "peak_mem_mb": memory.peak_mb,
        "peak_mem_method": memory.method,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch_size": batch_size,
        "resolution": config.image_size,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": model.gradient_checkpointing,
        "mixed_precision": mixed_precision,
        "compile": compile,
        "device": str(device),
    }


def nvae_update(config: NVAEConfig, batch_size: int, device: torch.device, mixed_precision: str = "no",
                compile: bool = False, compile_backend: str = "inductor"):
    """The training loop's update (`NVAEUpdate`: a fresh NVAE in training mode, Adamax with the `nvae` defaults, EMA)
    for per-process batches of `batch_size`. Returns (model, update, step): `step` is 10% of the default schedule,
    in the KL warm-up."""
    train = TrainConfig(global_batch_size=batch_size, per_device_batch_size=batch_size,
                        mixed_precision=mixed_precision, compile=compile, compile_backend=compile_backend)
    cfg = NVAETrainingConfig(model=config, train=train)
    launch = make_accelerator(cfg.train)
    model = NVAE(config).to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                                   weight_decay=cfg.optim.weight_decay)
    update = NVAEUpdate(model, model, EMA(model, cfg.train.ema_decay), optimizer, launch, cfg,
                        rows=BatchRows(0, batch_size, batch_size),
                        alphas=kl_balance_alphas(model.groups_per_scale_decoder_order).to(device))
    return model, update, cfg.train.max_steps // 10


def training_step(config: NVAEConfig, batch_size: int, device: torch.device, mixed_precision: str = "no",
                  compile: bool = False, compile_backend: str = "inductor"):
    """A fresh NVAE (in training mode) and a function taking one training step (`NVAEUpdate.step`, returning
    its `StepResult`) on one fixed batch of random images in [−1, 1], at 10% of the default schedule."""
    model, update, at_step = nvae_update(config, batch_size, device, mixed_precision, compile, compile_backend)
    x = torch.rand(batch_size, *model.image_shape, device=device) * 2 - 1
    batches = iter(lambda: {"image": x}, None)  # the same batch, forever
    return model, lambda: update.step(at_step, batches)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_spectral_loss(model: NVAE, device: torch.device) -> list[float]:
    """Make `model.spectral_loss()` record its own duration; returns the list the durations go to."""
    times: list[float] = []
    spectral_loss = model.spectral_loss

    def timed() -> torch.Tensor:
        _synchronize(device)
        start = time.perf_counter()
        value = spectral_loss()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        return value

    model.spectral_loss = timed  # an instance attribute: the step's `net.spectral_loss()` calls it
    return times
