"""Building blocks shared by every network here: the weight-normalized conv, Swish and ELU.

`Conv2d` is the one convolution class of the project. It is what the spectral regularizer
(`models/spectral.py`) collects, so every conv of the NVAE and of the energy networks must be one,
including the convs that do not use weight normalization (the NVAE's MBConv convs).

Both the forward pass and the spectral regularizer need each conv's normalized kernel. A training forward
keeps a weak reference to the kernel it computed (`regularized_weight` hands it out while it is alive and
the weights are unchanged), so the regularizer does not normalize every kernel a second time.

On the CPU in fp32, the plain stride-1 depthwise convs (the NVAE cells' 5×5) run through `DepthwiseConv2d`,
whose backward is about twice as fast as oneDNN's there (`Conv2d.fast_depthwise_grad` says which convs qualify).
`elu` (and the `ELU` module) is likewise computed on the CPU without PyTorch's scalar `expm1` (3.5–6× faster
there). `bench.py cpu-paths` times both paths against PyTorch's own.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, x·sigmoid(x)."""
    return F.silu(x)


class Swish(nn.Module):
    """Swish (SiLU) as a module: x·sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[*] → [*], element-wise x·sigmoid(x)."""
        return F.silu(x)


class LipSwish(nn.Module):
    """x·sigmoid(x)/1.1, the 1-Lipschitz Swish of the VAEBM energy networks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[*] → [*], element-wise x·sigmoid(x)/1.1 (1-Lipschitz)."""
        return F.silu(x) / 1.1


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU with α = 1: x for x > 0, exp(x) − 1 otherwise. [*] → [*].

    PyTorch's CPU ELU calls `expm1` element by element, unvectorized: 3.5–6× slower forward and backward than
    exp(min(x, 0)) − 1 + relu(x) with the gradient taken from the output (`_CPUELU`), which this uses on the
    CPU. The two differ by at most one rounding of exp(x) − 1 (6e-8 in fp32). Under `torch.compile` and on
    other devices it is `F.elu`.
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CPUELU.apply(x)
    return F.elu(x)


class ELU(nn.Module):
    """`elu` as a module. `cpu_fast_path = False` makes it `F.elu` everywhere (`bench.py cpu-paths` compares the
    two in whole training steps, as `Conv2d.fast_depthwise_grad` does for the depthwise backward)."""

    def __init__(self):
        super().__init__()
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[*] → [*], element-wise."""
        return elu(x) if self.cpu_fast_path else F.elu(x)


class _CPUELU(torch.autograd.Function):
    """ELU (α = 1) from vectorized ops; the gradient from the output: dy/dx = 1 for x > 0, y + 1 otherwise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(x.clamp(max=0)).sub_(1).add_(F.relu(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        # Differentiable in y too, so double backpropagation works as through `F.elu`.
        return torch.ops.aten.elu_backward(grad_out, 1.0, 1.0, 1.0, True, y)


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor across processes when a process group is up (data-dependent init)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


class Conv2d(nn.Conv2d):
    """2-D convolution with optional weight normalization and data-dependent initialization.

    With `weight_norm=True` the effective kernel is exp(log_g)·v/(‖v‖ + 1e-5), the norm taken per
    output channel over (C_in, kh, kw), with log_g initialized to log(‖v_init‖ + 0.01) so the initial
    kernel matches PyTorch's default initialization. `self.weight` holds v.

    With `data_init=True`, the first forward pass in training mode sets bias and log_g so the
    layer's outputs have per-channel mean 0 and std 0.2 on that batch (s = 5·std), averaged across
    processes. `data_init_done` is a buffer, so a loaded checkpoint is never re-initialized. Forward reads
    it only until it is set (then a Python flag answers), so a compiled forward holds no data-dependent
    branch and a GPU forward no host sync.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        weight_norm: bool = True,
        data_init: bool = False,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.use_weight_norm = weight_norm
        self.data_init = data_init and weight_norm
        if weight_norm:
            init_norm = self._weight_norm(self.weight.detach())
            self.log_weight_norm = nn.Parameter(torch.log(init_norm + 1e-2))
        else:
            self.register_parameter("log_weight_norm", None)
        self.register_buffer("data_init_done", torch.tensor(not self.data_init), persistent=True)
        self._init_pending = self.data_init  # False once `data_init_done` is known to be set (see `forward`)
        self._forward_weight = None  # (weak reference to the last training forward's kernel, parameter versions)
        # A plain stride-1 depthwise conv (the NVAE cells' 5×5) takes the faster kernel gradient on the CPU.
        self.fast_depthwise_grad = (groups == in_channels == out_channels > 1 and self.stride == (1, 1)
                                 and bias is False and not weight_norm and not isinstance(self.padding, str)
                                 and all(p <= d * (k - 1) for p, d, k in zip(self.padding, self.dilation,
                                                                              self.kernel_size)))

    @staticmethod
    def _weight_norm(weight: torch.Tensor) -> torch.Tensor:
        """Per-output-channel L2 norm, shaped [C_out, 1, 1, 1]."""
        return weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def effective_weight(self) -> torch.Tensor:
        """The kernel the convolution applies, [C_out, C_in/groups, kh, kw]."""
        if not self.use_weight_norm:
            return self.weight
        # Fold the per-channel factors first: one full-size multiply instead of two full-size ops.
        scale = torch.exp(self.log_weight_norm) / (self._weight_norm(self.weight) + 1e-5)
        return self.weight * scale

    def regularized_weight(self) -> torch.Tensor:
        """The kernel for the spectral regularizer: the one the last forward pass used while its graph is
        alive and the weights have not changed since, else a freshly computed one (the same values)."""
        if self._forward_weight is not None:
            reference, versions = self._forward_weight
            weight = reference()
            if weight is not None and versions == self._parameter_versions():
                return weight
        return self.effective_weight()

    def _parameter_versions(self) -> tuple[int, ...]:
        """Identities and in-place-update counters of the parameters the kernel is computed from."""
        weight, log_g = self.weight, self.log_weight_norm
        return id(weight), weight._version, id(log_g), log_g._version

    @torch.compiler.disable  # once per layer: never worth compiling
    def _initialize_if_needed(self, x: torch.Tensor) -> None:
        """The data-dependent init, unless the `data_init_done` buffer (e.g. loaded) says it ran already."""
        if bool(self.data_init_done):
            self._init_pending = False
        else:
            self._initialize_from_data(x)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._init_pending = self.data_init  # the loaded flag is read at the next training forward

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) must not point at this layer's kernel.
        return {**self.__dict__, "_forward_weight": None}

    @torch.no_grad()
    def _initialize_from_data(self, x: torch.Tensor) -> None:
        unit_weight = self.weight / (self._weight_norm(self.weight) + 1e-5)
        out = F.conv2d(x, unit_weight, None, self.stride, self.padding, self.dilation, self.groups)
        # Pool first and second moments across processes (averaging per-rank stds would be biased).
        mean = _all_reduce_mean(out.float().mean(dim=(0, 2, 3)))
        mean_sq = _all_reduce_mean(out.float().square().mean(dim=(0, 2, 3)))
        std = (mean_sq - mean.square()).clamp_min(0).sqrt()
        scale = 5.0 * std
        if self.bias is not None:
            self.bias.copy_(-mean / (scale + 1e-5))
        self.log_weight_norm.copy_(-torch.log(scale + 1e-5).view(-1, 1, 1, 1))
        self.data_init_done.fill_(True)
        self._init_pending = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H', W'] (data-dependent init on the first training call)."""
        if self.training and self._init_pending:  # a Python flag: compiled code holds no branch on a tensor
            self._initialize_if_needed(x)
        weight = self.effective_weight()
        # Kept weakly: it dies with the graph (after backward, or at once under no_grad or activation
        # checkpointing), so it never holds memory. Compiled code keeps nothing (the regularizer recomputes).
        if self.use_weight_norm and weight.requires_grad and not torch.compiler.is_compiling():
            self._forward_weight = (weakref.ref(weight), self._parameter_versions())
        # In fp32 only: in bf16 the per-image kernel gradients would be rounded before they are summed.
        if (self.fast_depthwise_grad and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return DepthwiseConv2d.apply(x, weight, self.padding, self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DepthwiseConv2d(torch.autograd.Function):
    """A stride-1 depthwise convolution without bias, [B, C, H, W] → [B, C, H', W'], kernel [C, 1, kh, kw],
    whose backward runs as forward convolutions (forward and backward together 1.7–2.3× faster on the CPU).

    oneDNN computes the kernel gradient of a channels-last depthwise conv 10–20× slower than the conv itself
    on the CPU (README, "Benchmarks"). That gradient, dW[c, i, j] = Σ_b Σ_hw x_pad[b, c, h + d·i, w + d·j]
    · g[b, c, h, w], is for each image a depthwise convolution of its channels with their own output
    gradients as kernels; summed over the images. The input gradient is the convolution of the output
    gradient with the flipped kernel. Both use differentiable ops, so double backpropagation works as
    through `F.conv2d`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int],
                dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, None, 1, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        channels, (kh, kw), (ph, pw), (dh, dw) = weight.shape[0], weight.shape[2:], ctx.padding, ctx.dilation
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            flipped_padding = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)  # ≥ 0, see `Conv2d.__init__`
            grad_x = F.conv2d(grad_out, weight.flip(2, 3), None, 1, flipped_padding, ctx.dilation, channels)
        if ctx.needs_input_grad[1]:
            kernels = grad_out.transpose(0, 1)  # [C, B, H', W']: image b's kernels are kernels[:, b:b + 1]
            # The forward's dilation becomes the stride: output position (i, j) reads x at offset d·(i, j).
            grad_weight = sum(F.conv2d(x[b:b + 1], kernels[:, b:b + 1], None, ctx.dilation, ctx.padding, 1,
                                       channels) for b in range(x.shape[0])).transpose(0, 1)
        return grad_x, grad_weight, None, None
