"""Process-level setup shared by the trainers: the Accelerator, seeds, training streams, memory readings."""
from __future__ import annotations

import os
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradScalerKwargs, ProjectConfiguration

from data.sources import ShardLocation, shard_location
from trainer.config.common import DataConfig, TrainConfig
from trainer.errors import UserError
from trainer.run.trackers import accelerate_trackers


@dataclass
class Launch:
    """What a trainer needs to know about this launch."""

    accelerator: Accelerator
    accumulation: int            # micro-batches per optimizer step
    deepspeed: bool              # the trained network is a DeepSpeed engine
    autocast_dtype: torch.dtype | None  # mixed precision applied by the trainer itself (under DeepSpeed)

    def autocast(self):
        """Mixed-precision context for forward passes: Accelerate's, or ours under DeepSpeed."""
        if self.autocast_dtype is None:
            return self.accelerator.autocast()
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The bare module inside a DDP wrapper or a DeepSpeed engine.

        Only a DeepSpeed launch asks Accelerate: its `unwrap_model` imports deepspeed whenever it is
        installed, which costs seconds and prints an accelerator-detection warning on a CPU machine.
        """
        if self.deepspeed:
            return self.accelerator.unwrap_model(module)
        return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def make_accelerator(train: TrainConfig, run_dir: Path | None = None) -> Launch:
    """An Accelerator for this launch, with gradient accumulation derived from the batch sizes, and the
    trackers of `train.log_with` (started later by the run's monitor; aim-like ones write under run_dir).

    global_batch = per_device_batch × processes × accumulation; anything else is a config error.
    Under DeepSpeed the engine keeps fp32 weights (ZeRO partitions optimizer state and gradients) and
    the trainer autocasts forward passes itself: DeepSpeed's own bf16 mode would hold the NVAE's BN and
    KL terms in bf16, and Accelerate does not autocast under DeepSpeed.
    """
    # Without a GPU, Accelerate forms the process group (gloo, MULTI_CPU) only when told `cpu=True`;
    # otherwise every process of a multi-process launch silently trains alone as "rank 0 of 1".
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = launched_processes > 1 and not torch.cuda.is_available() and not use_deepspeed
    state = PartialState(cpu=cpu)
    processes = launched_processes if use_deepspeed else state.num_processes
    per_step = train.per_device_batch_size * processes
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size ({train.global_batch_size}) is not a multiple of "
            f"train.per_device_batch_size × processes ({train.per_device_batch_size} × {processes})")
    accumulation = train.global_batch_size // per_step
    precision = _mixed_precision(train.mixed_precision, use_deepspeed)
    tracking = _tracking(train, run_dir)
    if use_deepspeed:
        accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=accumulation, **tracking)
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=train.per_device_batch_size,
                         gradient_accumulation_steps=accumulation, train_batch_size=train.global_batch_size)
        for key in ("bf16", "fp16"):  # the engine stays fp32; see the docstring
            ds_config.setdefault(key, {})["enabled"] = False
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        return Launch(accelerator, accumulation, deepspeed=True, autocast_dtype=dtype)
    accelerator = Accelerator(mixed_precision=None if precision == "auto" else precision, cpu=cpu,
                              gradient_accumulation_steps=accumulation,
                              kwargs_handlers=[GradScalerKwargs(init_scale=train.fp16_init_scale)], **tracking)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        _enable_cpu_fp16(accelerator, train.fp16_init_scale)
    if launched_processes != accelerator.num_processes:
        raise RuntimeError(f"launched {launched_processes} processes but Accelerate sees {accelerator.num_processes}")
    return Launch(accelerator, accumulation, deepspeed=False, autocast_dtype=None)


def _tracking(train: TrainConfig, run_dir: Path | None) -> dict:
    """Accelerator arguments for `train.log_with` (none when it names only TensorBoard, always our own)."""
    names = accelerate_trackers(train.log_with)
    if not names:
        return {}
    folders = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "trackers")) \
        if run_dir is not None else None
    return {"log_with": names, "project_config": folders}


def _enable_cpu_fp16(accelerator: Accelerator, init_scale: float) -> None:
    """fp16 on a CPU: Accelerate 1.15 accepts it but then trains in fp32 (no autocast, no loss scaler).
    PyTorch's CPU autocast runs fp16 and `torch.amp.GradScaler("cpu")` scales the loss, so switch on
    Accelerate's own mixed-precision path with that scaler: `prepare` then autocasts the model's forward,
    `backward` scales, `clip_grad_norm_` unscales and the prepared optimizer steps through the scaler
    (skipping steps whose gradients overflowed). Must run before `prepare`."""
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)


def _mixed_precision(configured: str, use_deepspeed: bool) -> str:
    if configured != "auto":
        return configured
    if use_deepspeed:  # take the launcher's setting, which Accelerate would otherwise give DeepSpeed
        return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return "auto"


def compile_if_asked(net: torch.nn.Module, train: TrainConfig) -> None:
    """`train.compile`: compile the calls of `net` and of its spectral regularizer in place
    (`nn.Module.compile`, so state dicts keep their keys and DDP/DeepSpeed wrappers call the compiled module).
    The first calls compile (minutes with Inductor on a CPU); a new batch size recompiles once, with a
    dynamic batch dimension."""
    if not train.compile:
        return
    net.compile(backend=train.compile_backend)
    spectral = getattr(net, "spectral", None)
    if isinstance(spectral, torch.nn.Module):
        spectral.compile(backend=train.compile_backend)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and random."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int) -> int:
    """A per-process seed, distinct across ranks (chains and posterior noise must not repeat)."""
    return seed * 100_003 + 7_919 * (rank + 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def shard_directory(data: DataConfig, accelerator: Accelerator) -> Path | ShardLocation:
    """The shard set to read: `data.shards` (a local folder, or a remote/pattern location with its index and
    cache, see data/sources.py), or a bundled dataset materialized on first use."""
    if data.shards:
        location = shard_location(data.shards, data.index, data.shard_cache)
        if isinstance(location, Path) and not (location / "index.json").is_file():
            raise UserError(f"data.shards '{location}' has no index.json (make it with scripts/make_shards.py)")
        return location
    from data.bundled import materialize_shards

    cache = Path(data.cache_dir).expanduser()
    with accelerator.main_process_first():  # one process writes, the others then find it done
        return materialize_shards(data.dataset, data.image_size, cache)


def batch_inputs(batch: dict) -> torch.Tensor:
    """The model input of a stream batch: images [B, C, H, W] or toy points [B, D]."""
    return batch["image"] if "image" in batch else batch["x"]


def make_train_stream(data: DataConfig, batch_size: int, seed: int, accelerator: Accelerator):
    """The infinite, per-rank training stream. Never handed to `accelerator.prepare` (it would drop data)."""
    from data.stream import TrainStream

    if data.is_toy:
        from data.toy2d import ToyStream, make_toy

        return ToyStream(make_toy(data.dataset), batch_size, seed, accelerator.process_index, accelerator.num_processes)

    return TrainStream(
        shard_directory(data, accelerator), batch_size=batch_size, seed=seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        num_workers=data.num_workers, image_size=data.image_size, hflip=data.hflip,
        max_skip_fraction=data.max_skip_fraction, shuffle_buffer=data.shuffle_buffer, split=data.split)
