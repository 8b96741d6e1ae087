"""NVAE residual cells (the official code's res_mbconv architecture instance).

A cell is `skip(x) + 0.1 · SE(branch(x))`: the residual branch is damped by a fixed 0.1.

- `EncoderCell`: two (BN → Swish → 3×3 conv) ops, used in the preprocess blocks and the encoder
  tower; stride 2 in a down cell, whose skip is a `FactorizedReduce`.
- `MBConvCell`: an inverted residual (expansion 6 in the decoder tower, 3 in the postprocess
  blocks, depthwise 5×5), whose up-sampling variant has a bilinear + 1×1 skip.
- `EncoderCombiner` / `DecoderCombiner`: how encoder features and latents enter the decoder state.

Every convolution is `models.layers.Conv2d` so the spectral regularizer finds it; the MBConv convs
are built with `weight_norm=False`, as in the official code.

Gradient checkpointing: `run_cell` wraps a cell in non-reentrant `torch.utils.checkpoint`. A BN in
train mode would update its running statistics twice (forward and recompute), so our `BatchNorm2d`
uses the batch statistics *without* touching the running ones while a recompute is in progress.

Synchronized BN (`set_batchnorm_sync`, the trainer's `train.sync_bn`): in a multi-process run the
train-mode statistics are those of the whole global batch, as in the official NVAE, so 2 processes
with B/2 images each normalize like 1 process with B. Written here (`_SyncBatchNorm`) because
PyTorch's SyncBatchNorm runs on GPUs only; this one works with any process group (gloo on CPU too).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.layers import ELU, Conv2d

RESIDUAL_SCALE = 0.1  # fixed damping of every residual branch (official constant, not learned)

# ----------------------------------------------------------------------------------------------
# BatchNorm that is safe under activation recomputation.

_recompute_state = threading.local()


@contextlib.contextmanager
def _recomputing():
    """Marks the current thread as re-running a checkpointed forward (see `BatchNorm2d`)."""
    previous = getattr(_recompute_state, "active", False)
    _recompute_state.active = True
    try:
        yield
    finally:
        _recompute_state.active = previous


def _channels(t: torch.Tensor) -> torch.Tensor:
    """[C] → [1, C, 1, 1], to broadcast per-channel values over [B, C, H, W]."""
    return t[None, :, None, None]


class _SyncBatchNorm(torch.autograd.Function):
    """Train-mode batch norm over the union of every process's batch x [B, C, H, W] (N = Σ B·H·W).

    Forward: each process's per-channel (count, mean, biased variance) are all-gathered and pooled
    exactly (mean of means, within- plus between-process variance); y = (x − μ)·γ/√(σ² + eps) + β.
    Backward, with g = dJ/dy of J = Σ_processes loss: the global sums Σg and Σg·x̂ (one all-reduce)
    give dx = γ/√(σ² + eps)·(g − Σg/N − x̂·Σg·x̂/N), which includes the paths through the other
    processes' statistics. dγ, dβ are this process's own sums: DDP then averages them like every
    other gradient, which yields the gradient of the global-batch mean loss. Statistics in fp32;
    only x is kept for backward, as in nn.BatchNorm2d. Also returns (μ, unbiased σ²), no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        """x [B, C, H, W] normalized over every process's batch; returns (y, mean [C], unbiased var [C])."""
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        local = torch.stack([torch.full_like(mean, x.numel() // x.shape[1]), mean, var])  # [3, C]
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)  # (all_gather_into_tensor is not available with gloo)
        counts, means, variances = torch.stack(gathered).unbind(1)  # each [R, C]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        scale = weight.float() * invstd
        y = x.float() * _channels(scale) + _channels(bias.float() - mean * scale)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        unbiased_var = var * total / (total - 1).clamp_min(1)
        ctx.mark_non_differentiable(mean, unbiased_var)
        return y.to(x.dtype), mean, unbiased_var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        """Gradients of x, weight and bias, with the per-channel sums all-reduced across processes."""
        x, weight, mean, invstd, total = ctx.saved_tensors
        g = grad_y.float()
        x_hat = (x.float() - _channels(mean)) * _channels(invstd)
        sum_g, sum_g_xhat = g.sum(dim=(0, 2, 3)), (g * x_hat).sum(dim=(0, 2, 3))  # this process's, [C]
        global_sums = torch.stack([sum_g, sum_g_xhat])
        dist.all_reduce(global_sums)
        grad_x = _channels(weight.float() * invstd) * (
            g - _channels(global_sums[0] / total) - x_hat * _channels(global_sums[1] / total))
        return grad_x.to(x.dtype), sum_g_xhat.to(weight.dtype), sum_g.to(weight.dtype), None


def _process_group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that does not update its running statistics during a checkpoint recompute,
    and that can normalize by the statistics of the whole global batch (`synchronized`).

    In train mode the output uses the batch statistics either way, so the recomputed activations
    equal the original ones; only the (second) running-statistics update is skipped. The flag is
    thread-local because autograd may run the recompute on its own device thread.

    `synchronized` (set by `set_batchnorm_sync`) takes effect only in train mode with a process
    group of more than one process; every process must then run the same forward and backward
    passes (a training step does). The running statistics are updated with the global mean and
    unbiased variance, as one process holding the whole global batch would update them.
    """

    synchronized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, C, H, W]; global-batch statistics when synchronized on several processes."""
        if self.training and self.synchronized and _process_group_size() > 1:
            return self._synchronized_forward(x)
        if self.training and getattr(_recompute_state, "active", False):
            # Throw-away copies of the running statistics: the op saves the same tensors for
            # backward as in the original forward (checkpoint checks the count), updates nothing.
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, self.momentum, self.eps)
        return super().forward(x)

    def _synchronized_forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.weight if self.weight is not None else x.new_ones(channels, dtype=torch.float32)
        bias = self.bias if self.bias is not None else x.new_zeros(channels, dtype=torch.float32)
        y, mean, unbiased_var = _SyncBatchNorm.apply(x, weight, bias, self.eps)
        if self.track_running_stats and not getattr(_recompute_state, "active", False):
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)
        return y


def set_batchnorm_sync(module: nn.Module, enabled: bool) -> int:
    """Switch global-batch statistics on or off for every `BatchNorm2d` in `module`; returns their number."""
    layers = [m for m in module.modules() if isinstance(m, BatchNorm2d)]
    for layer in layers:
        layer.synchronized = enabled
    return len(layers)


def run_cell(cell: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """cell(x), with activation checkpointing when asked and when a graph is being recorded."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(cell, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _recomputing()))
    return cell(x)


# ----------------------------------------------------------------------------------------------
# Parts of a cell.


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool → Linear(C, max(C//16, 4)) → ReLU → Linear → sigmoid.

    The linears are plain nn.Linear (no weight norm, not spectrally regularized), as officially.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, C, H, W]."""
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Skip path of a down cell: Swish, then four 1×1 stride-2 convs on the input shifted by
    (0,0), (1,1), (0,1), (1,0) pixels, concatenated: [B, C, H, W] → [B, C_out, H/2, W/2].

    Each conv gives C_out/4 channels (the last takes the remainder), so together they see every
    pixel of each 2×2 block.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        quarter = out_channels // 4
        sizes = [quarter, quarter, quarter, out_channels - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(in_channels, size, 1, stride=2, bias=True) for size in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/2, W/2]."""
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(part) for conv, part in zip(self.convs, shifted)], dim=1)


class UpsampleSkip(nn.Module):
    """Skip path of an up cell: bilinear ×2 (align_corners=True) then a 1×1 conv (WN, no bias)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, C_out, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class _ResidualCell(nn.Module):
    """skip(x) + 0.1·SE(branch(x)); subclasses set `skip`, `se` and implement `branch`."""

    skip: nn.Module
    se: nn.Module

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch [B, C_in, H, W] → [B, C_out, H', W']; subclasses implement it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H', W']: skip(x) + 0.1·SE(branch(x))."""
        return self.skip(x) + RESIDUAL_SCALE * self.se(self.branch(x))


class EncoderCell(_ResidualCell):
    """res_bnswish × 2: BN → Swish → conv3×3 (stride s) → BN → Swish → conv3×3 → SE.

    [B, C_in, H, W] → [B, C_out, H/s, W/s]; s = 2 doubles the channels in the encoder.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_se: bool, bn_momentum: float, bn_eps: float):
        super().__init__()
        if stride == 1:
            assert in_channels == out_channels, "a stride-1 cell keeps its channel count"
            self.skip = nn.Identity()
        else:
            self.skip = FactorizedReduce(in_channels, out_channels)
        self.bn1 = BatchNorm2d(in_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.bn2 = BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=True)
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/s, W/s] (s the stride)."""
        x = self.conv1(F.silu(self.bn1(x)))
        return self.conv2(F.silu(self.bn2(x)))


class MBConvCell(_ResidualCell):
    """Inverted residual (mconv_e{6,3}k5g0):

    [nearest ×2] → BN → 1×1 conv (C_in → hidden) → BN → Swish → depthwise 5×5 → BN → Swish →
    1×1 conv (hidden → C_out) → BN → SE. hidden = C_in·expansion, from the pre-up-sampling C_in.
    The three convs have no bias and no weight norm (official), but are still `Conv2d`.
    [B, C_in, H, W] → [B, C_out, H·u, W·u] with u = 2 for an up cell, else 1.
    """

    def __init__(
        self, in_channels: int, out_channels: int, expansion: int, upsample: bool, use_se: bool,
        bn_momentum: float, bn_eps: float, kernel_size: int = 5,
    ):
        super().__init__()
        if upsample:
            self.skip = UpsampleSkip(in_channels, out_channels)
        else:
            assert in_channels == out_channels, "a normal cell keeps its channel count"
            self.skip = nn.Identity()
        self.upsample = upsample
        hidden = round(in_channels * expansion)
        bn = dict(eps=bn_eps, momentum=bn_momentum)
        self.bn_in = BatchNorm2d(in_channels, **bn)
        self.conv_expand = Conv2d(in_channels, hidden, 1, bias=False, weight_norm=False)
        self.bn_expand = BatchNorm2d(hidden, **bn)
        self.conv_depthwise = Conv2d(
            hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False, weight_norm=False
        )
        self.bn_depthwise = BatchNorm2d(hidden, **bn)
        self.conv_project = Conv2d(hidden, out_channels, 1, bias=False, weight_norm=False)
        self.bn_out = BatchNorm2d(out_channels, **bn)
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H', W'] (H' = 2H when upsampling)."""
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv_expand(self.bn_in(x))
        x = self.conv_depthwise(F.silu(self.bn_expand(x)))
        x = self.conv_project(F.silu(self.bn_depthwise(x)))
        return self.bn_out(x)


# ----------------------------------------------------------------------------------------------
# Small heads and combiners.


class EncoderCombiner(nn.Module):
    """Posterior feature for a group: enc_feature + 1×1 conv(decoder state) (WN, bias)."""

    def __init__(self, dec_channels: int, enc_channels: int):
        super().__init__()
        self.conv = Conv2d(dec_channels, enc_channels, 1, bias=True)

    def forward(self, enc_feature: torch.Tensor, dec_state: torch.Tensor) -> torch.Tensor:
        """[B, C_enc, h, w], [B, C_dec, h, w] → [B, C_enc, h, w]."""
        return enc_feature + self.conv(dec_state)


class DecoderCombiner(nn.Module):
    """New decoder state: 1×1 conv(concat(state, z)) (C_dec + L → C_dec, WN, bias)."""

    def __init__(self, dec_channels: int, latent_channels: int):
        super().__init__()
        self.conv = Conv2d(dec_channels + latent_channels, dec_channels, 1, bias=True)

    def forward(self, dec_state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[B, C_dec, h, w], [B, L, h, w] → [B, C_dec, h, w]."""
        return self.conv(torch.cat([dec_state, z], dim=1))


class ELUConv(nn.Module):
    """ELU → conv (WN, bias), optionally followed by another ELU (the encoder's enc0 head)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, elu_after: bool = False):
        super().__init__()
        self.elu = ELU()  # no parameters: the state dict is the conv's
        self.conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.elu_after = elu_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H', W']."""
        x = self.conv(self.elu(x))
        return self.elu(x) if self.elu_after else x
