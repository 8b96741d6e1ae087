"""Process-level setup shared by the trainers: Accelerator, seeds, data streams, memory readings."""
from __future__ import annotations

import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from trainer.errors import UserError
from trainer.sections import DataConfig, TrainConfig


def make_accelerator(train: TrainConfig) -> tuple[Accelerator, int]:
    """An Accelerator for this launch and the gradient-accumulation steps derived from the batch sizes.

    global_batch = per_device_batch × processes × accumulation; anything else is a config error.
    """
    state = PartialState()
    per_step = train.per_device_batch_size * state.num_processes
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size ({train.global_batch_size}) is not a multiple of "
            f"train.per_device_batch_size × processes ({train.per_device_batch_size} × {state.num_processes})")
    accumulation = train.global_batch_size // per_step
    mixed_precision = None if train.mixed_precision == "auto" else train.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed_precision)
    return accelerator, accumulation


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and random."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int) -> int:
    """A per-process seed, distinct across ranks (chains and posterior noise must not repeat)."""
    return seed * 100_003 + 7_919 * (rank + 1)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any of them."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def shard_directory(data: DataConfig, accelerator: Accelerator) -> Path:
    """The shard set to read: `data.shards`, or a bundled dataset materialized on first use."""
    if data.shards:
        path = Path(data.shards).expanduser()
        if not (path / "index.json").is_file():
            raise UserError(f"data.shards '{path}' has no index.json (make it with scripts/make_shards.py)")
        return path
    from data.bundled import materialize_shards

    cache = Path(data.cache_dir).expanduser()
    with accelerator.main_process_first():  # one process writes, the others then find it done
        return materialize_shards(data.dataset, data.image_size, cache)


def make_train_stream(data: DataConfig, batch_size: int, seed: int, accelerator: Accelerator):
    """The infinite, per-rank training stream. Never handed to `accelerator.prepare` (it would drop data)."""
    from data.stream import TrainStream

    return TrainStream(
        shard_directory(data, accelerator), batch_size=batch_size, seed=seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        num_workers=data.num_workers, image_size=data.image_size, hflip=data.hflip,
        max_skip_fraction=data.max_skip_fraction, shuffle_buffer=data.shuffle_buffer)
