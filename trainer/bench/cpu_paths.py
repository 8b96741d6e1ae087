"""The CPU fast paths of `models/layers.py` against PyTorch's own ops (README, Benchmarks): the depthwise
convolutions' backward (`DepthwiseConv2d` against oneDNN's) and ELU (`elu` against `F.elu`), per input shape of a
model and over whole NVAE training steps.

    python scripts/bench.py cpu-paths --config nvae-bench-small --batch-size 8

Every measurement alternates the two in one process (a shared CPU's speed drifts between runs): each shape's
forward + backward, and whole steps (`bench.py nvae`'s step) with every layer of the model that takes the path
switched between the two, A B A B. Outputs and gradients of both are compared on every shape.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ELU, Conv2d, DepthwiseConv2d, elu
from models.nvae import NVAEConfig
from trainer.bench.nvae import training_step

SWITCHES = {"depthwise": "fast_depthwise_grad", "elu": "cpu_fast_path"}  # each path's on/off attribute of a layer


def bench_cpu_paths(config: NVAEConfig, batch_size: int, repeats: int = 10, steps: int = 6,
                    warmup: int = 2) -> dict:
    """For each path ("depthwise", "elu") of the NVAE `config` at `batch_size`: per distinct input shape, the
    median forward + backward time of PyTorch's op and of ours over `repeats` alternating pairs and the largest
    relative difference of their outputs and gradients; then `steps` alternating pairs of whole training steps
    after `warmup`, the path off and on in every layer that takes it.
    Returns {path: {"shapes": [...], "step_s_stock", "step_s_ours", "step_speedup"}, "batch_size"} (medians)."""
    torch.manual_seed(0)
    model, take_step = training_step(config, batch_size, torch.device("cpu"))
    layers = {"depthwise": [m for m in model.modules() if isinstance(m, Conv2d) and m.fast_depthwise_grad],
              "elu": [m for m in model.modules() if isinstance(m, ELU)]}
    for path, taking in layers.items():
        if not taking:
            raise ValueError(f"the model has no layer that takes the {path} path")
    inputs = _record_inputs(layers, take_step)  # also the data-dependent init

    result: dict = {}
    for _ in range(warmup):
        take_step()
    for path, taking in layers.items():
        shapes = []
        for shape, layer in inputs[path]:
            if path == "depthwise":
                stock, ours = _depthwise_pair(shape, layer)
                described = {"input": list(shape), "kernel": list(layer.kernel_size)}
            else:
                stock, ours = _elu_pair(shape)
                described = {"input": list(shape)}
            shapes.append(described | _compare(stock, ours, repeats))
        stock_step, ours_step = _alternate(_steps_with(taking, path, False, take_step),
                                           _steps_with(taking, path, True, take_step), steps)
        result[path] = {"shapes": shapes, "step_s_stock": stock_step, "step_s_ours": ours_step,
                        "step_speedup": stock_step / ours_step}
    return result | {"batch_size": batch_size}


def _record_inputs(layers: dict[str, list[nn.Module]], take_step: Callable) -> dict[str, list]:
    """One training step with hooks: per path, [(input shape, a layer it came from)] for each distinct
    (shape, padding, dilation, kernel), sorted."""
    seen: dict[str, dict] = {path: {} for path in layers}

    def recorder(path: str):
        def record(layer, args, out) -> None:
            shape = tuple(args[0].shape)
            key = (shape, layer.padding, layer.dilation, layer.kernel_size) if path == "depthwise" else (shape,)
            seen[path].setdefault(key, (shape, layer))
        return record

    hooks = [m.register_forward_hook(recorder(path)) for path, taking in layers.items() for m in taking]
    take_step()
    for hook in hooks:
        hook.remove()
    return {path: [seen[path][key] for key in sorted(seen[path])] for path in layers}


def _depthwise_pair(shape: tuple, layer: Conv2d) -> tuple[Callable, Callable]:
    """oneDNN's depthwise conv and `DepthwiseConv2d` on one input shape: each returns (output, grads)."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    padding, dilation, channels = layer.padding, layer.dilation, shape[1]
    grad_out = torch.randn_like(F.conv2d(x, weight, None, 1, padding, dilation, channels))

    def stock():
        out = F.conv2d(x, weight, None, 1, padding, dilation, channels)
        return (out, *torch.autograd.grad(out, (x, weight), grad_out))

    def ours():
        out = DepthwiseConv2d.apply(x, weight, padding, dilation)
        return (out, *torch.autograd.grad(out, (x, weight), grad_out))

    return stock, ours


def _elu_pair(shape: tuple) -> tuple[Callable, Callable]:
    """`F.elu` and `elu` on one input shape (values of both signs): each returns (output, grad)."""
    x = (3 * torch.randn(shape)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad_out = torch.randn_like(x)

    def pair(fn):
        def run():
            out = fn(x)
            return (out, *torch.autograd.grad(out, x, grad_out))
        return run

    return pair(F.elu), pair(elu)


def _compare(stock: Callable, ours: Callable, repeats: int) -> dict:
    """Median times of both over `repeats` alternating pairs and the largest relative difference of their
    results (output, then gradients), each relative to the stock result's largest magnitude."""
    times = _alternate(stock, ours, repeats)
    difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(_detached(ours()), _detached(stock())))
    return {"stock_s": times[0], "ours_s": times[1], "speedup": times[0] / times[1],
            "max_rel_difference": difference}


def _detached(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.detach() for t in tensors]


def _steps_with(layers: list[nn.Module], path: str, on: bool, take_step: Callable) -> Callable:
    """A training step with `path` switched on or off in `layers`."""
    def run():
        for layer in layers:
            setattr(layer, SWITCHES[path], on)
        return take_step()
    return run


def _alternate(first: Callable, second: Callable, repeats: int) -> tuple[float, float]:
    """Median wall time of `first()` and of `second()`, called alternately `repeats` times each."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
