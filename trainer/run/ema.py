"""Exponential moving average of a model's weights (buffers such as BN statistics are copied)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Keeps `shadow`, a frozen copy of `model` whose parameters track an EMA of the model's.

    Update: shadow ← shadow + (1 − decay)·(param − shadow), after each optimizer step. Buffers
    (BN running statistics, spectral u/v) are copied as they are: they are statistics, not weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step of the parameters towards `model`'s; buffers are copied."""
        shadow_params = [p for p in self.shadow.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(shadow_params, params, 1.0 - self.decay)
        for shadow_buffer, buffer in zip(self.shadow.buffers(), model.buffers()):
            shadow_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow model's state dict."""
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the shadow model's state dict."""
        self.shadow.load_state_dict(state)
