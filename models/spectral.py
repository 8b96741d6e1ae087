"""Spectral regularization: the sum of the largest singular values of every conv kernel.

Each `Conv2d`'s effective kernel is reshaped to a matrix [C_out, C_in·kh·kw] (the norm of the
reshaped kernel, not the operator norm of the convolution, as in NVAE and VAEBM). Matrices of equal
shape are stacked and run through one batched power iteration, so the cost is one small batched
matmul per distinct shape rather than one per layer. The singular vectors u, v persist across calls
as buffers (and so in checkpoints): the first call runs `first_iterations` (40), later calls
`iterations` (4).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import Conv2d


class SpectralRegularizer(nn.Module):
    """Σ_i σ_max(W_i) over the given convs, differentiable in the weights.

    The convs are held in a plain list (not registered as submodules) so their parameters are not
    duplicated in the owner's state dict; only the u/v buffers of each shape group are.
    """

    def __init__(self, convs: list[Conv2d], iterations: int = 4, first_iterations: int = 40):
        super().__init__()
        groups: "OrderedDict[tuple[int, int], list[Conv2d]]" = OrderedDict()
        for conv in convs:
            rows = conv.out_channels
            cols = conv.weight[0].numel()
            groups.setdefault((rows, cols), []).append(conv)
        self._groups = list(groups.values())
        self.iterations = iterations
        self.first_iterations = first_iterations
        for index, ((rows, cols), members) in enumerate(groups.items()):
            u = F.normalize(torch.randn(len(members), rows), dim=1, eps=1e-3)
            v = F.normalize(torch.randn(len(members), cols), dim=1, eps=1e-3)
            self.register_buffer(f"u{index}", u)
            self.register_buffer(f"v{index}", v)
        self.register_buffer("warm", torch.tensor(False))

    @property
    def num_layers(self) -> int:
        return sum(len(members) for members in self._groups)

    def forward(self) -> torch.Tensor:
        """Sum of the spectral norms (a scalar), advancing the power iteration in place."""
        iterations = self.iterations if bool(self.warm) else self.first_iterations
        total = None
        for index, members in enumerate(self._groups):
            weights = torch.stack([conv.effective_weight().flatten(1) for conv in members])  # [G, R, C]
            u, v = getattr(self, f"u{index}"), getattr(self, f"v{index}")
            with torch.no_grad():
                w = weights.detach().float()
                for _ in range(iterations):
                    v = F.normalize(torch.einsum("gr,grc->gc", u, w), dim=1, eps=1e-3)
                    u = F.normalize(torch.einsum("grc,gc->gr", w, v), dim=1, eps=1e-3)
                getattr(self, f"u{index}").copy_(u)
                getattr(self, f"v{index}").copy_(v)
            sigma = torch.einsum("gr,grc,gc->g", u.to(weights.dtype), weights, v.to(weights.dtype))
            total = sigma.sum() if total is None else total + sigma.sum()
        self.warm.fill_(True)
        if total is None:
            return torch.zeros(())
        return total


def collect_convs(module: nn.Module) -> list[Conv2d]:
    """Every `Conv2d` in `module`, in registration order."""
    return [m for m in module.modules() if isinstance(m, Conv2d)]
