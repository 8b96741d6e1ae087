"""Collective helpers: decisions every process takes alike, and the pieces that make a multi-process run match
a 1-process run (a process's rows of a global batch, noise drawn per global sample, rows computed in shares and
gathered)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from accelerate import Accelerator

from trainer.config.common import DataConfig


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any of them."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def any_ranks(accelerator: Accelerator, flags: Sequence[bool]) -> list[bool]:
    """Flag i true on every process if it is true on any of them (one all-reduce for all flags)."""
    if accelerator.num_processes == 1:
        return [bool(flag) for flag in flags]
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(value, reduction="sum").tolist()]


def broadcast_from_main(accelerator: Accelerator, value):
    """The main process's `value` (any picklable object, e.g. a path or an error message) on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def main_then_share(accelerator: Accelerator, work: Callable[[], object]):
    """Run `work()` on the main process only and return its result on every process. A `UserError` (or a full
    device) raised there is raised on every process, so no process waits forever for a main that failed."""
    from trainer.errors import UserError, no_space_path

    outcome: tuple[str, object] = ("ok", None)
    if accelerator.is_main_process:
        try:
            outcome = ("ok", work())
        except UserError as err:
            outcome = ("error", str(err))
        except OSError as err:
            if no_space_path(err) is None:
                raise
            outcome = ("error", f"no space left on the device writing {err.filename or 'the run directory'!r}")
    status, value = broadcast_from_main(accelerator, outcome)
    if status == "error":
        raise UserError(value)
    return value


def mean_across_ranks(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """The same floats averaged over all processes (one all-reduce), so that every process sees the same
    numbers: decisions taken on them (e.g. divergence) agree, and logs show the global batch."""
    if accelerator.num_processes == 1:
        return values
    reduced = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device),
                                 reduction="mean")
    return dict(zip(values, reduced.tolist()))


@dataclass(frozen=True)
class BatchRows:
    """This process's rows [start, stop) of a global micro-batch of `total` samples."""

    start: int
    stop: int
    total: int

    @staticmethod
    def of(data: DataConfig, per_device: int, accelerator: Accelerator) -> "BatchRows":
        """Rows of this process with data.split=global; with "shards" the process's batch is its own."""
        if data.split != "global":
            return BatchRows(0, per_device, per_device)
        start = accelerator.process_index * per_device
        return BatchRows(start, start + per_device, per_device * accelerator.num_processes)


def sliced_noise(shapes: Sequence[Sequence[int]], rows: BatchRows, generator: torch.Generator,
                 device) -> list[torch.Tensor]:
    """Standard-normal noise [stop − start, *shape] per per-sample shape: this process's rows of a draw
    for the whole global micro-batch. With the same generator state on every process, sample i of the
    global batch gets the same noise for any number of processes."""
    return [torch.randn((rows.total, *shape), generator=generator, device=device)[rows.start:rows.stop]
            for shape in shapes]


class SlicedNoise:
    """A Langevin noise source (`models.langevin.NoiseSource`) made of `sliced_noise` draws."""

    def __init__(self, generator: torch.Generator, rows: BatchRows):
        self.generator, self.rows = generator, rows

    def sample(self, shapes: Sequence[torch.Size], device: torch.device) -> list[torch.Tensor]:
        """One standard-normal tensor [stop − start, *shape[1:]] per shape: this process's rows of a global draw."""
        return sliced_noise([shape[1:] for shape in shapes], self.rows, self.generator, device)


def mean_across_processes(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """tensor ↦ its mean over the processes (every process must call it), or None on one process.

    With equal per-process batches the mean of per-process batch means is the global batch mean.
    """
    if accelerator.num_processes == 1:
        return None
    return lambda tensor: accelerator.reduce(tensor.detach(), reduction="mean")


Tensors = dict[str, torch.Tensor]


def tensor_broadcaster(accelerator: Accelerator) -> Callable[[Tensors], Tensors] | None:
    """A function {name: tensor} ↦ the main process's tensors on every process (every process must call it), or
    None on one process."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import broadcast

    return lambda tensors: broadcast({name: t.contiguous() for name, t in tensors.items()}, from_process=0)


def collective_rows(accelerator: Accelerator, count: int,
                    compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """`compute(rows)` → [len(rows), ...] for rows 0 … count−1, the rows split over the processes.

    Every process computes a contiguous share and the shares are gathered: every process returns
    the full [count, ...] tensor. Row i is the same for any number of processes as long as
    `compute` makes row i from inputs of index i only (e.g. per-chain noise).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return compute(slice(0, count))
    share = -(-count // world)
    start, stop = min(rank * share, count), min((rank + 1) * share, count)
    # A process without rows computes row 0 anyway (shapes must match for the gather) and drops it.
    part = compute(slice(start, stop) if stop > start else slice(0, 1))[: stop - start]
    padded = part.new_zeros((share, *part.shape[1:]))
    padded[: len(part)] = part
    return accelerator.gather(padded)[:count]  # the shares are contiguous and in rank order
