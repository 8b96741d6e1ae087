"""Helper for tests/test_multiprocess.py, run under torchrun with 2 processes (gloo): the pieces that
make a multi-process step match one process holding the whole global batch. Each process holds rows
[rank·4, rank·4 + 4) of a global batch of 8; rank 0 writes the largest differences from the
1-process computation (relative to its largest value) as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/multiprocess_sync_check.py OUT.json
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from accelerate import Accelerator  # noqa: E402

from models.layers import Conv2d  # noqa: E402
from models.nvae.cells import BatchNorm2d, run_cell, set_batchnorm_sync  # noqa: E402
from trainer.nvae.objective import balanced_kl  # noqa: E402
from trainer.run.collective import (  # noqa: E402
    BatchRows,
    collective_rows,
    mean_across_processes,
    sliced_noise,
)

GLOBAL_BATCH = 8


class Block(nn.Module):
    """BN → Swish → conv → BN: [B, 4, 5, 5] → [B, 6, 5, 5]."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv, self.bn2 = BatchNorm2d(4, momentum=0.05), Conv2d(4, 6, 3, padding=1), BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.conv(F.silu(self.bn1(x))))


class Net(nn.Module):
    def __init__(self, checkpointing: bool):
        super().__init__()
        self.block, self.checkpointing = Block(), checkpointing

    def forward(self, x):
        return run_cell(self.block, x, self.checkpointing)


def per_sample_loss(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of a per-sample loss, like the NVAE objective."""
    return (y * weights).square().flatten(1).sum(1).mean()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b| (b: the 1-process reference)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def compare_batchnorm(rows: slice, world: int, checkpointing: bool, synchronized: bool = True) -> dict:
    """Two training steps' outputs, input and parameter gradients, and running statistics: this
    process's share (synchronized BN, gradients averaged like DDP) against the full batch."""
    torch.manual_seed(0)
    net = Net(checkpointing)
    reference = copy.deepcopy(net)
    set_batchnorm_sync(net, synchronized)
    diffs = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        x = 3 * torch.randn(GLOBAL_BATCH, 4, 5, 5, generator=generator) + 1  # the same on every process
        weights = torch.randn(GLOBAL_BATCH, 6, 5, 5, generator=generator)
        x_full, x_mine = x.clone().requires_grad_(True), x[rows].clone().requires_grad_(True)
        y_full, y_mine = reference(x_full), net(x_mine)
        per_sample_loss(y_full, weights).backward()
        per_sample_loss(y_mine, weights[rows]).backward()
        for p in net.parameters():  # what DDP does: average the gradients of the per-process mean losses
            dist.all_reduce(p.grad)
            p.grad /= world
        diffs["output"] = max(diffs["output"], max_diff(y_mine, y_full[rows]))
        # d(global mean)/dx = (1/world)·d(Σ per-process losses)/dx, and this process holds the latter.
        diffs["input_grad"] = max(diffs["input_grad"], max_diff(x_mine.grad / world, x_full.grad[rows]))
        # All gradients together: the conv bias before bn2 has a zero gradient up to rounding.
        diffs["param_grad"] = max(diffs["param_grad"], max_diff(
            torch.cat([p.grad.flatten() for p in net.parameters()]),
            torch.cat([q.grad.flatten() for q in reference.parameters()])))
        net.zero_grad()
        reference.zero_grad()
    diffs["running_stats"] = max(max_diff(a, b) for a, b in zip(net.buffers(), reference.buffers()))
    return diffs


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    result = {
        "world": world,
        "batchnorm": compare_batchnorm(rows, world, checkpointing=False),
        "batchnorm_checkpointed": compare_batchnorm(rows, world, checkpointing=True),
        "batchnorm_per_process": compare_batchnorm(rows, world, checkpointing=False, synchronized=False),
    }

    # KL balancing: coefficients from the global batch.
    generator = torch.Generator().manual_seed(5)
    kl = [torch.rand(GLOBAL_BATCH, generator=generator) * (g + 1) for g in range(3)]
    alphas = torch.tensor([1.0, 4.0, 16.0])
    full, gammas_full = balanced_kl(kl, alphas, 0.5)
    mine, gammas_mine = balanced_kl([k[rows] for k in kl], alphas, 0.5, mean_across_processes(accelerator))
    result["kl_gammas"] = max_diff(gammas_mine, gammas_full)
    result["kl_rows"] = max_diff(mine, full[rows])

    # Per-sample noise: this process's rows of the global draw.
    batch_rows = BatchRows(rows.start, rows.stop, GLOBAL_BATCH)
    noise = sliced_noise([(2, 3)], batch_rows, torch.Generator().manual_seed(9), "cpu")[0]
    alone = sliced_noise([(2, 3)], BatchRows(0, GLOBAL_BATCH, GLOBAL_BATCH), torch.Generator().manual_seed(9), "cpu")[0]
    result["noise"] = max_diff(noise, alone[rows])

    # Image grids: each process computes a contiguous share of the rows, everyone gets all of them.
    for count in (5, 1):
        asked = []

        def compute(columns: slice) -> torch.Tensor:
            asked.append([columns.start, columns.stop])
            return torch.arange(count, dtype=torch.float32)[columns, None] * torch.ones(1, 3)

        gathered = collective_rows(accelerator, count, compute)
        shares = [None] * world
        dist.all_gather_object(shares, asked)
        result[f"grid_{count}"] = {"rows": gathered[:, 0].tolist(), "asked": shares}

    if rank == 0:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(out)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
