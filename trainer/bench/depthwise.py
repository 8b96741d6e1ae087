"""The depthwise convolutions' backward on the CPU: oneDNN's against `models.layers.DepthwiseConv2d` (README,
Benchmarks), per convolution shape of a model and over whole NVAE training steps.

    python scripts/bench.py depthwise --config nvae-bench-small --batch-size 8

Both measurements alternate the two backwards in one process (a shared CPU's speed drifts between runs):
each shape's forward + backward, and whole steps (`bench.py nvae`'s step) with every plain depthwise conv of
the model switched between the two, A B A B. The gradients of both are compared on every shape.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from models.layers import Conv2d, DepthwiseConv2d
from models.nvae import NVAEConfig
from trainer.bench.nvae import training_step


def bench_depthwise(config: NVAEConfig, batch_size: int, repeats: int = 10, steps: int = 6,
                    warmup: int = 2) -> dict:
    """Per distinct depthwise conv of the NVAE `config` at `batch_size`: the median forward + backward time of
    `F.conv2d` (oneDNN) and of `DepthwiseConv2d` over `repeats` alternating pairs, and the largest relative
    difference of their gradients; then `steps` alternating pairs of whole training steps after `warmup`.
    Returns {"shapes": [...], "step_s_onednn", "step_s_forward_convs", "step_speedup"} (medians)."""
    torch.manual_seed(0)
    model, take_step = training_step(config, batch_size, torch.device("cpu"))
    depthwise = [m for m in model.modules() if isinstance(m, Conv2d) and m.fast_depthwise_grad]
    if not depthwise:
        raise ValueError("the model has no plain depthwise convolution")
    inputs: dict[tuple, Conv2d] = {}

    def record(layer, args, out) -> None:
        inputs.setdefault((tuple(args[0].shape), layer.padding, layer.dilation, layer.kernel_size), layer)

    hooks = [m.register_forward_hook(record) for m in depthwise]
    take_step()  # also the data-dependent init
    for hook in hooks:
        hook.remove()

    shapes = []
    for (shape, padding, dilation, kernel), layer in sorted(inputs.items()):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        weight = layer.weight.detach().clone().requires_grad_(True)
        grad_out = torch.randn_like(F.conv2d(x, weight, None, 1, padding, dilation, shape[1]))

        def onednn():
            out = F.conv2d(x, weight, None, 1, padding, dilation, shape[1])
            return torch.autograd.grad(out, (x, weight), grad_out)

        def forward_convs():
            return torch.autograd.grad(DepthwiseConv2d.apply(x, weight, padding, dilation), (x, weight), grad_out)

        times = _alternate(onednn, forward_convs, repeats)
        difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(forward_convs(), onednn()))
        shapes.append({"input": list(shape), "kernel": list(kernel), "onednn_s": times[0],
                       "forward_convs_s": times[1], "speedup": times[0] / times[1],
                       "max_rel_grad_difference": difference})

    def use_forward_convs(on: bool):
        def run():
            for m in depthwise:
                m.fast_depthwise_grad = on
            return take_step()
        return run

    for _ in range(warmup):
        take_step()
    onednn_step, forward_convs_step = _alternate(use_forward_convs(False), use_forward_convs(True), steps)
    return {"shapes": shapes, "step_s_onednn": onednn_step, "step_s_forward_convs": forward_convs_step,
            "step_speedup": onednn_step / forward_convs_step, "batch_size": batch_size}


def _alternate(first, second, repeats: int) -> tuple[float, float]:
    """Median wall time of `first()` and of `second()`, called alternately `repeats` times each."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
