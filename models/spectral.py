"""Spectral regularization: the sum of the largest singular values of every conv kernel (and linear weight).

Each `Conv2d`'s effective kernel is reshaped to a matrix [C_out, C_in·kh·kw] (the norm of the
reshaped kernel, not the operator norm of the convolution, as in NVAE and VAEBM); an `nn.Linear`'s weight is
its matrix [out, in] (the MLP energies of the 2-D toys). Matrices of equal
shape are stacked and run through one batched power iteration, so the cost is one small batched
matmul per distinct shape rather than one per layer. The singular vectors u, v persist across calls
as buffers (and so in checkpoints): the first call runs `first_iterations` (40), later calls
`iterations` (4).

Cost: the kernels are those of the forward pass when its graph is still alive (`Conv2d.regularized_weight`),
so weight normalization is not computed twice, and gradients reach the weights through the forward's own
normalization. Each shape group runs all its iterations back to back (its matrices stay in cache) with
plain batched matmuls. Padding different shapes into fewer, larger stacks was weighed and left out: for
`nvae-bench-small` it halves the 31 groups only at the price of 1.4–1.6× the matrix elements read per
iteration.
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

    def __init__(self, convs: list[Conv2d | nn.Linear], iterations: int = 4, first_iterations: int = 40):
        super().__init__()
        groups: "OrderedDict[tuple[int, int], list[Conv2d]]" = OrderedDict()
        for conv in convs:
            rows = conv.weight.shape[0]
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
        self._known_warm = False  # True once `warm` is known to be set (see `forward`)

    @property
    def num_layers(self) -> int:
        """Number of layers whose spectral norms are regularized."""
        return sum(len(members) for members in self._groups)

    def forward(self) -> torch.Tensor:
        """Sum of the spectral norms (a scalar), advancing the power iteration in place."""
        if self._known_warm:  # a Python flag: compiled code holds no branch on a tensor
            return self._spectral_sum(self.iterations)
        return self._first_call()

    @torch.compiler.disable  # once per run: compiling its 40 unrolled iterations would not pay
    def _first_call(self) -> torch.Tensor:
        """The first call (or the first after a load): the `warm` buffer says whether the iteration ran before."""
        return self._spectral_sum(self.iterations if bool(self.warm) else self.first_iterations)

    def _spectral_sum(self, iterations: int) -> torch.Tensor:
        total = None
        for index, members in enumerate(self._groups):
            weights = torch.stack([_matrix(layer) for layer in members])  # [G, R, C]
            u_buffer, v_buffer = getattr(self, f"u{index}"), getattr(self, f"v{index}")
            u, v = power_iteration(weights.detach().float(), u_buffer, v_buffer, iterations)
            with torch.no_grad():
                u_buffer.copy_(u)
                v_buffer.copy_(v)
            u, v = u.to(weights.dtype), v.to(weights.dtype)
            sigma = torch.bmm(torch.bmm(u.unsqueeze(1), weights), v.unsqueeze(2))  # uᵀ W v, [G, 1, 1]
            total = sigma.sum() if total is None else total + sigma.sum()
        self.warm.fill_(True)
        self._known_warm = True
        if total is None:
            return torch.zeros(())
        return total

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_warm = False  # the loaded flag is read at the next call


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The matrix whose spectral norm is regularized: a Linear's weight, a Conv2d's kernel as [C_out, C_in·kh·kw]."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    return layer.regularized_weight().flatten(1)


@torch.no_grad()
def power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int,
                    eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """`iterations` rounds of v ← wᵀu/‖wᵀu‖, u ← wv/‖wv‖ on stacked matrices w [G, R, C] from u [G, R],
    v [G, C]; returns the new (u, v). Norms below `eps` are taken as `eps` (F.normalize's rule)."""
    for _ in range(iterations):
        v = _normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), eps)
        # w v written as vᵀwᵀ: the same products, but the batched GEMV with the vector on the left runs
        # about 10× faster on a CPU (oneDNN/MKL take a slow path for [G, R, C] @ [G, C, 1]).
        u = _normalize(torch.bmm(v.unsqueeze(1), w.transpose(1, 2)).squeeze(1), eps)
    return u, v


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """F.normalize(x, dim=1, eps=eps) in one op fewer: x / max(‖x_row‖, eps), x [G, N]."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)


def collect_convs(module: nn.Module) -> list[Conv2d]:
    """Every `Conv2d` in `module`, in registration order."""
    return [m for m in module.modules() if isinstance(m, Conv2d)]
